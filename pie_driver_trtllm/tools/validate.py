"""`validate`: every problem in a Pie config or a driver startup TOML, each at its FILE:LINE.

A startup file gets the checks `serve` runs before it loads an engine: the TOML rules of config.py (all
of them, not only the first) and a model directory that holds a checkpoint. A file of another kind
(Pie's `drivers.toml`, an empty file) is named as such instead of passing.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

from pie_driver_trtllm.tools.pie_config import (
    PieConfig,
    Problem,
    find_line,
    format_problem,
    load_pie_config,
    startup_problems,
)


def kind_of(data: dict[str, Any]) -> str:
    """"pie" ([[model]] entries), "startup" ([model] + [driver]), "drivers" (Pie's drivers.toml) or "other"."""
    model = data.get("model")
    if isinstance(model, list):
        return "pie"
    if isinstance(model, dict) or ("driver" in data and isinstance(data["driver"], dict) and (
            "options" in data["driver"] or "device" in data["driver"])):
        return "startup"
    driver = data.get("driver")
    if "python" in data or (isinstance(driver, dict) and all(isinstance(v, dict) for v in driver.values())):
        return "drivers"
    return "other"


def check_startup(path: Path, text: str, data: dict[str, Any]) -> PieConfig:
    """Every problem of a driver startup TOML, with its line; the model directory must hold config.json."""
    cfg = PieConfig(path, text)
    for table, key, message in startup_problems(data):
        line = (find_line(text, None, table, key) if key else None) or find_line(text, None, table)
        cfg.problems.append(Problem(line, message))
    model = data.get("model")
    snapshot = model.get("snapshot_dir") if isinstance(model, dict) else None
    if isinstance(snapshot, str) and snapshot:
        folder = Path(snapshot).expanduser()
        folder = folder if folder.is_absolute() else path.parent / folder
        if not (folder / "config.json").is_file():
            what = "does not exist" if not folder.exists() else "holds no config.json"
            cfg.problems.append(Problem(find_line(text, None, "model", "snapshot_dir"),
                                        f"model.snapshot_dir {folder} {what}: `serve` needs a Hugging Face "
                                        "checkpoint there (`pie-driver-trtllm make-model DIR` writes one)"))
    return cfg


def validate_file(path: Path) -> tuple[list[str], list[str], str]:
    """(problem lines, warnings, the verdict when there are no problems)."""
    try:
        text = path.read_text(encoding="utf-8")
        data = tomllib.loads(text)
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError):
        cfg = load_pie_config(path)  # names the read or syntax error with its line
        return [format_problem(cfg, p) for p in cfg.problems], [], ""
    kind = kind_of(data)
    if kind == "drivers":
        return [f"{path}: this is Pie's drivers.toml (interpreter settings, see `pie-driver-trtllm show`), not a "
                "config; validate takes a Pie config ([[model]] entries) or a driver startup TOML"], [], ""
    if kind == "other":
        return [f"{path}: neither a Pie config ([[model]] entries) nor a driver startup TOML ([model] + "
                "[driver]): nothing to check"], [], ""
    if kind == "startup":
        cfg = check_startup(path, text, data)
        cfg.problems.sort(key=lambda p: p.line or 0)
        return [format_problem(cfg, p) for p in cfg.problems], [], f"✓ {path}: a valid driver startup file"
    cfg = load_pie_config(path)
    cfg.problems.sort(key=lambda p: p.line or 0)
    ours = [m for m in cfg.models if m.ours]
    verdict = f"✓ {path}: {len(cfg.models)} [[model]] entry(ies), {len(ours)} for this driver, no problems"
    return [format_problem(cfg, p) for p in cfg.problems], [f"! {path}: {w}" for w in cfg.warnings], verdict
