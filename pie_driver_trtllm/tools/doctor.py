"""`doctor`: every check a user needs before serving, each PASS / WARN / FAIL with what was found and the fix.

Checks about the driver's interpreter (this package, tensorrt_llm, torch, GPUs) run inside that
interpreter through `probe_main`, in a child process, so they see exactly what Pie's driver would see.
"""

from __future__ import annotations

import ctypes.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path
from typing import Any

from pie_driver_trtllm.tools.doctor_report import Check, finish_report
from pie_driver_trtllm.tools.pie_home import PieHomeError, pie_home, resolve_interpreter

GIB = 1 << 30
REFERENCE_PACKAGES = ("torch", "transformers", "safetensors")
_PROBE = "from pie_driver_trtllm.tools.doctor import probe_main; probe_main()"
_TRT_IMPORT = """import json, time
t = time.time()
try:
    from pie_driver_trtllm.engines.tensorrt_llm.startup import import_tensorrt_llm
except ImportError:
    import importlib as m; trt = m.import_module('tensorrt_llm')
else:
    trt = import_tensorrt_llm()
print(json.dumps({'version': str(getattr(trt, '__version__', 'unknown')), 'elapsed': time.time() - t}))"""


def probe_main() -> None:
    """Run in the driver's interpreter: print one JSON object about what it can import and see."""
    import importlib.util

    out: dict[str, Any] = {"python": sys.executable, "version": ".".join(map(str, sys.version_info[:3]))}
    try:
        from pie_driver_trtllm.engines.tensorrt_llm.startup import install_hint, nvidia_library_dirs, require_package
        require_package()
        dirs = nvidia_library_dirs()
        out["trt"] = {"installed": True, "lib_dirs": dirs}
    except ImportError as exc:  # the package's own dependencies are missing here: plain find_spec
        installed = importlib.util.find_spec("tensorrt_llm") is not None
        out["trt"] = {"installed": installed, "lib_dirs": [], "note": f"helpers unavailable ({exc})"}
    except Exception as exc:  # StartupError from require_package
        out["trt"] = {"installed": False, "error": str(exc), "hint": install_hint()}
    if out["trt"].get("installed"):
        env = dict(os.environ)
        env["LD_LIBRARY_PATH"] = os.pathsep.join(out["trt"]["lib_dirs"] + [env.get("LD_LIBRARY_PATH", "")])
        try:
            done = subprocess.run([sys.executable, "-c", _TRT_IMPORT], capture_output=True, text=True, env=env,
                                  timeout=float(os.environ.get("PIE_DOCTOR_IMPORT_TIMEOUT", "180")), check=False)
            if done.returncode == 0:
                out["trt"].update(json.loads(done.stdout.strip().splitlines()[-1]))
            else:
                lines = [x for x in done.stderr.strip().splitlines() if x.strip()]
                out["trt"]["error"] = lines[-1] if lines else f"exit code {done.returncode}"
        except subprocess.TimeoutExpired:
            out["trt"]["error"] = "`import tensorrt_llm` did not finish within the timeout (a known hang)"
    out["missing_reference"] = [p for p in REFERENCE_PACKAGES if importlib.util.find_spec(p) is None]
    out["wheels"] = probe_wheels()
    try:
        import torch

        devices = []
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        for index in range(count):
            free, total = torch.cuda.mem_get_info(index)
            devices.append({"name": torch.cuda.get_device_name(index), "free": free, "total": total})
        out["torch"] = {"version": torch.__version__, "cuda": torch.version.cuda, "devices": devices}
    except Exception as exc:
        out["torch"] = {"error": f"{type(exc).__name__}: {exc}"}
    print(json.dumps(out))


def _run(python: Path, code: str, env: dict[str, str] | None = None, timeout: float = 600) -> tuple[int, str, str]:
    try:
        done = subprocess.run([str(python), "-c", code], capture_output=True, text=True, env=env,
                              cwd=tempfile.gettempdir(), timeout=timeout, check=False)
    except (OSError, subprocess.SubprocessError) as exc:
        return 1, "", str(exc)
    return done.returncode, done.stdout, done.stderr


