"""Protocol v1 codec: frames in, validated request objects out; reply maps in, frames out.

All checking of what a host sends happens here, once. Inner code receives `Request` objects whose
fields are known to be well typed and within the model's limits.
"""

from __future__ import annotations

import functools
from array import array
from dataclasses import dataclass
from typing import Annotated, Any

import msgspec

from . import PROTOCOL_VERSION
from .errors import DriverError, ErrorCode
from .samplers import (
    ALL_SAMPLERS,
    TOKEN_SAMPLERS,
    U32,
    U64,
    Sampler,
    WireSampler,
    frozen_maker,
    normalize_sampler,
    sampler_from_wire,
    wire_map,
)

__all__ = ["ALL_SAMPLERS", "TOKEN_SAMPLERS", "Sampler"]  # re-exported: engines read samplers from here

CONTROL_OPS = frozenset({"handshake", "health", "stats"})
STATE_OPS = frozenset({"forward", "fork", "truncate", "release", "shutdown"})


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
    requests: list[msgspec.Raw]


class _Fork(_Op):
    src: U64
    dst: U64
    length: U32 | None = None


class _Truncate(_Op):
    context: U64
    length: U32


class _Release(_Op):
    contexts: list[U64]


class _WireRequest(msgspec.Struct, forbid_unknown_fields=True):
    context: U64
    tokens: list[U32]
    positions: list[U32]
    samplers: list[WireSampler] = []


_OP_TYPES: dict[str, type[_Op]] = {"forward": _Forward, "fork": _Fork, "truncate": _Truncate,
                                   "release": _Release}
_header_decoder = msgspec.msgpack.Decoder(_Header)
_op_decoders = {op: msgspec.msgpack.Decoder(t) for op, t in _OP_TYPES.items()}
_request_decoder = msgspec.msgpack.Decoder(_WireRequest)
_encoder = msgspec.msgpack.Encoder()


# ---------------------------------------------------------------- validated objects (what inner code sees)

@dataclass(frozen=True, slots=True)
class ForwardItem:
    context: int
    tokens: list[int]
    positions: list[int]
    samplers: tuple[Sampler, ...]


_forward_item_unchecked = frozen_maker(ForwardItem)  # ForwardItem(...) for the fast path: one per request


@dataclass(frozen=True, slots=True)
class Fork:
    src: int
    dst: int
    length: int | None


@dataclass(frozen=True, slots=True)
class Truncate:
    context: int
    length: int


@dataclass(frozen=True, slots=True)
class Release:
    contexts: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class Forward:
    items: list[ForwardItem | DriverError]  # a bad request fails alone, so it stays in its slot


@dataclass(frozen=True, slots=True)
class Request:
    id: int
    op: str
    body: Forward | Fork | Truncate | Release | None = None


@dataclass(frozen=True, slots=True)
class Limits:
    """What the edge checks requests against (model facts and advertised caps)."""

    vocab_size: int
    max_model_len: int
    max_forward_requests: int
    max_forward_tokens: int
    max_logprob_labels: int
    max_frame_bytes: int
    samplers: frozenset[str] = frozenset(ALL_SAMPLERS)


class FrameRejected(Exception):
    """A frame that gets an error reply before reaching the driver core."""

    def __init__(self, request_id: int | None, error: DriverError) -> None:
        super().__init__(error.message)
        self.request_id = request_id
        self.error = error


# ---------------------------------------------------------------- decoding

def decode_frame(frame: bytes | memoryview, limits: Limits) -> Request:
    """Decode and validate one frame. Raises FrameRejected with the reply's id and error."""
    if len(frame) > limits.max_frame_bytes:
        raise FrameRejected(None, DriverError(
            ErrorCode.BAD_FRAME, f"frame of {len(frame)} bytes is over the {limits.max_frame_bytes}-byte limit"))
    try:
        return _fast_forward(frame, limits) or _decode(frame, limits)
    except RecursionError:
        raise FrameRejected(None, DriverError(ErrorCode.BAD_FRAME, "frame is nested too deeply")) from None
    except UnicodeDecodeError as exc:  # msgspec reports a bad UTF-8 string this way
        raise FrameRejected(None, DriverError(ErrorCode.BAD_FRAME, f"frame holds an invalid string: {exc}")) from None


