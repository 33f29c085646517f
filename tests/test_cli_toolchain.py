"""The setup tool chain: install, set, unset, show, doctor, exec, list, validate.

Every test runs against a temporary PIE_HOME with PIE_PYTHON and VIRTUAL_ENV cleared; the real ~/.pie is
never read or written.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from typer.testing import CliRunner

from pie_driver_trtllm.tools import pie_home
from pie_driver_trtllm.tools.cli import app
from pie_driver_trtllm.tools.doctor import trt_install_fix
from pie_driver_trtllm.tools.pie_home import PieHomeError, resolve_interpreter

ROOT = Path(__file__).resolve().parent.parent
DOUBLE = Path(__file__).resolve().parent / "trtllm_double"
VERBS = ("install", "set", "unset", "show", "doctor", "exec", "list", "validate", "serve", "make-model", "demo")
FOREIGN = """# drivers for this workstation (hand-written comment)
[python]
venv = "/opt/shared-venv"  # shared default

[driver.vllm]
venv = "/opt/vllm venv"   # keep me
"""


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "pie home"
    monkeypatch.setenv("PIE_HOME", str(path))
    for name in ("PIE_PYTHON", "VIRTUAL_ENV", "PYTHONPATH", "PIE_TRTLLM_TEST_DOUBLE"):
        monkeypatch.delenv(name, raising=False)
    return path


def invoke(*args: str):
    return CliRunner().invoke(app, list(args))


# --- help ---------------------------------------------------------------------------------------------------


def test_top_level_help_lists_every_verb() -> None:
    result = invoke("--help")
    assert result.exit_code == 0
    for verb in VERBS:
        assert f"  {verb} " in result.output, verb
    assert "Example" in result.output


@pytest.mark.parametrize("verb", VERBS)
def test_each_verb_help_has_an_example(verb: str) -> None:
    result = invoke(verb, "--help")
    assert result.exit_code == 0, result.output
    assert "Example" in result.output and f"pie-driver-trtllm {verb}" in result.output


def test_typer_app_is_exposed_through_the_pie_drivers_entry_point_group() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    target = project["entry-points"]["pie.drivers"]["tensorrt_llm"]
    module, _, attr = target.partition(":")
    assert getattr(__import__(module, fromlist=[attr]), attr) is app
    assert "tomlkit" in " ".join(project["dependencies"])


# --- install ------------------------------------------------------------------------------------------------


def test_install_prints_a_copy_pasteable_recipe(home: Path) -> None:
    result = invoke("install", "--extra", "tensorrt")
    assert result.exit_code == 0, result.output
    venv = home / "venvs" / "tensorrt_llm"
    quoted = f"'{venv}'"  # PIE_HOME has a space: paths are shell-quoted
    lines = result.output.splitlines()
    assert lines[0].startswith("# Recipe for the tensorrt_llm driver")
    assert "apt-get install -y libopenmpi-dev openmpi-bin" in result.output
    assert f"uv venv {quoted} --python 3.12" in lines
    assert (f"uv pip install --python '{venv}/bin/python' '{ROOT}[tensorrt]' "  # the checkout it runs from
            "--extra-index-url https://pypi.nvidia.com") in lines
    assert f"python3.12 -m venv {quoted}" in lines
    assert f"pie-driver-trtllm set venv {quoted}" in lines
    assert "pie-driver-trtllm doctor" in lines
    assert not venv.exists(), "without --run nothing is created"


def test_install_recipe_for_reference_extra_and_explicit_path(home: Path, tmp_path: Path) -> None:
    result = invoke("install", str(tmp_path / "v"), "--extra", "reference")
    assert result.exit_code == 0
    assert f"uv pip install --python {tmp_path}/v/bin/python '{ROOT}[reference]'" in result.output
    assert "pypi.nvidia.com" not in result.output and "openmpi" not in result.output
    assert invoke("install", "--extra", "bogus").exit_code == 2


@pytest.fixture(scope="module")
def installed_venv(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """`install --run` on this machine, from a copy of the checkout, without dependencies (fast)."""
    base = tmp_path_factory.mktemp("install")
    source = base / "checkout"
    source.mkdir()
    shutil.copy(ROOT / "pyproject.toml", source)
    shutil.copy(ROOT / "README.md", source)
    shutil.copytree(ROOT / "pie_driver_trtllm", source / "pie_driver_trtllm",
                    ignore=shutil.ignore_patterns("__pycache__"))
    venv = base / "venv"
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")}
    done = subprocess.run([sys.executable, "-m", "pie_driver_trtllm.tools.cli", "install", str(venv), "--run",
                           "--from", str(source), "--extra", "none", "--no-deps"],
                          capture_output=True, text=True, env={**env, "PIE_HOME": str(base / "home")},
                          timeout=240, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    return venv, done.stdout + done.stderr


@pytest.mark.slow
def test_install_run_creates_a_venv_with_the_package(installed_venv: tuple[Path, str]) -> None:
    venv, output = installed_venv
    assert "==> [1/3] creating" in output and "==> [2/3] installing" in output and "==> [3/3]" in output
    assert ("Python 3.12" in output) or ("falling back to Python" in output)  # 3.12 preferred, else a notice
    # --extra none --no-deps leaves a venv that cannot serve: said, with the command that completes it
    assert f"! Installed pie-driver-trtllm 0.1.0 into {venv}, but it cannot serve yet: zmq, msgspec missing" in output
    assert f"pie-driver-trtllm install {venv} --run --extra reference --from" in output
    assert f"pie-driver-trtllm set venv {venv}" in output
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # the venv's own copy, not this tree
    done = subprocess.run([str(venv / "bin" / "python"), "-c", "import pie_driver_trtllm as p; print(p.__file__)"],
                          capture_output=True, text=True, cwd=venv, env=env, check=True)
    assert done.stdout.strip().startswith(str(venv)), "imported from the venv, not the checkout"


@pytest.mark.slow
def test_exec_runs_python_and_pip_in_the_registered_venv(installed_venv: tuple[Path, str], home: Path) -> None:
    venv, _ = installed_venv
    assert invoke("set", "venv", str(venv)).exit_code == 0
    env = {k: v for k, v in os.environ.items() if k != "VIRTUAL_ENV"}
    cli = [sys.executable, "-m", "pie_driver_trtllm.tools.cli", "exec", "--"]
    done = subprocess.run([*cli, "python", "-c", "import sys; print(sys.prefix)"], capture_output=True, text=True,
                          env=env, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str(venv)
    done = subprocess.run([*cli, "pip", "--version"], capture_output=True, text=True, env=env, check=False)
    assert done.returncode == 0 and str(venv) in done.stdout
    done = subprocess.run([*cli, "python", "-c", "import sys; sys.exit(3)"], env=env, check=False)
    assert done.returncode == 3, "the command's exit status is passed through"


def test_exec_without_a_command_explains_usage(home: Path) -> None:
    result = invoke("exec")
    assert result.exit_code == 2 and "no command to exec" in result.output


# --- set / unset / show -------------------------------------------------------------------------------------


def test_set_unset_round_trip_keeps_foreign_blocks_and_comments(home: Path) -> None:
    path = home / "drivers.toml"
    home.mkdir()
    path.write_text(FOREIGN)
    odd = str(home / 'venv with "quotes" and \\ backslash')
    result = invoke("set", "venv", odd)
    assert result.exit_code == 0, result.output
    assert f"[driver.tensorrt_llm] of {path}" in result.output
    text = path.read_text()
    data = tomllib.loads(text)
    assert data["driver"]["tensorrt_llm"] == {"venv": odd}, "escaped so it reads back exactly"
    assert data["driver"]["vllm"] == {"venv": "/opt/vllm venv"}
    assert data["python"] == {"venv": "/opt/shared-venv"}
    assert "# drivers for this workstation (hand-written comment)" in text and "# keep me" in text
    assert "step 4 of 6" in result.output and odd in result.output  # the show that follows

    assert invoke("set", "python", "/usr/bin/python3.12").exit_code == 0
    data = tomllib.loads(path.read_text())
    assert data["driver"]["tensorrt_llm"] == {"python": "/usr/bin/python3.12"}, "setting python clears venv"

    result = invoke("unset", "python")
    assert result.exit_code == 0 and "Removed python from [driver.tensorrt_llm]" in result.output
    assert path.read_text() == FOREIGN, "an emptied block is dropped and everything else is byte-identical"
    result = invoke("unset", "python")
    assert result.exit_code == 0 and "Nothing to remove" in result.output
    assert path.read_text() == FOREIGN
    assert [p.name for p in home.iterdir()] == ["drivers.toml"], "no temporary files left behind"


def test_set_shared_writes_the_python_block(home: Path) -> None:
    assert invoke("set", "venv", "/opt/other", "--shared").exit_code == 0
    data = tomllib.loads((home / "drivers.toml").read_text())
    assert data == {"python": {"venv": "/opt/other"}}
    assert invoke("unset", "venv", "--shared").exit_code == 0
    assert tomllib.loads((home / "drivers.toml").read_text()) == {}


def test_write_is_atomic_when_replace_fails(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    home.mkdir()
    (home / "drivers.toml").write_text(FOREIGN)

    def broken(src: str, dst: str) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(pie_home.os, "replace", broken)
    with pytest.raises(OSError):
        pie_home.set_interpreter("venv", "/opt/x", home / "drivers.toml")
    assert (home / "drivers.toml").read_text() == FOREIGN
    assert [p.name for p in home.iterdir()] == ["drivers.toml"]


def test_set_refuses_a_broken_drivers_toml(home: Path) -> None:
    home.mkdir()
    (home / "drivers.toml").write_text("[driver.vllm\nvenv = 1\n")
    result = invoke("set", "venv", "/opt/x")
    assert result.exit_code == 1 and "is not valid TOML" in result.output
    assert (home / "drivers.toml").read_text() == "[driver.vllm\nvenv = 1\n"


def _fake_python(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    python = folder / "python3"
    python.write_text("#!/bin/sh\n")
    python.chmod(0o755)
    return python


def test_precedence_order_each_step(home: Path, tmp_path: Path) -> None:
    """Each source wins over every later one; removing it hands over to the next."""
    venv_env = tmp_path / "activated"
    _fake_python(venv_env / "bin")
    (venv_env / "bin" / "python3").rename(venv_env / "bin" / "python")
    on_path = _fake_python(tmp_path / "pathbin")
    home.mkdir()
    (home / "drivers.toml").write_text('[python]\npython = "/shared/python"\n\n'
                                       '[driver.tensorrt_llm]\nvenv = "/drivers/venv"\n\n'
                                       '[driver.vllm]\nvenv = "/not/ours"\n')
    env = {"PIE_HOME": str(home), "PIE_PYTHON": "/pie/python", "VIRTUAL_ENV": str(venv_env),
           "PATH": str(on_path.parent)}
    options = {"venv": "/options/venv"}

    got = resolve_interpreter(options, env)
    assert (got.step, got.python) == (1, Path("/options/venv/bin/python"))
    assert resolve_interpreter({"python": "/options/python"}, env).python == Path("/options/python")
    got = resolve_interpreter({}, env)
    assert (got.step, got.python) == (2, Path("/pie/python")) and "$PIE_PYTHON" in got.source
    env["PIE_PYTHON"] = ""  # empty counts as unset
    got = resolve_interpreter({}, env)
    assert (got.step, got.python) == (3, venv_env / "bin" / "python") and "$VIRTUAL_ENV" in got.source
    env["VIRTUAL_ENV"] = str(tmp_path / "no-such-venv")  # only used when its bin/python exists
    got = resolve_interpreter({}, env)
    assert (got.step, got.python) == (4, Path("/drivers/venv/bin/python"))
    assert "[driver.tensorrt_llm].venv (/drivers/venv)" in got.source
    (home / "drivers.toml").write_text('[python]\npython = "/shared/python"\n\n[driver.vllm]\nvenv = "/not/ours"\n')
    got = resolve_interpreter({}, env)
    assert (got.step, got.python) == (5, Path("/shared/python")) and "[python].python" in got.source
    (home / "drivers.toml").unlink()  # a missing file counts as empty
    got = resolve_interpreter({}, env)
    assert (got.step, got.python) == (6, on_path)
    env["PATH"] = str(tmp_path / "empty")
    with pytest.raises(PieHomeError, match="pie-driver-trtllm install"):
        resolve_interpreter({}, env)


def test_precedence_rejects_venv_and_python_together(home: Path) -> None:
    with pytest.raises(PieHomeError, match="pick one"):
        resolve_interpreter({"venv": "/a", "python": "/b"}, {"PIE_HOME": str(home)})


def test_show_reports_source_and_step(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PIE_PYTHON", sys.executable)
    result = invoke("show")
    assert result.exit_code == 0
    assert result.output.splitlines()[:3] == [
        "driver:  tensorrt_llm", f"python:  {sys.executable}",
        f"source:  $PIE_PYTHON ({sys.executable})  [step 2 of 6: PIE_PYTHON]"]
    monkeypatch.setenv("PATH", "/nonexistent")
    monkeypatch.delenv("PIE_PYTHON")
    result = invoke("show")
    assert result.exit_code == 1 and "python:  NOT RESOLVED" in result.output


# --- doctor -------------------------------------------------------------------------------------------------


def _doctor_json(*args: str) -> tuple[int, dict]:
    result = invoke("doctor", "--json", "--min-free-gib", "0", *args)
    return result.exit_code, json.loads(result.output)


def _by_name(report: dict) -> dict[str, dict]:
    return {c["name"]: c for c in report["checks"]}


@pytest.mark.slow
def test_doctor_fails_without_tensorrt_llm_and_gives_the_remedy(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PIE_PYTHON", sys.executable)
    result = invoke("doctor", "--min-free-gib", "0")
    assert result.exit_code == 1, result.output
    lines = result.output.splitlines()
    trt = next(i for i, line in enumerate(lines) if line.split()[1:2] == ["tensorrt_llm"])
    assert lines[trt].split()[0] == "FAIL" and "not importable" in lines[trt]
    assert lines[trt + 1].strip() == f"fix: {trt_install_fix()}"
    assert f"pip install '{ROOT}[tensorrt]'" in lines[trt + 1]  # from this checkout, not a name no index has
    assert any(line.split()[:2] == ["PASS", "pie-driver-trtllm"] for line in lines)
    assert any(line.split()[:3] == ["PASS", "reference", "engine"] for line in lines)
    assert lines[-1].startswith("✗ ") and "failed" in lines[-1]


@pytest.mark.slow
def test_doctor_json_schema(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PIE_PYTHON", sys.executable)
    code, report = _doctor_json()
    assert set(report) == {"driver", "engine", "python", "source", "checks", "summary", "ok"}
    assert (report["driver"], report["engine"], report["python"]) == ("tensorrt_llm", "tensorrt_llm", sys.executable)
    assert report["source"].startswith("$PIE_PYTHON")
    names = [c["name"] for c in report["checks"]]
    for name in ("interpreter", "python version", "pie-driver-trtllm", "tensorrt_llm", "reference engine",
                 "MPI runtime", "disk room"):
        assert name in names
    for check in report["checks"]:
        assert set(check) == {"name", "status", "found", "fix"} and check["status"] in ("PASS", "WARN", "FAIL")
        assert all(isinstance(v, str) for v in check.values())
        assert check["status"] == "PASS" or check["fix"], f"{check['name']} has no fix"
    counts = {s.lower(): sum(c["status"] == s for c in report["checks"]) for s in ("PASS", "WARN", "FAIL")}
    assert report["summary"] == counts
    assert report["ok"] is (counts["fail"] == 0) and code == (0 if report["ok"] else 1)
    assert _by_name(report)["tensorrt_llm"]["status"] == "FAIL"


@pytest.mark.slow
def test_doctor_passes_for_the_reference_engine(home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PIE_PYTHON", sys.executable)
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    config = tmp_path / "driver.toml"
    config.write_text(f'[model]\nsnapshot_dir = "{model}"\n\n[driver]\ndevice = ["cpu"]\n\n'
                      '[driver.options]\nengine = "reference"\n')
    code, report = _doctor_json("--config", str(config))
    checks = _by_name(report)
    assert report["engine"] == "reference"
    assert checks["reference engine"]["status"] == "PASS"
    assert checks["config"]["status"] == "PASS" and checks["device cpu"]["status"] == "PASS"
    assert checks["model snapshot"]["status"] == "PASS"
    assert checks["tensorrt_llm"]["status"] == "WARN"  # not needed for this engine
    assert code == 0 and report["ok"], [c for c in report["checks"] if c["status"] == "FAIL"]


@pytest.mark.slow
def test_doctor_config_flags_invisible_devices_and_bad_keys(home: Path, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PIE_PYTHON", sys.executable)
    config = tmp_path / "driver.toml"
    config.write_text('[model]\nsnapshot_dir = "/no/such/model"\n\n[driver]\ndevice = ["cuda:99"]\n\n'
                      '[driver.options]\nengine = "reference"\n')
    code, report = _doctor_json("--config", str(config))
    checks = _by_name(report)
    assert code == 1
    assert checks["device cuda:99"]["status"] == "FAIL" and "CUDA_VISIBLE_DEVICES" in checks["device cuda:99"]["fix"]
    assert checks["model snapshot"]["status"] == "FAIL"
    config.write_text('[model]\nsnapshot_dir = "/m"\n\n[driver.options]\nengine = "reference"\nbogus = 1\n')
    code, report = _doctor_json("--config", str(config))
    assert code == 1 and "unknown key driver.options.bogus" in _by_name(report)["config"]["found"]


@pytest.mark.slow
def test_doctor_passes_tensorrt_llm_when_importable(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With the test double on the path the check can pass: it imports in a child and reports the version."""
    monkeypatch.setenv("PIE_PYTHON", sys.executable)
    monkeypatch.setenv("PYTHONPATH", str(DOUBLE))
    _, report = _doctor_json()
    check = _by_name(report)["tensorrt_llm"]
    assert check["status"] == "PASS" and check["found"].startswith("1.2.1 (import took")


def test_doctor_unresolved_interpreter_fails(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PIE_PYTHON", str(home / "missing" / "python"))
    code, report = _doctor_json()
    assert code == 1 and _by_name(report)["interpreter"]["status"] == "FAIL"
    assert "install --run" in _by_name(report)["interpreter"]["fix"]
