"""Engines: one module each, all behind the interface in `base`."""

from __future__ import annotations

from pie_driver_trtllm.config import DriverConfig
from pie_driver_trtllm.engines.base import Engine


def load_engine(config: DriverConfig, device: str) -> Engine:
    """Build the configured engine on one device. Raises StartupError with a one-line remedy."""
    if config.engine == "reference":
        from pie_driver_trtllm.engines.reference.engine import ReferenceEngine

        return ReferenceEngine.load(config, device)
    from pie_driver_trtllm.engines.tensorrt_llm.startup import TensorRTLLMEngine

    return TensorRTLLMEngine.load(config, device)
