"""TEST DOUBLE of TensorRT-LLM 1.2.1 (`tensorrt_llm.inputs.data`), not the real package.

Input forms per trtllm-api.md 2.2; `get_cache_salt_id` per section 4.
"""

from __future__ import annotations

import hashlib
from typing import Any, NotRequired, TypedDict


class TextPrompt(TypedDict):
    prompt: str
    multi_modal_data: NotRequired[dict[str, Any]]
    mm_processor_kwargs: NotRequired[dict[str, Any]]
    query: NotRequired[str]


class TokensPrompt(TypedDict):
    prompt_token_ids: list[int]
    multi_modal_data: NotRequired[dict[str, Any]]
    mm_processor_kwargs: NotRequired[dict[str, Any]]
    query_token_ids: NotRequired[list[int]]


PromptInputs = str | list[int] | TextPrompt | TokensPrompt


def prompt_inputs(inputs: Any) -> TextPrompt | TokensPrompt:
    """Normalise one input as the real `prompt_inputs` does (str -> TextPrompt, list[int] -> TokensPrompt)."""
    if isinstance(inputs, str):
        return TextPrompt(prompt=inputs)
    if isinstance(inputs, list):
        assert isinstance(inputs[0], int)
        return TokensPrompt(prompt_token_ids=inputs)
    if isinstance(inputs, dict):
        assert inputs.get("prompt") is not None or inputs.get("prompt_token_ids") is not None
        return inputs  # type: ignore[return-value]
    raise TypeError(f"Invalid type of inputs for llm.generate: {type(inputs)}")


def get_cache_salt_id(cache_salt: str) -> int:
    """An unsigned 64-bit id for a salt: the first 8 digest bytes, little-endian.

    The real function hashes with blake3 (trtllm-api.md 4). blake3 is used here when installed; otherwise
    blake2b stands in, so ids then differ from the real ones (only equality between salts matters to a driver).
    """
    data = cache_salt.encode("utf-8")
    try:
        import blake3  # type: ignore[import-not-found]

        digest = blake3.blake3(data).digest(length=8)
    except ImportError:
        digest = hashlib.blake2b(data, digest_size=8).digest()
    return int.from_bytes(digest, "little")
