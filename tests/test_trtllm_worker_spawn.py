"""TensorRT-LLM's MPI worker imports the driver's main module again; the driver must survive that."""

from __future__ import annotations

import os
import runpy
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import write_config
from trtllm_support import double_env

from pie_driver_trtllm.client import spawn


def test_importing_the_main_module_as_a_worker_starts_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    started: list[str] = []
    monkeypatch.setattr("pie_driver_trtllm.serving.driver.main", lambda *a, **k: started.append("main") or 0)
    monkeypatch.setattr(os, "_exit", lambda code: started.append(f"exit {code}"))
    monkeypatch.setattr(sys, "argv", ["mpi4py.futures.server"])
    runpy.run_module("pie_driver_trtllm.__main__", run_name="__worker__", alter_sys=True)
    assert started == []


def test_worker_import_in_a_fresh_interpreter_returns_at_once() -> None:
    """What mpi4py's worker does: run_module under "__worker__", with the server's own argv."""
    code = ("import runpy, sys; sys.argv = ['server']; "
            "runpy.run_module('pie_driver_trtllm.__main__', run_name='__worker__', alter_sys=True); print('alive')")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert (done.returncode, done.stdout.strip()) == (0, "alive"), done.stderr


@pytest.mark.slow
def test_generate_mode_starts_without_the_single_process_variable(tmp_path: Path, tiny_model: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """The double, like the real package, starts an MPI worker that re-imports `pie_driver_trtllm.__main__`."""
    monkeypatch.delenv("TLLM_WORKER_USE_SINGLE_PROCESS", raising=False)
    config = write_config(tmp_path, tiny_model, engine="tensorrt_llm", execution_mode="generate")
    process = spawn(config, env=double_env())
    try:
        client = process.client()
        out = client.forward([{"context": 1, "tokens": [3, 4, 5], "positions": [0, 1, 2],
                               "samplers": [{"at": 2, "type": "greedy"}]}])
        client.close()
        assert out[0]["ok"] and isinstance(out[0]["outputs"][0]["token"], int)
    finally:
        assert process.stop() == 0


@pytest.mark.slow
def test_sigterm_exits_in_time_when_llm_shutdown_hangs(tmp_path: Path, tiny_model: Path) -> None:
    config = write_config(tmp_path, tiny_model, engine="tensorrt_llm", execution_mode="generate")
    process = spawn(config, env={**double_env(), "PIE_TRTLLM_DOUBLE_SHUTDOWN_HANG_S": "3600"})
    try:
        process.process.send_signal(signal.SIGTERM)
        assert process.process.wait(timeout=60) == 0  # the hour-long hang was cut at SHUTDOWN_TIMEOUT_S
        assert "LLM.shutdown() did not return" in process.stderr()
    finally:
        if process.process.poll() is None:
            process.process.kill()
            process.process.wait()
