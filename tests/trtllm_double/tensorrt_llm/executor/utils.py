"""TEST DOUBLE of TensorRT-LLM 1.2.1 (`tensorrt_llm.executor.utils`), not the real package."""


class RequestError(RuntimeError):
    """Raised for errors found while enqueueing one request (trtllm-api.md 2.4 item 5)."""
