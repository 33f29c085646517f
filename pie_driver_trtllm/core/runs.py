"""Runs: token samplers of protocol 1.1 that ask for up to `max_tokens` tokens in one forward.

The driver never appends a run's tokens to the history. The engine keeps the keys and values it computed
for them with the context, so a host that feeds back the tokens it keeps (all, a prefix, or none) costs no
recompute of those; anything it does not feed back is cropped away by the next step of that context.
"""

from __future__ import annotations

from typing import Any

from pie_driver_trtllm.engines.base import RowResult
from pie_driver_trtllm.sampler import Sampler
from pie_driver_trtllm.wire.errors import DriverError, ErrorCode

STOP_MAX_TOKENS = "max_tokens"
STOP_TOKEN = "stop_token"
STOP_MODEL_LEN = "max_model_len"


def run_steps(sampler: Sampler, length: int, max_model_len: int) -> int:
    """Tokens a run after a prefix of `length` may make: `max_tokens`, but none at or past `max_model_len`
    (at least one, as for any token sampler)."""
    return max(1, min(sampler.max_tokens, max_model_len - length))


def check_at_end(context: int, sampler: Sampler, length: int, at_end: bool) -> None:
    if sampler.max_tokens > 1 and not at_end:
        raise DriverError(ErrorCode.BAD_REQUEST,
                          f"sampler at={sampler.at} asks for max_tokens={sampler.max_tokens}, but the prefix of "
                          f"{length} tokens is not the end of context {context}'s history: a run must sample "
                          "after the last token")


def run_output(sampler: Sampler, max_model_len: int, length: int, result: RowResult) -> dict[str, Any]:
    """The reply map of a run: its tokens up to the first stop id (included), and why it stopped."""
    tokens = result.tokens or []
    stops = sampler.stop_token_ids
    end = next((i + 1 for i, token in enumerate(tokens) if token in stops), 0) if stops else 0
    if end:
        reason = STOP_TOKEN
    else:
        end = min(len(tokens), sampler.max_tokens)
        reason = STOP_MAX_TOKENS if end >= sampler.max_tokens or length + end < max_model_len else STOP_MODEL_LEN
    out: dict[str, Any] = {"tokens": tokens[:end], "stop": reason}
    if sampler.return_logprobs:
        out["logprobs"] = (result.token_logprobs or [])[:end]
    return out
