"""The router's forward arithmetic: the caps it advertises for N replicas, how it cuts one replica's
share of a forward into sub-forwards within that replica's own caps, and how it matches the replies.

Pure functions over lists and frames, so they are tested without starting a replica.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import msgspec

from pie_driver_trtllm.wire.messages import ForwardItem

# Per-forward caps the router advertises as N times one replica's: it cuts each replica's share into
# sub-forwards within that replica's requests and tokens, so one forward may carry N times those.
# Kept as they are: the row and output caps (`max_sampler_rows`, `max_logit_rows`, `max_prob_rows`,
# `max_output_elements`), since the cut does not count rows, and a forward within one replica's bound
# leaves every share within it; `max_logprob_labels` bounds one sampler; `total_pages` is a virtual page
# pool the driver does not manage (a context's pages never leave its replica) and `max_page_refs` equals it
# by contract.
SCALED_CAPS = ("max_forward_tokens", "max_forward_requests")
# One replica's own forward caps stay visible to the host under these keys.
REPLICA_CAPS = ("max_forward_tokens", "max_forward_requests")


class ForwardReply(msgspec.Struct):
    """A replica's forward reply, its per-request results left encoded: the router only reorders them."""

    id: int | None = None
    results: list[msgspec.Raw] | None = None
    error: dict[str, Any] | None = None


_FORWARD_REPLY = msgspec.msgpack.Decoder(ForwardReply)


@dataclass
class Piece:
    """A request of the forward, or a consecutive part of one too long for a replica's token cap."""

    item: ForwardItem
    request: int                         # its index among the forward's requests
    samplers: list[int] | None = None    # a part: which of the request's samplers it carries, in order


@dataclass
class SubForward:
    """Part of one replica's share of a forward, within that replica's own caps."""

    replica: int
    pieces: list[Piece]
    request_id: int | None = None   # None until sent; stays None when the replica was down


def router_caps(caps: dict[str, Any], replicas: int) -> dict[str, Any]:
    """One replica's handshake caps as the router in front of `replicas` of them advertises them."""
    scaled = {key: caps[key] * replicas for key in SCALED_CAPS if key in caps}
    own = {f"replica_{key}": caps[key] for key in REPLICA_CAPS}
    return {**caps, **scaled, **own}


def pieces(request: int, item: ForwardItem, max_tokens: int) -> list[Piece]:
    """The request whole, or cut into consecutive parts of at most `max_tokens` tokens, each with the
    samplers that fall in it. A replica runs its sub-forwards in order, so the parts merge one after
    the other just as the whole request would, and each sampler sees the same prefix."""
    if len(item.tokens) <= max_tokens:
        return [Piece(item, request)]
    parts = []
    for start in range(0, len(item.tokens), max_tokens):
        end = start + max_tokens
        carried = [i for i, sampler in enumerate(item.samplers) if start <= sampler.at < end]
        samplers = tuple(replace(item.samplers[i], at=item.samplers[i].at - start) for i in carried)
        part = ForwardItem(item.context, item.tokens[start:end], item.positions[start:end], samplers)
        parts.append(Piece(part, request, carried))
    return parts


def sub_forwards(share: Sequence[Piece], max_requests: int, max_tokens: int) -> list[list[Piece]]:
    """A replica's share, in order, packed greedily into consecutive sub-forwards within its caps (no
    piece is over `max_tokens`). Requests of one context may land in different sub-forwards: the
    replica runs them in order, and the core answers a context repeated within one forward as if its
    requests came one after the other."""
    cuts: list[list[Piece]] = []
    current: list[Piece] = []
    tokens = 0
    for piece in share:
        size = len(piece.item.tokens)
        if current and (len(current) == max_requests or tokens + size > max_tokens):
            cuts.append(current)
            current, tokens = [], 0
        current.append(piece)
        tokens += size
    if current:
        cuts.append(current)
    return cuts


def join_parts(request: ForwardItem, parts: list[tuple[Piece, Any]]) -> dict[str, Any]:
    """One result for a request that went in parts: the first failure, or every sampler's output in the
    request's own sampler order. `parts` holds each part's result, decoded."""
    outputs: list[Any] = [None] * len(request.samplers)
    for piece, result in parts:
        if not result.get("ok"):
            return result
        for index, output in zip(piece.samplers or (), result["outputs"], strict=True):
            outputs[index] = output
    return {"ok": True, "outputs": outputs}


def round_robin(queues: Sequence[Sequence[Any]]) -> list[Any]:
    """The queues' items interleaved: the first of each, then the second of each, and so on.

    The router sends sub-forwards in this order so that every replica gets its first one before the
    router spends time encoding the rest.
    """
    longest = max((len(queue) for queue in queues), default=0)
    return [queue[i] for i in range(longest) for queue in queues if i < len(queue)]


def take_replies(frames: Iterable[bytes], waiting: set[int],
                 replies: dict[int, tuple[bytes, ForwardReply] | None]) -> None:
    """Decode each frame from one replica as a forward reply and keep, under its id, each one that is
    awaited (its id leaves `waiting`); a reply to an id no longer awaited (an older request whose wait
    was abandoned) is skipped."""
    for frame in frames:
        reply = _FORWARD_REPLY.decode(frame)
        if reply.id in waiting:
            waiting.discard(reply.id)
            replies[reply.id] = (frame, reply)
