"""Engines: one module each, all behind the interface in `base`."""

from __future__ import annotations

from ..config import DriverConfig
from .base import Engine


def load_engine(config: DriverConfig, device: str) -> Engine:
    """Build the configured engine on one device. Raises StartupError with a one-line remedy."""
    if config.engine == "reference":
        from .reference import ReferenceEngine

        return ReferenceEngine.load(config, device)
    from .tensorrt_llm import TensorRTLLMEngine

    return TensorRTLLMEngine.load(config, device)
