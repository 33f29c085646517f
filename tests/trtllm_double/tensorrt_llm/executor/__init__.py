"""TEST DOUBLE of TensorRT-LLM 1.2.1 (`tensorrt_llm.executor`), not the real package."""

from .result import CompletionOutput, GenerationResult, Logprob
from .utils import RequestError

__all__ = ["CompletionOutput", "GenerationResult", "Logprob", "RequestError"]
