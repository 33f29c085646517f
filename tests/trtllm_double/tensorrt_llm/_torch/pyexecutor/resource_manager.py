"""TEST DOUBLE of TensorRT-LLM 1.2.1 private internals (`tensorrt_llm._torch.pyexecutor.resource_manager`).

Not the real package. `ResourceManagerType` members per trtllm-api.md 5.1. The KV cache manager keeps one
transformers `DynamicCache` per request id (no paging, no block reuse); it lives from the request's first
`prepare_resources` until `free_resources`, whether or not the request is in `PyExecutor.active_requests`.
The seq-slot manager hands out `slot_manager.max_num_requests` slots and raises RuntimeError when a batch needs more.
"""

from __future__ import annotations

from collections import OrderedDict
from enum import Enum
from typing import Any

from .llm_request import LlmRequest


class ResourceManagerType(Enum):
    KV_CACHE_MANAGER = "KV_CACHE_MANAGER"
    DRAFT_KV_CACHE_MANAGER = "DRAFT_KV_CACHE_MANAGER"
    PEFT_CACHE_MANAGER = "PEFT_CACHE_MANAGER"
    SEQ_SLOT_MANAGER = "SEQ_SLOT_MANAGER"
    SPEC_RESOURCE_MANAGER = "SPEC_RESOURCE_MANAGER"


def _all_requests(scheduled_batch: Any) -> list[LlmRequest]:
    return list(scheduled_batch.context_requests) + list(scheduled_batch.generation_requests)


def check_free_gpu_memory_fraction(kv_cache_config: Any) -> None:
    """The real KV cache manager sizes the cache from free memory and asserts the fraction first
    (resource_manager.py, `calculate_max_num_blocks`, 1.1/1.2-era: "must be smaller than 1.0"); the
    `KvCacheConfig` validator itself accepts [0, 1]."""
    fraction = kv_cache_config.free_gpu_memory_fraction
    fraction = fraction if fraction is not None else 0.9
    assert fraction < 1.0, f"Invalid freeMemFraction, freeMemFraction {fraction} must be smaller than 1.0"


class BaseResourceManager:
    def get_max_resource_count(self) -> int:
        raise NotImplementedError

    def get_needed_resource_to_completion(self, request: LlmRequest) -> int:
        raise NotImplementedError

    def prepare_resources(self, scheduled_batch: Any) -> None:
        pass

    def update_resources(self, scheduled_batch: Any, *args: Any, **kwargs: Any) -> None:
        pass

    def free_resources(self, request: LlmRequest) -> None:
        pass

    def shutdown(self) -> None:
        pass


