"""The `step` op (protocol 1.2): a decode step as columns is the forward it stands for.

At the edge a valid step decodes to the forward of the same requests, and a step with any bad value
fails whole with that value's documented code. In the core, any sequence of steps leaves the same
replies, histories, lookahead buffer, counters and engine rows as those forwards on the general path.
Over a socket, `DriverClient.step` answers what `forward` answers, replicas included.
"""

from __future__ import annotations

from typing import Any

import msgspec
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from test_decode_step import SAMPLERS, VOCAB, ScriptedEngine, reply_map, state

from pie_driver_trtllm.core.driver_core import DriverCore
from pie_driver_trtllm.sampler import Sampler
from pie_driver_trtllm.wire.codec import Forward, FrameRejected, Limits, Release, StepColumns, Truncate, decode_frame
from pie_driver_trtllm.wire.samplers import wire_map

LIMITS = Limits(vocab_size=50, max_model_len=40, max_forward_requests=6, max_forward_tokens=5,
                max_logprob_labels=4, max_frame_bytes=1 << 16, max_sampler_rows=4, max_output_elements=3)
RUN = Sampler(type="greedy", at=0, temperature=0.0, max_tokens=3)
STEP_SAMPLERS = (*SAMPLERS, RUN, None)
encode = msgspec.msgpack.encode


def step_frame(contexts: list[int], tokens: list[int], positions: list[int], sampler: Any = None,
               **extra: Any) -> bytes:
    fields: dict[str, Any] = {"contexts": contexts, "tokens": tokens, "positions": positions, **extra}
    if sampler is not None:
        fields["sampler"] = sampler
    return encode({"v": 1, "id": 9, "op": "step", **fields})


def forward_frame(contexts: list[int], tokens: list[int], positions: list[int], sampler: Any = None) -> bytes:
    return encode({"v": 1, "id": 9, "op": "forward", "requests": [
        {"context": c, "tokens": [t], "positions": [p], "samplers": [] if sampler is None else [sampler]}
        for c, t, p in zip(contexts, tokens, positions, strict=True)]})


def rejected(frame: bytes) -> tuple[str, str]:
    with pytest.raises(FrameRejected) as caught:
        decode_frame(frame, LIMITS)
    assert caught.value.request_id == 9
    return caught.value.error.code.value, caught.value.error.message


# ---------------------------------------------------------------- the edge

sampler_maps = st.sampled_from([None, {"at": 0, "type": "greedy"}, {"at": 0, "type": "top_k", "top_k": 3, "seed": 4},
                                {"at": 0, "type": "multinomial", "temperature": 0.5, "return_logprob": True},
                                {"at": 0, "type": "dist", "k": 2}, {"at": 0, "type": "greedy", "max_tokens": 4}])


@settings(max_examples=150, deadline=None)
@given(columns=st.lists(st.tuples(st.integers(0, 2**64 - 1), st.integers(0, 49), st.integers(0, 39)), max_size=5),
       sampler=sampler_maps)
@example(columns=[], sampler=None)
@example(columns=[(3, 1, 0), (3, 2, 1)], sampler={"at": 0, "type": "dist", "k": 2})
@example(columns=[(0, 0, 0)] * 5, sampler={"at": 0, "type": "greedy"})  # over max_sampler_rows
@example(columns=[(0, 0, 0)] * 4, sampler={"at": 0, "type": "multinomial", "temperature": 0.5,
                                           "return_logprob": True})  # over max_output_elements
def test_a_valid_step_decodes_to_the_forward_it_stands_for(columns: list[tuple[int, int, int]], sampler: Any) -> None:
    contexts, tokens, positions = ([c[i] for c in columns] for i in range(3))
    try:
        forward = decode_frame(forward_frame(contexts, tokens, positions, sampler), LIMITS)
    except FrameRejected as exc:  # over a cap: the step is refused with the same code
        assert rejected(step_frame(contexts, tokens, positions, sampler))[0] == exc.error.code.value
        return
    step = decode_frame(step_frame(contexts, tokens, positions, sampler), LIMITS)
    assert isinstance(step.body, Forward) and step.body.columns is not None
    assert (step.id, step.op) == (forward.id, forward.op) == (9, "forward")
    assert step.body == forward.body  # the same requests, built only now


