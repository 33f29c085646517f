"""The decode step's fast path against the general path: the same replies, histories, lookahead buffer,
counters and engine rows for any sequence of forwards, and reply bytes equal to the general encoding."""

from __future__ import annotations

from typing import Any

import msgspec
from hypothesis import example, given, settings
from hypothesis import strategies as st

from pie_driver_trtllm.core.driver_core import DriverCore
from pie_driver_trtllm.engines.base import ModelInfo, Row, RowResult
from pie_driver_trtllm.sampler import Sampler
from pie_driver_trtllm.wire.codec import Forward, ForwardItem, ForwardTokens, Release, Truncate, encode_ok
from pie_driver_trtllm.wire.errors import DriverError, ErrorCode

VOCAB = 50
GREEDY = Sampler(type="greedy", at=0, temperature=0.0)
SAMPLERS = (GREEDY, Sampler(type="top_k", at=0, top_k=5), Sampler(type="top_k", at=0, top_k=5, seed=11),
            Sampler(type="dist", at=0, k=2), Sampler(type="greedy", at=0, temperature=0.0, return_logprob=True),
            Sampler(type="top_k", at=0, top_k=5, seed=11, return_logprob=True, logprob_mode="raw"),
            Sampler(type="top_p", at=0, temperature=0.0, top_p=0.5))


class ScriptedEngine:
    """Tokens a pure function of the prefix, sampler and seed; a row fails when its prefix says so.
    Every call's rows are logged as plain values."""

    kind, version, execution_mode = "scripted", "0", "none"
    samplers = frozenset({"greedy", "top_k", "top_p", "dist"})

    def __init__(self, max_model_len: int = 40) -> None:
        self.model = ModelInfo("scripted", "Scripted", VOCAB, max_model_len, None, None)
        self.calls: list[list[tuple[Any, ...]]] = []

    def step(self, rows: list[Row]) -> list[RowResult]:
        self.calls.append([(r.context, list(r.tokens[:r.length]), r.length, r.sampler, r.seed, r.steps)
                           for r in rows])
        results = []
        for r in rows:
            prefix = list(r.tokens[:r.length])
            if sum(prefix) % 13 == 12:
                results.append(RowResult(error="scripted failure", code="ENGINE_ERROR"))
            elif r.sampler.type == "dist":
                results.append(RowResult(dist=([sum(prefix) % VOCAB], [1.0])))
            else:
                made = []
                for _ in range(r.steps):
                    made.append((sum(prefix) * 7 + len(prefix) + (r.seed or 0)) % VOCAB)
                    prefix.append(made[-1])
                logprobs = [-token / VOCAB for token in made] if r.sampler.return_logprob else None
                results.append(RowResult(tokens=made, token_logprobs=logprobs))
        return results

    def fork(self, src: int, dst: int, length: int) -> None:
        pass

    def drop(self, contexts: list[int]) -> None:
        self.calls.append([("drop", sorted(contexts))])

    def close(self) -> None:
        pass


def state(core: DriverCore) -> Any:
    engine = core.engine
    assert isinstance(engine, ScriptedEngine)
    c = core.counters
    return (list(core.store._histories.items()), core.store.tokens,
            sorted((k, p.anchor, p.tokens) for k, p in core.lookahead._predictions.items()), core.lookahead.hits,
            (c.requests, c.tokens_in, c.tokens_out, c.engine_calls, dict(c.errors)), engine.calls)


def reply_map(reply: Any) -> Any:
    return msgspec.msgpack.decode(encode_ok(1, reply))


# One op: ("forward", [(context, kind, sampler index)]) where kind picks the request's shape, or a
# truncate / release of one context.
request = st.tuples(st.integers(0, 3), st.sampled_from(["next", "next", "next", "repeat", "rollback", "gap",
                                                           "prompt", "two"]),
                    st.integers(0, len(SAMPLERS) - 1))
ops = st.lists(st.one_of(st.tuples(st.just("forward"), st.lists(request, min_size=1, max_size=5)),
                         st.tuples(st.sampled_from(["truncate", "release"]), st.integers(0, 3))), max_size=25)


def build(core: DriverCore, requests: list[tuple[int, str, int]]) -> Forward:
    """The forward that each request shape means against the core's current histories."""
    items: list[ForwardItem | DriverError] = []
    for context, kind, sampler in requests:
        known = core.store.length(context)
        token = (known * 3 + context) % VOCAB
        if kind == "prompt" or (known == 0 and kind != "gap"):
            tokens, positions = [token, 1, 2], [0, 1, 2]
        elif kind == "next":
            tokens, positions = [token], [known]
        elif kind == "repeat":
            tokens, positions = [token], [known - 1]
        elif kind == "rollback":
            tokens, positions = [(token + 1) % VOCAB], [max(0, known - 2)]
        elif kind == "gap":
            tokens, positions = [token], [known + 1]
        else:
            tokens, positions = [token, token], [known, known + 1]
        chosen = SAMPLERS[sampler]
        if chosen.at != len(tokens) - 1:
            chosen = Sampler(**{**{f: getattr(chosen, f) for f in chosen.__slots__}, "at": len(tokens) - 1})
        items.append(ForwardItem(context, tokens, positions, (chosen,)))
    if requests and requests[0][2] == len(SAMPLERS) - 1:
        items.append(DriverError(ErrorCode.BAD_REQUEST, "refused at the edge"))
    return Forward(items)