def _last_line(text: str) -> str:
    lines = [x for x in text.strip().splitlines() if x.strip()]
    return lines[-1] if lines else "no output"


def _read_config(path: Path) -> tuple[str, list[str], dict[str, Any], Path | None, list[Check]]:
    """(engine, devices, options, snapshot dir, checks) of a driver TOML or a full Pie config."""
    from pie_driver_trtllm.config import ENGINE_ALIASES, StartupError, is_pie_config, load_config
    from pie_driver_trtllm.tools.pie_config import format_problem, load_pie_config

    try:
        is_pie = is_pie_config(tomllib.loads(path.read_text(encoding="utf-8")))
    except Exception:
        is_pie = False
    if is_pie:
        cfg = load_pie_config(path)
        ours = [m for m in cfg.models if m.ours]
        checks = [Check("config", "FAIL", format_problem(cfg, p), "fix the line shown; see docs/configuration.md")
                  for p in cfg.problems]
        checks += [Check("config", "WARN", w) for w in cfg.warnings]
        if not ours:
            return "tensorrt_llm", [], {}, None, checks
        first = ours[0]
        engine = ENGINE_ALIASES.get(str(first.options.get("engine", "tensorrt_llm")), "tensorrt_llm")
        if not cfg.problems:
            checks.append(Check("config", "PASS", f"{path}: {len(ours)} [[model]] entry(ies) for this driver, "
                                                  f"first {first.name!r} (engine {engine})"))
        return engine, first.devices, first.options, None, checks
    try:
        config = load_config(path)
    except StartupError as exc:
        return "tensorrt_llm", [], {}, None, [Check("config", "FAIL", str(exc), "fix the key named above; see "
                                                                                 "docs/configuration.md")]
    options = {"venv": config.options.venv, "python": config.options.python}
    found = f"{path}: engine {config.engine}, devices {', '.join(config.driver.device)}"
    return (config.engine, list(config.driver.device), {k: v for k, v in options.items() if v},
            Path(config.model.snapshot_dir), [Check("config", "PASS", found)])


