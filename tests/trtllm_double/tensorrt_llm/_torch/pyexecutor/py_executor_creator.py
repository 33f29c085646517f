"""TEST DOUBLE of TensorRT-LLM 1.2.1 private internals (`...pyexecutor.py_executor_creator`).

Not the real package. `create_py_executor(llm_args=..., checkpoint_dir=..., tokenizer=...)` builds the
managers (SEQ_SLOT_MANAGER, then KV_CACHE_MANAGER kept last), the scheduler, the model engine and the
TorchSampler, and starts the worker thread, like the real creator (trtllm-api.md 5.1). The double-only
`_model` keyword hands over the transformers model the LLM already loaded (float32, CPU).
"""

from __future__ import annotations

from typing import Any

from .model_engine import PyTorchModelEngine
from .py_executor import PyExecutor
from .resource_manager import (
    KVCacheManager,
    ResourceManager,
    ResourceManagerType,
    SeqSlotManager,
    check_free_gpu_memory_fraction,
)
from .sampler import TorchSampler
from .scheduler import SimpleScheduler


def create_py_executor(llm_args: Any, checkpoint_dir: str | None = None, tokenizer: Any = None, *,
                       _model: Any = None) -> PyExecutor:
    if _model is None:
        import torch
        from transformers import AutoModelForCausalLM

        _model = AutoModelForCausalLM.from_pretrained(str(checkpoint_dir or llm_args.model), dtype=torch.float32,
                                                      local_files_only=True).eval()
    max_batch_size = int(llm_args.max_batch_size or 2048)
    max_num_sequences = max_batch_size * int(llm_args.pipeline_parallel_size or 1)
    max_seq_len = int(llm_args.max_seq_len or getattr(_model.config, "max_position_embeddings", 2048))
    max_num_tokens = int(llm_args.max_num_tokens or 8192)
    check_free_gpu_memory_fraction(llm_args.kv_cache_config)
    kv = KVCacheManager(_model.config, max_seq_len=max_seq_len, max_batch_size=max_batch_size,
                        tokens_per_block=llm_args.kv_cache_config.tokens_per_block)
    resource_manager = ResourceManager({ResourceManagerType.SEQ_SLOT_MANAGER: SeqSlotManager(max_num_sequences),
                                        ResourceManagerType.KV_CACHE_MANAGER: kv})
    model_engine = PyTorchModelEngine(_model, max_num_tokens=max_num_tokens, max_seq_len=max_seq_len,
                                      batch_size=max_batch_size, kv_cache_manager=kv,
                                      max_num_sequences=max_num_sequences)
    scheduler = SimpleScheduler(max_num_sequences, max_num_tokens,
                                chunked_prefill=bool(llm_args.enable_chunked_prefill),
                                chunk_unit=llm_args.kv_cache_config.tokens_per_block)
    return PyExecutor(resource_manager, scheduler, model_engine,
                      TorchSampler(max_seq_len, max_num_sequences), dist=None,
                      disable_overlap_scheduler=llm_args.disable_overlap_scheduler,
                      max_input_len=int(llm_args.max_input_len or 2048), max_batch_size=max_batch_size,
                      max_beam_width=int(llm_args.max_beam_width or 1), max_seq_len=max_seq_len, start_worker=True)


__all__ = ["create_py_executor"]
