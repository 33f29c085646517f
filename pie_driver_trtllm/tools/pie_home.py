"""`$PIE_HOME/drivers.toml` and the interpreter Pie would start this driver with.

Pie reads `$PIE_HOME/drivers.toml` (PIE_HOME defaults to `~/.pie`): a `[driver.<type>]` block per driver
type and a shared `[python]` block, each holding `venv = "..."` or `python = "..."`. This module edits
that file without disturbing anything else in it (other drivers' blocks, comments, layout), writes it
atomically, and resolves the interpreter with Pie's precedence, recording which step chose it.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):  # noqa: UP036 - tomli keeps older interpreters working
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

DRIVER_TYPE = "tensorrt_llm"
KINDS = ("venv", "python")
STEPS = ("options", "PIE_PYTHON", "VIRTUAL_ENV", "drivers.toml [driver]", "drivers.toml [python]", "PATH")


class PieHomeError(Exception):
    """A problem the user must fix: an unreadable drivers.toml, conflicting keys, no interpreter."""


def pie_home(env: dict[str, str] | None = None) -> Path:
    env = os.environ if env is None else env
    value = env.get("PIE_HOME", "")
    return Path(os.path.expanduser(value)) if value else Path(os.path.expanduser("~")) / ".pie"


def drivers_toml(env: dict[str, str] | None = None) -> Path:
    return pie_home(env) / "drivers.toml"


def default_venv(env: dict[str, str] | None = None) -> Path:
    return pie_home(env) / "venvs" / DRIVER_TYPE


def venv_python(venv: str | Path) -> Path:
    return Path(os.path.expanduser(str(venv))) / "bin" / "python"


def read_drivers(path: Path) -> dict[str, Any]:
    """The parsed file; a missing file counts as empty."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return {}
    except OSError as exc:
        raise PieHomeError(f"cannot read {path}: {exc.strerror or exc}") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise PieHomeError(f"{path} is not valid TOML: {exc}; fix or remove it") from None


def atomic_write(path: Path, text: str) -> None:
    """Write `text` to `path` via a temporary file in the same folder and os.replace (never half-written)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    mode = path.stat().st_mode & 0o777 if path.exists() else 0o644
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _load_document(path: Path) -> Any:
    import tomlkit
    from tomlkit.exceptions import ParseError

    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return tomlkit.document()
    try:
        return tomlkit.parse(text)
    except ParseError as exc:
        raise PieHomeError(f"{path} is not valid TOML: {exc}; fix or remove it") from None


def _block(doc: Any, shared: bool, create: bool) -> Any:
    """The `[python]` or `[driver.tensorrt_llm]` table of a tomlkit document (None when absent)."""
    import tomlkit

    if shared:
        if "python" not in doc and create:
            doc["python"] = tomlkit.table()
        return doc.get("python")
    if "driver" not in doc:
        if not create:
            return None
        doc["driver"] = tomlkit.table(is_super_table=True)
    drivers = doc["driver"]
    if DRIVER_TYPE not in drivers and create:
        drivers[DRIVER_TYPE] = tomlkit.table()
    return drivers.get(DRIVER_TYPE)


def block_name(shared: bool) -> str:
    return "[python]" if shared else f"[driver.{DRIVER_TYPE}]"


def set_interpreter(kind: str, value: str, path: Path, *, shared: bool = False) -> str:
    """Set `venv` or `python` (clearing the other) in the driver's block; returns the stored value."""
    if kind not in KINDS:
        raise PieHomeError(f"unknown key {kind!r}; use venv or python")
    stored = os.path.abspath(os.path.expanduser(value))
    doc = _load_document(path)
    block = _block(doc, shared, create=True)
    block[kind] = stored
    other = KINDS[1 - KINDS.index(kind)]
    if other in block:
        del block[other]
    import tomlkit

    atomic_write(path, tomlkit.dumps(doc).rstrip("\n") + "\n")
    return stored


