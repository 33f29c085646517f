"""`install`: the recipe for a driver venv, and running it (`--run`).

The venv is made with uv when it is on PATH, else with `python -m venv`; Python 3.12 is preferred
(TensorRT-LLM 1.2.1 publishes wheels for 3.10 and 3.12; this package needs 3.11 or later), and when it
cannot be found the current interpreter is used with a notice (a version asked for with --python must
exist). The package comes from where this copy came from (its source checkout, or the wheel or folder it
was installed from), with the tensorrt extra on a machine with an NVIDIA GPU and the reference extra (CPU
torch first) without one.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
from collections.abc import Callable
from importlib import metadata
from pathlib import Path

from pie_driver_trtllm import __version__
from pie_driver_trtllm.origin import NVIDIA_INDEX, PACKAGE, default_source, package_spec
from pie_driver_trtllm.tools.pie_home import DRIVER_TYPE

EXTRAS = ("tensorrt", "reference", "none")
PREFERRED_PYTHON = "3.12"
TORCH_CPU_INDEX = "https://download.pytorch.org/whl/cpu"
MPI_NOTE = "TensorRT-LLM imports mpi4py: it needs a system MPI runtime, e.g. " \
           "`sudo apt-get install -y libopenmpi-dev openmpi-bin` (NVIDIA's TensorRT-LLM container has one)."


def gpu_present() -> bool:
    """An NVIDIA GPU on this machine (its device nodes), without importing torch."""
    return any(Path("/dev").glob("nvidia[0-9]*"))


def default_extra() -> str:
    return "tensorrt" if gpu_present() else "reference"


def cpu_torch(venv_python_version: str | None = None) -> list[str]:
    """pip arguments for the CPU build of torch: the one this tool runs with when it is a CPU build for the
    same Python (found where that one was), else PyTorch's CPU index."""
    try:
        mine = metadata.version("torch")
    except metadata.PackageNotFoundError:
        mine = ""
    same_python = venv_python_version is None or venv_python_version.split(".")[:2] == \
        [str(x) for x in sys.version_info[:2]]
    if mine.endswith("+cpu") and same_python:
        return [f"torch=={mine}"]
    return ["torch", "--index-url", TORCH_CPU_INDEX]


def install_flags(extra: str, no_deps: bool) -> list[str]:
    flags = ["--extra-index-url", NVIDIA_INDEX] if extra == "tensorrt" and not no_deps else []
    return flags + (["--no-deps"] if no_deps else [])


def _q(parts: list[str]) -> str:
    return " ".join(shlex.quote(p) for p in parts)


