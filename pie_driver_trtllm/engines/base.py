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


class WeightsLoadError(Exception):
    """A `load_weights` that failed. `serving_previous`: the old weights are intact and still served;
    False: the swap itself failed part way, and the engine refuses every `step` until a load succeeds."""

    def __init__(self, message: str, serving_previous: bool = True) -> None:
        super().__init__(message)
        self.message = message
        self.serving_previous = serving_previous


class Engine(Protocol):
    """What the core drives. Optional methods (an engine without one makes its op `UNSUPPORTED`):

    - `stats() -> dict`: counters that the driver's `stats` op reports under `engine`; where the engine
      can count them, `prompt_tokens_computed`: tokens whose KV it computed other than by a one-token
      decode step (prefill and replay).
    - `load_weights(path: str) -> None`: replace the weights in place from a directory of safetensors of
      the same architecture, validated and staged whole before any live weight changes, and drop every
      cached KV of every context (the next step replays from history). Raises `WeightsLoadError`.
    - `sleep(level: int) -> None`: 1 frees the KV cache; 2 also moves the weights to host memory.
      `wake() -> None` restores them; the KV cache starts empty, so contexts replay from history. An
      engine that offers only some levels says which in `sleep_levels` (default: both).
    """

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


RL_OPS = ("load_weights", "sleep", "wake")


def rl_ops(engine: object) -> list[str]:
    """The optional weight and memory ops `engine` offers, by protocol op name."""
    return [op for op in RL_OPS if callable(getattr(engine, op, None))]


def sleep_levels(engine: object) -> list[int]:
    """The `sleep` levels `engine` offers (both, unless it says otherwise)."""
    if not callable(getattr(engine, "sleep", None)):
        return []
    return list(getattr(engine, "sleep_levels", (1, 2)))