def _fast_forward(frame: bytes | memoryview, limits: Limits) -> Request | None:
    """The common case in one pass: a well-formed forward whose requests are all valid.

    Anything else returns None and takes the general path, which names each problem and keeps a bad
    request's failure to its own slot. Both paths accept exactly the same frames and build equal objects.

    msgspec decodes the frame, checking every token against `vocab_size` in C. Positions come out as raw
    msgpack: a run p0, p0+1, ... written canonically is recognised by comparing its bytes with the encoding
    of that run and becomes a slice of shared int objects, so no int is allocated for it; other positions are
    decoded and checked by msgspec. A request's sampler list is looked up in a memo of lists already checked
    against these limits.
    """
    data = frame if type(frame) is bytes else bytes(frame)
    fast = _fast_path(limits)
    try:
        wire = fast.decoder.decode(data)
    except (msgspec.ValidationError, msgspec.DecodeError, UnicodeDecodeError, RecursionError):
        return None
    requests = wire.requests
    if (wire.op != "forward" or type(wire.v) is not int or wire.v != PROTOCOL_VERSION or not _is_uint(wire.id, 64)
            or len(requests) > limits.max_forward_requests):
        return None
    # msgspec keeps the last of repeated keys; a typed field is checked at every occurrence, a raw one is
    # not. So each request must hold exactly one 'positions' key: the name cannot overlap itself, and
    # every request has at least one, hence a count equal to the number of requests means one each.
    if data.count(b"positions") != len(requests):
        return None
    ints, blob, offsets = fast.ints, fast.blob, fast.offsets
    n_ints = len(ints)
    known_samplers = fast.samplers
    items: list[ForwardItem | DriverError] = []
    total_tokens = 0
    for request in requests:
        tokens = request.tokens
        n_tokens = len(tokens)
        total_tokens += n_tokens
        positions = None
        raw = bytes(request.positions)
        head = raw[0]  # an array header: fixarray, array16, array32
        start = 3 if head == 0xDC else 1 if 0x90 < head <= 0x9F else 5 if head == 0xDD else 0
        if start and len(raw) > start:
            first = raw[start]  # the first position: fixint, uint8, uint16, uint32
            p0 = (first if first < 0x80 else (raw[start + 1] << 8 | raw[start + 2]) if first == 0xCD
                  else raw[start + 1] if first == 0xCC
                  else int.from_bytes(raw[start + 1:start + 5], "big") if first == 0xCE else -1)
            end = p0 + n_tokens
            if p0 >= 0 and end <= n_ints and raw[start:] == blob[offsets[p0]:offsets[end]]:
                positions = ints[p0:end]
        if positions is None:
            positions = fast.decode_positions(request.positions)
            if positions is None or len(positions) != n_tokens:
                return None
        known = known_samplers.get(request.samplers)
        if known is None:
            known = fast.learn_samplers(request.samplers)
            if known is None:
                return None
        samplers, max_at = known
        if max_at >= n_tokens:
            return None
        items.append(_forward_item_unchecked(request.context, tokens, positions, samplers))
    return None if total_tokens > limits.max_forward_tokens else Request(wire.id, "forward", Forward(items))


_POSITION_TABLE_MAX = 1 << 17  # shared position ints cover the first 128 Ki positions (about 6 MB)
_MAX_MEMO_SAMPLERS = 4096  # distinct sampler lists remembered per Limits; a host rarely uses many


