"""The package tree is the architecture: these rules keep each layer to what it may know.

They read the imports of every module (including imports inside functions) without running any code,
so a rule broken anywhere fails here. `docs/architecture.md` states the same rules.
"""

from __future__ import annotations

import ast
import shutil
from pathlib import Path

PACKAGE = "pie_driver_trtllm"
ROOT = Path(__file__).resolve().parents[1] / PACKAGE
MAX_MODULE_LINES = 450  # "about 400": a file past it is asking to be split along a seam


def module_name(root: Path, path: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules(root: Path) -> dict[str, Path]:
    return {module_name(root, path): path for path in sorted(root.rglob("*.py"))}


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """Every module `name` imports: package modules by full name, outside ones by their top-level name."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            for alias in node.names:  # `from pkg import module` names the module, not the package
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base)
    return {m if m.startswith(PACKAGE) else m.split(".")[0] for m in found}


def in_layer(module: str, *layers: str) -> bool:
    return any(module == f"{PACKAGE}.{layer}" or module.startswith(f"{PACKAGE}.{layer}.") for layer in layers)


def rule_breaks(root: Path) -> list[str]:
    """One line per import that breaks a layering rule, and one per import cycle."""
    mods = modules(root)
    graph = {name: imports_of(name, path, set(mods)) for name, path in mods.items()}
    breaks: list[str] = []

    def forbid(layer: str, targets: tuple[str, ...], outside: tuple[str, ...], why: str) -> None:
        for name, deps in graph.items():
            if not in_layer(name, layer):
                continue
            for dep in sorted(deps):
                if in_layer(dep, *targets) or dep in outside:
                    breaks.append(f"{name} imports {dep}: {why}")

    forbid("wire", (), ("torch", "tensorrt_llm"), "wire/ sits below every other layer")
    wire_may_import = {PACKAGE, f"{PACKAGE}.sampler"}  # and wire/ itself: an allow-list, as documented
    for name, deps in graph.items():
        if in_layer(name, "wire"):
            breaks.extend(f"{name} imports {dep}: wire/ imports only wire/, sampler.py and the package root"
                          for dep in sorted(deps)
                          if dep.startswith(PACKAGE) and not in_layer(dep, "wire") and dep not in wire_may_import)
    forbid("engines", ("wire", "core", "serving", "replicas", "tools", "benchmarks", "client"),
           ("zmq", "msgspec", "msgpack"), "engines know no wire format and no socket")
    forbid("core", ("serving", "replicas", "tools", "benchmarks", "client"), ("zmq",), "core/ knows no transport")
    for name, deps in graph.items():
        for dep in sorted(deps):
            if in_layer(dep, "tools") and not in_layer(name, "tools"):
                breaks.append(f"{name} imports {dep}: nothing below tools/ imports tools/")
            if in_layer(dep, "benchmarks") and not in_layer(name, "benchmarks", "tools"):
                breaks.append(f"{name} imports {dep}: only tools/ runs the benchmarks")
    breaks.extend(f"import cycle: {' -> '.join(cycle)}" for cycle in cycles(graph))
    return breaks


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per strongly connected group of package modules that import each other."""
    found: list[list[str]] = []
    done: set[str] = set()

    def visit(node: str, path: list[str]) -> None:
        if node in path:
            found.append([*path[path.index(node):], node])
            return
        if node in done or node not in graph:
            return
        for dep in sorted(graph[node]):
            visit(dep, [*path, node])
        done.add(node)

    for node in sorted(graph):
        visit(node, [])
    return found


def test_the_package_keeps_every_layering_rule() -> None:
    assert rule_breaks(ROOT) == []


def test_a_bad_import_is_caught(tmp_path: Path) -> None:
    copy = tmp_path / PACKAGE
    shutil.copytree(ROOT, copy, ignore=shutil.ignore_patterns("__pycache__"))
    base = copy / "engines" / "base.py"
    base.write_text(base.read_text() + "\nfrom pie_driver_trtllm.wire.codec import decode_frame  # noqa\n")
    core = copy / "core" / "lookahead.py"
    core.write_text(core.read_text() + "\n\ndef _late():\n    import zmq  # noqa\n")
    histories = copy / "core" / "histories.py"
    histories.write_text(histories.read_text() + "\nfrom pie_driver_trtllm.core import lookahead  # noqa\n")
    lookahead = copy / "core" / "lookahead.py"
    lookahead.write_text(lookahead.read_text() + "\nfrom pie_driver_trtllm.core import histories  # noqa\n")
    limits = copy / "wire" / "limits.py"  # a module no deny-list names: the allow-list catches it
    limits.write_text(limits.read_text() + "\nfrom pie_driver_trtllm import origin  # noqa\n")
    breaks = rule_breaks(copy)
    assert any("wire.limits imports pie_driver_trtllm.origin" in b for b in breaks), breaks
    assert any("engines.base imports pie_driver_trtllm.wire.codec" in b for b in breaks), breaks
    assert any("core.lookahead imports zmq" in b for b in breaks), breaks
    assert any(b.startswith("import cycle") and "core.histories" in b for b in breaks), breaks


def test_no_module_is_past_the_size_that_asks_for_a_split() -> None:
    sizes = {name: len(path.read_text().splitlines()) for name, path in modules(ROOT).items()}
    assert {name: n for name, n in sizes.items() if n > MAX_MODULE_LINES} == {}
