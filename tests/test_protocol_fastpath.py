"""The one-pass forward path of the codec against the general path: same frames accepted, equal objects built.

`fast_forward.fast_forward` may decline any frame (it returns None and `decode_frame` takes the general path),
but whatever it accepts must be exactly what `protocol._decode` builds, and the general path must find no
fault in it. The common shapes (canonical positions that count up by one, repeated sampler lists) must be
taken by the fast path, or the codec benchmark silently loses its speed.
"""

from __future__ import annotations

import math
from typing import Any

import msgpack
import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pie_driver_trtllm.wire import codec as protocol
from pie_driver_trtllm.wire import fast_forward, messages
from pie_driver_trtllm.wire.codec import Forward, ForwardItem, FrameRejected, Limits, Request, decode_frame
from pie_driver_trtllm.wire.errors import DriverError, ErrorCode

LIMITS = Limits(vocab_size=300, max_model_len=70000, max_forward_requests=6, max_forward_tokens=400,
                max_logprob_labels=4, max_frame_bytes=1 << 20)
BIG = Limits(vocab_size=300, max_model_len=(1 << 17) + 50, max_forward_requests=6, max_forward_tokens=400,
             max_logprob_labels=4, max_frame_bytes=1 << 20)  # positions past the shared-int table
TINY = Limits(vocab_size=50, max_model_len=20, max_forward_requests=3, max_forward_tokens=12,
              max_logprob_labels=2, max_frame_bytes=4096, samplers=frozenset({"greedy", "dist"}))
ALL_LIMITS = (LIMITS, BIG, TINY)


def general(frame: bytes, limits: Limits) -> Request | FrameRejected:
    try:
        return protocol._decode(frame, limits)
    except FrameRejected as exc:
        return exc


def summary(result: Request | FrameRejected) -> Any:
    """A comparable form of a decode result (DriverError compares by identity)."""
    if isinstance(result, FrameRejected):
        return ("rejected", result.request_id, result.error.code, result.error.message)
    if isinstance(result.body, Forward):
        return (result.id, result.op, [(i.code, i.message) if isinstance(i, DriverError) else i
                                       for i in result.body.items])
    return result


def decoded(frame: bytes, limits: Limits) -> Any:
    try:
        return summary(decode_frame(frame, limits))
    except FrameRejected as exc:
        return summary(exc)


def check_paths_agree(frame: bytes, limits: Limits) -> Request | None:
    """The fast path's answer (None when it declines), after checking it against the general path."""
    fast = fast_forward.fast_forward(frame, limits)
    slow = general(frame, limits)
    if fast is None:
        return None
    assert isinstance(slow, Request), slow
    assert isinstance(slow.body, Forward)
    assert all(isinstance(item, ForwardItem) for item in slow.body.items), slow.body.items
    assert fast == slow
    for item in fast.body.items:
        assert type(item) is ForwardItem
        assert type(item.tokens) is list and type(item.positions) is list and type(item.samplers) is tuple
        assert all(type(p) is int for p in item.positions)
    assert decode_frame(frame, limits) == slow
    return fast


def frame_of(*requests: Any, id: int = 7) -> bytes:
    """A forward frame; a request field given as `msgspec.Raw` is written byte for byte."""
    return msgspec.msgpack.encode({"v": 1, "id": id, "op": "forward", "requests": list(requests)})


def req(context: int = 1, tokens: Any = None, positions: Any = None, **extra: Any) -> dict[str, Any]:
    tokens = [5, 6, 7] if tokens is None else tokens
    positions = list(range(len(tokens))) if positions is None else positions
    return {"context": context, "tokens": tokens, "positions": positions, **extra}


GREEDY = [{"at": 0, "type": "greedy"}]


# ---------------------------------------------------------------- the shared position table


