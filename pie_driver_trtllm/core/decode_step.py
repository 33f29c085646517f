"""The decode step's fast path: every request one token at the end of its own history, one token sampler.

That is the forward a host sends on almost every step, so it gets its own loop: one pass to check that
the forward is one, one to append and build the engine rows, and a reply that is a list of tokens
(`ForwardTokens`, encoded straight to bytes) rather than a map per request (a step where a sampler asks
for its token's log-probability answers with the maps). Anything else (a new context, a rollback, a
context twice, several tokens or samplers, a distribution sampler, a run, a failed request) is declined
before anything changes and takes the general path; what the fast path does is exactly what the
general path would do.
"""

from __future__ import annotations

import random
from collections import deque
from dataclasses import dataclass
from typing import Any

from pie_driver_trtllm.core.histories import ContextStore
from pie_driver_trtllm.core.lookahead import LookaheadBuffer
from pie_driver_trtllm.engines.base import Row, RowResult
from pie_driver_trtllm.sampler import TOKEN_SAMPLERS, Sampler
from pie_driver_trtllm.wire.codec import ForwardItem, ForwardTokens, StepColumns

_TOKEN_SAMPLERS = frozenset(TOKEN_SAMPLERS)
consume = deque(maxlen=0).extend  # runs an iterator to its end, keeping nothing: a loop in C


@dataclass(slots=True)
class DecodePlan:
    """A decode step between planning and its engine call."""

    tokens: list[int | None]  # per request: its token when the lookahead buffer served it, else None
    rows: list[Row]
    slots: list[int] | None  # the request of each row; None when row i is request i
    contexts: set[int]
    logprobs: bool = False  # a sampler asked for its token's log-probability: the reply is maps, not tokens


def plan_decode(items: list, store: ContextStore, lookahead: LookaheadBuffer, max_len: int,
                rng: random.Random, dry: bool = False) -> DecodePlan | None:
    """The plan of a decode step, or None (nothing changed) when `items` is not one. `dry`: a rehearsal,
    which reads what the plan reads and builds its rows but changes nothing (no append, no LRU move, no
    lookahead, no seed drawn); it brings that code and data back into the CPU's caches between steps."""
    logprobs = False
    for item in items:
        if type(item) is not ForwardItem or len(item.tokens) != 1 or len(item.samplers) != 1 \
                or item.samplers[0].type not in _TOKEN_SAMPLERS or item.samplers[0].max_tokens:  # a run
            return None
        if item.samplers[0].return_logprob:
            logprobs = True
    return _plan([item.context for item in items], [item.tokens[0] for item in items],
                 [item.positions[0] for item in items], [item.samplers[0] for item in items], logprobs,
                 store, lookahead, max_len, rng, dry)


def plan_step(columns: StepColumns, store: ContextStore, lookahead: LookaheadBuffer, max_len: int,
              rng: random.Random, dry: bool = False) -> DecodePlan | None:
    """`plan_decode` for a step that came as columns: its one sampler is checked once, not per request."""
    sampler = columns.sampler
    if sampler is None or sampler.type not in _TOKEN_SAMPLERS or sampler.max_tokens:
        return None
    return _plan(columns.contexts, columns.tokens, columns.positions, [sampler] * len(columns.contexts),
                 sampler.return_logprob, store, lookahead, max_len, rng, dry)


