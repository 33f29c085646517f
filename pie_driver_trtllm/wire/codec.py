"""Protocol v1 codec: frames in, validated request objects out; reply maps in, frames out.

The general path here names every problem; `fast_forward` takes the common well-formed forward in one
pass and steps aside for anything else. What they build is defined in `messages`.

All checking of what a host sends happens here, once. Inner code receives `Request` objects whose
fields are known to be well typed and within the model's limits.
"""

from __future__ import annotations

import functools
from typing import Annotated, Any, Literal

import msgspec

from pie_driver_trtllm import PROTOCOL_VERSION
from pie_driver_trtllm.wire.errors import DriverError, ErrorCode, shown
from pie_driver_trtllm.wire.fast_forward import fast_forward
from pie_driver_trtllm.wire.limits import Limits, output_problem
from pie_driver_trtllm.wire.messages import (
    Fork,
    Forward,
    ForwardItem,
    FrameRejected,
    LoadWeights,
    Release,
    Request,
    Sleep,
    StepColumns,
    Truncate,
    Wake,
    is_uint,
)
from pie_driver_trtllm.wire.samplers import (
    ALL_SAMPLERS,
    TOKEN_SAMPLERS,
    U32,
    U64,
    Sampler,
    WireSampler,
    sampler_from_wire,
    wire_map,
)
from pie_driver_trtllm.wire.step import decode_step

# Re-exported: inner code imports the validated objects and the samplers from here.
__all__ = ["ALL_SAMPLERS", "TOKEN_SAMPLERS", "Fork", "Forward", "ForwardItem", "FrameRejected", "Limits",
           "LoadWeights", "Release", "Request", "Sampler", "Sleep", "StepColumns", "Truncate", "Wake"]

CONTROL_OPS = frozenset({"handshake", "health", "stats"})
STATE_OPS = frozenset({"forward", "step", "fork", "truncate", "release", "load_weights", "sleep", "wake", "shutdown"})
MAX_PATH_CHARS = 4096  # PATH_MAX on Linux
MAX_RELEASE_CONTEXTS = 1 << 20  # one release: the ids are handled on the serving thread, about 75 ms a million


# ---------------------------------------------------------------- wire shapes (decoded by msgspec)

class _Header(msgspec.Struct):
    v: Any = msgspec.UNSET
    id: Any = msgspec.UNSET
    op: Any = msgspec.UNSET


class _Op(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    v: Any = None
    id: Any = None
    op: Any = None


class _Forward(_Op):
    requests: msgspec.Raw  # its length is checked before its entries are decoded


class _Fork(_Op):
    src: U64
    dst: U64
    length: U32 | None = None


class _Truncate(_Op):
    context: U64
    length: U32


class _Release(_Op):
    contexts: Annotated[list[U64], msgspec.Meta(max_length=MAX_RELEASE_CONTEXTS)]  # checked from the header


class _LoadWeights(_Op):
    path: Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_PATH_CHARS)]
    version: U64


class _Sleep(_Op):
    level: Literal[1, 2]


class _Wake(_Op):
    pass


_OP_TYPES: dict[str, type[_Op]] = {"forward": _Forward, "fork": _Fork, "truncate": _Truncate,
                                   "release": _Release, "load_weights": _LoadWeights, "sleep": _Sleep,
                                   "wake": _Wake}
_header_decoder = msgspec.msgpack.Decoder(_Header)
_op_decoders = {op: msgspec.msgpack.Decoder(t) for op, t in _OP_TYPES.items()}
_raw_list_decoder = msgspec.msgpack.Decoder(list[msgspec.Raw])
_encoder = msgspec.msgpack.Encoder()


# ---------------------------------------------------------------- decoding

def decode_frame(frame: bytes | memoryview, limits: Limits) -> Request:
    """Decode and validate one frame. Raises FrameRejected with the reply's id and error."""
    if len(frame) > limits.max_frame_bytes:
        raise FrameRejected(None, DriverError(
            ErrorCode.BAD_FRAME, f"frame of {len(frame)} bytes is over the {limits.max_frame_bytes}-byte limit"))
    try:
        return fast_forward(frame, limits) or _decode(frame, limits)
    except RecursionError:
        raise FrameRejected(None, DriverError(ErrorCode.BAD_FRAME, "frame is nested too deeply")) from None
    except UnicodeDecodeError as exc:  # msgspec reports a bad UTF-8 string this way
        raise FrameRejected(None, DriverError(ErrorCode.BAD_FRAME, f"frame holds an invalid string: {exc}")) from None


