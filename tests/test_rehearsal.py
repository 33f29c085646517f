"""Rehearsal between decode steps (`rehearse_steps`): running the last step's driver side again changes
nothing, stops once the next request is here, and a driver that rehearses answers what one that does not
answers."""

from __future__ import annotations

import random
from typing import Any

from hypothesis import example, given, settings
from test_decode_step import SAMPLERS, ScriptedEngine, build, ops, state
from test_step_op import _one_by_one

from pie_driver_trtllm.core.driver_core import DriverCore
from pie_driver_trtllm.serving.backend import LocalBackend
from pie_driver_trtllm.wire.codec import Forward, Limits, Release, StepColumns, Truncate, encode_forward

LIMITS = Limits(vocab_size=50, max_model_len=40, max_forward_requests=8, max_forward_tokens=64,
                max_logprob_labels=4, max_frame_bytes=1 << 16)


def _everything(core: DriverCore, engine: ScriptedEngine) -> Any:
    """All a rehearsal could change: the core's state, the engine's calls, the LRU order, the random draws."""
    guarded, core.engine = core.engine, engine
    try:
        return (state(core), list(core.store._histories), core._rng.getstate(), core.last_was_decode)
    finally:
        core.engine = guarded


@settings(max_examples=100, deadline=None)
@given(ops=ops)
@example(ops=[("forward", [(0, "prompt", 0), (1, "prompt", 1)]), ("forward", [(0, "next", 1), (1, "next", 1)])])
def test_a_rehearsal_changes_nothing(ops: list[tuple[str, Any]]) -> None:
    engine = ScriptedEngine()
    core = DriverCore(engine, max_contexts=3, lookahead_tokens=4, random_seed=5)
    core._rng = random.Random(5)  # its state is compared too
    backend = LocalBackend(core, "cpu")
    for op, arg in ops:
        if op == "forward":
            body = build(core, arg)
            core.forward(body)
            items = [item for item in body.items if not isinstance(item, Exception)]
            columns = StepColumns([i.context for i in items], [i.tokens[-1] for i in items],
                                  [i.positions[-1] for i in items], SAMPLERS[0])
            for rehearsed in (body, Forward(columns=columns)):
                before = _everything(core, engine)
                core.plan_decode(rehearsed, dry=True)
                assert _everything(core, engine) == before
            before = _everything(core, engine)
            backend.rehearse(encode_forward(1, items), LIMITS, lambda: False)
            assert _everything(core, engine) == before
        elif op == "truncate" and arg in core.store:
            core.truncate(Truncate(arg, core.store.length(arg) // 2))
        elif op == "release":
            core.release(Release((arg,)))


def test_a_rehearsal_stops_once_the_next_request_is_here() -> None:
    core = DriverCore(ScriptedEngine(), max_contexts=8, lookahead_tokens=1, random_seed=5)
    backend = LocalBackend(core, "cpu")
    body = Forward(columns=StepColumns([0, 1], [1, 1], [0, 0], SAMPLERS[0]))
    core.forward(body)
    core.forward(Forward(columns=StepColumns([0, 1], [2, 2], [1, 1], SAMPLERS[0])))
    assert core.last_was_decode
    calls: list[str] = []
    planned = core.plan_decode
    core.plan_decode = lambda b, dry=False: calls.append("plan") or planned(b, dry)  # type: ignore[method-assign]
    frame = encode_forward(1, Forward(columns=StepColumns([0, 1], [3, 3], [2, 2], SAMPLERS[0])).items)
    backend.rehearse(frame, LIMITS, lambda: True)  # the request came during the decode
    assert calls == []
    backend.rehearse(frame, LIMITS, lambda: False)
    assert calls == ["plan"]


def test_a_driver_that_rehearses_answers_what_one_that_does_not_answers(start_driver) -> None:
    made = {}
    for rehearse in (True, False):
        driver = start_driver(rehearse_steps=rehearse)
        client = driver.client()
        greedy = {"at": 0, "type": "greedy"}
        made[rehearse] = (_one_by_one(client, [10, 11], [5, 6, 7], 8, greedy, as_step=True),
                          _one_by_one(client, [20, 21], [5, 6, 7], 8, greedy, as_step=False))
        rehearsals = client.call("stats")["rehearsals"]
        assert rehearsals > 0 if rehearse else rehearsals == 0
    assert made[True] == made[False]