class _FastPath:
    """What the fast path needs for one `Limits`: its decoders, the shared position ints, the sampler memo."""

    __slots__ = (
        "blob",
        "decoder",
        "ints",
        "limits",
        "offsets",
        "positions_decoder",
        "samplers",
    )

    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self.decoder, self.positions_decoder = _fast_decoders(limits.vocab_size, limits.max_model_len)
        self.ints, self.blob, self.offsets = _position_table(max(0, min(limits.max_model_len, _POSITION_TABLE_MAX)))
        self.samplers: dict[tuple[WireSampler, ...], tuple[tuple[Sampler, ...], int]] = {}

    def decode_positions(self, raw: msgspec.Raw) -> list[int] | None:
        """Positions that are not an unbroken run: decoded with their bounds checked by msgspec."""
        try:
            return self.positions_decoder.decode(raw)
        except (msgspec.ValidationError, msgspec.DecodeError, UnicodeDecodeError, RecursionError):
            return None

    def learn_samplers(self, wire: tuple[WireSampler, ...]) -> tuple[tuple[Sampler, ...], int] | None:
        """Check a sampler list not seen before: (samplers, largest `at`), or None if one is bad."""
        samplers = []
        max_at = -1
        try:
            for s in wire:
                samplers.append(normalize_sampler(s, self.limits))
                max_at = max(max_at, s.at)
        except DriverError:
            return None
        if len(self.samplers) >= _MAX_MEMO_SAMPLERS:
            self.samplers.clear()
        known = self.samplers[wire] = (tuple(samplers), max_at)
        return known


@functools.lru_cache(maxsize=8)
def _fast_path(limits: Limits) -> _FastPath:
    return _FastPath(limits)


@functools.lru_cache(maxsize=8)
def _fast_decoders(vocab_size: int, max_model_len: int) -> tuple[msgspec.msgpack.Decoder, msgspec.msgpack.Decoder]:
    """The frame decoder (tokens checked against the model's bounds while decoding, positions left raw) and
    the decoder of a raw positions list. Tokens and positions are u32 whatever the model says."""
    token = Annotated[int, msgspec.Meta(ge=0, lt=min(vocab_size, 1 << 32))]
    position = Annotated[int, msgspec.Meta(ge=0, lt=min(max_model_len, 1 << 32))]
    request = msgspec.defstruct("FastRequest", [("context", U64), ("tokens", list[token]),
                                                ("positions", msgspec.Raw),
                                                ("samplers", tuple[WireSampler, ...], ())],
                                forbid_unknown_fields=True, gc=False)
    frame = msgspec.defstruct("FastForward", [("v", Any), ("id", Any), ("op", Any), ("requests", list[request])],
                              forbid_unknown_fields=True, gc=False)
    return msgspec.msgpack.Decoder(frame), msgspec.msgpack.Decoder(list[position])


@functools.lru_cache(maxsize=4)
def _position_table(size: int) -> tuple[list[int], bytes, array]:
    """The ints 0 .. size-1, their canonical msgpack encodings back to back, and where each one starts.

    `blob[offsets[a]:offsets[b]]` is the body (the array without its header) of the encoding of
    `list(range(a, b))`: msgpack writes 0..127 in 1 byte, 128..255 in 2, 256..65535 in 3, the rest in 5.
    """
    ints = list(range(size))
    offsets = array("I", [0])  # the blob stays far below 4 GiB
    for low, high, width in ((0, 128, 1), (128, 256, 2), (256, 1 << 16, 3), (1 << 16, 1 << 32, 5)):
        top = min(high, size)
        if top > low:
            base = offsets[-1]
            offsets.extend(range(base + width, base + width * (top - low) + 1, width))
    encoded = _encoder.encode(ints)
    blob = encoded[len(encoded) - offsets[-1]:]
    return ints, blob, offsets