def run_checks(config: Path | None = None, engine: str | None = None, min_free_gib: float = 20.0) -> dict[str, Any]:
    """Every check, in order; the report `--json` prints."""
    checks: list[Check] = []
    devices: list[str] = []
    options: dict[str, Any] = {}
    snapshot = None
    config_engine = "tensorrt_llm"
    if config is not None:
        config_engine, devices, options, snapshot, config_checks = _read_config(config)
    else:
        config_checks = []
    engine = engine or config_engine
    trt = engine == "tensorrt_llm"
    bad = "FAIL" if trt else "WARN"  # what a missing TensorRT-LLM piece costs for this engine
    report: dict[str, Any] = {"driver": "tensorrt_llm", "engine": engine, "python": None, "source": None}
    try:
        resolved = resolve_interpreter(options)
    except PieHomeError as exc:
        checks.append(Check("interpreter", "FAIL", "NOT RESOLVED", str(exc)))
        return finish_report(report, checks + config_checks)
    report.update(python=str(resolved.python), source=resolved.source)
    python = resolved.python
    if not python.exists():
        checks.append(Check("interpreter", "FAIL", f"{python} does not exist (from {resolved.source})",
                            "create it with `pie-driver-trtllm install --run`, or " + _setting_fix(resolved.step,
                                                                                                   config)))
        return finish_report(report, checks + config_checks)
    checks.append(Check("interpreter", "PASS", f"{python} (from {resolved.source})"))
    code, out, err = _run(python, "import sys; print('%d.%d.%d' % sys.version_info[:3])", timeout=60)
    version = out.strip()
    if code != 0:
        checks.append(Check("python version", "FAIL", _last_line(err), "use a working interpreter"))
        return finish_report(report, checks + config_checks)
    parts = tuple(int(x) for x in version.split(".")[:2] if x.isdigit())
    good = parts == (3, 12) if trt else parts >= (3, 11)  # TensorRT-LLM: 3.10 and 3.12; this package: 3.11+
    checks.append(Check("python version", "PASS" if good else "WARN", version,
                        "" if good else "TensorRT-LLM 1.2.1 wheels are built for Python 3.10 and 3.12, and "
                                        "this package needs 3.11 or later: so 3.12; "
                                        "recreate the venv with `pie-driver-trtllm install --run --python 3.12`"))
    code, out, err = _run(python, "import pie_driver_trtllm as p, pie_driver_trtllm.serving.driver; "
                                  "print(p.__version__, p.__file__)", timeout=120)
    env = None
    if code == 0:
        checks.append(Check("pie-driver-trtllm", "PASS", out.strip()))
    else:
        checks.append(Check("pie-driver-trtllm", "FAIL", f"not importable in {python}: {_last_line(err)}",
                            _package_fix(resolved.step, config, trt)))
        parent = str(Path(__file__).resolve().parents[2])  # probe with this copy of the package
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, (parent, os.environ.get("PYTHONPATH"))))}
    code, out, err = _run(python, _PROBE, env=env)
    try:
        probe = json.loads(out.strip().splitlines()[-1])
    except (ValueError, IndexError):
        checks.append(Check("probe", "FAIL", f"the probe failed in {python}: {_last_line(err)}",
                            "run `pie-driver-trtllm exec -- python -c 'import torch'` to see why"))
        return finish_report(report, checks + config_checks)
    checks += _probe_checks(probe, trt, bad)
    if trt or probe.get("trt", {}).get("installed"):
        checks += trtllm_runtime_checks(probe, dict(os.environ), nvidia_driver_version())
    mpi = ctypes.util.find_library("mpi")
    inherited = sorted(k for k in os.environ if k.startswith(("OMPI_", "PMIX_", "PMI_", "SLURM_")))
    if mpi:
        checks.append(Check("MPI runtime", "WARN" if inherited else "PASS", mpi + (
            f"; inherited launcher variables {', '.join(inherited[:4])}" if inherited else ""),
            "unset the inherited MPI/SLURM variables if start-up hangs" if inherited else ""))
    else:
        checks.append(Check("MPI runtime", bad, "libmpi not found",
                            "TensorRT-LLM imports mpi4py: `sudo apt-get install -y libopenmpi-dev openmpi-bin`, "
                            "or run in NVIDIA's TensorRT-LLM container"))
    count = len(probe.get("torch", {}).get("devices", []))
    for device in devices:
        index = 0 if device == "cuda" else int(device.split(":")[1]) if device.startswith("cuda:") else None
        if index is None:
            checks.append(Check(f"device {device}", "FAIL" if trt else "PASS", "cpu",
                                "TensorRT-LLM runs on NVIDIA GPUs only: use \"cuda:N\" or engine = \"reference\""
                                if trt else ""))
        else:
            checks.append(Check(f"device {device}", "PASS" if index < count else "FAIL",
                                f"{count} CUDA device(s) visible",
                                "" if index < count else "use a visible device index (check CUDA_VISIBLE_DEVICES)"))
    if snapshot is not None:
        ok = (snapshot / "config.json").is_file()
        checks.append(Check("model snapshot", "PASS" if ok else "FAIL", str(snapshot),
                            "" if ok else "model.snapshot_dir must hold a Hugging Face checkpoint (config.json)"))
    checks += config_checks
    checks.append(_disk_check(min_free_gib))
    return finish_report(report, checks)


def _setting_fix(step: int, config: Path | None) -> str:
    """How to change the interpreter setting that won (a venv named in a config beats `set venv`)."""
    if step == 1:
        return f"fix venv/python under [model.driver.options] in {config}: it wins over `set venv` and $PIE_PYTHON"
    if step == 2:
        return "change or unset $PIE_PYTHON: it wins over `set venv`"
    if step == 3:
        return "deactivate the venv in $VIRTUAL_ENV, or install into it: it wins over `set venv`"
    return "point the setting at a working venv with `pie-driver-trtllm set venv PATH`"