class KVCacheManager(BaseResourceManager):
    """One DynamicCache per request id; `num_tokens(request_id)` is how many tokens it holds."""

    def __init__(self, model_config: Any, max_seq_len: int, max_batch_size: int, tokens_per_block: int = 32,
                 dtype_byte_size: int = 4) -> None:
        self._model_config = model_config
        self.max_seq_len = max_seq_len
        self.max_batch_size = max_batch_size
        self.tokens_per_block = tokens_per_block
        self.dtype_byte_size = dtype_byte_size
        self.caches: dict[int, Any] = {}

    def get_max_resource_count(self) -> int:
        return self.max_batch_size

    def get_needed_resource_to_completion(self, request: LlmRequest) -> int:
        return 1

    def has_cache(self, request_id: int) -> bool:
        return request_id in self.caches

    def get_cache(self, request_id: int) -> Any:
        if request_id not in self.caches:
            raise RuntimeError(f"KV cache manager: request {request_id} holds no KV cache (freed or never "
                               "prepared)")
        return self.caches[request_id]

    def num_tokens(self, request_id: int) -> int:
        cache = self.caches.get(request_id)
        return 0 if cache is None else int(cache.get_seq_length())

    def prepare_resources(self, scheduled_batch: Any) -> None:
        from transformers import DynamicCache

        for req in scheduled_batch.context_requests:  # the real one: impl.add_sequence(...)
            if req.get_num_tokens(0) + 1 > self.max_seq_len:
                raise RuntimeError(f"KV cache manager: request {req.py_request_id} needs "
                                   f"{req.get_num_tokens(0) + 1} tokens > max_seq_len {self.max_seq_len}")
            if req.py_request_id not in self.caches:
                self.caches[req.py_request_id] = DynamicCache(config=self._model_config)
        for req in scheduled_batch.generation_requests:  # the real one: impl.add_token(request_id)
            if req.py_request_id not in self.caches:
                raise RuntimeError(f"KV cache manager: generation request {req.py_request_id} has no KV cache")
            if req.get_num_tokens(0) + 1 > self.max_seq_len:
                raise RuntimeError(f"KV cache manager: request {req.py_request_id} would exceed max_seq_len "
                                   f"{self.max_seq_len}")

    def update_resources(self, scheduled_batch: Any, attn_metadata: Any = None,
                         kv_cache_dtype_byte_size: float | None = None) -> None:
        pass  # the real one rewinds rejected draft tokens; no drafts here

    def free_resources(self, request: LlmRequest) -> None:
        self.caches.pop(request.py_request_id, None)

    def get_num_free_blocks(self) -> int:
        used = sum(-(-self.num_tokens(rid) // self.tokens_per_block) for rid in self.caches)
        total = self.max_batch_size * -(-self.max_seq_len // self.tokens_per_block)
        return max(total - used, 0)

    def shutdown(self) -> None:
        self.caches.clear()


class SlotManager:
    def __init__(self, max_num_requests: int) -> None:
        self.max_num_requests = max_num_requests
        self.slot_mapping: dict[int, int] = {}
        self.free_slots = set(range(max_num_requests))

    def get_slot(self, request_id: int) -> int | None:
        return self.slot_mapping.get(request_id)

    def add_slot(self, request_id: int) -> int:
        if not self.free_slots:
            # Guess: the real SlotManager's error type/message are not in the reference; RuntimeError per the brief.
            raise RuntimeError(f"No free slots: all {self.max_num_requests} sequence slots are in use")
        slot = min(self.free_slots)
        self.free_slots.remove(slot)
        self.slot_mapping[request_id] = slot
        return slot

    def remove_slot(self, request_id: int) -> None:
        slot = self.slot_mapping.pop(request_id, None)
        if slot is not None:
            self.free_slots.add(slot)


class SeqSlotManager(BaseResourceManager):
    """Like the real one (seq_slot_manager.py at 0f555a43): the slot count lives only in `slot_manager`."""

    def __init__(self, max_num_sequences: int) -> None:
        self.slot_manager = SlotManager(max_num_sequences)

    def get_max_resource_count(self) -> int:
        return self.slot_manager.max_num_requests

    def get_needed_resource_to_completion(self, request: LlmRequest) -> int:
        return 1

    @property
    def num_used_slots(self) -> int:
        return len(self.slot_manager.slot_mapping)

    def prepare_resources(self, scheduled_batch: Any) -> None:
        needing = [r for r in _all_requests(scheduled_batch)
                   if self.slot_manager.get_slot(r.py_request_id) is None]
        total = self.get_max_resource_count()
        if self.num_used_slots + len(needing) > total:
            raise RuntimeError(f"No free slots: {self.num_used_slots} of {total} sequence slots "
                               f"are held and the batch needs {len(needing)} more")
        for req in needing:
            req.seq_slot = self.slot_manager.add_slot(req.py_request_id)
            req.py_seq_slot = req.seq_slot

    def free_resources(self, request: LlmRequest) -> None:
        self.slot_manager.remove_slot(request.py_request_id)
        request.seq_slot = None
        request.py_seq_slot = None


class ResourceManager:
    def __init__(self, resource_managers: dict[ResourceManagerType, BaseResourceManager]) -> None:
        self.resource_managers: OrderedDict[ResourceManagerType, BaseResourceManager] = OrderedDict(
            resource_managers)

    def __call__(self, type_: ResourceManagerType) -> BaseResourceManager | None:
        return self.resource_managers.get(type_)

    def register_resource_manager(self, type_: ResourceManagerType, manager: BaseResourceManager) -> None:
        self.resource_managers[type_] = manager

    def get_resource_manager(self, type_: ResourceManagerType) -> BaseResourceManager | None:
        return self.resource_managers.get(type_)

    def prepare_resources(self, scheduled_batch: Any) -> None:
        for manager in self.resource_managers.values():
            manager.prepare_resources(scheduled_batch)

    def update_resources(self, scheduled_batch: Any, attn_metadata: Any = None,
                         kv_cache_dtype_byte_size: float | None = None) -> None:
        for type_, manager in self.resource_managers.items():
            if type_ == ResourceManagerType.KV_CACHE_MANAGER:
                manager.update_resources(scheduled_batch, attn_metadata, kv_cache_dtype_byte_size)
            else:
                manager.update_resources(scheduled_batch)

    def free_resources(self, request: LlmRequest) -> None:
        # trtllm-api.md 5.3: every manager's free_resources, the KV cache manager last.
        kv = None
        for type_, manager in self.resource_managers.items():
            if type_ == ResourceManagerType.KV_CACHE_MANAGER:
                kv = manager
                continue
            manager.free_resources(request)
        if kv is not None:
            kv.free_resources(request)

    def reorder_pipeline(self, resource_manager_list: list[ResourceManagerType]) -> None:
        for type_ in resource_manager_list:
            self.resource_managers.move_to_end(type_)

    def shutdown(self) -> None:
        for manager in self.resource_managers.values():
            manager.shutdown()


__all__ = ["BaseResourceManager", "KVCacheManager", "ResourceManager", "ResourceManagerType", "SeqSlotManager",
           "SlotManager", "check_free_gpu_memory_fraction"]