@settings(max_examples=150, deadline=None)
@given(ops=ops, lookahead=st.sampled_from([1, 4]), max_total=st.sampled_from([None, 12]))
@example(ops=[("forward", [(0, "prompt", 0)]), ("forward", [(0, "next", 0), (1, "next", 0)]),
              ("forward", [(0, "next", 0)]), ("forward", [(0, "next", 0), (0, "next", 0)])], lookahead=4,
         max_total=None)
@example(ops=[("forward", [(0, "prompt", 0), (1, "prompt", 0)])] + [("forward", [(0, "next", 0), (1, "next", 0)])] * 4,
         lookahead=1, max_total=12)
def test_fast_path_does_what_the_general_path_does(ops: list[tuple[str, Any]], lookahead: int,
                                                   max_total: int | None) -> None:
    fast = DriverCore(ScriptedEngine(), max_contexts=3, lookahead_tokens=lookahead, random_seed=5,
                      max_total_tokens=max_total)
    general = DriverCore(ScriptedEngine(), max_contexts=3, lookahead_tokens=lookahead, random_seed=5,
                         max_total_tokens=max_total)
    general.fast_decode = False
    for op, arg in ops:
        replies = []
        for core in (fast, general):
            if op == "forward":
                replies.append(reply_map(core.forward(build(core, arg))))
            elif op == "truncate" and arg in core.store:
                core.truncate(Truncate(arg, core.store.length(arg) // 2))
            elif op == "release":
                core.release(Release((arg,)))
        assert replies[:1] == replies[1:]
        assert state(fast) == state(general)


def test_a_decode_step_with_log_probabilities_takes_the_fast_path() -> None:
    core = DriverCore(ScriptedEngine(), max_contexts=8, lookahead_tokens=4, random_seed=5)
    first = core.forward(Forward([ForwardItem(c, [1, 2], [0, 1], (Sampler(type="greedy", at=1, temperature=0.0),))
                                  for c in range(3)]))
    fed = [result["outputs"][0]["token"] for result in first["results"]]
    samplers = (GREEDY, SAMPLERS[4], SAMPLERS[5])  # plain greedy, greedy and top_k with return_logprob
    step = core.plan_decode(Forward([ForwardItem(c, [fed[c]], [2], (samplers[c],)) for c in range(3)]))
    assert step is not None and step.logprobs
    assert step.tokens[0] is not None and [row.steps for row in step.rows] == [1, 1]  # 0 from the buffer
    reply = core.finish_decode(step, core.run_rows(step.rows))
    assert not isinstance(reply, ForwardTokens)
    assert [set(r["outputs"][0]) for r in reply["results"]] == [{"token"}, {"token", "logprob"}, {"token", "logprob"}]
    assert sorted(core.lookahead._predictions) == [0, 1]  # the greedy row with its log-probability kept its buffer


def test_a_decode_step_takes_the_fast_path() -> None:
    core = DriverCore(ScriptedEngine(), max_contexts=8, lookahead_tokens=1, random_seed=5)
    core.forward(Forward([ForwardItem(c, [1, 2], [0, 1], (Sampler(type="greedy", at=1, temperature=0.0),))
                          for c in range(3)]))
    step = core.plan_decode(Forward([ForwardItem(c, [4], [2], (GREEDY,)) for c in range(3)]))
    assert step is not None and len(step.rows) == 3
    reply = core.finish_decode(step, core.run_rows(step.rows))
    assert isinstance(reply, ForwardTokens) and len(reply.tokens) == 3


@settings(max_examples=100, deadline=None)
@given(request_id=st.integers(0, 2**64 - 1), tokens=st.lists(st.integers(0, 2**32 - 1), max_size=40),
       pad=st.sampled_from([0, 16, 65_536]), weights_version=st.integers(0, 2**64 - 1))
@example(request_id=0, tokens=[], pad=0, weights_version=0)
@example(request_id=2**64 - 1, tokens=[127, 128, 255, 256, 65_535, 65_536], pad=0, weights_version=2**64 - 1)
def test_token_replies_encode_to_the_general_bytes(request_id: int, tokens: list[int], pad: int,
                                                   weights_version: int) -> None:
    tokens = tokens + [7] * pad  # array headers of every width
    reply = ForwardTokens(tokens, weights_version)
    assert encode_ok(request_id, reply) == encode_ok(request_id, reply.as_map())
