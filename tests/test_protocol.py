"""Unit tests of the protocol v1 codec: frame-level rejections, per-request validation, normalisation."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pie_driver_trtllm.wire.codec import (
    Fork,
    Forward,
    ForwardItem,
    FrameRejected,
    Limits,
    Release,
    Request,
    Sampler,
    Truncate,
    decode_frame,
    encode_error,
    encode_ok,
)
from pie_driver_trtllm.wire.errors import DriverError, ErrorCode

LIMITS = Limits(vocab_size=100, max_model_len=64, max_forward_requests=4, max_forward_tokens=16,
                max_logprob_labels=8, max_frame_bytes=4096)


def pack(obj: Any) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def decode(obj: Any, limits: Limits = LIMITS) -> Request:
    return decode_frame(pack(obj), limits)


def rejected(frame: bytes | Any, limits: Limits = LIMITS) -> FrameRejected:
    raw = frame if isinstance(frame, bytes) else pack(frame)
    with pytest.raises(FrameRejected) as info:
        decode_frame(raw, limits)
    return info.value


def request(context: int = 1, tokens: list[int] | None = None, positions: list[int] | None = None,
            **extra: Any) -> dict[str, Any]:
    tokens = [1, 2] if tokens is None else tokens
    positions = list(range(len(tokens))) if positions is None else positions
    return {"context": context, "tokens": tokens, "positions": positions, **extra}


def forward(*requests: Any, id: int = 7) -> dict[str, Any]:
    return {"v": 1, "id": id, "op": "forward", "requests": list(requests)}


def forward_items(*requests: Any, limits: Limits = LIMITS) -> list[ForwardItem | DriverError]:
    decoded = decode(forward(*requests), limits)
    assert decoded.id == 7
    assert decoded.op == "forward"
    assert isinstance(decoded.body, Forward)
    assert len(decoded.body.items) == len(requests)
    return decoded.body.items


def one_item(req: dict[str, Any], limits: Limits = LIMITS) -> ForwardItem | DriverError:
    """Decode `req` next to a good request and check the good one still passes."""
    items = forward_items(request(context=99), req, limits=limits)
    good = items[0]
    assert isinstance(good, ForwardItem)
    assert good.context == 99
    assert good.tokens == [1, 2]
    return items[1]


def item_error(req: dict[str, Any], limits: Limits = LIMITS) -> ErrorCode:
    item = one_item(req, limits)
    assert isinstance(item, DriverError), item
    assert item.message.startswith("requests[1]: ")
    return item.code


def sampler(req_sampler: dict[str, Any], limits: Limits = LIMITS) -> Sampler:
    item = one_item(request(samplers=[req_sampler]), limits)
    assert isinstance(item, ForwardItem), item
    assert len(item.samplers) == 1
    return item.samplers[0]


def sampler_error(req_sampler: dict[str, Any], limits: Limits = LIMITS) -> ErrorCode:
    return item_error(request(samplers=[req_sampler]), limits)


# ---------------------------------------------------------------- frame level


@pytest.mark.parametrize("frame", [
    b"",
    b"\xc1",  # never-used msgpack byte
    b"\xff\xfe\xfd garbage",
    pack({"v": 1, "id": 3, "op": "health"})[:-2],  # truncated map
    b"\x84\xa1v\x01\xa2id\x01\xa2op\xa7forward\xa8requests\xdd\xff\xff\xff\xff",  # array claims 4G items
])
def test_undecodable_bytes_are_bad_frame(frame: bytes) -> None:
    exc = rejected(frame)
    assert exc.request_id is None
    assert exc.error.code is ErrorCode.BAD_FRAME


@pytest.mark.parametrize("obj", [[1, 2, 3], 5, "v", None, {1: 2}])
def test_non_map_is_bad_frame(obj: Any) -> None:
    exc = rejected(obj)
    assert exc.request_id is None
    assert exc.error.code is ErrorCode.BAD_FRAME


def test_oversize_frame_is_bad_frame_without_decoding() -> None:
    limits = Limits(vocab_size=100, max_model_len=64, max_forward_requests=4, max_forward_tokens=16,
                    max_logprob_labels=8, max_frame_bytes=64)
    frame = pack({"v": 1, "id": 3, "op": "health", "pad": "x" * 100})
    assert len(frame) > 64
    exc = rejected(frame, limits)
    assert exc.request_id is None  # not decoded, so the id is not read
    assert exc.error.code is ErrorCode.BAD_FRAME
    assert str(len(frame)) in exc.error.message
    garbage = b"\xc1" * 65
    assert rejected(garbage, limits).error.code is ErrorCode.BAD_FRAME
    assert "64" in rejected(garbage, limits).error.message
    # exactly at the limit is decoded
    candidates = (pack({"v": 1, "id": 3, "op": "health", "pad": "x" * n}) for n in range(64))
    fits = next(f for f in candidates if len(f) == 64)
    assert decode_frame(fits, limits) == Request(3, "health")


def test_memoryview_frame_is_accepted() -> None:
    assert decode_frame(memoryview(pack({"v": 1, "id": 4, "op": "stats"})), LIMITS) == Request(4, "stats")


@pytest.mark.parametrize("op", ["handshake", "health", "stats", "shutdown"])
def test_control_ops_decode_without_body(op: str) -> None:
    assert decode({"v": 1, "id": 12, "op": op}) == Request(12, op, None)


def test_largest_u64_id_is_accepted() -> None:
    assert decode({"v": 1, "id": 2**64 - 1, "op": "health"}).id == 2**64 - 1


@pytest.mark.parametrize("header, expected_id", [
    ({"id": 3, "op": "health"}, 3),
    ({"v": 2, "id": 3, "op": "health"}, 3),
    ({"v": 0, "id": 4, "op": "forward"}, 4),
    ({"v": "1", "id": 5, "op": "health"}, 5),
    ({"v": True, "id": 6, "op": "health"}, 6),
    ({"v": None, "id": 8, "op": "health"}, 8),
    ({"v": 2, "id": "x", "op": "health"}, None),
    ({"v": 2, "op": "health"}, None),
    ({"v": 2, "id": -1}, None),
])
def test_wrong_or_missing_version(header: dict[str, Any], expected_id: int | None) -> None:
    exc = rejected(header)
    assert exc.error.code is ErrorCode.VERSION
    assert exc.request_id == expected_id


def test_float_version_is_rejected() -> None:
    exc = rejected({"v": 1.0, "id": 3, "op": "health"})  # 1.0 == 1 in Python, but it is not the integer 1
    assert exc.error.code is ErrorCode.VERSION
    assert exc.request_id == 3


@pytest.mark.parametrize("header", [
    {"v": 1, "op": "health"},
    {"v": 1, "id": True, "op": "health"},
    {"v": 1, "id": False, "op": "health"},
    {"v": 1, "id": -1, "op": "health"},
    {"v": 1, "id": "12", "op": "health"},
    {"v": 1, "id": 1.0, "op": "health"},
    {"v": 1, "id": None, "op": "health"},
    {"v": 1, "id": [1], "op": "health"},
])
def test_bad_id_is_bad_request_with_null_id(header: dict[str, Any]) -> None:
    exc = rejected(header)
    assert exc.error.code is ErrorCode.BAD_REQUEST
    assert exc.request_id is None


@pytest.mark.parametrize("header", [
    {"v": 1, "id": 9},
    {"v": 1, "id": 9, "op": 3},
    {"v": 1, "id": 9, "op": None},
    {"v": 1, "id": 9, "op": b"health"},
    {"v": 1, "id": 9, "op": ["health"]},
])
def test_missing_or_non_string_op_is_bad_request(header: dict[str, Any]) -> None:
    exc = rejected(header)
    assert exc.error.code is ErrorCode.BAD_REQUEST
    assert exc.request_id == 9


@pytest.mark.parametrize("op", ["", "Forward", "generate", "handshake "])
def test_unknown_op(op: str) -> None:
    exc = rejected({"v": 1, "id": 10, "op": op})
    assert exc.error.code is ErrorCode.UNKNOWN_OP
    assert exc.request_id == 10


def test_deeply_nested_frame_is_rejected_not_raised() -> None:
    frame = pack({"v": 1, "id": 3, "op": "health"})
    frame = b"\x84" + frame[1:] + b"\xa1x" + b"\x91" * 5000 + b"\x01"  # 4-entry map, x = [[[...[1]...]]]
    assert len(frame) < LIMITS.max_frame_bytes * 2
    limits = Limits(vocab_size=100, max_model_len=64, max_forward_requests=4, max_forward_tokens=16,
                    max_logprob_labels=8, max_frame_bytes=1 << 20)
    exc = rejected(frame, limits)
    assert exc.error.code is ErrorCode.BAD_FRAME


# ---------------------------------------------------------------- forward: good requests and normalisation


def test_forward_decodes_items() -> None:
    items = forward_items(request(context=2**64 - 1, tokens=[0, 99], positions=[0, 63]),
                          {"context": 3, "tokens": [], "positions": []})
    assert items[0] == ForwardItem(context=2**64 - 1, tokens=[0, 99], positions=[0, 63], samplers=())
    assert items[1] == ForwardItem(context=3, tokens=[], positions=[], samplers=())


def test_forward_with_no_requests() -> None:
    decoded = decode(forward())
    assert decoded.body == Forward([])


def test_greedy_sampler_is_temperature_zero() -> None:
    s = sampler({"at": 1, "type": "greedy", "temperature": 0.7})
    assert s.type == "greedy"
    assert s.at == 1
    assert s.temperature == 0.0
    assert s.is_greedy
    assert s.makes_token


@pytest.mark.parametrize("kind, extra", [
    ("multinomial", {}), ("top_k", {"top_k": 5}), ("top_p", {"top_p": 0.5}), ("min_p", {"min_p": 0.1}),
    ("top_k_top_p", {"top_k": 5, "top_p": 0.9}),
])
@pytest.mark.parametrize("zero", [0, 0.0])
def test_token_sampler_at_temperature_zero_is_greedy(kind: str, extra: dict[str, Any], zero: float) -> None:
    s = sampler({"at": 0, "type": kind, "temperature": zero, **extra})
    assert s.type == kind
    assert s.temperature == 0.0
    assert s.is_greedy


def test_token_sampler_defaults_and_parameters() -> None:
    s = sampler({"at": 0, "type": "multinomial"})
    assert (s.temperature, s.top_k, s.top_p, s.min_p, s.seed) == (1.0, 0, 1.0, 0.0, None)
    assert not s.is_greedy
    s = sampler({"at": 1, "type": "top_k_top_p", "temperature": 0.5, "top_k": 3, "top_p": 0.25,
                 "seed": 2**64 - 1})
    assert (s.temperature, s.top_k, s.top_p, s.seed) == (0.5, 3, 0.25, 2**64 - 1)
    assert not s.is_greedy
    s = sampler({"at": 0, "type": "min_p", "min_p": 0.0})
    assert s.min_p == 0.0


@pytest.mark.parametrize("temperature", [None, 0, 0.0])
def test_dist_and_logprobs_use_temperature_one_when_zero_or_absent(temperature: float | None) -> None:
    extra = {} if temperature is None else {"temperature": temperature}
    d = sampler({"at": 0, "type": "dist", "k": 3, **extra})
    assert d.temperature == 1.0
    assert d.k == 3
    assert not d.is_greedy
    assert not d.makes_token
    lp = sampler({"at": 1, "type": "logprobs", "token_ids": [1, 99], **extra})
    assert lp.temperature == 1.0
    assert lp.token_ids == (1, 99)
    assert not lp.is_greedy


def test_dist_keeps_a_nonzero_temperature() -> None:
    assert sampler({"at": 0, "type": "dist", "k": 8, "temperature": 0.5}).temperature == 0.5


def test_several_samplers_keep_their_order() -> None:
    item = one_item(request(tokens=[1, 2, 3], samplers=[
        {"at": 2, "type": "greedy"}, {"at": 0, "type": "dist", "k": 1}, {"at": 2, "type": "multinomial"}]))
    assert isinstance(item, ForwardItem)
    assert [(s.type, s.at) for s in item.samplers] == [("greedy", 2), ("dist", 0), ("multinomial", 2)]


# ---------------------------------------------------------------- forward: per-request failures


@pytest.mark.parametrize("req", [
    request(context=True),
    request(tokens=[True, 5], positions=[0, 1]),
    request(tokens=[5, 6], positions=[0, True]),
    request(context=-1),
    request(tokens=[-1], positions=[0]),
    request(tokens=[5], positions=[-1]),
    request(tokens=[1.0], positions=[0]),
    request(context="1"),
    request(tokens=[5, 6], positions=[0]),
    request(tokens=[5], positions=[0, 1]),
    request(unexpected=1),
    {"tokens": [1], "positions": [0]},
    {"context": 1, "positions": [0]},
    {"context": 1, "tokens": [1]},
    request(samplers=None),
    request(samplers={"at": 0, "type": "greedy"}),
    5,
    "request",
    [1, [1], [0]],
])
def test_malformed_request_fails_alone_with_bad_request(req: Any) -> None:
    assert item_error(req) is ErrorCode.BAD_REQUEST


@pytest.mark.parametrize("req", [
    request(tokens=[100], positions=[0]),
    request(tokens=[1, 2**20], positions=[0, 1]),
    request(tokens=[1], positions=[64]),
    request(tokens=[1, 1], positions=[0, 1000]),
])
def test_token_or_position_out_of_range(req: dict[str, Any]) -> None:
    assert item_error(req) is ErrorCode.OUT_OF_RANGE


def test_samplers_may_be_omitted_or_empty() -> None:
    assert one_item(request()) == ForwardItem(1, [1, 2], [0, 1], ())
    assert one_item(request(samplers=[])) == ForwardItem(1, [1, 2], [0, 1], ())


def test_error_keeps_its_slot_among_good_requests() -> None:
    items = forward_items(request(context=1), request(context=2, tokens=[500], positions=[0]),
                          request(context=3), request(context=4, tokens=[1], positions=[0, 1]))
    assert [type(i).__name__ for i in items] == ["ForwardItem", "DriverError", "ForwardItem", "DriverError"]
    assert items[1].code is ErrorCode.OUT_OF_RANGE  # type: ignore[union-attr]
    assert items[1].message.startswith("requests[1]: ")  # type: ignore[union-attr]
    assert items[3].code is ErrorCode.BAD_REQUEST  # type: ignore[union-attr]
    assert items[3].message.startswith("requests[3]: ")  # type: ignore[union-attr]
    assert [i.context for i in items if isinstance(i, ForwardItem)] == [1, 3]


@pytest.mark.parametrize("s, code", [
    ({"at": 2, "type": "greedy"}, ErrorCode.OUT_OF_RANGE),
    ({"at": 100, "type": "dist", "k": 1}, ErrorCode.OUT_OF_RANGE),
    ({"at": -1, "type": "greedy"}, ErrorCode.BAD_REQUEST),
    ({"at": True, "type": "greedy"}, ErrorCode.BAD_REQUEST),
    ({"type": "greedy"}, ErrorCode.BAD_REQUEST),
    ({"at": 0}, ErrorCode.BAD_REQUEST),
    ({"at": 0, "type": "beam"}, ErrorCode.BAD_REQUEST),
    ({"at": 0, "type": 3}, ErrorCode.BAD_REQUEST),
    ({"at": 0, "type": "top_k"}, ErrorCode.BAD_REQUEST),
    ({"at": 0, "type": "top_k_top_p", "top_k": 3}, ErrorCode.BAD_REQUEST),
    ({"at": 0, "type": "top_k_top_p", "top_p": 0.5}, ErrorCode.BAD_REQUEST),
    ({"at": 0, "type": "top_p"}, ErrorCode.BAD_REQUEST),
    ({"at": 0, "type": "min_p"}, ErrorCode.BAD_REQUEST),
    ({"at": 0, "type": "dist"}, ErrorCode.BAD_REQUEST),
    ({"at": 0, "type": "logprobs"}, ErrorCode.BAD_REQUEST),
    ({"at": 0, "type": "top_k", "top_k": 0}, ErrorCode.BAD_REQUEST),
    ({"at": 0, "type": "top_p", "top_p": 0.0}, ErrorCode.BAD_REQUEST),
    ({"at": 0, "type": "top_p", "top_p": 1.5}, ErrorCode.BAD_REQUEST),
    ({"at": 0, "type": "top_p", "top_p": math.nan}, ErrorCode.BAD_REQUEST),
    ({"at": 0, "type": "min_p", "min_p": -0.1}, ErrorCode.BAD_REQUEST),
    ({"at": 0, "type": "min_p", "min_p": 1.1}, ErrorCode.BAD_REQUEST),
    ({"at": 0, "type": "multinomial", "temperature": -0.5}, ErrorCode.BAD_REQUEST),
    ({"at": 0, "type": "multinomial", "temperature": math.nan}, ErrorCode.BAD_REQUEST),
    ({"at": 0, "type": "multinomial", "temperature": math.inf}, ErrorCode.BAD_REQUEST),
    ({"at": 0, "type": "greedy", "temperature": math.nan}, ErrorCode.BAD_REQUEST),
    ({"at": 0, "type": "multinomial", "temperature": "hot"}, ErrorCode.BAD_REQUEST),
    ({"at": 0, "type": "multinomial", "seed": -1}, ErrorCode.BAD_REQUEST),
    ({"at": 0, "type": "multinomial", "seed": True}, ErrorCode.BAD_REQUEST),
    ({"at": 0, "type": "greedy", "beam_width": 2}, ErrorCode.BAD_REQUEST),
    ({"at": 0, "type": "dist", "k": 101}, ErrorCode.OUT_OF_RANGE),  # over vocab_size (100)
    ({"at": 0, "type": "dist", "k": 0}, ErrorCode.OUT_OF_RANGE),
    ({"at": 0, "type": "logprobs", "token_ids": []}, ErrorCode.OUT_OF_RANGE),
    ({"at": 0, "type": "logprobs", "token_ids": list(range(9))}, ErrorCode.OUT_OF_RANGE),
    ({"at": 0, "type": "logprobs", "token_ids": [1, 100]}, ErrorCode.OUT_OF_RANGE),
    ({"at": 0, "type": "logprobs", "token_ids": [-1]}, ErrorCode.BAD_REQUEST),
])
def test_bad_sampler(s: dict[str, Any], code: ErrorCode) -> None:
    assert sampler_error(s) is code


def test_dist_k_capped_by_vocab_size() -> None:
    limits = Limits(vocab_size=4, max_model_len=64, max_forward_requests=4, max_forward_tokens=16,
                    max_logprob_labels=8, max_frame_bytes=4096)
    item = one_item(request(tokens=[1, 2], samplers=[{"at": 0, "type": "dist", "k": 5}]), limits)
    assert isinstance(item, DriverError)
    assert item.code is ErrorCode.OUT_OF_RANGE
    assert sampler({"at": 0, "type": "dist", "k": 4}, limits).k == 4


def test_sampler_type_not_served_is_unsupported() -> None:
    limits = Limits(vocab_size=100, max_model_len=64, max_forward_requests=4, max_forward_tokens=16,
                    max_logprob_labels=8, max_frame_bytes=4096, samplers=frozenset({"greedy", "multinomial"}))
    assert sampler_error({"at": 0, "type": "logprobs", "token_ids": [1]}, limits) is ErrorCode.UNSUPPORTED
    assert sampler_error({"at": 0, "type": "top_k", "top_k": 3}, limits) is ErrorCode.UNSUPPORTED
    # an unknown type is BAD_REQUEST, not UNSUPPORTED
    assert sampler_error({"at": 0, "type": "nucleus"}, limits) is ErrorCode.BAD_REQUEST
    assert sampler({"at": 0, "type": "greedy"}, limits).is_greedy


# ---------------------------------------------------------------- forward: whole-frame failures


def test_too_many_requests_is_capacity() -> None:
    exc = rejected(forward(*[request(context=c, tokens=[1], positions=[0]) for c in range(5)]))
    assert exc.error.code is ErrorCode.CAPACITY
    assert exc.request_id == 7
    items = forward_items(*[request(context=c, tokens=[1], positions=[0]) for c in range(4)])
    assert all(isinstance(i, ForwardItem) for i in items)


def test_tokens_of_refused_requests_count_toward_capacity() -> None:
    # 10 good tokens + 7 tokens of a request refused for an out-of-vocab token: 17 > 16
    exc = rejected(forward(request(tokens=[1] * 10, positions=list(range(10))),
                           request(context=2, tokens=[1] * 6 + [100], positions=list(range(7)))))
    assert exc.error.code is ErrorCode.CAPACITY
    assert exc.request_id == 7


def test_too_many_tokens_is_capacity() -> None:
    exc = rejected(forward(request(tokens=[1] * 10, positions=list(range(10))),
                           request(context=2, tokens=[1] * 7, positions=list(range(7)))))
    assert exc.error.code is ErrorCode.CAPACITY
    assert exc.request_id == 7
    items = forward_items(request(tokens=[1] * 10, positions=list(range(10))),
                          request(context=2, tokens=[1] * 6, positions=list(range(6))))
    assert all(isinstance(i, ForwardItem) for i in items)


@pytest.mark.parametrize("frame", [
    {"v": 1, "id": 7, "op": "forward"},
    {"v": 1, "id": 7, "op": "forward", "requests": {"context": 1}},
    {"v": 1, "id": 7, "op": "forward", "requests": None},
    {"v": 1, "id": 7, "op": "forward", "requests": [], "extra": 1},
])
def test_forward_shape_errors_are_bad_request(frame: dict[str, Any]) -> None:
    exc = rejected(frame)
    assert exc.error.code is ErrorCode.BAD_REQUEST
    assert exc.request_id == 7


# ---------------------------------------------------------------- fork / truncate / release


def test_fork_truncate_release_bodies() -> None:
    assert decode({"v": 1, "id": 1, "op": "fork", "src": 2, "dst": 3}) == Request(1, "fork", Fork(2, 3, None))
    assert decode({"v": 1, "id": 1, "op": "fork", "src": 2, "dst": 3, "length": 5}).body == Fork(2, 3, 5)
    assert decode({"v": 1, "id": 1, "op": "fork", "src": 2, "dst": 3, "length": None}).body == \
        Fork(2, 3, None)
    assert decode({"v": 1, "id": 2, "op": "truncate", "context": 4, "length": 0}) == \
        Request(2, "truncate", Truncate(4, 0))
    assert decode({"v": 1, "id": 3, "op": "release", "contexts": [1, 2, 2**64 - 1]}) == \
        Request(3, "release", Release((1, 2, 2**64 - 1)))
    assert decode({"v": 1, "id": 3, "op": "release", "contexts": []}).body == Release(())


@pytest.mark.parametrize("frame", [
    {"op": "fork", "src": 5, "dst": 5},
    {"op": "fork", "src": 5},
    {"op": "fork", "src": True, "dst": 6},
    {"op": "fork", "src": -1, "dst": 6},
    {"op": "fork", "src": 5, "dst": 6, "length": -1},
    {"op": "fork", "src": 5, "dst": 6, "extra": 0},
    {"op": "truncate", "context": 5},
    {"op": "truncate", "context": 5, "length": True},
    {"op": "truncate", "context": "5", "length": 1},
    {"op": "release"},
    {"op": "release", "contexts": [1, True]},
    {"op": "release", "contexts": 1},
    {"op": "release", "contexts": [-3]},
    {"op": "truncate", "context": 5, "length": 1, "extra": 0},  # unknown fields, on every state op
    {"op": "release", "contexts": [1], "extra": 0},
    {"op": "sleep", "level": 1, "extra": 0},
    {"op": "wake", "extra": 0},
    {"op": "load_weights", "path": "/w", "version": 1, "extra": 0},
    {"op": "step", "contexts": [], "tokens": [], "positions": [], "extra": 0},
    {"op": "truncate", "context": 5, "length": None},  # nil where the field is not optional
    {"op": "release", "contexts": None},
    {"op": "load_weights", "path": None, "version": 1},
    {"op": "sleep", "level": None},
])
def test_state_op_errors_are_bad_request(frame: dict[str, Any]) -> None:
    exc = rejected({"v": 1, "id": 11, **frame})
    assert exc.error.code is ErrorCode.BAD_REQUEST
    assert exc.request_id == 11


def test_a_release_of_more_than_a_million_contexts_is_capacity_and_costs_no_decoding() -> None:
    roomy = dataclasses.replace(LIMITS, max_frame_bytes=8 << 20)
    exc = rejected({"v": 1, "id": 12, "op": "release", "contexts": [1] * ((1 << 20) + 1)}, roomy)
    assert exc.error.code is ErrorCode.CAPACITY and exc.request_id == 12
    assert decode({"v": 1, "id": 12, "op": "release", "contexts": [1] * (1 << 20)}, roomy).body == \
        Release((1,) * (1 << 20))


# ---------------------------------------------------------------- encoding


def test_encode_ok_round_trip() -> None:
    frame = encode_ok(5, {"results": [{"ok": True, "outputs": [{"token": 3}]}], "released": 2})
    assert msgpack.unpackb(frame) == {"v": 1, "id": 5, "ok": True,
                                      "results": [{"ok": True, "outputs": [{"token": 3}]}], "released": 2}


def test_encode_error_round_trip() -> None:
    error = DriverError(ErrorCode.HISTORY_GAP, "gap", known_length=4)
    assert msgpack.unpackb(encode_error(9, error)) == {
        "v": 1, "id": 9, "ok": False, "error": {"code": "HISTORY_GAP", "message": "gap", "known_length": 4}}
    assert msgpack.unpackb(encode_error(None, DriverError(ErrorCode.BAD_FRAME, "bad"))) == {
        "v": 1, "id": None, "ok": False, "error": {"code": "BAD_FRAME", "message": "bad"}}


def test_rejection_encodes_to_an_error_reply() -> None:
    exc = rejected({"v": 1, "id": 21, "op": "nope"})
    reply = msgpack.unpackb(encode_error(exc.request_id, exc.error))
    assert reply["id"] == 21
    assert reply["ok"] is False
    assert reply["error"]["code"] == "UNKNOWN_OP"
    assert "nope" in reply["error"]["message"]


# ---------------------------------------------------------------- fuzzing: only FrameRejected ever escapes

SMALL_LIMITS = Limits(vocab_size=50, max_model_len=32, max_forward_requests=3, max_forward_tokens=8,
                      max_logprob_labels=4, max_frame_bytes=2048)

scalars = (st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.integers(-3, 70)
           | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=8) | st.binary(max_size=8))
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                      | st.dictionaries(st.text(max_size=8) | st.integers(-2, 5), inner, max_size=4),
                      max_leaves=12)


def mostly(good: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """Usually a well-formed value, sometimes anything at all."""
    return st.sampled_from((True,) * 7 + (False,)).flatmap(lambda ok: good if ok else values)


small_ints = st.integers(-2, 60)
sampler_types = st.sampled_from(["greedy", "multinomial", "top_k", "top_p", "min_p", "top_k_top_p", "dist",
                                 "logprobs", "beam"])
floats = st.floats(-0.5, 2.0) | st.sampled_from([math.nan, math.inf, 0.0, 1.0])
wire_samplers = st.fixed_dictionaries(
    {"at": mostly(st.integers(0, 2)), "type": mostly(sampler_types)},
    optional={"temperature": mostly(floats), "top_k": mostly(st.integers(0, 5)), "top_p": mostly(floats),
              "min_p": mostly(floats), "seed": mostly(st.integers(0, 2**64 - 1)),
              "k": mostly(st.integers(0, 6)),
              "token_ids": mostly(st.lists(st.integers(0, 55), max_size=6))})


@st.composite
def wire_requests(draw: st.DrawFn) -> dict[str, Any]:
    n = draw(st.integers(0, 5))
    tokens = mostly(st.lists(st.integers(0, 49), min_size=n, max_size=n)) | st.lists(small_ints, max_size=6)
    positions = mostly(st.just(list(range(n)))) | st.lists(st.integers(-1, 35), min_size=n, max_size=n)
    return draw(st.fixed_dictionaries(
        {"context": mostly(st.integers(0, 2**64 - 1)), "tokens": mostly(tokens),
         "positions": mostly(positions)},
        optional={"samplers": mostly(st.lists(wire_samplers, max_size=3))}))


header = {"v": mostly(st.just(1)), "id": mostly(st.integers(0, 2**64 - 1))}
frames = st.one_of(
    st.fixed_dictionaries({**header, "op": st.just("forward"),
                           "requests": mostly(st.lists(wire_requests(), max_size=4))}),
    st.fixed_dictionaries({**header, "op": st.just("fork"), "src": mostly(small_ints),
                           "dst": mostly(small_ints)}, optional={"length": mostly(small_ints)}),
    st.fixed_dictionaries({**header, "op": st.just("truncate"), "context": mostly(small_ints),
                           "length": mostly(small_ints)}),
    st.fixed_dictionaries({**header, "op": st.just("release"),
                           "contexts": mostly(st.lists(small_ints, max_size=4))}),
    st.fixed_dictionaries({**header,
                           "op": mostly(st.sampled_from(["health", "stats", "shutdown", "bogus"]))}),
    st.dictionaries(st.sampled_from(["v", "id", "op", "requests", "src", "dst", "context", "contexts", "x"]),
                    values, max_size=6),
)


def _decode_only_rejects(frame: bytes) -> None:
    try:
        result = decode_frame(frame, SMALL_LIMITS)
    except FrameRejected as exc:
        assert isinstance(exc.error, DriverError)
        assert isinstance(exc.error.code, ErrorCode)
        assert exc.request_id is None or (isinstance(exc.request_id, int) and exc.request_id >= 0)
        return
    assert isinstance(result, Request)
    if isinstance(result.body, Forward):
        assert len(result.body.items) <= SMALL_LIMITS.max_forward_requests
        for item in result.body.items:
            assert isinstance(item, ForwardItem | DriverError)
            if isinstance(item, ForwardItem):
                assert len(item.tokens) == len(item.positions)
                assert all(0 <= t < SMALL_LIMITS.vocab_size for t in item.tokens)
                assert all(0 <= p < SMALL_LIMITS.max_model_len for p in item.positions)
                assert all(0 <= s.at < len(item.tokens) for s in item.samplers)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=300))
def test_arbitrary_bytes_only_raise_frame_rejected(frame: bytes) -> None:
    _decode_only_rejects(frame)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(values)
def test_arbitrary_msgpack_values_only_raise_frame_rejected(obj: Any) -> None:
    _decode_only_rejects(pack(obj))


@settings(max_examples=250, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(frames)
def test_arbitrary_request_maps_only_raise_frame_rejected(obj: dict[str, Any]) -> None:
    _decode_only_rejects(pack(obj))


def test_invalid_utf8_fails_the_frame_or_only_its_request() -> None:
    """msgspec reports bad UTF-8 as UnicodeDecodeError; it must still become a protocol error."""
    with pytest.raises(FrameRejected) as rejected:
        decode_frame(b"\x83\xa1v\x01\xa2id\x03\xa2op\xa2\xff\xfe", SMALL_LIMITS)  # op: invalid UTF-8
    assert rejected.value.error.code is ErrorCode.BAD_FRAME
    good = {"context": 1, "tokens": [1], "positions": [0], "samplers": [{"at": 0, "type": "greedy"}]}
    bad = {"context": 2, "tokens": [1], "positions": [0], "samplers": [{"at": 0, "type": "ÿþ"}]}
    frame = pack({"v": 1, "id": 9, "op": "forward", "requests": [good, bad]}).replace(
        "ÿþ".encode(), b"\xff\xfe\xfd\xfc")
    items = decode_frame(frame, SMALL_LIMITS).body.items
    assert isinstance(items[0], ForwardItem)
    assert isinstance(items[1], DriverError) and items[1].code is ErrorCode.BAD_REQUEST