def _decode(frame: bytes | memoryview, limits: Limits) -> Request:
    try:
        header = _header_decoder.decode(frame)
    except msgspec.ValidationError as exc:
        raise FrameRejected(None, DriverError(ErrorCode.BAD_FRAME, f"frame is not a msgpack map: {exc}")) from None
    except msgspec.DecodeError as exc:
        raise FrameRejected(None, DriverError(ErrorCode.BAD_FRAME, f"frame is not valid msgpack: {exc}")) from None

    request_id = header.id if is_uint(header.id, 64) else None
    if type(header.v) is not int or header.v != PROTOCOL_VERSION:
        version = "missing" if header.v is msgspec.UNSET else shown(header.v)
        raise FrameRejected(request_id, DriverError(
            ErrorCode.VERSION, f"protocol version {version} is not supported; this driver speaks v=1"))
    if request_id is None:
        what = "missing" if header.id is msgspec.UNSET else f"{shown(header.id)} is not an unsigned 64-bit integer"
        raise FrameRejected(None, DriverError(ErrorCode.BAD_REQUEST, f"request id {what}"))
    if not isinstance(header.op, str):
        raise FrameRejected(request_id, DriverError(ErrorCode.BAD_REQUEST, "field 'op' must be a string"))
    op = header.op
    if op in CONTROL_OPS or op == "shutdown":
        return Request(request_id, op)
    if op == "step":
        return decode_step(frame, limits, request_id)
    if op not in _OP_TYPES:
        known = ", ".join(sorted(CONTROL_OPS | STATE_OPS))
        raise FrameRejected(request_id, DriverError(ErrorCode.UNKNOWN_OP, f"unknown op {shown(op)}; known: {known}"))
    try:
        wire = _op_decoders[op].decode(frame)
    except msgspec.ValidationError as exc:
        code = ErrorCode.CAPACITY if op == "release" and "of length <=" in str(exc) else ErrorCode.BAD_REQUEST
        raise FrameRejected(request_id, DriverError(code, f"{op}: {exc}")) from None
    if isinstance(wire, _Forward):
        return Request(request_id, op, _forward_body(wire, limits, request_id))
    if isinstance(wire, _Fork):
        if wire.src == wire.dst:
            raise FrameRejected(request_id, DriverError(ErrorCode.BAD_REQUEST, "fork: src and dst are the same"))
        return Request(request_id, op, Fork(wire.src, wire.dst, wire.length))
    if isinstance(wire, _Truncate):
        return Request(request_id, op, Truncate(wire.context, wire.length))
    if isinstance(wire, _LoadWeights):
        if "\0" in wire.path:
            raise FrameRejected(request_id, DriverError(ErrorCode.BAD_REQUEST, "load_weights: path holds a NUL"))
        return Request(request_id, op, LoadWeights(wire.path, wire.version))
    if isinstance(wire, _Sleep):
        return Request(request_id, op, Sleep(wire.level))
    if isinstance(wire, _Wake):
        return Request(request_id, op, Wake())
    assert isinstance(wire, _Release)
    return Request(request_id, op, Release(tuple(wire.contexts)))


def _forward_body(wire: _Forward, limits: Limits, request_id: int) -> Forward:
    count = _array_length(wire.requests)
    if count is None:
        raise FrameRejected(request_id, DriverError(ErrorCode.BAD_REQUEST, "forward: Expected `array` - at "
                                                    "`$.requests`"))
    if count > limits.max_forward_requests:
        raise _capacity(request_id, f"forward has {count} requests; max_forward_requests is "
                        f"{limits.max_forward_requests}")
    decoder = _request_decoder(limits.max_forward_tokens, limits.max_sampler_rows)
    items: list[ForwardItem | DriverError] = []
    total_tokens = total_samplers = 0
    for index, raw in enumerate(_raw_list_decoder.decode(wire.requests)):
        try:
            wire_request = decoder.decode(raw)
        except (msgspec.ValidationError, msgspec.DecodeError, UnicodeDecodeError) as exc:
            if isinstance(exc, msgspec.ValidationError) and "of length <=" in str(exc):
                raise _capacity(request_id, f"requests[{index}] alone is over a forward's caps "
                                f"(max_forward_tokens {limits.max_forward_tokens}, max_sampler_rows "
                                f"{limits.max_sampler_rows})") from None
            items.append(DriverError(ErrorCode.BAD_REQUEST, f"requests[{index}]: {exc}"))
            continue
        # Counted even when the request is refused below, and checked as they add up, so that what a
        # frame makes the driver hold stays within the caps however the frame is built.
        total_tokens += len(wire_request.tokens)
        total_samplers += len(wire_request.samplers)
        if total_tokens > limits.max_forward_tokens:
            raise _capacity(request_id, f"forward carries more than {limits.max_forward_tokens} tokens "
                            "(max_forward_tokens)")
        if total_samplers > limits.max_sampler_rows:
            raise _capacity(request_id, f"forward carries more than {limits.max_sampler_rows} samplers "
                            "(max_sampler_rows)")
        try:
            items.append(_forward_item(wire_request, limits))
        except DriverError as exc:
            exc.message = f"requests[{index}]: {exc.message}"
            items.append(exc)
    problem = output_problem([item.samplers for item in items if isinstance(item, ForwardItem)], limits)
    if problem:
        raise _capacity(request_id, problem)
    return Forward(items)


def _capacity(request_id: int, message: str) -> FrameRejected:
    return FrameRejected(request_id, DriverError(ErrorCode.CAPACITY, message))