@pytest.mark.parametrize("size", [0, 1, 15, 16, 127, 128, 129, 255, 256, 257, 65535, 65536, 65537, 70000])
def test_position_table_is_the_canonical_encoding(size: int) -> None:
    ints, blob, offsets = fast_forward._position_table(size)
    assert ints == list(range(size))
    assert len(offsets) == size + 1 and offsets[size] == len(blob)
    cuts = sorted({0, size, *(c for c in (1, 15, 16, 127, 128, 129, 255, 256, 257, 65535, 65536, 65537)
                              if c <= size)})
    for a in cuts:
        for b in cuts:
            if a <= b:
                encoded = msgpack.packb(list(range(a, b)))
                header = 1 if b - a < 16 else 3 if b - a < 65536 else 5
                assert blob[offsets[a]:offsets[b]] == encoded[header:], (a, b)


def test_item_maker_builds_an_equal_frozen_item() -> None:
    made = messages.forward_item_unchecked(3, [1], [0], ())
    assert made == ForwardItem(3, [1], [0], ())
    assert type(made) is ForwardItem
    with pytest.raises(AttributeError):
        made.context = 4  # type: ignore[misc]


# ---------------------------------------------------------------- shapes the fast path must take


@pytest.mark.parametrize("start, n", [(0, 1), (0, 15), (0, 16), (100, 40), (120, 20), (127, 1), (128, 3),
                                      (250, 10), (256, 1), (1000, 128), (65530, 12), (65536, 1),
                                      (69990, 10)])
def test_canonical_runs_take_the_fast_path(start: int, n: int) -> None:
    tokens = [(start + i) % 300 for i in range(n)]
    frame = frame_of(req(1, tokens, list(range(start, start + n)), samplers=GREEDY),
                     req(2, [1, 2], [start, start + 1]))
    fast = check_paths_agree(frame, LIMITS)
    assert fast is not None
    assert fast.body.items[0].positions == list(range(start, start + n))


def test_benchmark_frame_takes_the_fast_path() -> None:
    from pie_driver_trtllm.benchmarks import codec
    frame = msgpack.packb(codec.build_forward())
    fast = fast_forward.fast_forward(frame, codec.LIMITS)
    assert fast is not None
    assert fast == protocol._decode(frame, codec.LIMITS)


@pytest.mark.parametrize("positions", [
    [3, 1, 2], [0, 0, 0], [5, 6, 8], [2, 1, 0], [0, 1, 2**16], [65535, 65536, 65537],
])
def test_other_positions_are_decoded_and_still_fast(positions: list[int]) -> None:
    fast = check_paths_agree(frame_of(req(1, [1, 2, 3], positions)), LIMITS)
    assert fast is not None
    assert fast.body.items[0].positions == positions


@pytest.mark.parametrize("raw, expected", [
    (b"\x93\xd0\x00\xd0\x01\xd0\x02", [0, 1, 2]),  # int8 encodings
    (b"\xdc\x00\x03\x00\x01\x02", [0, 1, 2]),  # array16 header for a short list
    (b"\xdd\x00\x00\x00\x03\x00\x01\x02", [0, 1, 2]),  # array32 header
    (b"\x93\xcd\x00\x05\x06\x07", [5, 6, 7]),  # uint16 for a small first value
    (b"\x93\xcc\x05\xcc\x06\xcc\x07", [5, 6, 7]),
    (b"\x93\xce\x00\x01\x00\x00\xce\x00\x01\x00\x01\xce\x00\x01\x00\x02", [65536, 65537, 65538]),
    (b"\x93\xcf\x00\x00\x00\x00\x00\x00\x00\x01\x02\x03", [1, 2, 3]),  # uint64
])
def test_non_canonical_encodings_decode_the_same(raw: bytes, expected: list[int]) -> None:
    frame = frame_of(req(1, [1, 2, 3], msgspec.Raw(raw)))
    fast = check_paths_agree(frame, LIMITS)
    assert fast is not None
    assert fast.body.items[0].positions == expected


# ---------------------------------------------------------------- shapes the fast path must decline


