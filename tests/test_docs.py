"""The documents must not drift from the code: every claim here is one a test can check.

Files and modules named in README.md and docs/ exist, CLI verbs are the command line's, config keys are
the config's, error codes are the driver's, and the handshake, `caps` and `stats` fields documented in
docs/protocol.md are exactly the ones a driver sends.
"""

from __future__ import annotations

import importlib
import re
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import typer.main
from conftest import write_config

from pie_driver_trtllm.client import DriverProcess, spawn
from pie_driver_trtllm.config import (
    DriverOptions,
    DriverSection,
    ModelSection,
    StartupError,
    option_table_markdown,
    parse_config,
)
from pie_driver_trtllm.replicas.batches import router_caps
from pie_driver_trtllm.serving.server import TAKEOVER_S
from pie_driver_trtllm.wire.errors import ErrorCode

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
PAGES = [ROOT / "README.md", *sorted(DOCS.glob("*.md"))]
PACKAGE = ROOT / "pie_driver_trtllm"
START = "<!-- config-table:start -->"
END = "<!-- config-table:end -->"
OPS = ("handshake", "forward", "fork", "truncate", "release", "health", "stats", "shutdown", "load_weights", "sleep",
       "wake", "step")
CONFIG_SECTIONS = {"model": ModelSection, "driver": DriverSection, "driver.options": DriverOptions}

# Bare file names in the pages that are not part of this tree: other projects' sources (tensorrt-llm.md
# cites the files it read), files a user or a run makes, and the normative contract kept with the host.
# A path with folders is checked when its first folder is one of ours, and taken as another project's
# otherwise.
NOT_OURS = {
    "llm_args.py", "llm_request.py", "sampling_params.py", "bootstrap.py", "seq_slot_manager.py",
    "test_llm.py", "_lib.py", "llm_generate_distributed.py", "config.json", "drivers.toml", ".demo/",
    "protocol-v1.md",
}
# Upper-case names in backticks that are not error codes: sockets, signals, environment variables, ...
NOT_CODES = {"DEALER", "REQ", "ROUTER", "ROUTER_MANDATORY", "ZMQ_MAXMSGSIZE", "SIGINT", "SIGTERM",
             "PR_SET_PDEATHSIG", "LLM", "HOST", "PATH", "LD_LIBRARY_PATH", "CUDA_VISIBLE_DEVICES",
             "OMP_NUM_THREADS", "VIRTUAL_ENV", "PIE_HOME", "PIE_PYTHON", "PIE_DRIVER_FAULTS",
             "PIE_TRTLLM_LD_LIBRARY_PATH_BOOTSTRAPPED"}


def page_text(path: Path) -> str:
    return path.read_text(encoding="utf-8")


def quoted(path: Path) -> Iterator[str]:
    """Every `backticked` span of a page."""
    yield from re.findall(r"`([^`\n]+)`", page_text(path))


def section(text: str, heading: str) -> str:
    """The body of the markdown section whose heading starts with `heading`, up to the next heading."""
    match = re.search(rf"^#+ {re.escape(heading)}.*?$(.*?)(?=^#+ |\Z)", text, re.M | re.S)
    assert match, f"no section {heading!r}"
    return match.group(1)


def first_column(table_text: str) -> list[str]:
    """Backticked names in the first column of every markdown table row of `table_text`."""
    names = []
    for line in table_text.splitlines():
        if line.startswith("| `"):
            names += re.findall(r"`([^`]+)`", re.split(r"(?<!\\)\|", line)[1])  # `\|` is a pipe inside a cell
    return names


# ---------------------------------------------------------------- configuration


def test_configuration_table_matches_code() -> None:
    text = page_text(DOCS / "configuration.md")
    assert text.count(START) == 1 and text.count(END) == 1, "exactly one pair of config-table markers"
    between = text.split(START, 1)[1].split(END, 1)[0]
    assert between.startswith("\n"), "the table starts on the line after the start marker"
    assert between[1:] == option_table_markdown(), (
        "docs/configuration.md is stale: paste pie_driver_trtllm.config.option_table_markdown() "
        "between the markers")


def config_keys() -> set[str]:
    return {f"{section}.{name}" for section, cls in CONFIG_SECTIONS.items() for name in cls.__struct_fields__}


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_config_keys_named_exist(page: Path) -> None:
    text = page_text(page)
    if page.name == "protocol.md":  # its handshake's `model.*` and `driver.*` fields are not config keys
        text = text.replace(section(text, "5.1 handshake"), "")
    named = {q for q in re.findall(r"`([^`\n]+)`", text) if re.fullmatch(r"(model|driver(\.options)?)\.\w+", q)}
    named |= {f"driver.options.{m}" for m in re.findall(r"\[driver\.options\][^\n]*?\b(\w+) =", text)}
    assert named <= config_keys(), f"{page.name} names config keys that do not exist: {named - config_keys()}"


