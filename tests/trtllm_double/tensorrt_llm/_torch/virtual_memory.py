"""TEST DOUBLE of TensorRT-LLM 1.2.1 (`tensorrt_llm._torch.virtual_memory`), not the real package.

The memory tags of 1.2-era `virtual_memory.py` (`ExecutorMemoryType`, `verify_sleep_wakeup_tags`,
`release_with_tag`, `materialize_with_tag`). The real functions unmap the GPU memory allocated under a tag
and map it back; here the process-wide set of released tags is kept, and the owners of tagged memory ask
it. What the real tags do to their contents is modelled by the LLM double: the model's weights come back
(the 1.2-era `test_llm_sleep` releases the `model` tag, wakes it and expects the same outputs); the KV
cache's contents do not, while its reuse index stays (NeMo-RL resets the prefix cache before releasing).
"""

from __future__ import annotations

from enum import StrEnum

_RELEASED: set[str] = set()


class ExecutorMemoryType(StrEnum):
    SAMPLER = "sampler"
    DRAFTER = "drafter"
    GUIDED_DECODER = "guided_decoder"
    SPEC_RESOURCES = "spec_resource_manager"
    INIT_KV_CACHE = "_no_capture_init_kv_cache"
    INIT_EXTRA_RESOURCES = "_no_capture_init_extra_resources"
    MODEL_EXTRA = "model_extra"
    EXTRA_RESOURCES = "executor_extra"
    KV_CACHE = "kv_cache"
    MODEL_ENGINE_MAIN = "model"
    MODEL_ENGINE_DRAFT = "draft_model"


def verify_sleep_wakeup_tags(tags_strs: list[str]) -> list[ExecutorMemoryType]:
    tags = []
    for tag_str in tags_strs:
        try:
            tags.append(ExecutorMemoryType(tag_str))
        except ValueError:
            raise ValueError(f"Unknown memory tag '{tag_str}'.Valid tags are: "
                             f"{[t.value for t in ExecutorMemoryType]}") from None
    return tags


def release_with_tag(*tags: str) -> int:
    fresh = [str(t) for t in tags if str(t) not in _RELEASED]
    _RELEASED.update(fresh)
    return len(fresh)


def materialize_with_tag(*tags: str) -> int:
    back = [str(t) for t in tags if str(t) in _RELEASED]
    _RELEASED.difference_update(back)
    return len(back)


def released_tags() -> frozenset[str]:
    """Double only: the tags whose memory is unmapped now."""
    return frozenset(_RELEASED)


__all__ = ["ExecutorMemoryType", "materialize_with_tag", "release_with_tag", "verify_sleep_wakeup_tags"]
