"""TEST DOUBLE of TensorRT-LLM 1.2.1 private internals (`tensorrt_llm._torch.pyexecutor.model_engine`).

Not the real package. `PyTorchModelEngine.forward(scheduled_requests, resource_manager, ...)` returns
`{"logits": Tensor[num_requests, vocab]}` (last position of each scheduled request; context requests first).
Each request runs alone against its own DynamicCache, feeding only the tokens the cache does not hold yet:
the scheduled chunk of the prompt for a context request, the last sampled token for a generation request.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..._calls import record
from .resource_manager import KVCacheManager, ResourceManagerType


@dataclass
class AttentionMetadata:
    """A placeholder for the real attention metadata object the KV manager's update_resources receives."""

    max_num_requests: int
    max_num_tokens: int
    kv_cache_manager: Any = None
    seq_lens: list[int] = field(default_factory=list)


class PyTorchModelEngine:
    def __init__(self, model: Any, max_num_tokens: int, max_seq_len: int, batch_size: int,
                 kv_cache_manager: KVCacheManager | None = None, max_num_sequences: int | None = None) -> None:
        import torch

        self.model = model
        self.max_num_tokens = max_num_tokens
        self.max_seq_len = max_seq_len
        self.batch_size = batch_size
        self.dtype = torch.float32
        self.kv_cache_dtype_byte_size = 4  # float32 KV
        self.attn_metadata = AttentionMetadata(max_num_requests=batch_size, max_num_tokens=max_num_tokens,
                                               kv_cache_manager=kv_cache_manager)
        self.iter_counter = 0
        self._max_num_sequences = max_num_sequences if max_num_sequences is not None else batch_size

    def get_max_num_sequences(self) -> int:
        """The real one: max_batch_size x pipeline-parallel size."""
        return self._max_num_sequences

    def forward(self, scheduled_requests: Any, resource_manager: Any, new_tensors_device: Any = None,
                gather_context_logits: bool = False, cache_indirection_buffer: Any = None) -> dict[str, Any]:
        import torch

        kv = resource_manager.get_resource_manager(ResourceManagerType.KV_CACHE_MANAGER)
        rows, ran = [], []
        with torch.inference_mode():
            for req in scheduled_requests.all_requests():
                cache = kv.get_cache(req.py_request_id)
                tokens = req.get_tokens(0)
                held = int(cache.get_seq_length())
                if held >= len(tokens):
                    raise RuntimeError(f"model engine: request {req.py_request_id} has no new token to run "
                                       f"(cache holds {held} of {len(tokens)})")
                # a context request runs its scheduled chunk; a generation request its newest token
                end = (req.context_current_position + req.context_chunk_size if req.is_context_init_state
                       else len(tokens))
                new = tokens[held:end]
                out = self.model(input_ids=torch.tensor([new], dtype=torch.long), past_key_values=cache,
                                 use_cache=True, logits_to_keep=1)
                rows.append(out.logits[0, -1].float())
                ran.append({"request_id": req.py_request_id, "phase": "context" if req.is_context_init_state
                            else "generation", "new_tokens": len(new), "cached_tokens": held})
        self.attn_metadata.seq_lens = [r["new_tokens"] for r in ran]
        self.iter_counter += 1
        record("PyExecutor._forward_step", request_ids=[r["request_id"] for r in ran],
               new_tokens={r["request_id"]: r["new_tokens"] for r in ran}, requests=ran)
        vocab = int(self.model.config.vocab_size)
        logits = torch.stack(rows) if rows else torch.empty((0, vocab))
        return {"logits": logits}


__all__ = ["AttentionMetadata", "PyTorchModelEngine"]
