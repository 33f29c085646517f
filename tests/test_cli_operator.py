"""The command line as an operator meets it: one-line errors with the right exit status and no traceback,
CLI conventions, quiet libraries, and the KV reservation the reference engine makes on CPU.

Every case runs the CLI as a subprocess (`python -m pie_driver_trtllm.tools.cli`) against a temporary
PIE_HOME; nothing here installs torch or reaches the network.
"""

from __future__ import annotations

import importlib.util
import json
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import write_config

from pie_driver_trtllm.benchmarks.cli import target_table

ROOT = Path(__file__).resolve().parent.parent
CLI = [sys.executable, "-m", "pie_driver_trtllm.tools.cli"]
PIE_CONFIG = """[[model]]
name = "llama"
hf_repo = "meta-llama/Llama-3.2-1B"

[model.driver]
type = "tensorrt_llm"
device = ["cuda:0"]

[model.driver.options]
engine = "reference"
lookahed_tokens = 4
max_concurrent_requests = 0
bogus_thing = 1
"""


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    base = {k: v for k, v in os.environ.items() if k not in ("PIE_PYTHON", "VIRTUAL_ENV", "NO_COLOR",
                                                             "FORCE_COLOR", "PYTHONPATH")}
    return {**base, "PIE_HOME": str(tmp_path / "pie home"), "PYTHONPATH": str(ROOT), "COLUMNS": "200"}


def cli(env: dict[str, str], *args: str, prelude: str | None = None, timeout: float = 120,
        ) -> subprocess.CompletedProcess[str]:
    command = CLI if prelude is None else [sys.executable, "-c", prelude + "\nfrom pie_driver_trtllm.tools.cli "
                                           "import main\nimport sys\nsys.argv[0] = 'pie-driver-trtllm'\nmain()"]
    return subprocess.run([*command, *args], capture_output=True, text=True, env=env, timeout=timeout,
                          check=False, cwd=ROOT)


def one_error(done: subprocess.CompletedProcess[str], code: int, needle: str) -> str:
    """The run exited with `code`, printed no traceback, and its last error line holds `needle`."""
    output = done.stdout + done.stderr
    assert done.returncode == code, output
    assert "Traceback" not in output and "Error:" not in output.replace("Error: Invalid value", ""), output
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert lines and needle in lines[-1], output
    return lines[-1]


# --- conventions --------------------------------------------------------------------------------------------


def test_version_short_help_and_completion(env: dict[str, str]) -> None:
    done = cli(env, "--version")
    assert done.returncode == 0 and done.stdout.strip() == "pie-driver-trtllm 0.1.0"
    done = cli(env, "-h")
    assert done.returncode == 0 and "--install-completion" in done.stdout and "-V, --version" in done.stdout
    done = cli(env, "doctor", "-h")
    assert done.returncode == 0 and "Example" in done.stdout


def test_usage_errors_exit_2_everywhere(env: dict[str, str]) -> None:
    one_error(cli(env, "demo", "--contexts", "2"), 2, "Invalid value for '--contexts'")
    one_error(cli(env, "demo", "--size", "huge"), 2, "'huge' is not one of 'tiny', 'small', '1b'")
    one_error(cli(env, "make-model", "/tmp/x", "--size", "huge"), 2, "Invalid value for '--size'")
    one_error(cli(env, "doctor", "--engine", "nope"), 2, "--engine 'nope' is not one of")


# --- errors in one line ---------------------------------------------------------------------------------------


def test_serve_with_a_closed_handshake_fd(env: dict[str, str], tmp_path: Path) -> None:
    config = tmp_path / "driver.toml"
    config.write_text('[model]\nsnapshot_dir = "/m"\n')
    one_error(cli(env, "serve", "--config", str(config), "--handshake-fd", "97"), 2,
              "--handshake-fd 97 is not an open file descriptor")


def test_serve_on_a_pie_config_says_what_serve_expects(env: dict[str, str], tmp_path: Path) -> None:
    config = tmp_path / "pie.toml"
    config.write_text(PIE_CONFIG)
    line = one_error(cli(env, "serve", "--config", str(config)), 2, "is a Pie config ([[model]] entries)")
    assert "driver startup TOML" in line and "must be a table" not in line


def driver(env: dict[str, str], *args: str, stdin: int | None = subprocess.DEVNULL
           ) -> subprocess.CompletedProcess[str]:
    """`python -m pie_driver_trtllm`, the way a host starts the driver."""
    return subprocess.run([sys.executable, "-m", "pie_driver_trtllm", *args], capture_output=True, text=True,
                          env=env, timeout=60, check=False, cwd=ROOT, stdin=stdin)