def test_every_option_is_explained() -> None:
    text = page_text(DOCS / "configuration.md")
    explained = text.split(START)[0] + text.split(END)[1]  # the prose, not the generated table
    words = set(re.findall(r"`([a-z_.]+)`", explained))
    missing = {key for key in config_keys() if key not in words and key.rpartition(".")[2] not in words}
    assert not missing, f"docs/configuration.md does not say what these keys do: {sorted(missing)}"
    options = set(DriverOptions.__struct_fields__)
    words = set(re.findall(r"`([a-z_.]+)`", section(text, "What each option does")))
    unknown = {w for w in words if "_" in w and "." not in w and w not in options and w not in config_keys()
               and not re.search(r"\b" + re.escape(w) + r"\b", option_table_markdown())}
    assert not unknown, f"docs/configuration.md explains keys that do not exist: {sorted(unknown)}"


READERS = {  # how a bullet of "What each option does" starts, and where its keys must be read
    "Read by the driver core and the protocol edge": ("core", "wire", "serving/driver.py", "serving/backend.py",
                                                      "engines/model_facts.py"),
    "Read by the socket server": ("serving",),
    "Only advertised in `caps`": ("serving/driver.py",),
    "Read by the reference engine": ("engines/reference",),
    "Read by the TensorRT-LLM engine": ("engines/tensorrt_llm",),
}


def package_sources(*places: str) -> str:
    paths = [p for place in places for p in ([PACKAGE / place] if place.endswith(".py") else
                                             sorted((PACKAGE / place).rglob("*.py")))]
    return "\n".join(path.read_text(encoding="utf-8") for path in paths)


def test_each_option_is_read_where_the_page_says() -> None:
    bullets = section(page_text(DOCS / "configuration.md"), "What each option does").split("\n- ")
    names = {key.rpartition(".")[2] for key in config_keys()}
    seen = set()
    for bullet in bullets:
        reader = next((r for r in READERS if bullet.startswith(r)), None)
        if reader is None:
            continue
        seen.add(reader)
        sources = package_sources(*READERS[reader])
        keys = {w.rpartition(".")[2] for w in re.findall(r"`([a-z_.]+)`", bullet)} & names
        unread = sorted(k for k in keys if not re.search(rf"\b{k}\b", sources))
        assert not unread, f"{reader}: {unread} are not read there"
        if reader.startswith("Only advertised"):
            elsewhere = package_sources(".").replace(sources, "").replace(package_sources("config.py"), "")
            assert not [k for k in keys if re.search(rf"\b{k}\b", elsewhere)], f"{keys} are read, not only advertised"
    assert seen == set(READERS), f"bullets missing from docs/configuration.md: {set(READERS) - seen}"


CONFIG_EXAMPLES = {  # each example line of docs/configuration.md, and a config that prints it
    "unknown key driver.options.lookahead": {"driver": {"options": {"lookahead": 4}}},
    "unknown table [extra]": {"extra": {}},
    "driver.options.lookahead_tokens = 99": {"driver": {"options": {"lookahead_tokens": 99}}},
    "driver.options.engine = 'vllm'": {"driver": {"options": {"engine": "vllm"}}},
    "driver.group_id = True": {"driver": {"group_id": True}},
    "driver.device entry 'gpu0'": {"driver": {"device": ["gpu0"]}},
    "model.snapshot_dir is required": {"model": {}},
}


def test_config_error_examples_are_real_output() -> None:
    block = section(page_text(DOCS / "configuration.md"), "Strict validation").split("```")[1]
    lines = [line for line in block.splitlines() if line.startswith("pie-driver-trtllm: ")]
    assert len(lines) == len(CONFIG_EXAMPLES)
    for line in lines:
        [data] = [d for start, d in CONFIG_EXAMPLES.items() if line.startswith(f"pie-driver-trtllm: config: {start}")]
        data = {"model": {"snapshot_dir": "m"}, **data}
        with pytest.raises(StartupError) as info:
            parse_config(data)
        printed = f"pie-driver-trtllm: {info.value}"
        head, _, tail = line.partition(" ..., ")  # an elided list: both ends must match
        assert printed.startswith(head) and printed.endswith(tail), (line, printed)


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_startup_toml_examples_parse(page: Path) -> None:
    for block in re.findall(r"```toml\n(.*?)```", page_text(page), re.S):
        if "[driver]" not in block or "[model]\n" not in block:
            continue  # a Pie config, not the driver's startup file
        parse_config(tomllib.loads(block))