@pytest.mark.parametrize("request_map", [
    req(1, [1, 2, 3], [0, 1]),  # fewer positions than tokens, and the run matches the first two
    req(1, [1, 2], [0, 1, 2]),
    req(1, [1, 2, 3], [69998, 69999, 70000]),  # runs past max_model_len
    req(1, [1, 2, 3], [-1, 0, 1]),
    req(1, [1, 2, 3], [0, 1, True]),
    req(1, [1, 2, 3], [0.0, 1, 2]),
    req(1, [1, 2, 3], None, samplers=None),
    req(1, [1, 2, 3], "012"),
    req(1, [1, 2, 3], {"0": 1}),
    req(1, [1, 2, 300]),
    req(1, [1, 2, 3], samplers=[{"at": 3, "type": "greedy"}]),
    req(1, [1, 2, 3], samplers=[{"at": 0, "type": "top_k"}]),
    req(1, [1, 2, 3], samplers=[{"at": 0, "type": "greedy", "bogus": 1}]),
    req(1, [1, 2, 3], samplers=[{"at": 0, "type": "logprobs", "token_ids": [1, 2, 3, 4, 5]}]),
    req(1, [1, 2, 3], extra=1),
    {"context": 1, "tokens": [1]},
])
def test_faulty_requests_are_declined(request_map: dict[str, Any]) -> None:
    frame = frame_of(req(9), request_map)
    assert fast_forward.fast_forward(frame, LIMITS) is None
    items = decode_frame(frame, LIMITS).body.items
    assert isinstance(items[0], ForwardItem)
    assert isinstance(items[1], DriverError)


def test_sampler_memo_is_per_limits() -> None:
    """The same sampler bytes are valid under one Limits and unsupported under another."""
    frame = frame_of(req(1, [1, 2], samplers=[{"at": 1, "type": "multinomial", "temperature": 0.5}]))
    assert check_paths_agree(frame, LIMITS) is not None
    assert fast_forward.fast_forward(frame, TINY) is None
    item = decode_frame(frame, TINY).body.items[0]
    assert isinstance(item, DriverError) and item.code is ErrorCode.UNSUPPORTED
    # `at` is checked against each request's own length, not remembered with the list
    short = frame_of(req(1, [1], [0], samplers=[{"at": 1, "type": "multinomial", "temperature": 0.5}]))
    assert fast_forward.fast_forward(short, LIMITS) is None
    item = decode_frame(short, LIMITS).body.items[0]
    assert isinstance(item, DriverError) and item.code is ErrorCode.OUT_OF_RANGE


def test_sampler_memo_is_bounded() -> None:
    fast = fast_forward._fast_path(TINY)
    for seed in range(fast_forward._MAX_MEMO_SAMPLERS + 10):
        frame = frame_of(req(1, [1], [0], samplers=[{"at": 0, "type": "greedy", "seed": seed}]))
        assert fast_forward.fast_forward(frame, TINY) is not None
        assert len(fast.samplers) <= fast_forward._MAX_MEMO_SAMPLERS


def test_frame_level_faults_are_declined() -> None:
    good = frame_of(req())
    assert fast_forward.fast_forward(good, LIMITS) is not None
    for frame in (good + b"\x00", good[:-1], msgspec.msgpack.encode({"v": 2, "id": 1, "op": "forward", "requests": []}),
                  msgspec.msgpack.encode({"v": 1, "id": -1, "op": "forward", "requests": []}),
                  msgspec.msgpack.encode({"v": 1, "id": 1, "op": "fork", "requests": []}),
                  frame_of(*[req(c) for c in range(7)]),  # more than max_forward_requests
                  frame_of(*[req(c, [1] * 100, list(range(100))) for c in range(5)])):  # 500 > 400 tokens
        assert fast_forward.fast_forward(frame, LIMITS) is None


# ---------------------------------------------------------------- property: the two paths agree

small = st.integers(-2, 70)
positions_run = st.tuples(st.sampled_from([0, 1, 120, 127, 128, 250, 255, 256, 65530, 65535, 65536, 69995,
                                           (1 << 17) - 3, (1 << 17) + 45]),
                          st.integers(0, 20))
