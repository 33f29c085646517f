"""The driver core: validated requests in, engine batches out, one reply map per operation.

It owns the context histories and the lookahead buffer of one replica and calls its engine at most
once per forward, for every row that the lookahead buffer cannot serve.
"""

from __future__ import annotations

import random
import threading
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from .engines.base import Engine, Row, RowResult
from .errors import DriverError, ErrorCode
from .histories import ContextStore, MergeResult
from .lookahead import LookaheadBuffer
from .protocol import Fork, Forward, ForwardItem, Release, Truncate


def out_of_memory(exc: BaseException) -> bool:
    """MemoryError, or torch's (CUDA) OutOfMemoryError, recognised without importing torch."""
    return isinstance(exc, MemoryError) or any(t.__name__ == "OutOfMemoryError" for t in type(exc).__mro__)


@dataclass
class Counters:
    requests: int = 0
    tokens_in: int = 0
    tokens_out: int = 0
    engine_calls: int = 0
    oom_splits: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def error(self, code: ErrorCode | str) -> None:
        with self._lock:
            self.errors[str(code)] += 1


class DriverCore:
    def __init__(self, engine: Engine, *, max_contexts: int, lookahead_tokens: int,
                 random_seed: int | None = None) -> None:
        self.engine = engine
        self.store = ContextStore(max_contexts)
        self.lookahead = LookaheadBuffer(lookahead_tokens)
        self.counters = Counters()
        self._max_len = engine.model.max_model_len
        self._rng = random.Random(random_seed) if random_seed is not None else random.SystemRandom()

    # ------------------------------------------------------------------ forward

    def forward(self, body: Forward) -> dict[str, Any]:
        n = len(body.items)
        outputs: list[list[dict[str, Any] | None]] = [[] for _ in range(n)]
        failures: list[DriverError | None] = [None] * n
        rows: list[Row] = []
        slots: list[tuple[int, int]] = []
        evicted: list[int] = []
        self.counters.requests += n
        for index, item in enumerate(body.items):
            if isinstance(item, DriverError):
                failures[index] = item
                continue
            try:
                merged = self._merge(item, rows)
            except DriverError as exc:
                failures[index] = exc
                continue
            evicted += merged.evicted
            outputs[index] = [None] * len(item.samplers)
            self._plan_samplers(index, item, merged.snapshots, outputs[index], rows, slots)

        if rows:
            self._run_engine(rows, slots, outputs, failures)
        gone = [c for c in evicted if c not in self.store]
        if gone:
            self.engine.drop(gone)

        results = []
        for index in range(n):
            failure = failures[index]
            if failure is not None:
                self.counters.error(failure.code)
                results.append({"ok": False, "error": failure.to_wire()})
            else:
                self.counters.tokens_out += len(outputs[index])
                results.append({"ok": True, "outputs": outputs[index]})
        return {"results": results}

    def _merge(self, item: ForwardItem, rows: list[Row]) -> MergeResult:
        if item.tokens and rows:
            self._protect_pending_rows(item, rows)
        snapshot_at = frozenset(s.at for s in item.samplers)
        merged = self.store.merge(item.context, item.tokens, item.positions, snapshot_at)
        self.counters.tokens_in += len(item.tokens)
        if merged.cut_at is not None:
            self.lookahead.cut(item.context, merged.cut_at)
        if merged.evicted:
            self.lookahead.drop(merged.evicted)
        return merged

    def _protect_pending_rows(self, item: ForwardItem, rows: list[Row]) -> None:
        # A context seen twice in one batch: rows planned earlier read the live history, which this
        # merge may overwrite, so they get a private copy of their prefix first.
        if item.context not in self.store:
            return
        live = self.store.get(item.context)
        lowest = min(item.positions)
        for row in rows:
            if row.context == item.context and row.tokens is live and row.length > lowest:
                row.tokens = live[: row.length]
                row.steps = 1

    def _plan_samplers(self, index: int, item: ForwardItem, snapshots: dict[int, list[int]],
                       out: list[dict[str, Any] | None],
                       rows: list[Row], slots: list[tuple[int, int]]) -> None:
        live = self.store.get(item.context) if item.context in self.store else []
        for position, sampler in enumerate(item.samplers):
            tokens = snapshots.get(sampler.at, live)
            length = item.positions[sampler.at] + 1
            at_end = tokens is live and length == len(live)
            steps = 1
            if sampler.is_greedy:
                if tokens is live:
                    buffered = self.lookahead.take(item.context, live, length)
                    if buffered is not None:
                        out[position] = {"token": buffered}
                        continue
                if at_end:
                    steps = max(1, min(self.lookahead.size, self._max_len - length))
                seed = None
            else:
                if sampler.makes_token:
                    self.lookahead.drop([item.context])
                seed = sampler.seed if sampler.seed is not None else self._rng.getrandbits(63)
            rows.append(Row(item.context, tokens, length, sampler, seed, steps))
            slots.append((index, position))

    def _run_engine(self, rows: list[Row], slots: list[tuple[int, int]],
                    outputs: list[list[dict[str, Any] | None]], failures: list[DriverError | None]) -> None:
        self.counters.engine_calls += 1
        results = self._step_or_fail(rows)
        for (index, position), row, result in zip(slots, rows, results, strict=True):
            if result.error is not None:
                failures[index] = DriverError(ErrorCode(result.code), result.error)
            elif result.tokens is not None:
                outputs[index][position] = {"token": result.tokens[0]}
                if row.steps > 1:
                    self.lookahead.fill(row.context, row.length, result.tokens)
            elif result.dist is not None:
                outputs[index][position] = {"dist": [result.dist[0], result.dist[1]]}
            else:
                outputs[index][position] = {"logprobs": result.logprobs}

    def _step_or_fail(self, rows: list[Row]) -> list[RowResult]:
        """One engine call; if it raises as a whole, every row fails and its contexts' engine state goes."""
        try:
            return self._step(rows)
        except Exception as exc:
            self.engine.drop(list({row.context for row in rows}))
            return [RowResult(error=f"{type(exc).__name__}: {exc}")] * len(rows)

    def _step(self, rows: list[Row]) -> list[RowResult]:
        try:
            return self.engine.step(rows)
        except Exception as exc:
            if len(rows) == 1 or not out_of_memory(exc):
                raise
        # Out of memory: retry in halves, outside the except block so the failed attempt's tensors
        # (held by its traceback) are freed first. A single row that still does not fit fails alone.
        self.counters.oom_splits += 1
        self.engine.drop(list({row.context for row in rows}))
        middle = len(rows) // 2
        return self._step_or_fail(rows[:middle]) + self._step_or_fail(rows[middle:])

    # ------------------------------------------------------------------ other state ops

    def fork(self, body: Fork) -> dict[str, Any]:
        evicted = self.store.fork(body.src, body.dst, body.length)
        length = self.store.length(body.dst)
        self.lookahead.drop([body.dst, *evicted])
        self.engine.drop(evicted)
        self.engine.fork(body.src, body.dst, length)
        return {"length": length}

    def truncate(self, body: Truncate) -> dict[str, Any]:
        self.store.truncate(body.context, body.length)
        self.lookahead.cut(body.context, body.length)
        return {"length": body.length}

    def release(self, body: Release) -> dict[str, Any]:
        released = self.store.release(body.contexts)
        self.lookahead.drop(body.contexts)
        self.engine.drop(list(body.contexts))
        return {"released": len(released)}

    def stats(self) -> dict[str, Any]:
        c = self.counters
        return {"requests": c.requests, "tokens_in": c.tokens_in, "tokens_out": c.tokens_out,
                "engine_calls": c.engine_calls, "oom_splits": c.oom_splits, "lookahead_hits": self.lookahead.hits,
                "contexts": len(self.store), "evictions": self.store.evictions, "errors": dict(c.errors)}
