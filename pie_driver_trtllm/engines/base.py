"""The engine interface: one batched call per forward, many contexts per call."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from pie_driver_trtllm.sampler import Sampler


@dataclass(frozen=True, slots=True)
class ModelInfo:
    name: str
    arch_name: str
    vocab_size: int
    max_model_len: int
    eos_token_id: int | None
    pad_token_id: int | None


@dataclass(slots=True)
class Row:
    """One sampler to evaluate: the distribution after `tokens[:length]` of `context`.

    `tokens` is the context's live history (or a private snapshot); engines must not mutate it.
    `steps` > 1 asks for that many tokens in a row, each sampled after appending the previous one: a greedy
    row's lookahead, or a run (`sampler.max_tokens`); step i of a seeded row uses `step_seed(seed, i)`.
    """

    context: int
    tokens: list[int]
    length: int
    sampler: Sampler
    seed: int | None = None
    steps: int = 1


@dataclass(slots=True)
class RowResult:
    tokens: list[int] | None = None                          # token samplers
    dist: tuple[list[int], list[float]] | None = None         # dist
    logprobs: list[float] | None = None                      # logprobs
    token_logprobs: list[float] | None = None                # a run with return_logprobs: one per token
    error: str | None = None                                 # the engine failed on this row alone
    code: str = "ENGINE_ERROR"                               # the protocol code for `error`


class Engine(Protocol):
    """What the core drives. An engine may also offer `stats() -> dict`: counters that the driver's
    `stats` op reports under `engine`."""

    kind: str
    version: str
    execution_mode: str
    model: ModelInfo
    samplers: frozenset[str]

    def step(self, rows: list[Row]) -> list[RowResult]:
        """Evaluate every row in one batched call; results are in row order."""
        ...

    def fork(self, src: int, dst: int, length: int) -> None:
        """`dst` now starts with `src`'s first `length` tokens (engines may copy cached state)."""
        ...

    def drop(self, contexts: list[int]) -> None:
        """Free everything held for these contexts."""
        ...

    def close(self) -> None:
        ...


def common_prefix(cached: list[int], tokens: list[int], end: int) -> int:
    """Length of the common prefix of `cached` and `tokens[:end]` (C-speed compares, log-many of them)."""
    n = min(len(cached), end)
    if cached[:n] == tokens[:n]:
        return n
    lo, hi = 0, n  # the first mismatch lies in [lo, hi)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if cached[:mid] == tokens[:mid]:
            lo = mid
        else:
            hi = mid
    return lo
