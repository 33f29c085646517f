"""TEST DOUBLE of TensorRT-LLM 1.2.1 private internals (`tensorrt_llm._torch`), not the real package.

Modelled: the `pyexecutor` subpackage (trtllm-api.md section 5), the memory tags of `virtual_memory` and
`utils.get_device_uuid` (the RL calls, docs/tensorrt-llm.md).
"""