def test_the_driver_on_a_pie_config_says_what_it_expects(env: dict[str, str], tmp_path: Path) -> None:
    config = tmp_path / "pie.toml"
    config.write_text(PIE_CONFIG)
    done = driver(env, "--config", str(config))
    line = one_error(done, 2, f"{config} is a Pie config ([[model]] entries)")
    assert len(done.stderr.splitlines()) == 1 and done.stdout == ""
    assert "driver startup TOML" in line and "must be a table" not in line


@pytest.mark.parametrize(("fd", "needle"), [
    ("97", "--handshake-fd 97 is not an open file descriptor"),
    ("-3", "--handshake-fd -3 is not an open file descriptor"),
    ("0", "--handshake-fd 0 is open for reading only"),
    ("three", "argument --handshake-fd: invalid int value: 'three'"),
])
def test_the_driver_with_a_bad_handshake_fd(env: dict[str, str], tmp_path: Path, fd: str, needle: str) -> None:
    config = tmp_path / "driver.toml"
    config.write_text('[model]\nsnapshot_dir = "/m"\n[driver]\ndevice = ["cpu"]\n')
    with config.open("rb") as read_only:  # fd 0: open, but not for writing
        done = driver(env, "--config", str(config), "--handshake-fd", fd, stdin=read_only.fileno())
    one_error(done, 2, needle)
    assert len(done.stderr.splitlines()) == 1 and done.stdout == ""


def test_the_driver_without_tensorrt_llm_installs_from_where_it_came_from(env: dict[str, str],
                                                                          tmp_path: Path) -> None:
    if importlib.util.find_spec("tensorrt_llm") is not None:
        pytest.skip("tensorrt_llm is installed here")
    config = tmp_path / "driver.toml"
    config.write_text('[model]\nsnapshot_dir = "/m"\n[driver]\ndevice = ["cuda:0"]\n')
    done = driver(env, "--config", str(config))
    line = one_error(done, 2, "engine tensorrt_llm: the tensorrt_llm package is not importable")
    assert len(done.stderr.splitlines()) == 1
    assert f"`{sys.executable} -m pip install '{ROOT}[tensorrt]' --extra-index-url https://pypi.nvidia.com`" in line
    assert "'pie-driver-trtllm[" not in line  # a name no index has


