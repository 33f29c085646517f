"""TEST DOUBLE of TensorRT-LLM 1.2.1 private internals (`tensorrt_llm._torch`), not the real package.

Only the `pyexecutor` subpackage is modelled (trtllm-api.md section 5).
"""
