"""Loading TensorRT-LLM: library paths, the lazy import, GPU and argument checks, `LLM(...)`.

Everything here runs once at start-up and turns each known failure into a one-line StartupError with
the remedy. The engines that serve steps live in `trtllm_generate.py` and `trtllm_pyexecutor.py`.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import shlex
import sys
from pathlib import Path
from typing import Any

from pie_driver_trtllm.config import DriverConfig, StartupError
from pie_driver_trtllm.engines.base import Engine
from pie_driver_trtllm.engines.model_facts import read_model_info
from pie_driver_trtllm.origin import tensorrt_install_hint

PYEXECUTOR_VERSION = "1.2.1"
_BOOTSTRAP_GUARD = "PIE_TRTLLM_LD_LIBRARY_PATH_BOOTSTRAPPED"
TEST_DOUBLE_ENV = "PIE_TRTLLM_TEST_DOUBLE"  # set only by tests running against the test double: no GPU check
_DTYPES = {"auto": "auto", "bfloat16": "bfloat16", "bf16": "bfloat16", "float16": "float16", "fp16": "float16",
           "half": "float16", "float32": "float32", "fp32": "float32", "float": "float32"}


def install_hint() -> str:
    """How to install tensorrt_llm into this interpreter, from where this package came from."""
    return tensorrt_install_hint(f"{shlex.quote(sys.executable)} -m pip")


def require_package() -> None:
    """Fail fast (no heavy imports) when tensorrt_llm is not installed."""
    if importlib.util.find_spec("tensorrt_llm") is None:
        raise StartupError(f"engine tensorrt_llm: the tensorrt_llm package is not importable; {install_hint()}")


def nvidia_library_dirs() -> list[str]:
    """Library folders of NVIDIA's pip wheels (CUDA, cuBLAS, TensorRT), which the loader must see."""
    found: list[str] = []
    for package in ("nvidia", "tensorrt_libs", "tensorrt_llm"):
        spec = importlib.util.find_spec(package)
        for root in (spec.submodule_search_locations or []) if spec else []:
            for lib in sorted(Path(root).glob("**/lib")) + sorted(Path(root).glob("libs")) + [Path(root)]:
                if lib.is_dir() and any(lib.glob("*.so*")):
                    found.append(str(lib))
    return list(dict.fromkeys(found))


def ensure_library_path(argv: list[str]) -> None:
    """Put NVIDIA's wheel library folders on LD_LIBRARY_PATH, re-executing this process once if needed.

    The dynamic loader reads LD_LIBRARY_PATH only at process start, so setting it later has no effect on
    libraries that TensorRT-LLM's extension modules link against.
    """
    if os.environ.get(_BOOTSTRAP_GUARD):
        return
    current = [p for p in os.environ.get("LD_LIBRARY_PATH", "").split(os.pathsep) if p]
    missing = [d for d in nvidia_library_dirs() if d not in current]
    if not missing:
        return
    os.environ["LD_LIBRARY_PATH"] = os.pathsep.join(missing + current)
    os.environ[_BOOTSTRAP_GUARD] = "1"
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, [sys.executable, "-m", "pie_driver_trtllm", *argv])


def import_tensorrt_llm() -> Any:
    require_package()
    try:
        return importlib.import_module("tensorrt_llm")
    except (ImportError, OSError) as exc:
        text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        lowered = text.lower()
        if "mpi" in lowered:
            remedy = "install an MPI runtime: `apt-get install libopenmpi-dev openmpi-bin`"
        elif "libcuda" in lowered:
            remedy = "no NVIDIA driver was found (libcuda.so.1); run on a machine with an NVIDIA GPU"
        elif "libpython" in lowered:
            remedy = "this Python has no shared libpython; use one built with --enable-shared"
        else:
            remedy = install_hint()
        raise StartupError(f"engine tensorrt_llm: `import tensorrt_llm` failed ({text}); {remedy}") from None