sampler_maps = st.fixed_dictionaries(
    {"at": st.integers(-1, 6), "type": st.sampled_from(["greedy", "multinomial", "top_k", "dist", "logprobs", "x"])},
    optional={"temperature": st.sampled_from([0, 0.0, 0.5, -1.0, math.nan, True]), "top_k": st.integers(0, 3),
              "k": st.integers(0, 400), "token_ids": st.lists(st.integers(-1, 301), max_size=5),
              "seed": st.integers(0, 3)})


@st.composite
def fuzzy_requests(draw: st.DrawFn) -> dict[str, Any]:
    start, n = draw(positions_run)
    tokens = draw(st.lists(st.integers(0, 299), min_size=n, max_size=n)
                  | st.lists(st.sampled_from([-1, 0, 49, 50, 299, 300, True, 1.0]), max_size=4))
    positions: Any = list(range(start, start + n))
    mutation = draw(st.integers(0, 9))
    if mutation == 0 and positions:
        positions[draw(st.integers(0, len(positions) - 1))] += draw(st.sampled_from([-1, 1, 1 << 16]))
    elif mutation == 1:
        positions = positions[:-1] if positions else [0]
    elif mutation == 2:
        positions = draw(st.lists(small, min_size=len(tokens), max_size=len(tokens)))
    elif mutation == 3:
        positions = draw(st.sampled_from([None, "x", [[0]], {"a": 1}, [True], [0.5]]))
    out: dict[str, Any] = {"context": draw(st.sampled_from([0, 1, 2**64 - 1, -1, True])), "tokens": tokens,
                           "positions": positions}
    if draw(st.booleans()):
        out["samplers"] = draw(st.lists(sampler_maps, max_size=3) | st.sampled_from([None, [], {}]))
    if draw(st.integers(0, 15)) == 0:
        out["extra"] = 0
    return out


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(fuzzy_requests(), max_size=4), st.sampled_from(ALL_LIMITS))
def test_fast_and_general_paths_agree(requests: list[dict[str, Any]], limits: Limits) -> None:
    check_paths_agree(frame_of(*requests), limits)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(positions_run, st.sampled_from([None, GREEDY, [{"at": 0, "type": "dist", "k": 3}]])),
                max_size=5))
def test_valid_runs_are_always_fast(runs: list[tuple[tuple[int, int], Any]]) -> None:
    requests = []
    for (start, n), samplers in runs:
        if start + n > LIMITS.max_model_len:
            start = LIMITS.max_model_len - n
        entry = req(len(requests), [1] * n, list(range(start, start + n)))
        if samplers is not None and n:
            entry["samplers"] = samplers
        requests.append(entry)
    if len(requests) > LIMITS.max_forward_requests:
        return
    assert check_paths_agree(frame_of(*requests), LIMITS) is not None


def test_memoryview_and_bytearray_frames_take_the_fast_path() -> None:
    frame = frame_of(req(1, [1, 2, 3], [10, 11, 12], samplers=GREEDY), req(2, [4], [7]))
    want = protocol._decode(frame, LIMITS)
    for view in (memoryview(frame), bytearray(frame)):
        assert fast_forward.fast_forward(view, LIMITS) == want  # type: ignore[arg-type]
        assert decode_frame(view, LIMITS) == want  # type: ignore[arg-type]


def raw_map(*pairs: tuple[str, Any]) -> msgspec.Raw:
    """A msgpack map written pair by pair, so a key may repeat."""
    body = b"".join(msgspec.msgpack.encode(k) + msgspec.msgpack.encode(v) for k, v in pairs)
    assert len(pairs) < 16
    return msgspec.Raw(bytes([0x80 | len(pairs)]) + body)


