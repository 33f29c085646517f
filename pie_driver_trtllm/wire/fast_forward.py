"""The codec's fast path: a well-formed forward frame whose requests are all valid, in one pass.

It may decline any frame (it returns None and `protocol` takes the general path, which names each
problem); whatever it accepts, it builds exactly what the general path would.
"""

from __future__ import annotations

import functools
from array import array
from typing import Annotated, Any

import msgspec

from pie_driver_trtllm import PROTOCOL_VERSION
from pie_driver_trtllm.wire.errors import DriverError
from pie_driver_trtllm.wire.limits import Limits, outputs_may_exceed_caps
from pie_driver_trtllm.wire.messages import Forward, ForwardItem, Request, forward_item_unchecked, is_uint
from pie_driver_trtllm.wire.samplers import U64, Sampler, WireSampler, normalize_sampler


def fast_forward(frame: bytes | memoryview, limits: Limits) -> Request | None:
    """The common case in one pass: a well-formed forward whose requests are all valid.

    Anything else returns None and takes the general path, which names each problem and keeps a bad
    request's failure to its own slot. Both paths accept exactly the same frames and build equal objects.

    msgspec decodes the frame, checking every token against `vocab_size` in C. In a frame of short requests
    (a decode step's), msgspec checks the positions too, and each sampler list, left as raw msgpack, is
    looked up by its bytes in a memo of lists already checked against these limits. Otherwise positions
    come out as raw msgpack: a run p0, p0+1, ... written canonically is recognised by comparing its bytes
    with the encoding of that run and becomes a slice of shared int objects, so no int is allocated for it;
    other positions are decoded and checked by msgspec; sampler lists are looked up decoded.
    """
    data = frame if type(frame) is bytes else bytes(frame)
    if b"requests" not in data:  # another op (a step, say): no scans and no decode spent on it here
        return None
    fast = _fast_path(limits)
    # msgspec keeps the last of repeated keys; a typed field is checked at every occurrence, a raw one is
    # not. So each request must hold exactly one 'positions' key: the name cannot overlap itself, and
    # every request has at least one, hence a count equal to the number of requests means one each.
    named = data.count(b"positions")
    if outputs_may_exceed_caps(data, limits):
        return None
    short = len(data) < _SHORT_REQUEST_BYTES * named and data.count(b"samplers") == named
    wire = fast.decode_short(data) if short else None
    if wire is None:
        short = False
        try:
            wire = fast.decoder.decode(data)
        except (msgspec.ValidationError, msgspec.DecodeError, UnicodeDecodeError, RecursionError):
            return None
    requests = wire.requests
    if (wire.op != "forward" or type(wire.v) is not int or wire.v != PROTOCOL_VERSION or not is_uint(wire.id, 64)
            or named != len(requests)):  # no more than max_forward_requests: the decoders check
        return None
    if short:
        return _short_requests(wire, fast, limits)
    ints, blob, offsets = fast.ints, fast.blob, fast.offsets
    n_ints = len(ints)
    known_samplers = fast.samplers
    items: list[ForwardItem | DriverError] = []
    total_tokens = total_samplers = 0
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
        total_samplers += len(samplers)
        items.append(forward_item_unchecked(request.context, tokens, positions, samplers))
    if total_tokens > limits.max_forward_tokens or total_samplers > limits.max_sampler_rows:
        return None  # the general path names the cap
    return Request(wire.id, "forward", Forward(items))


def _short_requests(wire: Any, fast: _FastPath, limits: Limits) -> Request | None:
    """The requests of a frame of short ones (decode steps): positions came decoded and checked, and
    each request's sampler list is looked up by its bytes (hashing the decoded list costs far more)."""
    known_samplers, learn, make = fast.raw_samplers, fast.learn_raw_samplers, forward_item_unchecked
    items: list[ForwardItem | DriverError] = []
    total_tokens = total_samplers = 0
    for request in wire.requests:
        tokens = request.tokens
        n_tokens = len(tokens)
        if len(request.positions) != n_tokens:
            return None
        total_tokens += n_tokens
        raw = bytes(request.samplers)
        known = known_samplers.get(raw) or learn(raw)
        if known is None or known[1] >= n_tokens:
            return None
        total_samplers += len(known[0])
        items.append(make(request.context, tokens, request.positions, known[0]))
    if total_tokens > limits.max_forward_tokens or total_samplers > limits.max_sampler_rows:
        return None  # the general path names the cap
    return Request(wire.id, "forward", Forward(items))


def known_sampler_list(raw: bytes, limits: Limits) -> tuple[tuple[Sampler, ...], int] | None:
    """A sampler list still in its msgpack bytes, checked against `limits` once and remembered by those
    bytes: (samplers, largest `at`), or None when one is bad (the general path names it)."""
    fast = _fast_path(limits)
    return fast.raw_samplers.get(raw) or fast.learn_raw_samplers(raw)


# A frame averaging fewer bytes per request than this (a decode step's request is about 70) has its
# positions decoded as ints at once: too few per request for the shared-int run to pay for its checks.
# Its requests must each name `samplers` once (counted like `positions`, since that field is raw there).
_SHORT_REQUEST_BYTES = 256
_POSITION_TABLE_MAX = 1 << 17  # shared position ints cover the first 128 Ki positions (about 6 MB)
_MAX_MEMO_SAMPLERS = 4096  # distinct sampler lists remembered per Limits; a host rarely uses many
_MAX_FAST_SAMPLERS = 64  # longer sampler lists take the general path, which bounds them as they add up
_MAX_MEMO_BYTES = 4096  # a sampler list remembered by its bytes is no longer than this: the memo stays small