def _plan(contexts: list[int], tokens: list[int], positions: list[int], samplers: list[Sampler], logprobs: bool,
          store: ContextStore, lookahead: LookaheadBuffer, max_len: int, rng: random.Random,
          dry: bool = False) -> DecodePlan | None:
    unique = set(contexts)
    histories = store._histories
    lives = list(map(histories.get, contexts))
    if len(unique) != len(contexts) or None in lives:
        return None
    if dry:  # a rehearsal on the last step's frame: its positions are one behind; the rows, never run
        return DecodePlan([None] * len(contexts), [Row(context, live, len(live), s, None, 1)
                                                   for context, live, s in zip(contexts, lives, samplers, strict=True)],
                          None, unique, logprobs)
    if list(map(len, lives)) != positions \
            or (store.max_tokens is not None and store.tokens + len(contexts) > store.max_tokens):
        return None  # (past the bound on total tokens, the general path evicts)
    # From here on the forward is a decode step: the same changes as the general path. Each request
    # touches only its own context, so appending all first, then refreshing the LRU order in request
    # order, ends where the general path's request-by-request merge ends.
    consume(map(list.append, lives, tokens))
    store.tokens += len(contexts)
    consume(map(histories.move_to_end, contexts))
    if lookahead._predictions or lookahead.size > 1:
        plan = _plan_with_lookahead(contexts, samplers, lives, lookahead, max_len, rng)
        plan.logprobs = logprobs
        return plan
    draw = rng.getrandbits
    rows = [Row(context, live, len(live), s, None if s.type == "greedy" or s.temperature == 0.0  # is_greedy
                else s.seed if s.seed is not None else draw(63), 1)
            for context, live, s in zip(contexts, lives, samplers, strict=True)]
    return DecodePlan([None] * len(rows), rows, None, unique, logprobs)


def _plan_with_lookahead(contexts: list[int], samplers: list[Sampler], lives: list[list[int]],
                         lookahead: LookaheadBuffer, max_len: int, rng: random.Random) -> DecodePlan:
    """The rows of a decode step when the lookahead buffer may serve some or greedy rows ask for more."""
    predictions, size = lookahead._predictions, lookahead.size
    tokens: list[int | None] = [None] * len(contexts)
    rows: list[Row] = []
    slots: list[int] | None = None
    for index, (context, sampler, live) in enumerate(zip(contexts, samplers, lives, strict=True)):
        length = len(live)
        if sampler.is_greedy and sampler.return_logprob:  # a buffered token has no log-probability
            steps = 1  # the engine makes this one; the buffer stays for the steps after it
            seed = None
        elif sampler.is_greedy:
            if context in predictions:
                buffered = lookahead.take(context, live, length)
                if buffered is not None:
                    tokens[index] = buffered
                    if slots is None:
                        slots = list(range(index))
                    continue
            steps = max(1, min(size, max_len - length))
            seed = None
        else:
            predictions.pop(context, None)
            steps = 1
            seed = sampler.seed if sampler.seed is not None else rng.getrandbits(63)
        rows.append(Row(context, live, length, sampler, seed, steps))
        if slots is not None:
            slots.append(index)
    # The engine call concerns only the contexts it has rows for.
    return DecodePlan(tokens, rows, slots, {row.context for row in rows})


def finish_decode(plan: DecodePlan, results: list[RowResult],
                  lookahead: LookaheadBuffer) -> ForwardTokens | dict[str, Any] | None:
    """The reply of a decode step, or None (nothing changed) when an engine row failed or made no token
    (or no log-probability asked for): the general path assembles that one."""
    tokens, slots = plan.tokens, plan.slots
    try:
        made = [result.tokens[0] for result in results if result.error is None]  # type: ignore[index]
    except TypeError:  # a row without tokens
        return None
    if len(made) != len(plan.rows) or len(results) != len(plan.rows):
        return None
    if plan.logprobs and any(row.sampler.return_logprob and not result.token_logprobs
                             for row, result in zip(plan.rows, results, strict=True)):
        return None
    if lookahead.size > 1:  # otherwise every row asked for one token
        for row, result in zip(plan.rows, results, strict=True):
            if row.steps > 1:
                lookahead.fill(row.context, row.length, result.tokens)  # type: ignore[arg-type]
    if slots is not None:
        for index, token in zip(slots, made, strict=True):
            tokens[index] = token
        made = tokens  # type: ignore[assignment]
    return _with_logprobs(made, plan, results) if plan.logprobs else ForwardTokens(made)


def _with_logprobs(tokens: list[int], plan: DecodePlan, results: list[RowResult]) -> dict[str, Any]:
    """The reply maps of a decode step in which some samplers asked for their token's log-probability."""
    outputs: list[dict[str, Any]] = [{"token": token} for token in tokens]
    for index, row, result in zip(plan.slots or range(len(results)), plan.rows, results, strict=True):
        if row.sampler.return_logprob:
            outputs[index]["logprob"] = result.token_logprobs[0]  # type: ignore[index]
    return {"results": [{"ok": True, "outputs": [out]} for out in outputs]}
