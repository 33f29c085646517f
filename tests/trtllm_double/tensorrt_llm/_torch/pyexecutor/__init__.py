"""TEST DOUBLE of TensorRT-LLM 1.2.1 private internals (`tensorrt_llm._torch.pyexecutor`), not the real package.

Modules at the real paths: py_executor (PyExecutor), llm_request, resource_manager, scheduler, sampler,
model_engine, executor_request_queue, py_executor_creator. Behaviour follows trtllm-api.md 5.1-5.5 (read at
1.1/1.2-era commits); arithmetic is real (transformers, float32, CPU, one DynamicCache per request).
"""
