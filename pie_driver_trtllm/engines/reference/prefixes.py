"""Shared prefixes: which cache holds the longest prefix of a row's tokens, so a prefill copies it.

Both reference paths ask before a prefill: n samples forked from one prompt, or n contexts sent the same
prompt, then compute it once. A copy is worth it only when it saves two tokens or more (one token is a
decode step anyway).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TypeVar

from pie_driver_trtllm.engines.base import common_prefix

T = TypeVar("T")


def best_donor(candidates: Iterable[tuple[T, list[int]]], tokens: list[int], keep: int, first_needed: int,
               pending: Callable[[T], bool] = lambda _: False) -> tuple[T | None, int]:
    """The candidate whose cache holds the most of `tokens[:first_needed]`, at least `keep` + 2 tokens, and
    how many; (None, keep) when none does. A candidate's tokens are what its cache holds, except that its
    last token is not computed yet where `pending` says so."""
    best, donor = keep + 1, None
    if first_needed - keep < 2:
        return None, keep
    for candidate, held in candidates:
        if len(held) > best and held[best] == tokens[best]:  # the cheap test first
            shared = common_prefix(held, tokens, first_needed)
            if shared == len(held) and pending(candidate):
                shared -= 1
            if shared > best:
                best, donor = shared, candidate
    return (donor, best) if donor is not None else (None, keep)


def will_hold(planned: Iterable[tuple[list[int], int]], tokens: list[int], keep: int, first_needed: int) -> bool:
    """Whether a prefill planned in the same step (its tokens, and how many it will hold) will hold at least
    `keep` + 2 tokens of `tokens[:first_needed]`: then the row waits for it and copies them."""
    probe = keep + 1
    if first_needed - keep < 2:
        return False
    return any(held > probe and planned_tokens[probe] == tokens[probe]
               and common_prefix(planned_tokens, tokens, min(first_needed, held)) > probe
               for planned_tokens, held in planned)
