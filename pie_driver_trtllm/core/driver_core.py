"""The driver core: validated requests in, engine batches out, one reply map per operation.

It owns the context histories and the lookahead buffer of one replica and calls its engine at most
once per forward, for every row that the lookahead buffer cannot serve.
"""

from __future__ import annotations

import random
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from pie_driver_trtllm.core.decode_step import DecodePlan, finish_decode, plan_decode, plan_step
from pie_driver_trtllm.core.histories import ContextStore, MergeResult
from pie_driver_trtllm.core.lookahead import LookaheadBuffer
from pie_driver_trtllm.core.runs import check_at_end, run_output, run_steps
from pie_driver_trtllm.engines.base import Engine, Row, RowResult, WeightsLoadError, rl_ops, sleep_levels
from pie_driver_trtllm.wire.codec import (
    Fork,
    Forward,
    ForwardItem,
    ForwardTokens,
    LoadWeights,
    Release,
    Sleep,
    Truncate,
    Wake,
)
from pie_driver_trtllm.wire.errors import DriverError, ErrorCode


def out_of_memory(exc: BaseException) -> bool:
    """MemoryError, or torch's (CUDA) OutOfMemoryError, recognised without importing torch."""
    return isinstance(exc, MemoryError) or any(t.__name__ == "OutOfMemoryError" for t in type(exc).__mro__)


@dataclass
class Counters:
    requests: int = 0
    tokens_in: int = 0
    tokens_out: int = 0
    engine_calls: int = 0
    engine_s: float = 0.0  # wall time inside engine calls
    oom_splits: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def error(self, code: ErrorCode | str, count: int = 1) -> None:
        with self._lock:
            self.errors[str(code)] += count


@dataclass
class ForwardPlan:
    """A forward between planning and its engine call: per request, outputs so far or its failure."""

    outputs: list[list[dict[str, Any] | None]]
    failures: list[DriverError | None]
    rows: list[Row] = field(default_factory=list)
    slots: list[tuple[int, int]] = field(default_factory=list)  # (request, sampler) of each row
    evicted: list[int] = field(default_factory=list)
    planned: set[int] = field(default_factory=set)  # contexts with rows already


_APPENDED = MergeResult(None, [], {})  # what a plain one-token append merges to (read, never changed)