def _package_fix(step: int, config: Path | None, trt: bool) -> str:
    """The fix for a driver interpreter without this package: use the one this tool runs from when it can."""
    from pie_driver_trtllm.tools.install import package_spec

    here = sys.prefix != sys.base_prefix  # this tool runs from a venv, which has the package
    if step >= 4 and here:
        return (f"the interpreter running this tool has it: register its venv with "
                f"`pie-driver-trtllm set venv {sys.prefix}`")
    install = (f"`pie-driver-trtllm exec -- pip install '{package_spec(None, 'tensorrt' if trt else 'reference')}'`"
               " or `pie-driver-trtllm install --run`")
    if step < 4 and here:
        return f"{_setting_fix(step, config)}; or install it there: {install}"
    return f"install it into that interpreter: {install}"


def trt_install_fix() -> str:
    """Installing TensorRT-LLM into the driver's interpreter, from where this tool came from."""
    from pie_driver_trtllm.origin import tensorrt_install_hint

    return tensorrt_install_hint("pie-driver-trtllm exec -- pip")


def _probe_checks(probe: dict[str, Any], trt: bool, bad: str) -> list[Check]:
    from pie_driver_trtllm.tools.install import package_spec

    checks = []
    info = probe.get("trt", {})
    if info.get("installed") and "version" in info:
        checks.append(Check("tensorrt_llm", "PASS", f"{info['version']} (import took {info['elapsed']:.1f} s)"))
    elif info.get("installed"):
        checks.append(Check("tensorrt_llm", bad, f"installed but `import tensorrt_llm` failed: {info.get('error')}",
                            "see the remedy above; NVIDIA's TensorRT-LLM container has every native dependency"))
    else:
        checks.append(Check("tensorrt_llm", bad if trt else "WARN",
                            "not importable" + ("" if trt else " (not needed for engine reference)"),
                            trt_install_fix() if trt else ""))
    torch = probe.get("torch", {})
    devices = torch.get("devices", [])
    if "error" in torch:
        checks.append(Check("torch", "FAIL", torch["error"], "install the reference or tensorrt extra"))
    else:
        found = f"torch {torch['version']}, CUDA {torch.get('cuda') or 'none'}, {len(devices)} GPU(s) visible"
        checks.append(Check("torch / CUDA", "PASS" if devices or not trt else "FAIL", found,
                            "" if devices or not trt else "TensorRT-LLM needs an NVIDIA GPU: run on a GPU machine "
                            "and check CUDA_VISIBLE_DEVICES and `nvidia-smi`"))
    for index, gpu in enumerate(devices):
        low = gpu["free"] < 0.1 * gpu["total"]
        checks.append(Check(f"gpu cuda:{index}", "WARN" if low else "PASS",
                            f"{gpu['name']}, {gpu['free'] / GIB:.1f} GiB free of {gpu['total'] / GIB:.1f} GiB",
                            "free GPU memory: another process holds most of it (see nvidia-smi)" if low else ""))
    missing = probe.get("missing_reference", [])
    checks.append(Check("reference engine", "PASS" if not missing else ("WARN" if trt else "FAIL"),
                        "torch, transformers, safetensors importable" if not missing else
                        f"missing {', '.join(missing)}",
                        "" if not missing else
                        f"`pie-driver-trtllm exec -- pip install '{package_spec(None, 'reference')}'`"))
    return checks


def _disk_check(min_free_gib: float) -> Check:
    where = pie_home()
    while not where.exists() and where != where.parent:
        where = where.parent
    free = shutil.disk_usage(where).free / GIB
    status = "PASS" if free >= min_free_gib else "WARN" if free >= 2 else "FAIL"
    return Check("disk room", status, f"{free:.1f} GiB free at {where} (PIE_HOME, venvs and engine caches)",
                 "" if status == "PASS" else f"free space there (TensorRT-LLM venvs and engine caches take "
                                             f"{min_free_gib:.0f}+ GiB), or point PIE_HOME at a bigger disk")




