"""The router's one-pass forward: the host's requests re-packed per replica as they came, the replicas'
results spliced into one reply as they were encoded.

The general path (`decode_frame`, then one `ForwardItem` per request, re-encoded per replica) builds
Python objects for every token, position and sampler, twice. Here msgspec decodes the frame once into
light requests: the context as an integer, the tokens, positions and samplers as raw msgpack, bytes
that go to the replica as the host wrote them. The replica validates them as any driver does; the
router renumbers a failed request's `requests[i]` to its place in the host's forward. The caps are
checked on a bound (each token takes at least one byte of its raw array) and exactly by the general
path when the bound is not enough. A frame this path cannot take whole (malformed, not a forward, a
bound over the caps) is left to the general path, which names every problem.
"""

from __future__ import annotations

import functools
import operator
from dataclasses import dataclass
from typing import Any

import msgspec

from pie_driver_trtllm import PROTOCOL_VERSION
from pie_driver_trtllm.wire.codec import Limits, Request, decode_frame
from pie_driver_trtllm.wire.limits import outputs_may_exceed_caps
from pie_driver_trtllm.wire.messages import is_uint
from pie_driver_trtllm.wire.samplers import U64

_NO_SAMPLERS = msgspec.Raw(b"\x90")  # an empty msgpack array
_TOKENS = operator.attrgetter("tokens")
_SAMPLERS = operator.attrgetter("samplers")
_MIN_SAMPLER_BYTES = 17  # the shortest valid sampler map: {"at": 0, "type": "greedy"}
# Every failed result a replica encodes starts {"ok": false: a reply without these bytes has none.
FAILED_MARK = b"\xa2ok\xc2"


@dataclass(frozen=True, slots=True)
class Spliced:
    """A forward that took the one-pass path: its light requests, and the frame for the general path."""

    requests: list[Any]     # light requests: context, then tokens, positions, samplers (raw)
    tokens: int             # at least the number of tokens of all requests (each takes a byte or more)
    frame: bytes
    limits: Limits

    @property
    def items(self) -> list[Any]:
        """The validated requests, through the general path (a forward this path cannot finish)."""
        return decode_frame(self.frame, self.limits).body.items  # type: ignore[union-attr]


@dataclass(frozen=True, slots=True)
class Split:
    """A forward's requests grouped by replica, request order kept within each group. Built by C loops
    (sort, map, count), not a Python loop per request."""

    order: list[int]    # request indexes, replica 0's first, then replica 1's, ...
    starts: list[int]   # where each replica's group starts in `order` (one more entry: the end)
    inverse: list[int]  # where each request is in `order`

    @classmethod
    def of(cls, places: list[int], replicas: int) -> Split:
        """`places[i]`: the replica of request i."""
        order = sorted(range(len(places)), key=places.__getitem__)  # stable: request order kept
        starts = [0]
        for replica in range(replicas):
            starts.append(starts[-1] + places.count(replica))
        return cls(order, starts, sorted(range(len(order)), key=order.__getitem__))

    def slots(self, replica: int) -> list[int]:
        """The request indexes of one replica's share, in order."""
        return self.order[self.starts[replica]:self.starts[replica + 1]]

    def shares(self, requests: list[Any]) -> list[list[Any]]:
        grouped = list(map(requests.__getitem__, self.order))
        return [grouped[a:b] for a, b in zip(self.starts, self.starts[1:], strict=False)]

    def in_request_order(self, joined: list[Any]) -> list[Any]:
        """Every share's results one after the other (`order`'s order), put back in request order."""
        return list(map(joined.__getitem__, self.inverse))


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
        wire = _decoder().decode(data)
    except (msgspec.ValidationError, msgspec.DecodeError, UnicodeDecodeError, RecursionError):
        return None
    requests = wire.requests
    if (wire.op != "forward" or type(wire.v) is not int or wire.v != PROTOCOL_VERSION or not is_uint(wire.id, 64)
            or len(requests) > limits.max_forward_requests):
        return None
    tokens = token_bound(requests)
    if tokens > limits.max_forward_tokens or _rows_uncounted(requests, data, limits):
        return None
    return Request(wire.id, "forward", Spliced(requests, tokens, data, limits))  # type: ignore[arg-type]


def _rows_uncounted(requests: list[Any], data: bytes, limits: Limits) -> bool:
    """Whether the row and output caps need the general path's exact count. Bounds here: the samplers'
    bytes hold at most one sampler per 17; the frame names `dist` and `logprobs` at least once per such
    sampler, and each returns at most `vocab_size` or `max_logprob_labels` values."""
    if sum(map(len, map(_SAMPLERS, requests))) - len(requests) > _MIN_SAMPLER_BYTES * limits.max_sampler_rows:
        return True
    return outputs_may_exceed_caps(data, limits)


def token_bound(requests: list[Any]) -> int:
    """At least the tokens these light requests carry: a raw array's bytes, less its header's one."""
    return sum(map(len, map(_TOKENS, requests))) - len(requests)


def encode_share(request_id: int, requests: list[Any]) -> bytes:
    """One replica's share as a forward frame: each request re-encoded from what was decoded (its raw
    fields as the host wrote them, `samplers` only if the host sent it), so that a share stays within
    the `max_frame_bytes` that the host's frame met (the request id aside, it is no larger)."""
    return _encoder.encode(_SubForward(PROTOCOL_VERSION, request_id, "forward", requests))


@functools.cache
def _decoder() -> msgspec.msgpack.Decoder:
    request = msgspec.defstruct("LightRequest", [("context", U64), ("tokens", msgspec.Raw),
                                                 ("positions", msgspec.Raw), ("samplers", msgspec.Raw, _NO_SAMPLERS)],
                                forbid_unknown_fields=True, gc=False, omit_defaults=True)
    frame = msgspec.defstruct("LightForward", [("v", Any), ("id", Any), ("op", Any), ("requests", list[request])],
                              forbid_unknown_fields=True, gc=False)
    return msgspec.msgpack.Decoder(frame)
