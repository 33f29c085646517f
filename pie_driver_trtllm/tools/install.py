"""`install`: the recipe for a driver venv, and running it (`--run`).

The venv is made with uv when it is on PATH, else with `python -m venv`; Python 3.12 is preferred
(TensorRT-LLM 1.2.1 publishes wheels for 3.10 and 3.12), and when it cannot be found the current
interpreter is used with a notice. The package is then installed with the chosen extra.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from pie_driver_trtllm import __version__
from pie_driver_trtllm.tools.pie_home import DRIVER_TYPE

PACKAGE = "pie-driver-trtllm"
NVIDIA_INDEX = "https://pypi.nvidia.com"
EXTRAS = ("tensorrt", "reference", "none")
PREFERRED_PYTHON = "3.12"
MPI_NOTE = "TensorRT-LLM imports mpi4py: it needs a system MPI runtime, e.g. " \
           "`sudo apt-get install -y libopenmpi-dev openmpi-bin` (NVIDIA's TensorRT-LLM container has one)."


def package_spec(source: str | None, extra: str) -> str:
    """What to install: the package name (or a local checkout/wheel path) with the extra."""
    base = source or PACKAGE
    if source and (os.sep in source or source.startswith(".") or Path(source).exists()):
        base = os.path.abspath(os.path.expanduser(source))
    return base if extra == "none" else f"{base}[{extra}]"


def install_flags(extra: str, no_deps: bool) -> list[str]:
    flags = ["--extra-index-url", NVIDIA_INDEX] if extra == "tensorrt" and not no_deps else []
    return flags + (["--no-deps"] if no_deps else [])


def _q(parts: list[str]) -> str:
    return " ".join(shlex.quote(p) for p in parts)


def recipe(venv: Path, extra: str = "tensorrt", source: str | None = None, no_deps: bool = False) -> str:
    """Copy-pasteable shell lines that do what `install --run` does."""
    vpy = str(venv / "bin" / "python")
    spec, flags = package_spec(source, extra), install_flags(extra, no_deps)
    lines = [f"# Recipe for the {DRIVER_TYPE} driver ({PACKAGE} {__version__}, extra: {extra})"]
    if extra == "tensorrt":
        lines.append("# Requires a system MPI runtime, for example: sudo apt-get install -y libopenmpi-dev openmpi-bin")
    lines += [
        "# with uv:",
        _q(["uv", "venv", str(venv), "--python", PREFERRED_PYTHON]),
        _q(["uv", "pip", "install", "--python", vpy, spec, *flags]),
        "# or without uv:",
        _q([f"python{PREFERRED_PYTHON}", "-m", "venv", str(venv)]),
        _q([vpy, "-m", "pip", "install", spec, *flags]),
        "# then register the venv with Pie and check the machine:",
        _q(["pie-driver-trtllm", "set", "venv", str(venv)]),
        "pie-driver-trtllm doctor",
        "",
        "# To run the steps above for you: " + _q(["pie-driver-trtllm", "install", str(venv), "--run"]),
    ]
    return "\n".join(lines)


def python_version(python: str) -> str | None:
    """`3.12.1` when `python` runs and has the venv module, else None (pyenv shims that fail included)."""
    try:
        done = subprocess.run([python, "-c", "import sys, venv; print('%d.%d.%d' % sys.version_info[:3])"],
                              capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 and done.stdout.strip() else None


def choose_python(requested: str | None) -> tuple[str, str, str | None]:
    """(interpreter, its version, notice or None): the requested one, else python3.12, else this one."""
    wanted = requested or PREFERRED_PYTHON
    candidate = wanted if os.sep in wanted else shutil.which(f"python{wanted}") or f"python{wanted}"
    version = python_version(candidate)
    if version:
        return candidate, version, None
    fallback = sys.executable
    version = python_version(fallback) or ".".join(map(str, sys.version_info[:3]))
    notice = (f"! Python {wanted} was not found (tried {candidate}); falling back to Python {version} "
              f"({fallback}). TensorRT-LLM 1.2.1 wheels exist for Python 3.10 and 3.12 only; use "
              f"--python /path/to/python3.12 to choose.")
    return fallback, version, notice


def run_install(venv: Path, *, extra: str = "tensorrt", source: str | None = None, no_deps: bool = False,
                python: str | None = None, echo: Callable[[str], None] = print) -> int:
    """Create the venv and install the package into it, showing each step; 0 on success."""

    def step(n: int, text: str) -> None:
        echo(f"==> [{n}/3] {text}")

    def call(command: list[str]) -> int:
        echo("    $ " + _q(command))
        sys.stdout.flush()
        try:
            return subprocess.run(command, check=False).returncode
        except OSError as exc:
            echo(f"✗ could not start {command[0]}: {exc.strerror or exc}")
            return 127

    uv = shutil.which("uv")
    venv = Path(os.path.abspath(os.path.expanduser(str(venv))))
    vpy = venv / "bin" / "python"
    if vpy.exists():
        step(1, f"reusing the existing venv {venv}")
    else:
        interpreter, version, notice = choose_python(python)
        if notice:
            echo(notice)
        tool = "uv" if uv else "python -m venv"
        step(1, f"creating {venv} with {tool} (Python {version})")
        command = [uv, "venv", str(venv), "--python", interpreter] if uv else [interpreter, "-m", "venv", str(venv)]
        code = call(command)
        if code != 0:
            echo(f"✗ {tool} exited with {code}; see the messages above "
                 "(on Debian/Ubuntu `python -m venv` needs: sudo apt-get install python3-venv)")
            return code or 1
    spec = package_spec(source, extra)
    step(2, f"installing {spec} ({'uv pip' if uv else 'pip'}; this can take a while for the tensorrt extra)")
    flags = install_flags(extra, no_deps)
    command = [uv, "pip", "install", "--python", str(vpy), spec, *flags] if uv else \
        [str(vpy), "-m", "pip", "install", spec, *flags]
    code = call(command)
    if code != 0:
        echo(f"✗ the install exited with {code}; see the messages above")
        return code or 1
    step(3, "checking that the package imports in the venv")
    check = subprocess.run([str(vpy), "-c", "import pie_driver_trtllm as p; print(p.__version__, p.__file__)"],
                           capture_output=True, text=True, cwd=venv, check=False)
    if check.returncode != 0:
        echo(f"✗ installed, but `import pie_driver_trtllm` fails in {vpy}:\n{check.stderr.strip()}")
        return 1
    echo(f"✓ Installed {PACKAGE} {check.stdout.split()[0]} into {venv}")
    echo("Register it as this driver's interpreter, then check the machine:")
    echo("  " + _q(["pie-driver-trtllm", "set", "venv", str(venv)]))
    echo("  pie-driver-trtllm doctor")
    if extra == "tensorrt":
        echo(MPI_NOTE)
    return 0
