"""A full Pie config file: its `[[model]]` entries, which of them use this driver, and their validation.

Pie's config has `[[model]]` entries with `name`, `hf_repo`, a `[model.driver]` table (`type`, `device`,
`tensor_parallel_size`, `activation_dtype`, `random_seed`, `ipc_profile`, `spin_budget_us`, `options`)
and an optional `[model.scheduler]`. For entries whose `type` is `tensorrt_llm` (or `tensorrt-llm`,
`trtllm`) the driver table is checked with the same rules the driver applies at start-up (config.py),
plus Pie's own rules, and every problem is reported with the line it is on (tomllib gives no line
numbers, so the key's line is found in the text).
"""

from __future__ import annotations

import copy
import difflib
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pie_driver_trtllm.config import StartupError, parse_config

if sys.version_info >= (3, 11):  # noqa: UP036 - tomli keeps older interpreters working
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

TYPE_ALIASES = ("tensorrt_llm", "tensorrt-llm", "trtllm")
KNOWN_TYPES = {"tensorrt_llm": "python -m pie_driver_trtllm (this package)",
               "vllm": "python -m pie_driver_vllm", "sglang": "python -m pie_driver_sglang"}
MODEL_KEYS = {"name", "hf_repo", "driver", "scheduler"}
DRIVER_KEYS = {"type", "device", "tensor_parallel_size", "activation_dtype", "random_seed", "ipc_profile",
               "spin_budget_us", "options"}
IPC_PROFILES = ("latency", "balanced", "power")
# Pie refuses these in [model.driver.options]: drivers compute capacity themselves (max_batch_size is
# allowed for TensorRT-LLM as a runtime cap).
CAPACITY_KEYS = ("max_num_kv_pages", "max_batch_tokens", "linear_attn_max_slots", "total_pages", "cpu_pages",
                 "max_forward_tokens", "max_forward_requests", "max_num_seqs", "max_num_batched_tokens",
                 "max_running_requests", "max_total_tokens")


def is_this_driver(kind: Any) -> bool:
    return isinstance(kind, str) and kind in TYPE_ALIASES


@dataclass
class Problem:
    line: int | None
    message: str


@dataclass
class ModelEntry:
    index: int  # 0-based position among [[model]] entries
    name: str
    type: str
    devices: list[str]
    options: dict[str, Any]

    @property
    def ours(self) -> bool:
        return is_this_driver(self.type)


@dataclass
class PieConfig:
    path: Path
    text: str
    models: list[ModelEntry] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def _strip_comment(line: str) -> str:
    out, quote = [], None
    for ch in line:
        if quote:
            out.append(ch)
            if ch == quote:
                quote = None
        elif ch in "\"'":
            quote = ch
            out.append(ch)
        elif ch == "#":
            break
        else:
            out.append(ch)
    return "".join(out).strip()


_HEADER = re.compile(r"^\[\[?\s*([^\]]+?)\s*\]\]?$")


def _norm(name: str) -> str:
    return ".".join(part.strip().strip("\"'") for part in name.split("."))


def find_line(text: str, model_index: int | None, table: str, key: str | None = None) -> int | None:
    """1-based line of `key` in `table` (e.g. "model.driver.options") of the n-th `[[model]]`.

    Handles `[table]` headers, dotted keys (`driver.options.x = 1` under `[[model]]`) and inline tables
    (falls back to the line that opens them). Without `key`, the table's header line.
    """
    current, count, fallback = "", -1, None
    for number, raw in enumerate(text.splitlines(), 1):
        line = _strip_comment(raw)
        header = _HEADER.match(line)
        if header:
            current = _norm(header.group(1))
            if line.startswith("[[") and current == "model":
                count += 1
            if key is None and current == table and (model_index is None or count == model_index):
                return number
            continue
        if (model_index is not None and count != model_index) or "=" not in line or key is None:
            continue
        name = _norm(line.split("=", 1)[0])
        full = f"{current}.{name}" if current else name
        if full == f"{table}.{key}":
            return number
        if f"{table}.{key}".startswith(full + ".") and fallback is None:  # `options = { ... }` holding the key
            fallback = number
    return fallback


def did_you_mean(name: str, choices: list[str] | set[str]) -> str:
    """"; did you mean `x`?" for a close match, else where the allowed names are listed."""
    close = difflib.get_close_matches(name, sorted(choices), n=1, cutoff=0.6)
    if close:
        return f"; did you mean `{close[0]}`?"
    return f"; allowed: {', '.join(sorted(choices))}" if len(choices) <= 10 else "; see docs/configuration.md"


_UNKNOWN = re.compile(r"unknown key ([\w.]+)\.(\w+); allowed keys: (.*)$")
_KEY = re.compile(r"(?:key |config: |\b)(model|driver(?:\.options)?)\.([A-Za-z0-9_]+)")


def startup_problems(data: dict[str, Any]) -> list[tuple[str, str, str]]:
    """Every problem config.py finds in a startup table, as (table, key, message).

    config.py stops at the first problem; each offending key is dropped in turn and the rest checked
    again, so that one run names them all."""
    data = copy.deepcopy(data)
    found: list[tuple[str, str, str]] = []
    for _ in range(64):
        try:
            parse_config(data)
            break
        except StartupError as exc:
            message = str(exc).removeprefix("config: ")
            unknown = _UNKNOWN.search(message)
            if unknown:
                section, key, allowed = unknown.groups()
                message = f"unknown key {section}.{key}{did_you_mean(key, allowed.split(', '))}"
            table_name = re.search(r"unknown table \[(\w+)\]", message)
            if table_name and table_name.group(1) in data:
                found.append((table_name.group(1), "", message))
                del data[table_name.group(1)]
                continue
            where = _KEY.search(message)
            if not where:
                found.append(("driver", "", message))
                break
            table, key = where.groups()
            found.append((table, key, message))
            holder: Any = data
            for part in table.split("."):
                holder = holder.setdefault(part, {}) if isinstance(holder, dict) else None
            if isinstance(holder, dict) and message.startswith(f"{table}.{key} is required"):
                holder[key] = "<required>"  # dropping a required key would only bring the same problem back
                continue
            if not isinstance(holder, dict) or key not in holder:
                break
            del holder[key]
    return found


