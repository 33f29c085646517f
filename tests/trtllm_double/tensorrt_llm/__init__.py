"""TEST DOUBLE of TensorRT-LLM 1.2.1 (`tensorrt_llm`) -- NOT the real NVIDIA package.

It reproduces the public LLM API surface a serving driver touches (see
/work/shared/reference/trtllm-api.md, sections 1-4 and 8) and computes real tokens with a
transformers model on CPU. Like the real package, importing it prints a banner to stdout.
"""

from ._calls import CALLS, reset_calls
from .llmapi.llm import LLM
from .llmapi.llm_args import KvCacheConfig, TorchLlmArgs
from .sampling_params import SamplingParams

__version__ = "1.2.1"
IS_TEST_DOUBLE = True

# The real package prints this line on import (trtllm-api.md 1.1); a driver that speaks a protocol on stdout
# must redirect stdout before importing, so the double keeps the hazard.
print(f"[TensorRT-LLM] TensorRT LLM version: {__version__}", flush=True)

__all__ = ["CALLS", "LLM", "KvCacheConfig", "SamplingParams", "TorchLlmArgs", "__version__", "reset_calls"]