@pytest.mark.slow
def test_the_driver_with_handshake_fd_1_writes_the_handshake_to_stdout(env: dict[str, str], tiny_model: Path,
                                                                       tmp_path: Path) -> None:
    config = write_config(tmp_path, tiny_model)
    process = subprocess.Popen([sys.executable, "-m", "pie_driver_trtllm", "--config", str(config),
                                "--handshake-fd", "1"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env=env, cwd=ROOT, stdin=subprocess.DEVNULL)
    try:
        assert process.stdout is not None
        assert "endpoint" in json.loads(process.stdout.readline())
        assert json.loads(process.stdout.readline())["ready"] is True
        process.send_signal(signal.SIGTERM)
        _, err = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 0 and '"ready"' not in err, err


@pytest.mark.slow
def test_the_handshake_fd_gets_exactly_two_lines_then_closes_and_stdout_stays_empty(env: dict[str, str],
                                                                                   tiny_model: Path,
                                                                                   tmp_path: Path) -> None:
    from pie_driver_trtllm.client import DriverClient

    config = write_config(tmp_path, tiny_model, driver={"group_id": 5}, stream_socket=True)
    read_end, write_end = os.pipe()
    process = subprocess.Popen([sys.executable, "-m", "pie_driver_trtllm", "--config", str(config),
                                "--handshake-fd", str(write_end)], pass_fds=(write_end,), stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, env=env, cwd=ROOT, stdin=subprocess.DEVNULL)
    os.close(write_end)
    try:
        data, deadline = b"", time.monotonic() + 120
        while chunk := _read_within(read_end, deadline):  # b"" once the driver closes its end
            data += chunk
        lines = data.decode().splitlines()
        assert len(lines) == 2
        first, second = json.loads(lines[0]), json.loads(lines[1])
        assert set(first) == {"group_id", "endpoint", "stream_endpoint", "caps"} and first["group_id"] == 5
        assert second == {"ready": True, "num_groups": 1}
        client = DriverClient(first["endpoint"])
        assert client.call("handshake").result["caps"] == first["caps"]
        client.close()
        process.send_signal(signal.SIGTERM)
        out, _ = process.communicate(timeout=60)
    finally:
        os.close(read_end)
        if process.poll() is None:
            process.kill()
    assert process.returncode == 0 and out == b""


def _read_within(fd: int, deadline: float) -> bytes:
    ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
    assert ready, "the handshake stream was not closed in time"
    return os.read(fd, 1 << 16)


def test_make_model_onto_a_file(env: dict[str, str], tmp_path: Path) -> None:
    target = tmp_path / "a-file"
    target.write_text("x")
    one_error(cli(env, "make-model", str(target)), 2, f"{target} is a file")


def test_bench_usage_errors(env: dict[str, str], tmp_path: Path) -> None:
    out = str(tmp_path / "b")
    one_error(cli(env, "bench", "--size", "huge", "--out", out), 2, "'huge' is not one of 'tiny', 'small', '1b'")
    line = one_error(cli(env, "bench", "-w", "transprt", "--out", out), 2, "Invalid value for '--workload'")
    assert "--workloads" not in line and "'transport'" in line
    one_error(cli(env, "bench", "--device", "gpu", "--out", out), 2, "--device 'gpu' is not one of")
    one_error(cli(env, "bench", "-w", "codec", "--plot", str(tmp_path / "p.png"), "--out", out), 2,
              "--plot draws the overhead workload")
    assert not Path(out).exists(), "nothing measured"


@pytest.mark.slow
def test_bench_on_a_gpu_device_without_a_gpu(env: dict[str, str], tmp_path: Path) -> None:
    pytest.importorskip("torch")
    if any(Path("/dev").glob("nvidia[0-9]*")):
        pytest.skip("this machine has a GPU")
    one_error(cli(env, "bench", "--device", "cuda:0", "--out", str(tmp_path / "b")), 1,
              "--device cuda:0: torch sees 0 CUDA device(s)")


def test_bench_plot_without_matplotlib_fails_before_measuring(env: dict[str, str], tmp_path: Path) -> None:
    out = tmp_path / "b"
    done = cli(env, "bench", "-w", "overhead", "--plot", str(tmp_path / "p.png"), "--out", str(out),
               prelude="import sys; sys.modules['matplotlib'] = None  # as if not installed")
    one_error(done, 2, "--plot needs matplotlib")
    assert not out.exists()


def test_bench_says_where_results_went_and_marks_quick_runs(env: dict[str, str], tmp_path: Path) -> None:
    out = tmp_path / "b"
    done = cli(env, "bench", "-w", "codec", "--quick", "--repeat", "2", "--out", str(out))
    output = done.stdout + done.stderr
    assert "Traceback" not in output
    assert f"wrote {out / 'codec.json'}" in done.stdout
    assert f"results: {out}" in done.stdout
    assert "targets: measured vs target (--quick: smoke-test sizes, not a measurement)" in done.stdout
    assert "(repetition 2 of 2)" in done.stdout and "issue" not in output.lower()
    data = json.loads((out / "codec.json").read_text())
    spread = data["spread"]["codec 64 req x 8192 tok, mean ms"]
    assert data["repeats"] == 2 and len(spread["values"]) == 2 and spread["min"] <= spread["median"] <= spread["max"]
    met = spread["median"] < 1.0
    assert done.returncode == (0 if met else 1), output
    if not met:
        assert "✗ 1 target(s) not met: codec 64 req x 8192 tok, mean ms" in done.stdout


def test_targets_not_met_are_named() -> None:
    rows = [{"batch": b, "ratio": r, "driver_cost_us": 5.0} for b, r in ((1, 0.99), (16, 0.5))]
    results = {"overhead": {"batches": rows, "spread": {"overhead ratio, batch 16": {
        "median": 0.7, "min": 0.5, "max": 1.4, "values": [0.5, 0.7, 1.4]}}}}
    _, missed = target_table(results)
    assert [(t.label, t.value) for t in missed] == [("overhead ratio, batch 16", 0.7)]  # the median is judged


# --- doctor -----------------------------------------------------------------------------------------------------


def test_doctor_offers_set_venv_when_python3_on_path_lacks_the_package(env: dict[str, str], tmp_path: Path) -> None:
    bare = tmp_path / "bin"
    bare.mkdir()
    (bare / "python3").symlink_to(Path(sys.base_prefix) / "bin" / "python3")
    env = {**env, "PATH": f"{bare}{os.pathsep}{env['PATH']}"}
    del env["PYTHONPATH"]  # the CLI imports this tree from its working directory; python3 must not see it
    done = cli(env, "doctor", "--engine", "reference", "--min-free-gib", "0")
    assert done.returncode == 1 and "Traceback" not in done.stdout + done.stderr
    lines = done.stdout.splitlines()
    at = next(i for i, line in enumerate(lines) if line.split()[:2] == ["FAIL", "pie-driver-trtllm"])
    assert f"not importable in {bare / 'python3'}" in lines[at]
    assert lines[at + 1].strip() == (f"fix: the interpreter running this tool has it: register its venv with "
                                     f"`pie-driver-trtllm set venv {sys.prefix}`")


def test_doctor_names_the_config_setting_that_wins(env: dict[str, str], tmp_path: Path) -> None:
    config = tmp_path / "pie.toml"
    config.write_text(PIE_CONFIG.replace('engine = "reference"', 'engine = "reference"\nvenv = "/no/such/venv"'))
    done = cli(env, "doctor", "-c", str(config), "--json")
    report = json.loads(done.stdout)
    check = next(c for c in report["checks"] if c["name"] == "interpreter")
    assert done.returncode == 1 and check["status"] == "FAIL"
    assert f"[model.driver.options] in {config}: it wins over `set venv`" in check["fix"]


def test_doctor_honours_no_color(env: dict[str, str]) -> None:
    env = {**env, "PIE_PYTHON": str(tmp := Path("/no/such/python")), "FORCE_COLOR": "1"}
    coloured = cli(env, "doctor")
    assert "\x1b[1;31mFAIL" in coloured.stdout and str(tmp) in coloured.stdout
    plain = cli({**env, "NO_COLOR": "1"}, "doctor")
    assert plain.returncode == 1 and "\x1b[3" not in plain.stdout and "FAIL  interpreter" in plain.stdout


# --- validate -----------------------------------------------------------------------------------------------------


def test_validate_names_every_problem_in_one_run(env: dict[str, str], tmp_path: Path) -> None:
    config = tmp_path / "pie.toml"
    config.write_text(PIE_CONFIG)
    done = cli(env, "validate", str(config))
    assert done.returncode == 1 and "Traceback" not in done.stderr
    located = [line for line in done.stderr.splitlines() if line.startswith(f"{config}:")]
    assert [line.split(":")[1] for line in located] == ["11", "12", "13"]
    assert "did you mean `lookahead_tokens`?" in located[0]
    assert "max_concurrent_requests = 0 is out of range" in located[1]
    assert "bogus_thing" in located[2] and "allowed keys" not in located[2]
    assert done.stderr.splitlines()[-1] == f"✗ 3 problem(s) in {config}"


def test_validate_startup_file_runs_the_checks_serve_runs(env: dict[str, str], tmp_path: Path) -> None:
    config = tmp_path / "driver.toml"
    config.write_text('[model]\nsnapshot_dir = "missing-model"\n\n[driver]\ndevice = ["cpu"]\n\n'
                      '[driver.options]\nlookahead_tokns = 3\n\n[drivers]\nx = 1\n')
    done = cli(env, "validate", str(config))
    assert done.returncode == 1, done.stdout + done.stderr
    assert f"{config}:10: unknown table [drivers]" in done.stderr
    assert f"{config}:2: model.snapshot_dir {tmp_path / 'missing-model'} does not exist" in done.stderr
    assert f"{config}:8: unknown key driver.options.lookahead_tokns; did you mean `lookahead_tokens`?" \
        in done.stderr
    (tmp_path / "missing-model").mkdir()
    (tmp_path / "missing-model" / "config.json").write_text("{}")
    config.write_text(config.read_text().replace("lookahead_tokns", "lookahead_tokens").replace("[drivers]\nx = 1\n",
                                                                                              ""))
    done = cli(env, "validate", str(config))
    assert done.returncode == 0 and done.stdout.strip() == f"✓ {config}: a valid driver startup file"


def test_validate_names_every_problem_behind_an_empty_snapshot_dir(env: dict[str, str], tmp_path: Path) -> None:
    config = tmp_path / "driver.toml"
    config.write_text('[model]\nsnapshot_dir = ""\n\n[driver]\ndevice = []\n\n[driver.options]\n'
                      'lookahead_tokens = 99\nllm_kwargs = { "not ok" = 1 }\n')
    done = cli(env, "validate", str(config))
    assert done.returncode == 1 and "Traceback" not in done.stderr
    located = [line for line in done.stderr.splitlines() if line.startswith(f"{config}:")]
    assert [line.split(":")[1] for line in located] == ["2", "5", "8", "9"], done.stderr
    assert "model.snapshot_dir is required" in located[0] and "driver.device = [] is empty" in located[1]
    assert "lookahead_tokens = 99" in located[2] and "'not ok' is not a Python identifier" in located[3]


def test_validate_refuses_a_drivers_toml(env: dict[str, str], tmp_path: Path) -> None:
    path = tmp_path / "drivers.toml"
    path.write_text('[driver.tensorrt_llm]\nvenv = "/opt/v"\n')
    one_error(cli(env, "validate", str(path)), 1, "✗ 1 problem(s)")
    assert "this is Pie's drivers.toml" in cli(env, "validate", str(path)).stderr


# --- install ------------------------------------------------------------------------------------------------------


def test_install_recipe_installs_from_this_checkout(env: dict[str, str]) -> None:
    done = cli(env, "install", "/tmp/v", "--extra", "reference")
    assert done.returncode == 0, done.stderr
    assert "from the source checkout this tool runs from" in done.stdout.splitlines()[0]
    assert f"/tmp/v/bin/python -m pip install '{ROOT}[reference]'" in done.stdout
    assert "'pie-driver-trtllm[" not in done.stdout


def test_a_copy_installed_from_a_wheel_names_that_wheel(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from importlib import metadata

    from pie_driver_trtllm import origin

    wheel = tmp_path / "pie_driver_trtllm-0.1.0-py3-none-any.whl"
    wheel.write_bytes(b"")

    class Installed:
        def read_text(self, name: str) -> str | None:
            return json.dumps({"url": wheel.as_uri()}) if name == "direct_url.json" else None

    monkeypatch.setattr(metadata, "distribution", lambda name: Installed())
    assert origin.default_source(tmp_path) == (str(wheel), "the wheel or folder this copy was installed from")

    def not_installed(name: str) -> None:
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(metadata, "distribution", not_installed)
    assert origin.default_source(tmp_path) == ("pie-driver-trtllm", "the package index")


def test_install_with_a_python_that_does_not_exist(env: dict[str, str], tmp_path: Path) -> None:
    one_error(cli(env, "install", str(tmp_path / "v"), "--run", "--python", "3.99"), 2,
              "--python 3.99: not found")
    assert not (tmp_path / "v").exists()


# --- quiet libraries, Ctrl-C, the KV reservation --------------------------------------------------------------------


@pytest.mark.slow
def test_make_model_draws_no_progress_bars(env: dict[str, str], tmp_path: Path) -> None:
    done = cli(env, "make-model", str(tmp_path / "m"))
    assert done.returncode == 0 and done.stdout.startswith(f"wrote {tmp_path / 'm'} (tiny")
    assert "Writing model shards" not in done.stderr and "it/s" not in done.stderr


@pytest.mark.slow
def test_serve_exits_130_on_ctrl_c_and_loads_quietly(env: dict[str, str], tiny_model: Path, tmp_path: Path) -> None:
    config = tmp_path / "driver.toml"
    config.write_text(f'[model]\nsnapshot_dir = "{tiny_model}"\n\n[driver]\ndevice = ["cpu"]\n\n'
                      '[driver.options]\nengine = "reference"\n')
    process = subprocess.Popen([*CLI, "serve", "--config", str(config)], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    try:
        assert process.stdout is not None
        first = process.stdout.readline()
        assert "endpoint" in json.loads(first), first
        assert json.loads(process.stdout.readline())["ready"] is True
        time.sleep(0.2)
        process.send_signal(signal.SIGINT)
        _, err = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 130, err
    assert "Loading weights" not in err and "Traceback" not in err


def test_cpu_kv_budget_follows_available_memory(monkeypatch: pytest.MonkeyPatch, tiny_model: Path) -> None:
    pytest.importorskip("torch")
    from transformers import AutoModelForCausalLM

    from pie_driver_trtllm.engines.base import ModelInfo
    from pie_driver_trtllm.engines.reference import engine
    from pie_driver_trtllm.engines.reference.batched_llama import slot_bytes

    assert engine.available_memory() > 0
    monkeypatch.setattr(engine, "available_memory", lambda: 16 << 20)
    assert engine.kv_budget_cpu() == 4 << 20
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    info = ModelInfo("tiny", "LlamaForCausalLM", vocab_size=512, max_model_len=2048, eos_token_id=2, pad_token_id=0)
    per_slot = slot_bytes(model, 2048)
    assert engine._slot_count(model, info, "cpu", 128) == (4 << 20) // per_slot < 128
    assert engine._slot_count(model, info, "cpu", 2) == 2  # the configured limit when it fits


def test_demo_sizes_the_driver_for_its_own_contexts(tmp_path: Path) -> None:
    from pie_driver_trtllm.config import load_config
    from pie_driver_trtllm.tools.demo import write_config

    config = load_config(write_config(tmp_path, tmp_path / "model", "cpu", "float32", contexts=8, steps=24))
    assert config.options.max_concurrent_requests == 9 and config.options.max_seq_len == 31
