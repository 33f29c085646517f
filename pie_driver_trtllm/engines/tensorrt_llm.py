"""TensorRT-LLM engine loader. The package is imported lazily, here only."""

from __future__ import annotations

import importlib.util

from ..config import DriverConfig
from ..errors import StartupError
from .base import Engine

INSTALL_HINT = ("install it with `pip install tensorrt-llm==1.2.1 "
                "--extra-index-url https://pypi.nvidia.com` (needs an NVIDIA GPU and an MPI runtime), "
                "or set engine = \"reference\"")


class TensorRTLLMEngine:
    @classmethod
    def load(cls, config: DriverConfig, device: str) -> Engine:
        if importlib.util.find_spec("tensorrt_llm") is None:
            raise StartupError(f"engine tensorrt_llm: the tensorrt_llm package is not importable; {INSTALL_HINT}")
        raise StartupError("engine tensorrt_llm: this build has no TensorRT-LLM adapter yet; "
                           "set engine = \"reference\"")