def _check_model(cfg: PieConfig, index: int, model: Any) -> None:
    text = cfg.text

    def problem(message: str, table: str = "model", key: str | None = None) -> None:
        line = find_line(text, index, table, key) or find_line(text, index, "model")
        cfg.problems.append(Problem(line, f"[[model]] #{index + 1}: {message}"))

    if not isinstance(model, dict):
        problem("must be a table")
        return
    for key in sorted(set(model) - MODEL_KEYS):
        problem(f"unknown key `{key}`{did_you_mean(key, MODEL_KEYS)}", "model", key)
    name = model.get("name", "")
    driver = model.get("driver")
    if not isinstance(driver, dict):
        problem("has no [model.driver] table with a `type`")
        return
    kind = driver.get("type", "")
    devices = driver.get("device", [])
    devices = [devices] if isinstance(devices, str) else devices
    options = driver.get("options", {})
    cfg.models.append(ModelEntry(index, str(name), str(kind), list(devices) if isinstance(devices, list) else [],
                                 options if isinstance(options, dict) else {}))
    if not is_this_driver(kind):
        return
    for key in sorted(set(driver) - DRIVER_KEYS):
        problem(f"unknown key `{key}` in [model.driver]{did_you_mean(key, DRIVER_KEYS)}", "model.driver", key)
    if driver.get("ipc_profile", "balanced") not in IPC_PROFILES:
        problem(f"ipc_profile = {driver['ipc_profile']!r} is not one of {', '.join(IPC_PROFILES)}",
                "model.driver", "ipc_profile")
    if not isinstance(options, dict):
        problem("[model.driver.options] must be a table", "model.driver", "options")
        return
    for key in CAPACITY_KEYS:
        if key in options:
            problem(f"`{key}` is not accepted in [model.driver.options]; drivers compute KV pages and "
                    "scheduling capacity themselves", "model.driver.options", key)
    if "venv" in options and "python" in options:
        problem("both `venv` and `python` are set in [model.driver.options] — pick one",
                "model.driver.options", "python")
    startup_driver = {k: v for k, v in driver.items() if k in ("device", "tensor_parallel_size",
                                                               "activation_dtype", "random_seed")}
    if isinstance(startup_driver.get("device"), str):
        startup_driver["device"] = [startup_driver["device"]]
    startup_options = {k: v for k, v in options.items() if k not in CAPACITY_KEYS}
    startup = {"model": {"snapshot_dir": "<resolved by Pie>", "name": str(name)},
               "driver": {**startup_driver, "options": startup_options}}
    for table, key, message in startup_problems(startup):
        line = (find_line(text, index, f"model.{table}", key) if key else None) \
            or find_line(text, index, f"model.{table}") or find_line(text, index, "model")
        message = re.sub(r"(?<![\w.])driver\.", "model.driver.", message)
        if "driver.tensor_parallel_size" in message:
            message = "tensor_parallel_size must be 1 for tensorrt_llm; list several devices for data parallelism"
        cfg.problems.append(Problem(line, f"[[model]] #{index + 1}: {message}"))


def load_pie_config(path: str | Path) -> PieConfig:
    """Read a Pie config; syntax errors and rule violations land in `problems` with their lines."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        cfg = PieConfig(path, "")
        cfg.problems.append(Problem(None, f"cannot read {path}: {getattr(exc, 'strerror', None) or exc}"))
        return cfg
    cfg = PieConfig(path, text)
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        found = re.search(r"line (\d+)", str(exc))
        cfg.problems.append(Problem(int(found.group(1)) if found else None, f"not valid TOML: {exc}"))
        return cfg
    models = data.get("model", [])
    if not isinstance(models, list):
        cfg.problems.append(Problem(find_line(text, None, "model"),
                                    "`model` must be an array of tables: write [[model]], not [model]"))
        return cfg
    for index, model in enumerate(models):
        _check_model(cfg, index, model)
    claimed: dict[str, str] = {}
    for entry in cfg.models:
        for device in entry.devices:
            if device in claimed and claimed[device] != entry.name:
                line = find_line(text, entry.index, "model.driver", "device")
                cfg.problems.append(Problem(line, f"device {device} claimed by both model {claimed[device]!r} "
                                                  f"and {entry.name!r}"))
            claimed.setdefault(device, entry.name)
    if not any(m.ours for m in cfg.models):
        cfg.warnings.append("no [[model]] entry uses type = \"tensorrt_llm\" (or tensorrt-llm, trtllm); "
                            "nothing here is served by this driver")
    return cfg


def format_problem(cfg: PieConfig, problem: Problem) -> str:
    """`path:LINE: message` followed by the offending line, compiler style."""
    if problem.line is None:
        return f"{cfg.path}: {problem.message}"
    lines = cfg.text.splitlines()
    shown = lines[problem.line - 1] if 0 < problem.line <= len(lines) else ""
    return f"{cfg.path}:{problem.line}: {problem.message}\n  {problem.line:>4} | {shown}"