def _decode(frame: bytes | memoryview, limits: Limits) -> Request:
    try:
        header = _header_decoder.decode(frame)
    except msgspec.ValidationError as exc:
        raise FrameRejected(None, DriverError(ErrorCode.BAD_FRAME, f"frame is not a msgpack map: {exc}")) from None
    except msgspec.DecodeError as exc:
        raise FrameRejected(None, DriverError(ErrorCode.BAD_FRAME, f"frame is not valid msgpack: {exc}")) from None

    request_id = header.id if _is_uint(header.id, 64) else None
    if type(header.v) is not int or header.v != PROTOCOL_VERSION:
        shown = "missing" if header.v is msgspec.UNSET else repr(header.v)
        raise FrameRejected(request_id, DriverError(
            ErrorCode.VERSION, f"protocol version {shown} is not supported; this driver speaks v=1"))
    if request_id is None:
        what = "missing" if header.id is msgspec.UNSET else f"{header.id!r} is not an unsigned 64-bit integer"
        raise FrameRejected(None, DriverError(ErrorCode.BAD_REQUEST, f"request id {what}"))
    if not isinstance(header.op, str):
        raise FrameRejected(request_id, DriverError(ErrorCode.BAD_REQUEST, "field 'op' must be a string"))
    op = header.op
    if op in CONTROL_OPS or op == "shutdown":
        return Request(request_id, op)
    if op not in _OP_TYPES:
        known = ", ".join(sorted(CONTROL_OPS | STATE_OPS))
        raise FrameRejected(request_id, DriverError(ErrorCode.UNKNOWN_OP, f"unknown op {op!r}; known: {known}"))
    try:
        wire = _op_decoders[op].decode(frame)
    except msgspec.ValidationError as exc:
        raise FrameRejected(request_id, DriverError(ErrorCode.BAD_REQUEST, f"{op}: {exc}")) from None
    if isinstance(wire, _Forward):
        return Request(request_id, op, _forward_body(wire, limits, request_id))
    if isinstance(wire, _Fork):
        if wire.src == wire.dst:
            raise FrameRejected(request_id, DriverError(ErrorCode.BAD_REQUEST, "fork: src and dst are the same"))
        return Request(request_id, op, Fork(wire.src, wire.dst, wire.length))
    if isinstance(wire, _Truncate):
        return Request(request_id, op, Truncate(wire.context, wire.length))
    assert isinstance(wire, _Release)
    return Request(request_id, op, Release(tuple(wire.contexts)))


def _is_uint(value: Any, bits: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < (1 << bits)


def _forward_body(wire: _Forward, limits: Limits, request_id: int) -> Forward:
    if len(wire.requests) > limits.max_forward_requests:
        raise FrameRejected(request_id, DriverError(
            ErrorCode.CAPACITY, f"forward has {len(wire.requests)} requests; max_forward_requests is "
            f"{limits.max_forward_requests}"))
    items: list[ForwardItem | DriverError] = []
    total_tokens = 0
    for index, raw in enumerate(wire.requests):
        try:
            wire_request = _request_decoder.decode(raw)
        except (msgspec.ValidationError, msgspec.DecodeError, UnicodeDecodeError) as exc:
            items.append(DriverError(ErrorCode.BAD_REQUEST, f"requests[{index}]: {exc}"))
            continue
        total_tokens += len(wire_request.tokens)  # counted even when the request is refused below
        try:
            items.append(_forward_item(wire_request, limits))
        except DriverError as exc:
            exc.message = f"requests[{index}]: {exc.message}"
            items.append(exc)
    if total_tokens > limits.max_forward_tokens:
        raise FrameRejected(request_id, DriverError(
            ErrorCode.CAPACITY, f"forward carries {total_tokens} tokens; max_forward_tokens is "
            f"{limits.max_forward_tokens}"))
    return Forward(items)


def _forward_item(wire: _WireRequest, limits: Limits) -> ForwardItem:
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

def encode_ok(request_id: int, result: dict[str, Any]) -> bytes:
    return _encoder.encode({"v": PROTOCOL_VERSION, "id": request_id, "ok": True, **result})


def encode_error(request_id: int | None, error: DriverError) -> bytes:
    return _encoder.encode({"v": PROTOCOL_VERSION, "id": request_id, "ok": False, "error": error.to_wire()})


def encode_forward(request_id: int, items: list[ForwardItem]) -> bytes:
    """A forward frame carrying already-validated requests (the router's hop to a replica)."""
    requests = [{"context": item.context, "tokens": item.tokens, "positions": item.positions,
                 "samplers": [wire_map(s) for s in item.samplers]} for item in items]
    return _encoder.encode({"v": PROTOCOL_VERSION, "id": request_id, "op": "forward", "requests": requests})