# What TensorRT-LLM 1.2.1 (the release Pie 0.4.0 pins) was built against; a mismatch is the usual cause of
# an `import tensorrt_llm` that fails with undefined symbols or a first CUDA call that fails.
TRTLLM_TORCH = "2.9.1"
CUDA13_MIN_DRIVER = 580  # CUDA 13.0 needs an NVIDIA driver of the 580 series or newer
LAUNCHER_PREFIXES = ("OMPI_", "PMIX_", "PMI_", "SLURM_")


def probe_wheels() -> dict[str, str]:
    """Versions of the installed NVIDIA cuBLAS wheels (run in the driver's interpreter)."""
    from importlib.metadata import distributions

    found = {}
    for dist in distributions():
        name = (dist.metadata["Name"] or "").lower()
        if name.startswith("nvidia-cublas"):
            found[name] = dist.version
    return found


def nvidia_driver_version() -> str | None:
    """The kernel driver's version, from /proc (no NVML needed), else nvidia-smi; None when neither."""
    try:
        text = Path("/proc/driver/nvidia/version").read_text()
        for word in text.split():
            if word[:3].isdigit() and word.count(".") >= 1:
                return word
    except OSError:
        pass
    if shutil.which("nvidia-smi"):
        try:
            done = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                  capture_output=True, text=True, timeout=20, check=False)
            lines = done.stdout.strip().splitlines()
            return lines[0].strip() if done.returncode == 0 and lines else None
        except (OSError, subprocess.SubprocessError):
            return None
    return None


def trtllm_runtime_checks(probe: dict[str, Any], environ: dict[str, str], driver: str | None) -> list[Check]:
    """The known real-world start failures of TensorRT-LLM 1.2.1 beyond `import tensorrt_llm`."""
    checks = []
    launcher = sorted(k for k in environ if k.startswith(LAUNCHER_PREFIXES))
    checks.append(Check("MPI launcher variables", "WARN" if launcher else "PASS",
                        ", ".join(launcher[:6]) + (" ..." if len(launcher) > 6 else "") if launcher else "none set",
                        "unset them for the driver (verl clears PMI/PMIX/OMPI/SLURM variables before starting "
                        "TensorRT-LLM): a single-GPU LLM() then tries to join the outer job and hangs"
                        if launcher else ""))
    torch_version = str(probe.get("torch", {}).get("version", ""))
    if torch_version:
        same = torch_version.split("+")[0] == TRTLLM_TORCH
        checks.append(Check("torch for TensorRT-LLM", "PASS" if same else "WARN",
                            f"torch {torch_version}; TensorRT-LLM 1.2.1 was built against {TRTLLM_TORCH}",
                            "" if same else f"install torch=={TRTLLM_TORCH} from the CUDA 13 index "
                            "(https://download.pytorch.org/whl/cu130), or use NVIDIA's TensorRT-LLM container"))
    wheels = probe.get("wheels", {})
    cuda13 = {n: v for n, v in wheels.items() if v.split(".")[0] == "13"}
    checks.append(Check("cuBLAS (CUDA 13) wheel", "PASS" if cuda13 else "WARN",
                        ", ".join(f"{n} {v}" for n, v in sorted(wheels.items())) or "no nvidia-cublas wheel",
                        "" if cuda13 else "TensorRT-LLM 1.2.1 links CUDA 13's cuBLAS: `pip install "
                        "'nvidia-cublas>=13,<14'` in the driver's environment (NVIDIA's container has it)"))
    major = int(driver.split(".")[0]) if driver and driver.split(".")[0].isdigit() else None
    checks.append(Check("NVIDIA driver", "PASS" if major and major >= CUDA13_MIN_DRIVER else "FAIL" if major
                        else "WARN", driver or "not found (no /proc/driver/nvidia/version, no nvidia-smi)",
                        "" if major and major >= CUDA13_MIN_DRIVER else
                        f"CUDA 13 needs NVIDIA driver {CUDA13_MIN_DRIVER} or newer: upgrade the driver"))
    return checks
