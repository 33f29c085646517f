"""Start-up of the TensorRT-LLM engine: library paths, import failures, one-line errors."""

from __future__ import annotations

import os
import sys

import pytest
from trtllm_support import trt_config

from pie_driver_trtllm.config import StartupError, parse_config
from pie_driver_trtllm.engines.tensorrt_llm import startup as loader


def test_wheel_library_folders_go_on_the_loader_path_with_one_reexec(tmp_path, monkeypatch):
    lib = tmp_path / "nvidia" / "cublas" / "lib"
    lib.mkdir(parents=True)
    (lib / "libcublas.so.13").write_bytes(b"")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "nvidia", raising=False)
    monkeypatch.setenv("LD_LIBRARY_PATH", "/opt/other")
    monkeypatch.delenv("PIE_TRTLLM_LD_LIBRARY_PATH_BOOTSTRAPPED", raising=False)
    execs = []
    monkeypatch.setattr(os, "execv", lambda path, argv: execs.append(argv))
    loader.ensure_library_path(["--config", "x.toml"])
    assert os.environ["LD_LIBRARY_PATH"].split(os.pathsep) == [str(lib), "/opt/other"]
    assert execs == [[sys.executable, "-m", "pie_driver_trtllm", "--config", "x.toml"]]
    loader.ensure_library_path(["--config", "x.toml"])  # the guard stops a second re-exec
    assert len(execs) == 1


@pytest.mark.parametrize("message, remedy", [
    ("libmpi.so.40: cannot open shared object file", "libopenmpi-dev"),
    ("libcuda.so.1: cannot open shared object file", "NVIDIA driver"),
    ("libpython3.12.so.1.0: cannot open shared object file", "enable-shared"),
    ("something else broke", "pip install"),
])
def test_import_failures_name_the_remedy(tmp_path, monkeypatch, message, remedy):
    package = tmp_path / "tensorrt_llm"
    package.mkdir()
    (package / "__init__.py").write_text(f"raise ImportError({message!r})\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "tensorrt_llm", raising=False)
    with pytest.raises(StartupError) as failure:
        loader.import_tensorrt_llm()
    text = str(failure.value)
    assert remedy in text and message.split(":")[0] in text and "\n" not in text


def test_tensor_parallel_other_than_one_is_refused():
    with pytest.raises(StartupError, match="tensor_parallel_size"):
        parse_config({"model": {"snapshot_dir": "/m"}, "driver": {"tensor_parallel_size": 2}})


def test_missing_package_is_refused_before_any_heavy_import(tiny_model, monkeypatch):
    monkeypatch.setattr(loader.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(StartupError, match="pip install"):
        loader.TensorRTLLMEngine.load(trt_config(tiny_model), "cuda:0")