class _FastPath:
    """What the fast path needs for one `Limits`: its decoders, the shared position ints, the sampler memo."""

    __slots__ = (
        "blob",
        "decoder",
        "ints",
        "limits",
        "offsets",
        "positions_decoder",
        "raw_samplers",
        "samplers",
        "samplers_decoder",
        "short_decoder",
    )

    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self.decoder, self.positions_decoder, self.short_decoder = _fast_decoders(
            limits.vocab_size, limits.max_model_len, limits.max_forward_requests, limits.max_forward_tokens,
            min(limits.max_sampler_rows, _MAX_FAST_SAMPLERS))
        self.ints, self.blob, self.offsets = _position_table(max(0, min(limits.max_model_len, _POSITION_TABLE_MAX)))
        self.samplers: dict[tuple[WireSampler, ...], tuple[tuple[Sampler, ...], int]] = {}
        self.raw_samplers: dict[bytes, tuple[tuple[Sampler, ...], int]] = {}
        self.samplers_decoder = msgspec.msgpack.Decoder(Annotated[tuple[WireSampler, ...], msgspec.Meta(
            max_length=min(limits.max_sampler_rows, _MAX_FAST_SAMPLERS))])

    def decode_positions(self, raw: msgspec.Raw) -> list[int] | None:
        """Positions that are not an unbroken run: decoded with their bounds checked by msgspec."""
        try:
            return self.positions_decoder.decode(raw)
        except (msgspec.ValidationError, msgspec.DecodeError, UnicodeDecodeError, RecursionError):
            return None

    def decode_short(self, data: bytes) -> Any:
        """The frame through the decoder for short requests, or None (a request without samplers, say)."""
        try:
            return self.short_decoder.decode(data)
        except (msgspec.ValidationError, msgspec.DecodeError, UnicodeDecodeError, RecursionError):
            return None

    def learn_raw_samplers(self, raw: bytes) -> tuple[tuple[Sampler, ...], int] | None:
        """`learn_samplers` for a sampler list still in its msgpack bytes, remembered by those bytes."""
        try:
            wire = self.samplers_decoder.decode(raw)
        except (msgspec.ValidationError, msgspec.DecodeError, UnicodeDecodeError, RecursionError):
            return None
        known = self.samplers.get(wire) or self.learn_samplers(wire)
        if known is not None and len(raw) <= _MAX_MEMO_BYTES:
            if len(self.raw_samplers) >= _MAX_MEMO_SAMPLERS:
                self.raw_samplers.clear()
            self.raw_samplers[raw] = known
        return known

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
        known = (tuple(samplers), max_at)
        if sum(len(s.token_ids) for s in samplers) <= _MAX_FAST_SAMPLERS:  # the memo's memory stays small
            if len(self.samplers) >= _MAX_MEMO_SAMPLERS:
                self.samplers.clear()
            self.samplers[wire] = known
        return known


@functools.lru_cache(maxsize=8)
def _fast_path(limits: Limits) -> _FastPath:
    return _FastPath(limits)


@functools.lru_cache(maxsize=8)
def _fast_decoders(vocab_size: int, max_model_len: int, max_requests: int, max_tokens: int,
                   max_samplers: int) -> tuple[msgspec.msgpack.Decoder, ...]:
    """The frame decoder (tokens checked against the model's bounds while decoding, positions left raw),
    the decoder of a raw positions list, and the frame decoder that checks positions too (for frames of
    short requests). Tokens and positions are u32 whatever the model says. Each list's length is checked
    against its cap before its entries are decoded, so what a frame decodes to is bounded."""
    token = Annotated[int, msgspec.Meta(ge=0, lt=min(vocab_size, 1 << 32))]
    position = Annotated[int, msgspec.Meta(ge=0, lt=min(max_model_len, 1 << 32))]
    tokens = Annotated[list[token], msgspec.Meta(max_length=max_tokens)]
    request = msgspec.defstruct("FastRequest", [
        ("context", U64), ("tokens", tokens), ("positions", msgspec.Raw),
        ("samplers", Annotated[tuple[WireSampler, ...], msgspec.Meta(max_length=max_samplers)], ())],
        forbid_unknown_fields=True, gc=False)
    frame = msgspec.defstruct("FastForward", [
        ("v", Any), ("id", Any), ("op", Any),
        ("requests", Annotated[list[request], msgspec.Meta(max_length=max_requests)])],
        forbid_unknown_fields=True, gc=False)
    short = msgspec.defstruct("ShortRequest", [
        ("context", U64), ("tokens", tokens),
        ("positions", Annotated[list[position], msgspec.Meta(max_length=max_tokens)]), ("samplers", msgspec.Raw)],
        forbid_unknown_fields=True, gc=False)
    short_frame = msgspec.defstruct("ShortForward", [
        ("v", Any), ("id", Any), ("op", Any),
        ("requests", Annotated[list[short], msgspec.Meta(max_length=max_requests)])],
        forbid_unknown_fields=True, gc=False)
    return (msgspec.msgpack.Decoder(frame), msgspec.msgpack.Decoder(list[position]),
            msgspec.msgpack.Decoder(short_frame))


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
    encoded = msgspec.msgpack.encode(ints)
    blob = encoded[len(encoded) - offsets[-1]:]
    return ints, blob, offsets
