"""Pie subprocess driver that serves token generation from TensorRT-LLM or a PyTorch reference engine."""

__version__ = "0.1.0"
DRIVER_NAME = "pie-driver-trtllm"
PROTOCOL_VERSION = 1
PROTOCOL_MINOR = 2  # 1.1: runs of tokens (`max_tokens`); 1.2: the `step` op, a decode step as columns