def _array_length(raw: msgspec.Raw) -> int | None:
    """The element count of a msgpack array, read from its header; None when it is not an array."""
    data = memoryview(raw)
    if not data:
        return None
    head = data[0]
    if 0x90 <= head <= 0x9F:
        return head & 0x0F
    if head == 0xDC and len(data) >= 3:
        return int.from_bytes(data[1:3], "big")
    if head == 0xDD and len(data) >= 5:
        return int.from_bytes(data[1:5], "big")
    return None


@functools.lru_cache(maxsize=8)
def _request_decoder(max_tokens: int, max_samplers: int) -> msgspec.msgpack.Decoder:
    """A forward request's decoder; its lists are refused past the caps before their entries are read."""
    request = msgspec.defstruct("WireRequest", [
        ("context", U64), ("tokens", Annotated[list[U32], msgspec.Meta(max_length=max_tokens)]),
        ("positions", Annotated[list[U32], msgspec.Meta(max_length=max_tokens)]),
        ("samplers", Annotated[list[WireSampler], msgspec.Meta(max_length=max_samplers)], [])],
        forbid_unknown_fields=True)
    return msgspec.msgpack.Decoder(request)


def _forward_item(wire: Any, limits: Limits) -> ForwardItem:
    tokens, positions = wire.tokens, wire.positions
    if len(tokens) != len(positions):
        raise DriverError(ErrorCode.BAD_REQUEST,
                          f"{len(tokens)} tokens but {len(positions)} positions; they must pair up")
    if tokens and max(tokens) >= limits.vocab_size:
        bad = next(t for t in tokens if t >= limits.vocab_size)
        raise DriverError(ErrorCode.OUT_OF_RANGE, f"token {bad} is not below vocab_size {limits.vocab_size}")
    if positions and max(positions) >= limits.max_model_len:
        bad = next(p for p in positions if p >= limits.max_model_len)
        raise DriverError(ErrorCode.OUT_OF_RANGE,
                          f"position {bad} is not below max_model_len {limits.max_model_len}")
    samplers = tuple(sampler_from_wire(s, len(tokens), limits) for s in wire.samplers)
    return ForwardItem(wire.context, tokens, positions, samplers)


# ---------------------------------------------------------------- encoding

class ForwardTokens:
    """A forward's result when every request got one token: `{"results": [{"ok": true, "outputs":
    [{"token": t}]}, ...], "weights_version": w}`, kept as the list of tokens and encoded without building
    those maps."""

    __slots__ = ("tokens", "weights_version")

    def __init__(self, tokens: list[int], weights_version: int = 0) -> None:
        self.tokens = tokens
        self.weights_version = weights_version

    def as_map(self) -> dict[str, Any]:
        return {"results": [{"ok": True, "outputs": [{"token": t}]} for t in self.tokens],
                "weights_version": self.weights_version}


class _TokenResults(dict[int, bytes]):
    """The encoding of one request's result `{"ok": true, "outputs": [{"token": t}]}`, per token t."""

    def __missing__(self, token: int) -> bytes:
        if len(self) >= 1 << 20:  # bounded; a model's vocabulary is far smaller
            self.clear()
        encoded = self[token] = _encoder.encode({"ok": True, "outputs": [{"token": token}]})
        return encoded


_token_results = _TokenResults()


def encode_ok(request_id: int, result: dict[str, Any] | ForwardTokens) -> bytes:
    if type(result) is ForwardTokens:
        return _encode_tokens(request_id, result.tokens, result.weights_version)
    return _encoder.encode({"v": PROTOCOL_VERSION, "id": request_id, "ok": True, **result})


# {"v": 1, "id": <id>, "ok": true, "results": <array>, "weights_version": <w>} around the id, the array
# and the version, as msgspec writes that map.
_REPLY_HEAD = b"\x85" + b"".join(map(_encoder.encode, ("v", PROTOCOL_VERSION, "id")))
_REPLY_MIDDLE = b"".join(map(_encoder.encode, ("ok", True, "results")))
_REPLY_VERSION = _encoder.encode("weights_version")


def _encode_tokens(request_id: int, tokens: list[int], weights_version: int) -> bytes:
    """The bytes `encode_ok(request_id, ForwardTokens(tokens, w).as_map())` gives, joined from pieces."""
    n = len(tokens)
    count = bytes((0x90 | n,)) if n < 16 else b"\xdc" + n.to_bytes(2, "big") if n < 1 << 16 \
        else b"\xdd" + n.to_bytes(4, "big")
    return b"".join((_REPLY_HEAD, _encoder.encode(request_id), _REPLY_MIDDLE, count,
                     *map(_token_results.__getitem__, tokens), _REPLY_VERSION, _encoder.encode(weights_version)))


def encode_error(request_id: int | None, error: DriverError) -> bytes:
    return _encoder.encode({"v": PROTOCOL_VERSION, "id": request_id, "ok": False, "error": error.to_wire()})


def encode_forward(request_id: int, items: list[ForwardItem]) -> bytes:
    """A forward frame carrying already-validated requests (the router's hop to a replica)."""
    requests = [{"context": item.context, "tokens": item.tokens, "positions": item.positions,
                 "samplers": [wire_map(s) for s in item.samplers]} for item in items]
    return _encoder.encode({"v": PROTOCOL_VERSION, "id": request_id, "op": "forward", "requests": requests})
