"""Where this copy of the package came from, and how to install TensorRT-LLM from the same place.

The package name is on no index, so every remedy that installs it names this copy's source checkout, or
the wheel or folder it was installed from; only a copy that did come from an index names the index.
"""

from __future__ import annotations

import json
import os
from importlib import metadata
from pathlib import Path
from urllib.parse import unquote, urlparse

PACKAGE = "pie-driver-trtllm"
NVIDIA_INDEX = "https://pypi.nvidia.com"


def default_source(root: Path | None = None) -> tuple[str, str]:
    """(what to install, where that is): this copy's source checkout (`root`, by default the folder above
    the package), else the wheel or folder it was installed from, else the package name on the index."""
    root = root or Path(__file__).resolve().parents[1]
    pyproject = root / "pyproject.toml"
    if pyproject.is_file() and f'name = "{PACKAGE}"' in pyproject.read_text(encoding="utf-8"):
        return str(root), "the source checkout this tool runs from"
    try:
        direct = json.loads(metadata.distribution(PACKAGE).read_text("direct_url.json") or "null")
    except (metadata.PackageNotFoundError, ValueError):
        direct = None
    url = direct.get("url", "") if isinstance(direct, dict) else ""
    if url.startswith("file://") and Path(unquote(urlparse(url).path)).exists():
        return unquote(urlparse(url).path), "the wheel or folder this copy was installed from"
    return PACKAGE, "the package index"


def package_spec(source: str | None, extra: str) -> str:
    """What to install: the package name (or a local checkout/wheel path) with the extra."""
    base = source or default_source()[0]
    if os.sep in base or base.startswith(".") or Path(base).exists():
        base = os.path.abspath(os.path.expanduser(base))
    return base if extra == "none" else f"{base}[{extra}]"


def tensorrt_install_hint(pip: str) -> str:
    """The remedy for a missing tensorrt_llm; `pip` is the command that installs into the right interpreter."""
    return (f"install it with `{pip} install '{package_spec(None, 'tensorrt')}' --extra-index-url {NVIDIA_INDEX}` "
            "on Python 3.12 with an NVIDIA GPU and an MPI runtime, or set engine = \"reference\"")
