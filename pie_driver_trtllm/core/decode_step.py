"""The decode step's fast path: every request one token at the end of its own history, one token sampler.

That is the forward a host sends on almost every step, so it gets its own loop: one pass to check that
the forward is one, one to append and build the engine rows, and a reply that is a list of tokens
(`ForwardTokens`, encoded straight to bytes) rather than a map per request. Anything else (a new
context, a rollback, a context twice, several tokens or samplers, a distribution sampler, a failed
request) is declined before anything changes and takes the general path; what the fast path does is
exactly what the general path would do.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from pie_driver_trtllm.engines.base import Row, RowResult
from pie_driver_trtllm.sampler import TOKEN_SAMPLERS
from pie_driver_trtllm.wire.codec import ForwardItem, ForwardTokens

if TYPE_CHECKING:
    from pie_driver_trtllm.core.driver_core import DriverCore, ForwardPlan

_TOKEN_SAMPLERS = frozenset(TOKEN_SAMPLERS)


@dataclass(slots=True)
class DecodePlan:
    """A decode step between planning and its engine call."""

    tokens: list[int | None]  # per request: its token when the lookahead buffer served it, else None
    rows: list[Row]
    slots: list[int] | None  # the request of each row; None when row i is request i
    contexts: set[int]


def plan_decode(core: DriverCore, items: list) -> DecodePlan | None:
    """The plan of a decode step, or None (nothing changed) when `items` is not one."""
    histories = core.store._histories
    get = histories.get
    lives = []
    for item in items:
        if type(item) is not ForwardItem or len(item.tokens) != 1 or len(item.samplers) != 1 \
                or item.samplers[0].type not in _TOKEN_SAMPLERS:
            return None
        live = get(item.context)
        if live is None or item.positions[0] != len(live):
            return None
        lives.append(live)
    n = len(items)
    contexts = {item.context for item in items}
    if len(contexts) != n:
        return None
    # From here on the forward is a decode step: the same changes as the general path, in its order.
    counters, lookahead = core.counters, core.lookahead
    counters.requests += n
    counters.tokens_in += n
    predictions = lookahead._predictions
    size, max_len, rng = lookahead.size, core._max_len, core._rng
    move_to_end = histories.move_to_end
    tokens: list[int | None] = [None] * n
    rows: list[Row] = []
    slots: list[int] | None = None
    for index, (item, live) in enumerate(zip(items, lives, strict=True)):
        context = item.context
        live.append(item.tokens[0])
        move_to_end(context)
        length = len(live)
        sampler = item.samplers[0]
        if sampler.is_greedy:
            if predictions and context in predictions:
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
    if slots is not None:  # the engine call concerns only the contexts it has rows for
        contexts = {row.context for row in rows}
    return DecodePlan(tokens, rows, slots, contexts)


def finish_decode(core: DriverCore, plan: DecodePlan, results: list[RowResult]) -> ForwardTokens | dict:
    """The reply of a decode step: its tokens, or the general path's reply when an engine row failed."""
    tokens, slots, lookahead = plan.tokens, plan.slots, core.lookahead
    try:
        made = [result.tokens[0] for result in results if result.error is None]  # type: ignore[index]
    except TypeError:  # a row without tokens
        made = []
    if len(made) != len(plan.rows) or len(results) != len(plan.rows):
        return core.finish_forward(general_plan(plan), results)
    for row, result in zip(plan.rows, results, strict=True):
        if row.steps > 1:
            lookahead.fill(row.context, row.length, result.tokens)  # type: ignore[arg-type]
    if slots is None:
        tokens = made  # type: ignore[assignment]
    else:
        for index, token in zip(slots, made, strict=True):
            tokens[index] = token
    core.counters.tokens_out += len(tokens)
    return ForwardTokens(tokens)  # type: ignore[arg-type]


def general_plan(plan: DecodePlan) -> ForwardPlan:
    """The same step as the general path plans it, for the general path's assembly of results."""
    from pie_driver_trtllm.core.driver_core import ForwardPlan

    n = len(plan.tokens)
    slots = plan.slots if plan.slots is not None else range(n)
    return ForwardPlan([[None if t is None else {"token": t}] for t in plan.tokens], [None] * n, plan.rows,
                       [(index, 0) for index in slots])