class DriverCore:
    def __init__(self, engine: Engine, *, max_contexts: int, lookahead_tokens: int,
                 random_seed: int | None = None, max_total_tokens: int | None = None) -> None:
        self.engine = engine
        self.store = ContextStore(max_contexts, max_total_tokens)
        self.lookahead = LookaheadBuffer(lookahead_tokens)
        self.counters = Counters()
        self._max_len = engine.model.max_model_len
        self._rng = random.Random(random_seed) if random_seed is not None else random.SystemRandom()
        self.weights_version = 0    # the version of the weights served (0: those it started with)
        self.weights_serving = True  # False after a load that failed part way, until one succeeds
        self.asleep = 0
        self.last_was_decode = False  # the last forward took the decode step's fast path

    # ------------------------------------------------------------------ forward

    fast_decode = True  # decode steps take `decode_step`'s loop; off, every forward takes the general one

    def forward(self, body: Forward) -> dict[str, Any]:
        """Plan, run and answer a forward on the calling thread."""
        refused = self.refusal()
        if refused is not None:
            return self.refuse_forward(body, refused)
        step = self.plan_decode(body)
        if step is not None:
            reply = self.finish_decode(step, self.run_rows(step.rows) if step.rows else [])
            return reply.as_map() if isinstance(reply, ForwardTokens) else reply
        plan = self.plan_forward(body)
        return self.finish_forward(plan, self.run_rows(plan.rows) if plan.rows else [])

    def plan_decode(self, body: Forward, dry: bool = False) -> DecodePlan | None:
        """A decode step's plan (every request one token at its history's end, one token sampler), or
        None, having changed nothing, for any other forward. `dry`: a rehearsal (`decode_step.plan_decode`),
        which changes nothing at all."""
        if not self.fast_decode:
            return None
        if body.columns is not None:
            plan = plan_step(body.columns, self.store, self.lookahead, self._max_len, self._rng, dry)
        else:
            plan = plan_decode(body.items, self.store, self.lookahead, self._max_len, self._rng, dry)
        if dry:
            return plan
        self.last_was_decode = plan is not None
        if plan is not None:
            self.counters.requests += len(plan.tokens)
            self.counters.tokens_in += len(plan.tokens)
        return plan

    def finish_decode(self, plan: DecodePlan, results: list[RowResult]) -> ForwardTokens | dict[str, Any]:
        """A decode step's reply: its tokens, or the general path's reply when an engine row failed."""
        reply = finish_decode(plan, results, self.lookahead)
        if reply is None:
            n = len(plan.tokens)
            slots = plan.slots if plan.slots is not None else range(n)
            general = ForwardPlan([[None if t is None else {"token": t}] for t in plan.tokens], [None] * n,
                                  plan.rows, [(index, 0) for index in slots])
            return self.finish_forward(general, results)
        if type(reply) is ForwardTokens:
            self.counters.tokens_out += len(reply.tokens)
            reply.weights_version = self.weights_version
        else:  # maps: some samplers asked for their tokens' log-probabilities
            self.counters.tokens_out += len(reply["results"])
            reply["weights_version"] = self.weights_version
        return reply

    def plan_forward(self, body: Forward) -> ForwardPlan:
        """Merge every request into its history and serve what the lookahead buffer holds; the rest
        become engine rows. Touches only driver state, never the engine."""
        n = len(body.items)
        plan = ForwardPlan([[] for _ in range(n)], [None] * n)
        self.counters.requests += n
        for index, item in enumerate(body.items):
            if isinstance(item, DriverError):
                plan.failures[index] = item
                continue
            try:
                merged = self._merge(item, plan)
            except DriverError as exc:
                plan.failures[index] = exc
                continue
            plan.evicted += merged.evicted
            plan.outputs[index] = [None] * len(item.samplers)
            try:
                self._plan_samplers(index, item, merged.snapshots, plan.outputs[index], plan)
            except DriverError as exc:  # a run that is not at the end of its history; its tokens stay merged
                plan.failures[index] = exc
        return plan

    def run_rows(self, rows: list[Row]) -> list[RowResult]:
        """The one engine call of a forward (on the engine thread when served)."""
        self.counters.engine_calls += 1
        started = time.perf_counter()
        try:
            return self._step_or_fail(rows)
        finally:
            self.counters.engine_s += time.perf_counter() - started

    def fail_rows(self, rows: list[Row], exc: Exception) -> list[RowResult]:
        """Every row fails with `exc` (the engine call raised, or was abandoned at its deadline), and its
        contexts' engine state goes."""
        self.engine.drop(list({row.context for row in rows}))
        return [RowResult(error=f"{type(exc).__name__}: {exc}")] * len(rows)

    def finish_forward(self, plan: ForwardPlan, results: list[RowResult]) -> dict[str, Any]:
        self._apply_results(plan, results)
        gone = [c for c in plan.evicted if c not in self.store]
        if gone:
            self.engine.drop(gone)
        replies = []
        for index, failure in enumerate(plan.failures):
            if failure is not None:
                self.counters.error(failure.code)
                replies.append({"ok": False, "error": failure.to_wire()})
            else:
                outputs = plan.outputs[index]
                self.counters.tokens_out += sum(len(out["tokens"]) if "tokens" in out else 1 for out in outputs)
                replies.append({"ok": True, "outputs": outputs})
        return {"results": replies, "weights_version": self.weights_version}

    def _merge(self, item: ForwardItem, plan: ForwardPlan) -> MergeResult:
        if item.context in plan.planned:
            if item.tokens:
                self._protect_pending_rows(item, plan.rows)
        elif len(item.tokens) == 1 and self.store.append(item.context, item.tokens[0], item.positions[0]):
            self.counters.tokens_in += 1
            return _APPENDED
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
                if not row.sampler.is_run:  # a run reads its own copy; lookahead would not match the history
                    row.steps = 1

    def _plan_samplers(self, index: int, item: ForwardItem, snapshots: dict[int, list[int]],
                       out: list[dict[str, Any] | None], plan: ForwardPlan) -> None:
        rows, slots, planned = plan.rows, plan.slots, plan.planned
        live = self.store.get(item.context) if item.context in self.store else []
        for sampler in item.samplers:
            if sampler.is_run:
                length = item.positions[sampler.at] + 1
                check_at_end(item.context, sampler, length,
                             snapshots.get(sampler.at, live) is live and length == len(live))
        for position, sampler in enumerate(item.samplers):
            tokens = snapshots.get(sampler.at, live)
            length = item.positions[sampler.at] + 1
            at_end = tokens is live and length == len(live)
            steps = 1
            if sampler.is_run:  # never served from the lookahead buffer: the engine keeps its run's cache
                steps = run_steps(sampler, length, self._max_len)
                if sampler.is_greedy:
                    seed = None
                else:
                    self.lookahead.drop([item.context])
                    seed = sampler.seed if sampler.seed is not None else self._rng.getrandbits(63)
            elif sampler.is_greedy:
                # A buffered token has no log-probability: with return_logprob the engine makes this one
                # token, and the buffer stays for the steps after it.
                if tokens is live and not sampler.return_logprob:
                    buffered = self.lookahead.take(item.context, live, length)
                    if buffered is not None:
                        out[position] = {"token": buffered}
                        continue
                if at_end and not sampler.return_logprob:
                    steps = max(1, min(self.lookahead.size, self._max_len - length))
                seed = None
            else:
                if sampler.makes_token:
                    self.lookahead.drop([item.context])
                seed = sampler.seed if sampler.seed is not None else self._rng.getrandbits(63)
            rows.append(Row(item.context, tokens, length, sampler, seed, steps))
            slots.append((index, position))
            planned.add(item.context)

    def _apply_results(self, plan: ForwardPlan, results: list[RowResult]) -> None:
        outputs, failures = plan.outputs, plan.failures
        for (index, position), row, result in zip(plan.slots, plan.rows, results, strict=True):
            if result.error is not None:
                failures[index] = DriverError(ErrorCode(result.code), result.error)
            elif result.tokens is not None and row.sampler.is_run:
                outputs[index][position] = run_output(row.sampler, self._max_len, row.length, result)
                if row.sampler.is_greedy and row.context in self.store and row.tokens is self.store.get(row.context):
                    self.lookahead.fill(row.context, row.length, result.tokens)  # the live history, not a copy
            elif result.tokens is not None:
                outputs[index][position] = out = {"token": result.tokens[0]}
                if row.sampler.return_logprob:
                    if not result.token_logprobs:
                        failures[index] = DriverError(ErrorCode.ENGINE_ERROR, "the engine made no log-probability")
                        continue
                    out["logprob"] = result.token_logprobs[0]
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
            return self.fail_rows(rows, exc)

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

    # ------------------------------------------------------------------ weights and memory

    def refusal(self) -> DriverError | None:
        """Why no forward can run now (asleep, or no weights served), or None."""
        if self.asleep:
            return DriverError(ErrorCode.ASLEEP, f"the driver is asleep (level {self.asleep}); send wake first")
        if not self.weights_serving:
            return DriverError(ErrorCode.WEIGHTS_UNAVAILABLE, "no weights are served: the last load_weights "
                               "failed part way; load weights again")
        return None

    def refuse_forward(self, body: Forward, error: DriverError) -> dict[str, Any]:
        """Every request fails with `error`, a valid one or not (as with replicas); no state changes."""
        count = len(body.items)
        self.counters.requests += count
        self.counters.error(error.code, count)
        wire = error.to_wire()
        results = [{"ok": False, "error": wire} for _ in range(count)]
        return {"results": results, "weights_version": self.weights_version}

    def load_weights(self, body: LoadWeights) -> dict[str, Any]:
        """Replace the weights. Every cached KV goes with the old weights, and so does the lookahead
        buffer (its tokens came from them)."""
        self._check_supported("load_weights")
        if self.asleep == 2:
            raise DriverError(ErrorCode.ASLEEP, "the weights are in host memory (asleep at level 2); "
                              "wake first, or sleep at level 1, then load")
        try:
            self.engine.load_weights(body.path)  # type: ignore[attr-defined]
        except WeightsLoadError as exc:
            serving = exc.serving_previous and self.weights_serving  # nothing served since a part-way failure
            if not serving:
                self.weights_serving = False
                self.lookahead.clear()
            raise DriverError(ErrorCode.WEIGHTS_LOAD_FAILED, exc.message, serving_previous=serving) from None
        except Exception as exc:  # an engine failure other than a refused load: assume the worst
            self.weights_serving = False
            self.lookahead.clear()
            raise DriverError(ErrorCode.WEIGHTS_LOAD_FAILED, f"{type(exc).__name__}: {exc}",
                              serving_previous=False) from None
        self.lookahead.clear()
        self.weights_version, self.weights_serving = body.version, True
        return {"weights_version": body.version}

    def sleep(self, body: Sleep) -> dict[str, Any]:
        self._check_supported("sleep")
        if body.level not in sleep_levels(self.engine):
            raise DriverError(ErrorCode.UNSUPPORTED, f"sleep level {body.level} is not supported by this engine")
        self.engine.sleep(body.level)  # type: ignore[attr-defined]
        self.asleep = body.level
        return {"asleep": body.level}

    def wake(self, body: Wake) -> dict[str, Any]:
        self._check_supported("wake")
        if self.asleep:
            self.engine.wake()  # type: ignore[attr-defined]
            self.asleep = 0
        return {"asleep": 0}

    def _check_supported(self, op: str) -> None:
        if op not in rl_ops(self.engine):
            raise DriverError(ErrorCode.UNSUPPORTED, f"{op} is not supported by the {self.engine.kind} engine")

    def weights_health(self) -> dict[str, Any]:
        return {"weights_version": self.weights_version,
                "weights": "serving" if self.weights_serving else "unavailable", "asleep": self.asleep}

    def stats(self) -> dict[str, Any]:
        c = self.counters
        engine_stats = getattr(self.engine, "stats", None)
        return {"requests": c.requests, "tokens_in": c.tokens_in, "tokens_out": c.tokens_out,
                "engine_calls": c.engine_calls, "engine_s": round(c.engine_s, 6), "oom_splits": c.oom_splits,
                "lookahead_hits": self.lookahead.hits,
                "contexts": len(self.store), "evictions": self.store.evictions, "errors": dict(c.errors),
                "engine": engine_stats() if engine_stats is not None else {}}
