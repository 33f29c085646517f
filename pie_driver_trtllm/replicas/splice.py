"""The router's one-pass forward: the host's requests re-packed per replica as they came, the replicas'
results spliced into one reply as they were encoded.

The general path (`decode_frame`, then one `ForwardItem` per request, re-encoded per replica) builds
Python objects for every token, position and sampler twice. Here msgspec decodes the frame once into
light requests: the context, and tokens and positions checked against the model's bounds in C; the
sampler list stays raw msgpack, bytes that go to the replica unchanged, and the replica checks it. A
frame this path cannot take whole (malformed, over the caps, a request that fails these checks) is
left to the general path, which names every problem.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Annotated, Any

import msgspec

from pie_driver_trtllm import PROTOCOL_VERSION
from pie_driver_trtllm.wire.codec import Limits, Request, decode_frame
from pie_driver_trtllm.wire.messages import is_uint
from pie_driver_trtllm.wire.samplers import U64

_NO_SAMPLERS = msgspec.Raw(b"\x90")  # an empty msgpack array
# Every failed result a replica encodes starts {"ok": false: a reply without these bytes has none.
FAILED_MARK = b"\xa2ok\xc2"


@dataclass(frozen=True, slots=True)
class Spliced:
    """A forward that took the one-pass path: its light requests, and the frame for the general path."""

    requests: list[Any]     # light requests: context, tokens, positions, samplers (raw)
    tokens: int             # tokens of all requests
    frame: bytes
    limits: Limits

    @property
    def items(self) -> list[Any]:
        """The validated requests, through the general path (a forward this path cannot finish)."""
        return decode_frame(self.frame, self.limits).body.items  # type: ignore[union-attr]


class _SubForward(msgspec.Struct, array_like=False):
    v: int
    id: int
    op: str
    requests: list[Any]


_encoder = msgspec.msgpack.Encoder()


def decode_spliced(frame: bytes | memoryview, limits: Limits) -> Request | None:
    """A well-formed forward whose requests pass the router's checks, or None (the general path)."""
    if len(frame) > limits.max_frame_bytes:
        return None
    data = bytes(frame)
    try:
        wire = _decoder(limits.vocab_size, limits.max_model_len).decode(data)
    except (msgspec.ValidationError, msgspec.DecodeError, UnicodeDecodeError, RecursionError):
        return None
    requests = wire.requests
    if (wire.op != "forward" or type(wire.v) is not int or wire.v != PROTOCOL_VERSION or not is_uint(wire.id, 64)
            or len(requests) > limits.max_forward_requests):
        return None
    tokens = 0
    for request in requests:
        count = len(request.tokens)
        if count != len(request.positions):
            return None
        tokens += count
    if tokens > limits.max_forward_tokens:
        return None
    return Request(wire.id, "forward", Spliced(requests, tokens, data, limits))  # type: ignore[arg-type]


def encode_share(request_id: int, requests: list[Any]) -> bytes:
    """One replica's share as a forward frame: each request re-encoded from what was decoded, the
    samplers copied as the host wrote them."""
    return _encoder.encode(_SubForward(PROTOCOL_VERSION, request_id, "forward", requests))


@functools.lru_cache(maxsize=4)
def _decoder(vocab_size: int, max_model_len: int) -> msgspec.msgpack.Decoder:
    token = Annotated[int, msgspec.Meta(ge=0, lt=min(vocab_size, 1 << 32))]
    position = Annotated[int, msgspec.Meta(ge=0, lt=min(max_model_len, 1 << 32))]
    request = msgspec.defstruct("LightRequest", [("context", U64), ("tokens", list[token]),
                                                 ("positions", list[position]),
                                                 ("samplers", msgspec.Raw, _NO_SAMPLERS)],
                                forbid_unknown_fields=True, gc=False)
    frame = msgspec.defstruct("LightForward", [("v", Any), ("id", Any), ("op", Any), ("requests", list[request])],
                              forbid_unknown_fields=True, gc=False)
    return msgspec.msgpack.Decoder(frame)