def require_gpu(device: str) -> None:
    if os.environ.get(TEST_DOUBLE_ENV) == "1":
        return
    if not device.startswith("cuda"):
        raise StartupError(f"engine tensorrt_llm: driver.device {device!r} is not a CUDA device; TensorRT-LLM "
                           "runs on NVIDIA GPUs only (use \"cuda:N\", or engine = \"reference\" for CPU)")
    import torch

    if not torch.cuda.is_available():
        raise StartupError("engine tensorrt_llm: torch sees no CUDA GPU; run on a GPU machine or set "
                           "engine = \"reference\"")


def require_ray() -> None:
    """`rl_ops` runs TensorRT-LLM's Ray orchestrator (the test double starts no Ray)."""
    if os.environ.get(TEST_DOUBLE_ENV) != "1" and importlib.util.find_spec("ray") is None:
        raise StartupError("engine tensorrt_llm: rl_ops = true needs the ray package (TensorRT-LLM 1.2 offers "
                           "sleep and weight updates only on its Ray orchestrator); `pip install ray`, or set "
                           "rl_ops = false")


def pin_device(device: str) -> None:
    """TensorRT-LLM uses the first visible GPU: make that the configured one before CUDA starts."""
    if device.startswith("cuda:") and "CUDA_VISIBLE_DEVICES" not in os.environ:
        os.environ["CUDA_VISIBLE_DEVICES"] = device.split(":", 1)[1]


def llm_arguments(config: DriverConfig, trt: Any) -> dict[str, Any]:
    """The keyword arguments of `LLM(...)`: curated options first, `llm_kwargs` wins."""
    o = config.options
    kwargs: dict[str, Any] = dict(o.llm_kwargs)
    for key in ("backend", "attn_backend", "enable_chunked_prefill", "max_seq_len", "max_batch_size",
                "max_num_tokens"):
        value = getattr(o, key)
        if value is not None:
            kwargs.setdefault(key, value)
    if o.rl_ops:
        from pie_driver_trtllm.engines.tensorrt_llm.rl import rl_llm_arguments

        for key, value in rl_llm_arguments().items():
            kwargs.setdefault(key, value)
    kv = kwargs.get("kv_cache_config")
    if kv is None or isinstance(kv, dict):
        kv_fields: dict[str, Any] = {"enable_block_reuse": True, **(kv or {})}
        if o.kv_cache_free_gpu_memory_fraction is not None:
            kv_fields.setdefault("free_gpu_memory_fraction", o.kv_cache_free_gpu_memory_fraction)
        kwargs["kv_cache_config"] = trt.KvCacheConfig(**kv_fields)
    return {"model": config.model.snapshot_dir, "skip_tokenizer_init": o.skip_tokenizer_init,
            "trust_remote_code": o.trust_remote_code, "tensor_parallel_size": 1,
            "dtype": _DTYPES[config.driver.activation_dtype], **kwargs}


class TensorRTLLMEngine:
    @classmethod
    def load(cls, config: DriverConfig, device: str) -> Engine:
        require_package()
        info = read_model_info(config)
        pin_device(device)
        trt = import_tensorrt_llm()
        require_gpu(device)
        mode = config.options.execution_mode
        if mode == "pyexecutor":
            from pie_driver_trtllm.engines.tensorrt_llm.pyexecutor import PyExecutorEngine, check_private_api

            check_private_api(trt, config)
            os.environ["TLLM_WORKER_USE_SINGLE_PROCESS"] = "1"  # the executor must live in this process
        if config.options.rl_ops:
            require_ray()
        arguments = llm_arguments(config, trt)
        try:
            llm = trt.LLM(**arguments)
        except Exception as exc:  # ValueError for unknown kwargs, pydantic errors, CUDA errors
            text = " ".join(str(exc).split())[:400]
            raise StartupError(f"engine tensorrt_llm: LLM(...) failed: {type(exc).__name__}: {text}") from None
        version = str(getattr(trt, "__version__", "unknown"))
        if mode == "pyexecutor":
            return PyExecutorEngine(llm, trt, config, info, version)
        if config.options.rl_ops:
            from pie_driver_trtllm.engines.tensorrt_llm.rl import RLGenerateEngine

            return RLGenerateEngine(llm, trt, config, info, version)
        from pie_driver_trtllm.engines.tensorrt_llm.generate import GenerateEngine

        return GenerateEngine(llm, trt, config, info, version)
