"""TEST DOUBLE of TensorRT-LLM 1.2.1 (`tensorrt_llm._torch.utils`), not the real package: `get_device_uuid`."""

from __future__ import annotations


def get_device_uuid(device_idx: int) -> str:
    """The real one asks the CUDA driver for the device's UUID ("GPU-..."); the double has no GPU."""
    return f"GPU-test-double-{int(device_idx)}"


__all__ = ["get_device_uuid"]