# ---------------------------------------------------------------- files, modules, verbs


def ours(name: str, page: Path) -> bool:
    """Whether a named path means this tree: a bare name, or a path whose first folder is one of ours."""
    first = name.split("/")[0]
    if "/" not in name.rstrip("/"):
        return name not in NOT_OURS
    return first == ".." or any((base / first).exists() for base in (ROOT, PACKAGE, page.parent))


def exists(name: str, page: Path) -> bool:
    """A path or `path.attribute` named on `page`, looked up where the pages mean it."""
    path, _, attribute = name.partition(".") if re.fullmatch(r"[\w/]+\.[A-Za-z_][\w.]*", name) and not \
        re.search(r"\.(py|md|sh|toml|json|png|txt)$", name) else (name, "", "")
    bases = [ROOT, PACKAGE, page.parent, ROOT / "tests"]
    suffixes = [""] if not attribute else [".py", "/__init__.py"]
    found = [base / f"{path}{s}" for base in bases for s in suffixes if (base / f"{path}{s}").exists()]
    if not found and "/" not in path and not attribute:  # a bare file name: anywhere in the tree
        found = [p for p in ROOT.glob(f"**/{path}") if ".venv" not in p.parts and ".git" not in p.parts]
    if not found or not attribute:
        return bool(found)
    module = ".".join(found[0].relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
    target: Any = importlib.import_module(module)
    for part in attribute.removesuffix("()").split("."):
        if part in getattr(target, "__annotations__", {}):  # a field each instance sets
            return True
        if not hasattr(target, part):
            return False
        target = getattr(target, part)
    return True


def named_paths(page: Path) -> set[str]:
    text = page_text(page)
    names = {q for q in quoted(page) if re.fullmatch(r"\.?[\w.-]*[\w-]+(/[\w.-]*)*", q)
             and ("/" in q or re.search(r"\.(py|md|sh|toml|json|png)$", q))}
    names |= {q for q in quoted(page) if re.fullmatch(r"(\w+/)+\w+(\.[A-Za-z_]\w*)+(\(\))?", q)}  # layer/module.attr
    names |= {link for link in re.findall(r"\]\(([^)#]+)\)", text) if "://" not in link}
    return {n for n in names if not n.startswith("../shared/") and "://" not in n}


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_files_and_modules_named_exist(page: Path) -> None:
    missing = sorted(n for n in named_paths(page) if ours(n, page) and not exists(n, page))
    assert not missing, f"{page.name} names files or modules that do not exist: {missing}"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_python_names_exist(page: Path) -> None:
    """`pie_driver_trtllm.x.y` names: a module, or an attribute of one."""
    for name in {q.removesuffix("()") for q in quoted(page) if re.fullmatch(r"pie_driver_trtllm(\.\w+)+(\(\))?", q)}:
        parts = name.split(".")
        for cut in range(len(parts), 0, -1):
            try:
                target: Any = importlib.import_module(".".join(parts[:cut]))
            except ImportError:
                continue
            for attribute in parts[cut:]:
                assert hasattr(target, attribute), f"{page.name}: {name} does not exist"
                target = getattr(target, attribute)
            break


def cli_verbs() -> set[str]:
    from pie_driver_trtllm.tools.cli import app

    return set(typer.main.get_command(app).commands)  # type: ignore[attr-defined]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_cli_verbs_named_exist(page: Path) -> None:
    text = page_text(page)
    commands = r"(?:pie-driver-trtllm|pie-driver-tensorrt-llm|pie driver tensorrt-llm)"
    named = set(re.findall(commands + r" ([a-z][a-z-]*)", text))
    if page.name == "user-guide.md":  # its verb table
        table = section(text, "User guide").split("\n\n## ")[0]
        named |= {re.split(r"[ `]", cell)[0] for cell in first_column(table)}
    assert named <= cli_verbs(), f"{page.name} names verbs the command line lacks: {named - cli_verbs()}"


def test_every_verb_is_in_the_user_guide() -> None:
    table = section(page_text(DOCS / "user-guide.md"), "User guide").split("\n\n## ")[0]
    listed = {re.split(r"[ `]", cell)[0] for cell in first_column(table)}
    assert cli_verbs() - {"bench"} <= listed, f"verbs missing from the user guide's table: {cli_verbs() - listed}"


# ---------------------------------------------------------------- the protocol


def test_error_code_table_is_the_drivers() -> None:
    table = section(page_text(DOCS / "protocol.md"), "4. Error codes")
    assert set(first_column(table)) == {code.value for code in ErrorCode}


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_error_codes_named_exist(page: Path) -> None:
    named = {q for q in quoted(page) if re.fullmatch(r"[A-Z][A-Z0-9_]+", q)} - NOT_CODES
    unknown = named - {code.value for code in ErrorCode} - set(re.findall(r"\b[A-Z][A-Z0-9_]+\b", sources()))
    assert not unknown, f"{page.name} names codes the driver lacks (nor are they names in its code): {unknown}"


def sources() -> str:
    """The package's and the tests' code: environment variables and constants a page may name."""
    paths = [*PACKAGE.rglob("*.py"), *(ROOT / "tests").rglob("*.py")]
    return "\n".join(path.read_text(encoding="utf-8") for path in paths)


@pytest.mark.parametrize("name", [code.value for code in ErrorCode] + list(OPS))
def test_protocol_doc_mentions(name: str) -> None:
    assert f"`{name}`" in page_text(DOCS / "protocol.md"), f"docs/protocol.md does not mention `{name}`"


def test_the_takeover_delay_stated_is_the_servers() -> None:
    text = " ".join(page_text(DOCS / "protocol.md").split())
    stated = re.findall(r"(\d+) ms \(`server\.TAKEOVER_S`\)", text)
    assert stated and {int(ms) for ms in stated} == {round(TAKEOVER_S * 1000)}


@pytest.fixture(scope="module")
def driver_replies(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path) -> Iterator[dict[str, Any]]:
    process: DriverProcess = spawn(write_config(tmp_path_factory.mktemp("docs"), tiny_model))
    try:
        client = process.client()
        yield {op: client.call(op).result for op in ("handshake", "stats", "health")}
        client.close()
    finally:
        process.stop()


def test_handshake_fields_are_the_documented_ones(driver_replies) -> None:
    handshake = driver_replies["handshake"]
    sent = {f"{k}.{sub}" if isinstance(v, dict) and k != "caps" else k
            for k, v in handshake.items() for sub in (v if isinstance(v, dict) and k != "caps" else [None])}
    documented = section(page_text(DOCS / "protocol.md"), "5.1 handshake").split("`caps`:")[0]
    assert set(first_column(documented.split("Its values:")[0])) == sent


def test_caps_are_the_documented_ones(driver_replies) -> None:
    caps = driver_replies["handshake"]["caps"]
    documented = set(first_column(section(page_text(DOCS / "protocol.md"), "5.1 handshake").split("`caps`:")[1]))
    assert documented == set(caps) | set(router_caps(caps, 2)), "several devices add the replica_* keys"


def test_execution_modes_are_the_engines() -> None:
    from pie_driver_trtllm.engines.reference.batched import BatchedReferenceEngine
    from pie_driver_trtllm.engines.reference.engine import ReferenceEngine
    from pie_driver_trtllm.engines.tensorrt_llm.generate import GenerateEngine
    from pie_driver_trtllm.engines.tensorrt_llm.pyexecutor import PyExecutorEngine

    table = section(page_text(DOCS / "protocol.md"), "5.1 handshake").split("Its values:")[1].split("`caps`:")[0]
    rows = {tuple(re.findall(r'`"?([\w]+)"?`', line)[:2]) for line in table.splitlines() if line.startswith("| `")}
    engines = (ReferenceEngine, BatchedReferenceEngine, GenerateEngine, PyExecutorEngine)
    assert rows == {(e.kind, e.execution_mode) for e in engines}


def test_stats_fields_are_the_documented_ones(driver_replies) -> None:
    table = section(page_text(DOCS / "protocol.md"), "5.7 stats")
    documented = set(first_column(table))
    only_sometimes = {"replicas", "stages"}  # with several devices; with `stage_times` on
    assert documented - only_sometimes == set(driver_replies["stats"]), "`replicas` comes with several devices"


def test_health_fields_are_the_documented_ones(driver_replies) -> None:
    health = driver_replies["health"]
    documented = first_column(section(page_text(DOCS / "protocol.md"), "5.6 health"))
    top, entry = documented[:6], set(documented[6:])
    assert set(top) == set(health) and top[5] == "replicas"
    one_device_only_sometimes = {"stuck_s"}  # while a call is stuck
    several_devices_only = {"restarts", "pid"}
    assert set(health["replicas"][0]) == entry - one_device_only_sometimes - several_devices_only