def unset_interpreter(kind: str, path: Path, *, shared: bool = False) -> bool:
    """Remove `kind` from the block (dropping the block when it empties); False when nothing was set."""
    if kind not in KINDS:
        raise PieHomeError(f"unknown key {kind!r}; use venv or python")
    if not path.exists():
        return False
    doc = _load_document(path)
    block = _block(doc, shared, create=False)
    if block is None or kind not in block:
        return False
    del block[kind]
    if not block:
        if shared:
            del doc["python"]
        else:
            del doc["driver"][DRIVER_TYPE]
            if not doc["driver"]:
                del doc["driver"]
    import tomlkit

    atomic_write(path, tomlkit.dumps(doc).rstrip("\n") + "\n")
    return True


@dataclass
class Resolved:
    python: Path
    step: int      # 1-based precedence step (see STEPS)
    source: str    # where it came from, for `show` and `doctor`


def _pick(table: Any, where: str) -> tuple[Path, str] | None:
    """venv/python from one table; both set is an error, as in Pie."""
    if not isinstance(table, dict):
        return None
    venv, python = table.get("venv"), table.get("python")
    if venv is not None and python is not None:
        raise PieHomeError(f"{where}: both `venv` and `python` are set — pick one")
    for kind, value in (("venv", venv), ("python", python)):
        if value is None:
            continue
        if not isinstance(value, str) or not value:
            raise PieHomeError(f"{where}.{kind} must be a non-empty string, got {value!r}")
        found = venv_python(value) if kind == "venv" else Path(os.path.expanduser(value))
        return found, f"{where}.{kind} ({value})"
    return None


def resolve_interpreter(options: dict[str, Any] | None = None, env: dict[str, str] | None = None) -> Resolved:
    """The interpreter Pie would start this driver with, first match wins:

    1. `[model.driver.options]` venv or python; 2. `$PIE_PYTHON`; 3. `$VIRTUAL_ENV/bin/python` (if it exists);
    4. drivers.toml `[driver.tensorrt_llm]`; 5. drivers.toml `[python]`; 6. `python3` on PATH.
    """
    env = dict(os.environ) if env is None else env
    picked = _pick(options or {}, "[model.driver.options]")
    if picked:
        return Resolved(picked[0], 1, picked[1])
    if env.get("PIE_PYTHON"):
        return Resolved(Path(os.path.expanduser(env["PIE_PYTHON"])), 2, f"$PIE_PYTHON ({env['PIE_PYTHON']})")
    if env.get("VIRTUAL_ENV"):
        candidate = venv_python(env["VIRTUAL_ENV"])
        if candidate.is_file():
            return Resolved(candidate, 3, f"$VIRTUAL_ENV ({env['VIRTUAL_ENV']})")
    path = drivers_toml(env)
    data = read_drivers(path)
    shown = _display(path)
    drivers = data.get("driver", {})
    picked = _pick(drivers.get(DRIVER_TYPE) if isinstance(drivers, dict) else None,
                   f"{shown} [driver.{DRIVER_TYPE}]")
    if picked:
        return Resolved(picked[0], 4, picked[1])
    picked = _pick(data.get("python"), f"{shown} [python]")
    if picked:
        return Resolved(picked[0], 5, picked[1])
    found = shutil.which("python3", path=env.get("PATH", os.defpath))
    if found:
        return Resolved(Path(found), 6, f"python3 on PATH ({found})")
    raise PieHomeError(
        "no Python interpreter for the tensorrt_llm driver. Configure one of:\n"
        "  - venv = \"/path/to/venv\" in [model.driver.options] of the Pie config\n"
        "  - PIE_PYTHON=/path/to/python, or an activated virtual environment (VIRTUAL_ENV)\n"
        f"  - pie-driver-trtllm set venv PATH   (writes [driver.{DRIVER_TYPE}] in {shown})\n"
        "  - python3 on PATH\n"
        "Create a venv first with: pie-driver-trtllm install --run")


def _display(path: Path) -> str:
    """`~/.pie/drivers.toml` style when under the home folder, else the full path."""
    home = os.path.expanduser("~")
    text = str(path)
    return "~" + text[len(home):] if home not in ("", "/") and text.startswith(home + os.sep) else text
