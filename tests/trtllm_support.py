"""Helpers for running the TensorRT-LLM engine against the test double (tests/trtllm_double)."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType
from typing import Any

import msgpack

from pie_driver_trtllm.config import DriverConfig, parse_config
from pie_driver_trtllm.core.driver_core import DriverCore
from pie_driver_trtllm.engines.tensorrt_llm.startup import TEST_DOUBLE_ENV, TensorRTLLMEngine
from pie_driver_trtllm.serving.driver import build_limits
from pie_driver_trtllm.wire.codec import Limits, decode_frame

DOUBLE_DIR = Path(__file__).resolve().parent / "trtllm_double"


def drop_double_modules() -> None:
    for name in [m for m in sys.modules if m == "tensorrt_llm" or m.startswith("tensorrt_llm.")]:
        del sys.modules[name]


@contextmanager
def double_imported() -> Iterator[ModuleType]:
    """Import the test double as `tensorrt_llm` for a block; afterwards no trace of it is left."""
    sys.path.insert(0, str(DOUBLE_DIR))
    drop_double_modules()
    try:
        import tensorrt_llm

        assert Path(tensorrt_llm.__file__).is_relative_to(DOUBLE_DIR)
        yield tensorrt_llm
    finally:
        sys.path.remove(str(DOUBLE_DIR))
        drop_double_modules()


def double_env() -> dict[str, str]:
    """Environment for a driver subprocess that should import the test double as `tensorrt_llm`."""
    path = os.pathsep.join(p for p in (str(DOUBLE_DIR), os.environ.get("PYTHONPATH", "")) if p)
    return {"PYTHONPATH": path, TEST_DOUBLE_ENV: "1"}


def trt_config(model: Path, dtype: str = "float32", **options: Any) -> DriverConfig:
    return parse_config({"model": {"snapshot_dir": str(model)},
                         "driver": {"device": ["cpu"], "activation_dtype": dtype,
                                    "options": {"engine": "tensorrt_llm", **options}}})


class CoreHarness:
    """A driver core over one engine, fed with real frames (decoded by the real codec)."""

    def __init__(self, config: DriverConfig, engine: Any) -> None:
        self.engine = engine
        self.limits: Limits = build_limits(config, engine)
        self.core = DriverCore(engine, max_contexts=1000, lookahead_tokens=config.options.lookahead_tokens,
                               random_seed=7)

    def forward(self, requests: list[dict[str, Any]]) -> list[dict[str, Any]]:
        frame = msgpack.packb({"v": 1, "id": 1, "op": "forward", "requests": requests})
        return self.core.forward(decode_frame(frame, self.limits).body)["results"]


def load_double_engine(model: Path, **options: Any) -> tuple[CoreHarness, Any]:
    """Build the TensorRT-LLM engine on the test double; returns the harness and the double module."""
    config = trt_config(model, **options)
    engine = TensorRTLLMEngine.load(config, "cpu")
    return CoreHarness(config, engine), sys.modules["tensorrt_llm"]