@pytest.mark.parametrize(("frame", "code", "says"), [
    (step_frame([1, 2], [3], [0, 0]), "BAD_REQUEST", "2 contexts, 1 tokens and 2 positions"),
    (step_frame([1], [50], [0]), "OUT_OF_RANGE", "tokens[0] = 50 is not below vocab_size 50"),
    (step_frame([1, 2], [1, 1], [0, 40]), "OUT_OF_RANGE", "positions[1] = 40 is not below max_model_len"),
    (step_frame([1] * 7, [1] * 7, [0] * 7), "CAPACITY", "max_forward_requests is 6"),
    (step_frame([1] * 6, [1] * 6, [0] * 6), "CAPACITY", "max_forward_tokens is 5"),
    (step_frame([1] * 5, [1] * 5, [0] * 5, {"at": 0, "type": "greedy"}), "CAPACITY", "max_sampler_rows is 4"),
    (step_frame([1] * 3, [1] * 3, [0] * 3, {"at": 0, "type": "dist", "k": 3}), "CAPACITY", "max_output_elements"),
    (step_frame([1] * 4, [1] * 4, [0] * 4, {"at": 0, "type": "greedy", "return_logprob": True}), "CAPACITY",
     "max_output_elements is 3"),
    (step_frame([1], [1], [0], {"at": 1, "type": "greedy"}), "OUT_OF_RANGE", "sampler: sampler at=1"),
    (step_frame([1], [1], [0], {"at": 0, "type": "beam"}), "BAD_REQUEST", "sampler: "),
    (step_frame([1], [1], [0], {"at": 0, "type": "top_p", "top_p": 2.0}), "BAD_REQUEST", "sampler: top_p"),
    (step_frame([1], [1], [0], sampler=None, extra=1), "BAD_REQUEST", "unknown field `extra`"),
    (step_frame([-1], [1], [0]), "BAD_REQUEST", "$.contexts[0]"),
    (step_frame([1], [2**32], [0]), "BAD_REQUEST", "$.tokens[0]"),
    (encode({"v": 1, "id": 9, "op": "step", "contexts": [1], "tokens": [1]}), "BAD_REQUEST", "`positions`"),
    (encode({"v": 1, "id": 9, "op": "step", "contexts": [1], "tokens": [1], "positions": [0], "sampler": None}),
     "BAD_REQUEST", "sampler: Expected `object`, got `None`"),
    (encode({"v": 1, "id": 9, "op": "step", "contexts": 1, "tokens": [1], "positions": [0]}), "BAD_REQUEST",
     "$.contexts"),
])
def test_a_bad_value_fails_the_whole_step_with_its_code(frame: bytes, code: str, says: str) -> None:
    got_code, message = rejected(frame)
    assert (got_code, says in message) == (code, True), message


def test_the_step_sampler_memo_is_per_limits() -> None:
    frame = step_frame([1], [1], [0], {"at": 0, "type": "dist", "k": 3})
    assert decode_frame(frame, LIMITS).body.columns.sampler.k == 3  # type: ignore[union-attr]
    narrow = Limits(vocab_size=2, max_model_len=40, max_forward_requests=6, max_forward_tokens=5,
                    max_logprob_labels=4, max_frame_bytes=1 << 16, max_output_elements=64)
    with pytest.raises(FrameRejected) as caught:
        decode_frame(frame, narrow)  # k above this vocabulary: the map remembered under LIMITS is checked again
    assert caught.value.error.code.value == "OUT_OF_RANGE"


# ---------------------------------------------------------------- the core

# One op: a step of (context, kind) entries with one sampler index, or a truncate / release of one context.
entry = st.tuples(st.integers(0, 3), st.sampled_from(["next", "next", "next", "repeat", "rollback", "gap", "new"]))
ops = st.lists(st.one_of(st.tuples(st.just("step"), st.tuples(st.lists(entry, min_size=1, max_size=5),
                                                              st.integers(0, len(STEP_SAMPLERS) - 1))),
                         st.tuples(st.sampled_from(["truncate", "release"]), st.integers(0, 3))), max_size=25)