def recipe(venv: Path, extra: str = "tensorrt", source: str | None = None, no_deps: bool = False) -> str:
    """Copy-pasteable shell lines that do what `install --run` does."""
    vpy = str(venv / "bin" / "python")
    spec, flags = package_spec(source, extra), install_flags(extra, no_deps)
    origin = "--from" if source else default_source()[1]
    lines = [f"# Recipe for the {DRIVER_TYPE} driver ({PACKAGE} {__version__}, extra: {extra}, from {origin})"]
    if extra == "tensorrt":
        lines.append("# Requires a system MPI runtime, for example: sudo apt-get install -y libopenmpi-dev openmpi-bin")
    # The recipe makes a venv of PREFERRED_PYTHON: a torch wheel of this tool's own Python may not fit it.
    torch = cpu_torch(PREFERRED_PYTHON) if extra == "reference" and not no_deps and not gpu_present() else []
    lines += ["# with uv:", _q(["uv", "venv", str(venv), "--python", PREFERRED_PYTHON])]
    if torch:
        lines.append(_q(["uv", "pip", "install", "--python", vpy, *torch]) + "   # no GPU here: CPU torch")
    lines += [_q(["uv", "pip", "install", "--python", vpy, spec, *flags]),
              "# or without uv:", _q([f"python{PREFERRED_PYTHON}", "-m", "venv", str(venv)])]
    if torch:
        lines.append(_q([vpy, "-m", "pip", "install", *torch]) + "   # no GPU here: CPU torch")
    lines += [
        _q([vpy, "-m", "pip", "install", spec, *flags]),
        "# then register the venv with Pie and check the machine:",
        _q(["pie-driver-trtllm", "set", "venv", str(venv)]),
        "pie-driver-trtllm doctor" + ("" if extra == "tensorrt" else " --engine reference"),
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
    """(interpreter, its version, notice or None): the requested one (which must exist), else python3.12,
    else this one. An empty interpreter means the requested one was not found; the notice says so."""
    wanted = requested or PREFERRED_PYTHON
    candidate = wanted if os.sep in wanted else shutil.which(f"python{wanted}") or f"python{wanted}"
    version = python_version(candidate)
    if version:
        return candidate, version, None
    if requested:
        return "", "", (f"--python {requested}: not found (tried {candidate}); give an installed version "
                        f"such as {sys.version_info[0]}.{sys.version_info[1]}, or a path to an interpreter")
    fallback = sys.executable
    version = python_version(fallback) or ".".join(map(str, sys.version_info[:3]))
    notice = (f"! Python {wanted} was not found (tried {candidate}); falling back to Python {version} "
              f"({fallback}). With TensorRT-LLM use Python 3.12 (its 1.2.1 wheels are for 3.10 and 3.12, and "
              "this package needs 3.11 or later): choose it with --python /path/to/python3.12.")
    return fallback, version, notice


MISSING_CHECK = """import importlib.util as u, sys
names = sys.argv[1:]
print(' '.join(n for n in names if u.find_spec(n) is None))"""
NEEDED = {"none": ("zmq", "msgspec"), "reference": ("zmq", "msgspec", "torch", "transformers"),
          "tensorrt": ("zmq", "msgspec", "torch", "tensorrt_llm")}


def run_install(venv: Path, *, extra: str = "tensorrt", source: str | None = None, no_deps: bool = False,
                python: str | None = None, echo: Callable[[str], None] = print) -> int:
    """Create the venv and install the package into it, showing each step; 0 on success."""
    uv = shutil.which("uv")
    venv = Path(os.path.abspath(os.path.expanduser(str(venv))))
    vpy = venv / "bin" / "python"
    torch_first = extra == "reference" and not no_deps and not gpu_present()
    steps = 4 if torch_first else 3
    counter = iter(range(1, steps + 1))

    def step(text: str) -> None:
        echo(f"==> [{next(counter)}/{steps}] {text}")

    def call(command: list[str]) -> int:
        echo("    $ " + _q(command))
        sys.stdout.flush()
        try:
            return subprocess.run(command, check=False).returncode
        except OSError as exc:
            echo(f"✗ could not start {command[0]}: {exc.strerror or exc}")
            return 127

    def pip(*args: str) -> list[str]:
        return [uv, "pip", "install", "--python", str(vpy), *args] if uv else [str(vpy), "-m", "pip", "install", *args]

    if vpy.exists():
        step(f"reusing the existing venv {venv}")
        version = python_version(str(vpy))
    else:
        interpreter, version, notice = choose_python(python)
        if not interpreter:
            echo(f"✗ {notice}")
            return 2
        if notice:
            echo(notice)
        tool = "uv" if uv else "python -m venv"
        step(f"creating {venv} with {tool} (Python {version})")
        command = [uv, "venv", str(venv), "--python", interpreter] if uv else [interpreter, "-m", "venv", str(venv)]
        code = call(command)
        if code != 0:
            echo(f"✗ {tool} exited with {code}; see the messages above "
                 "(on Debian/Ubuntu `python -m venv` needs: sudo apt-get install python3-venv)")
            return code or 1
    if torch_first:
        step("installing the CPU build of torch (no NVIDIA GPU here; about 0.2 GB instead of several GB for "
             "a CUDA build)")
        code = call(pip(*cpu_torch(version)))
        if code != 0:
            echo(f"✗ the torch install exited with {code}; see the messages above, or install a CPU torch into "
                 f"{venv} yourself and run this again")
            return code or 1
    spec = package_spec(source, extra)
    origin = "--from" if source else default_source()[1]
    step(f"installing {spec} ({origin}; {'uv pip' if uv else 'pip'}"
         f"{', this can take a while' if extra == 'tensorrt' else ''})")
    code = call(pip(spec, *install_flags(extra, no_deps)))
    if code != 0:
        echo(f"✗ the install exited with {code}; see the messages above. To install from a source checkout or "
             f"a wheel: pie-driver-trtllm install {_q([str(venv)])} --run --from PATH")
        return code or 1
    step("checking that the package imports in the venv")
    check = subprocess.run([str(vpy), "-c", "import pie_driver_trtllm as p; print(p.__version__, p.__file__)"],
                           capture_output=True, text=True, cwd=venv, check=False)
    if check.returncode != 0:
        echo(f"✗ installed, but `import pie_driver_trtllm` fails in {vpy}:\n{check.stderr.strip()}")
        return 1
    missing = subprocess.run([str(vpy), "-c", MISSING_CHECK, *NEEDED[extra]], capture_output=True, text=True,
                             cwd=venv, check=False).stdout.split()
    installed = check.stdout.split()[0]
    if missing:
        wanted = "reference" if extra == "none" else extra
        echo(f"! Installed {PACKAGE} {installed} into {venv}, but it cannot serve yet: {', '.join(missing)} "
             f"missing (--extra {extra}{' --no-deps' if no_deps else ''}), so `doctor` fails. Add them with: "
             + _q(["pie-driver-trtllm", "install", str(venv), "--run", "--extra", wanted]
                  + (["--from", source] if source else [])))
    else:
        echo(f"✓ Installed {PACKAGE} {installed} into {venv}")
    echo("Register it as this driver's interpreter, then check the machine:")
    echo("  " + _q(["pie-driver-trtllm", "set", "venv", str(venv)]))
    echo("  pie-driver-trtllm doctor" + ("" if extra == "tensorrt" else " --engine reference"))
    if extra == "tensorrt":
        echo(MPI_NOTE)
    return 0