@pytest.mark.parametrize("pairs", [
    [("context", 1), ("tokens", [1]), ("positions", [True]), ("positions", [0])],
    [("context", 1), ("tokens", [1]), ("positions", None), ("positions", [0])],
    [("context", 1), ("tokens", [1]), ("positions", [0, 1]), ("positions", [0])],
    [("context", 1), ("tokens", [1]), ("positions", [0]), ("positions", [0])],
    [("positions", [5]), ("context", 1), ("tokens", [1]), ("positions", [0])],
    [("context", 1), ("tokens", [1]), ("positions", [0]), ("samplers", None), ("samplers", [])],
    [("context", 1), ("tokens", [1]), ("positions", [0]), ("samplers", [{"at": 5, "type": "greedy"}]),
     ("samplers", [])],
    [("context", 1), ("tokens", [1]), ("positions", [0]), ("samplers", []), ("samplers", GREEDY)],
    [("context", 1), ("tokens", [True]), ("tokens", [1]), ("positions", [0])],
    [("context", -1), ("context", 1), ("tokens", [1]), ("positions", [0])],
])
def test_repeated_keys_keep_the_general_paths_answer(pairs: list[tuple[str, Any]]) -> None:
    """msgspec keeps the last of repeated keys but checks every typed occurrence: the fast path may not
    skip the check of an occurrence it leaves raw."""
    for limits in ALL_LIMITS:
        frame = frame_of(req(9, [1], [0]), raw_map(*pairs))
        check_paths_agree(frame, limits)
        assert decoded(frame, limits) == summary(general(frame, limits))


def test_repeated_requests_key_keeps_the_general_paths_answer() -> None:
    bad = msgspec.msgpack.encode([{"context": 1, "tokens": [1], "positions": [True]}])
    good = msgspec.msgpack.encode([req(2, [1], [0])])
    frame = (b"\x85" + b"".join(msgspec.msgpack.encode(x) for x in ("v", 1, "id", 3, "op", "forward"))
             + msgspec.msgpack.encode("requests") + bad + msgspec.msgpack.encode("requests") + good)
    check_paths_agree(frame, LIMITS)
    assert decoded(frame, LIMITS) == summary(general(frame, LIMITS))


# ---------------------------------------------------------------- frames of short requests (decode steps)


@pytest.mark.parametrize("samplers", [GREEDY, [{"at": 0, "type": "top_k", "top_k": 3, "seed": 2}],
                                      [{"at": 0, "type": "greedy"}, {"at": 0, "type": "dist", "k": 2}]])
def test_decode_steps_take_the_fast_path_with_their_samplers_remembered_by_bytes(samplers: Any) -> None:
    frame = frame_of(*(req(c, [c + 1], [c + 40], samplers=samplers) for c in range(5)))
    fast = check_paths_agree(frame, LIMITS)
    assert fast is not None and len(fast.body.items) == 5
    assert msgspec.msgpack.encode(samplers) in fast_forward._fast_path(LIMITS).raw_samplers


@pytest.mark.parametrize("second", [
    [("context", 2), ("tokens", [1]), ("positions", [0]), ("samplers", [{"at": 5, "type": "greedy"}]),
     ("samplers", GREEDY)],
    [("context", 2), ("tokens", [1]), ("positions", [0]), ("samplers", [{"at": 0, "type": "nope"}]),
     ("samplers", GREEDY)],
    [("context", 2), ("tokens", [1]), ("positions", [0]), ("samplers", None), ("samplers", GREEDY)],
    [("context", 2), ("tokens", [1]), ("positions", [0]), ("samplers", GREEDY), ("samplers", None)],
])
def test_repeated_samplers_key_among_short_requests_keeps_the_general_paths_answer(second: Any) -> None:
    """Sampler lists stay raw in a frame of short requests: a repeated key must not hide a bad list."""
    for first in (req(1, [1], [0], samplers=GREEDY), req(1, [1], [0])):
        frame = frame_of(first, raw_map(*second))
        check_paths_agree(frame, LIMITS)
        assert decoded(frame, LIMITS) == summary(general(frame, LIMITS))


def test_short_requests_with_bad_sampler_bytes_are_declined() -> None:
    for samplers in (None, {}, [{"at": 0}], [{"at": 0, "type": "greedy", "extra": 1}]):
        assert check_paths_agree(frame_of(req(1, [1], [0], samplers=samplers)), LIMITS) is None