def columns(core: DriverCore, entries: list[tuple[int, str]], sampler: int) -> StepColumns:
    """The step each entry shape means against the core's current histories."""
    contexts, tokens, positions = [], [], []
    for context, kind in entries:
        known = core.store.length(context)
        position = {"next": known, "repeat": known - 1, "rollback": known - 2, "gap": known + 1, "new": 0}[kind]
        contexts.append(context)
        tokens.append((known * 3 + context + len(contexts)) % VOCAB)
        positions.append(max(0, position))
    return StepColumns(contexts, tokens, positions, STEP_SAMPLERS[sampler])


@settings(max_examples=200, deadline=None)
@given(ops=ops, lookahead=st.sampled_from([1, 4]), max_total=st.sampled_from([None, 12]))
@example(ops=[("step", ([(0, "new"), (1, "new")], 0))] + [("step", ([(0, "next"), (1, "next")], 0))] * 4,
         lookahead=4, max_total=None)
@example(ops=[("step", ([(0, "new")], 0)), ("step", ([(0, "next"), (0, "next")], 1)),
              ("step", ([(0, "next")], 7)), ("step", ([(0, "next")], 8))], lookahead=1, max_total=12)
def test_steps_do_what_their_forwards_do_on_the_general_path(ops: list[tuple[str, Any]], lookahead: int,
                                                             max_total: int | None) -> None:
    cores = [DriverCore(ScriptedEngine(), max_contexts=3, lookahead_tokens=lookahead, random_seed=5,
                        max_total_tokens=max_total) for _ in range(3)]
    step, forward, general = cores
    general.fast_decode = False
    for op, arg in ops:
        replies = []
        for core in cores:
            if op == "step":
                cols = columns(core, *arg)
                body = Forward(columns=cols) if core is step else Forward(cols.items())
                replies.append(reply_map(core.forward(body)))
            elif op == "truncate" and arg in core.store:
                core.truncate(Truncate(arg, core.store.length(arg) // 2))
            elif op == "release":
                core.release(Release((arg,)))
        assert replies[:1] * len(replies) == replies
        assert state(step) == state(forward) == state(general)


def test_a_step_takes_the_fast_path_and_never_builds_its_requests() -> None:
    core = DriverCore(ScriptedEngine(), max_contexts=8, lookahead_tokens=1, random_seed=5)
    core.forward(Forward(StepColumns([0, 1, 2], [1, 1, 1], [0, 0, 0], SAMPLERS[0]).items()))
    body = Forward(columns=StepColumns([0, 1, 2], [4, 5, 6], [1, 1, 1], SAMPLERS[1]))
    plan = core.plan_decode(body)
    assert plan is not None and [row.context for row in plan.rows] == [0, 1, 2]
    assert body._items is None  # no request object was made


# ---------------------------------------------------------------- over the socket

def _one_by_one(client: Any, contexts: list[int], prompt: list[int], steps: int, sampler: dict[str, Any],
                as_step: bool) -> list[list[int]]:
    """Greedy continuations of `prompt` in each context, fed back one step at a time."""
    first = client.forward([{"context": c, "tokens": prompt, "positions": list(range(len(prompt))),
                             "samplers": [{**sampler, "at": len(prompt) - 1}]} for c in contexts])
    made = [[r["outputs"][0]["token"]] for r in first]
    for i in range(steps):
        fed = [m[-1] for m in made]
        positions = [len(prompt) + i] * len(contexts)
        if as_step:
            results = client.step(contexts, fed, positions, sampler)
        else:
            results = client.forward([{"context": c, "tokens": [t], "positions": [p], "samplers": [sampler]}
                                      for c, t, p in zip(contexts, fed, positions, strict=True)])
        for m, r in zip(made, results, strict=True):
            assert r["ok"], r
            m.append(r["outputs"][0]["token"])
    return made


@pytest.mark.parametrize("devices", [1, 2], ids=["one driver", "two replicas"])
def test_steps_over_the_socket_answer_what_forwards_answer(start_driver, devices: int) -> None:
    driver = start_driver(**({"driver": {"device": ["cpu", "cpu"]}} if devices == 2 else {}))
    client = driver.client()
    assert client.call("handshake")["protocol_version"] == [1, 2]
    greedy = {"at": 0, "type": "greedy"}
    by_step = _one_by_one(client, [10, 11, 12], [5, 6, 7], 6, greedy, as_step=True)
    by_forward = _one_by_one(client, [20, 21, 22], [5, 6, 7], 6, greedy, as_step=False)
    assert by_step == by_forward
    failed = client.step([10, 99], [1, 1], [9, 3], wire_map(SAMPLERS[0]))
    assert failed[0]["ok"] and failed[1]["error"]["code"] == "HISTORY_GAP"  # fails its entry alone
    reply = client.call("step", check=False, contexts=[1], tokens=[1], positions=[0, 1])
    assert not reply.ok and reply.error is not None and reply.error.code == "BAD_REQUEST"
    assert client.call("health")["status"] == "ok"


# ---------------------------------------------------------------- hostile step frames

anything = st.one_of(st.none(), st.booleans(), st.integers(-(2**63), 2**64 - 1), st.floats(allow_nan=True),
                     st.text(max_size=4), st.binary(max_size=4), st.lists(st.integers(-3, 60), max_size=3),
                     st.dictionaries(st.text(max_size=3), st.integers(-3, 3), max_size=2))
sampler_like = st.one_of(sampler_maps, st.dictionaries(st.sampled_from(["at", "type", "k", "top_p", "seed", "x"]),
                                                       anything, max_size=3), anything)


@st.composite
def step_fields(draw: st.DrawFn) -> dict[str, Any]:
    """Columns mostly of one length with values around the limits, now and then a column of any shape,
    a sampler map of any kind, an unknown field."""
    n = draw(st.integers(0, 7))
    fields: dict[str, Any] = {name: draw(st.lists(st.integers(0, top), min_size=n, max_size=n))
                              for name, top in (("contexts", 2**64 - 1), ("tokens", 60), ("positions", 45))}
    if draw(st.integers(0, 3)) == 0:
        fields[draw(st.sampled_from(sorted(fields)))] = draw(st.one_of(anything, st.lists(anything, max_size=3)))
    if draw(st.booleans()):
        fields["sampler"] = draw(sampler_like)
    if draw(st.integers(0, 9)) == 0:
        fields["extra"] = draw(anything)
    return fields


@settings(max_examples=400, deadline=None)
@given(fields=step_fields())
@example(fields={"contexts": [1, 2], "tokens": [1, 2], "positions": [0, 0],
                 "sampler": {"at": 0, "type": "dist", "k": 9}})
@example(fields={"contexts": [0] * 7, "tokens": [0] * 7, "positions": [0] * 7})
@example(fields={"contexts": [1], "tokens": [55], "positions": [0]})
@example(fields={"contexts": [1], "tokens": [5], "positions": [41]})
def test_any_step_frame_gets_a_request_or_a_documented_refusal(fields: dict[str, Any]) -> None:
    frame = encode({"v": 1, "id": 9, "op": "step", **fields})
    try:
        request = decode_frame(frame, LIMITS)
    except FrameRejected as exc:
        assert exc.request_id == 9
        assert exc.error.code.value in {"BAD_REQUEST", "OUT_OF_RANGE", "CAPACITY", "UNSUPPORTED"}, exc.error.message
        return
    columns = request.body.columns  # type: ignore[union-attr]
    assert columns is not None and len(columns.contexts) == len(columns.tokens) == len(columns.positions)
    assert len(columns.contexts) <= min(LIMITS.max_forward_requests, LIMITS.max_forward_tokens)
    assert all(t < LIMITS.vocab_size for t in columns.tokens)
    assert all(p < LIMITS.max_model_len for p in columns.positions)
