"""Data-parallel replicas: the router in front of one driver subprocess per device (`pool`).

It serves the one socket the host talks to: it routes with context affinity, splits a forward by replica
and joins the results in order. A well-formed forward takes one pass (`splice`): the host's requests go
to their replicas as they came and the results come back as the replicas encoded them. Anything else
takes the general way: validated here, and a replica's share cut into sub-forwards within that
replica's caps (`batches`). Contexts of a replica that dies fail with REPLICA_LOST until replayed from
position 0, while the other replicas keep serving. `stats` counts what the host sent and received;
`health` follows each replica's process and whether its engine is fenced off (`engine_state`).
"""

from __future__ import annotations

import contextlib
import operator
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec

from pie_driver_trtllm.client import parse_reply
from pie_driver_trtllm.replicas.batches import (
    ForwardReply,
    Piece,
    SubForward,
    join_parts,
    pieces,
    round_robin,
    router_caps,
    sub_forwards,
)
from pie_driver_trtllm.replicas.engine_state import FencedEngines, ask
from pie_driver_trtllm.replicas.host_counters import HostCounters
from pie_driver_trtllm.replicas.placement import Placement
from pie_driver_trtllm.replicas.pool import STATS_TIMEOUT_S, Replica, ReplicaPool
from pie_driver_trtllm.replicas.replica_calls import ReplicaCalls
from pie_driver_trtllm.replicas.splice import (
    FAILED_MARK,
    Spliced,
    Split,
    decode_spliced,
    encode_share,
    token_bound,
)
from pie_driver_trtllm.replicas.weights import FleetWeights, Outcome, send_to
from pie_driver_trtllm.serving.backend import Pending
from pie_driver_trtllm.wire.codec import (
    Fork,
    Forward,
    ForwardItem,
    FrameRejected,
    Limits,
    LoadWeights,
    Release,
    Request,
    Sleep,
    Truncate,
    Wake,
    decode_frame,
    encode_forward,
)
from pie_driver_trtllm.wire.errors import DriverError, ErrorCode


class ReplicaSet:
    """A Backend over several replica subprocesses."""

    def __init__(self, config_path: str | Path, devices: list[str], private_dir: str) -> None:
        self._routing_state()
        self._pool = ReplicaPool(config_path, devices, private_dir, on_death=self._placement.lose)
        self._lock = self._pool.lock
        self.replicas = self._pool.replicas
        self._calls = ReplicaCalls(self.replicas, self._pool.mark_dead)
        self._fenced = FencedEngines(self.replicas, self._lock, self._calls.call)
        handshake = self.replicas[0].control.call("handshake").result  # type: ignore[union-attr]
        caps = handshake["caps"]  # every replica runs the same config, so replica 0's caps are each one's
        self._replica_caps = (caps["max_forward_requests"], caps["max_forward_tokens"])
        handshake["caps"] = {**router_caps(caps, len(devices)), "replicas": len(devices), "devices": list(devices)}
        self.handshake = handshake
        self._weights.offered(caps)
        self._weights.catch_up(self.replicas, self._calls.call)  # records each replica's first process

    def _routing_state(self) -> None:
        """Where each context lives (`placement`), and the counters of what the host sent and received."""
        self._placement = Placement()
        self._counters = HostCounters()
        self._weights = FleetWeights()
        self._split: tuple[int, list[int], Split] | None = None  # (moves, contexts, grouping) of the last forward

    def close(self) -> None:
        self._pool.close()

    # ------------------------------------------------------------------ Backend

    def begin(self, request: Request) -> Pending:
        """Every state op waits on replicas: all of it runs outside the socket lock."""
        return Pending(run=lambda: self.handle(request), finish=lambda reply: reply, expire=lambda: None)

    def decode_frame(self, frame: bytes | memoryview, limits: Limits) -> Request:
        """A forward the one-pass path can take (`splice`), else the codec's general decode."""
        return decode_spliced(frame, limits) or decode_frame(frame, limits)

    def rehearse(self, frame: bytes | memoryview, limits: Limits, arrived: Callable[[], bool]) -> bool:
        """Between steps: decode the last forward's frame again (the replicas plan their own steps)."""
        with contextlib.suppress(FrameRejected):
            self.decode_frame(frame, limits)
            return True
        return False

    def handle(self, request: Request) -> dict[str, Any]:
        self._pool.close_retired(kind="work")
        self._weights.catch_up(self.replicas, self._calls.call)
        body: Any = request.body
        if isinstance(body, Spliced | Forward):
            count = len(body.requests) if isinstance(body, Spliced) else len(body.items)
            self._counters.add_requests(count)
            refused = self._weights.refusal()
            if refused is not None:
                failures = [_failed(refused)] * count
                self._counters.add_failures(failures)  # type: ignore[arg-type]
                return {"results": failures, "weights_version": self._weights.version}
            if isinstance(body, Spliced):
                results = self._forward_spliced(body)
                results = results if results is not None else self._forward(body.items)
            else:
                results = self._forward(body.items)
            return {"results": results, "weights_version": self._weights.version}
        if isinstance(body, LoadWeights | Sleep | Wake):
            return self._weights.run(request.op, body, self._broadcast)
        if isinstance(body, Fork):
            return self._fork(body)
        if isinstance(body, Truncate):
            replica = self._owner_of(body.context)
            return self._calls.call(replica, "truncate", context=body.context, length=body.length)
        if isinstance(body, Release):
            return {"released": self._release(body.contexts)}
        raise AssertionError(f"op {request.op!r} reached the backend")

    def health(self) -> dict[str, Any]:
        """Each replica as the router knows it; only a replica whose engine is fenced off is asked."""
        self._fenced.refresh()
        with self._lock:
            replicas = [{"device": r.device, "alive": r.alive, "contexts": len(r.contexts),
                         **self._fenced.entry(r), "restarts": r.restarts,
                         "pid": r.process.process.pid if r.process else None} for r in self.replicas]
        weights = self._weights.health()
        ok = all(r["alive"] and r["engine"] == "ok" for r in replicas) and weights["weights"] == "serving"
        return {"status": "ok" if ok else "degraded", **weights, "replicas": replicas}

    def stats(self) -> dict[str, Any]:
        """`requests` and `errors` as the host sent and received them; the rest summed over the replicas."""
        total: dict[str, Any] = {"tokens_in": 0, "tokens_out": 0, "engine_calls": 0, "engine_s": 0.0,
                                 "oom_splits": 0, "engine_timeouts": 0, "lookahead_hits": 0, "contexts": 0,
                                 "evictions": 0}
        self._pool.close_retired(kind="control")
        requests, errors, not_returned = self._counters.snapshot()
        per_replica = []
        for replica in self.replicas:
            entry: dict[str, Any] = {"device": replica.device, "alive": replica.alive}
            client = replica.control
            if replica.alive and client is not None:
                stats = ask(client, "stats", STATS_TIMEOUT_S) or {}
                for key in total:
                    total[key] += stats.get(key, 0)
                entry.update(stats)
            per_replica.append(entry)
        total["tokens_out"] = max(0, total["tokens_out"] - not_returned)
        return {"requests": requests, **total, "errors": errors, "replicas": per_replica}

    def count_error(self, code: str) -> None:
        self._counters.add_error(code)

    # ------------------------------------------------------------------ weights and sleep, on every replica

    def _broadcast(self, op: str, **fields: Any) -> list[Outcome]:
        """`op` sent to every replica at once; each one's reply (None: down, or died meanwhile)."""
        sent = [(replica, send_to(replica, self._pool.mark_dead, op, fields)) for replica in self.replicas]
        replies = self._calls.gather([(r.index, i) for r, i in sent if i is not None])
        return [Outcome(r.index, r.device, None if i is None or replies.get(i) is None
                        else parse_reply(replies[i][0])) for r, i in sent]  # type: ignore[index]

    # ------------------------------------------------------------------ the one-pass path

    def _forward_spliced(self, body: Spliced) -> list[dict[str, Any] | msgspec.Raw] | None:
        """Each replica's share as one sub-forward of the host's requests, re-packed as they came, and
        the results spliced back in request order. None when the general path must take the forward:
        a context to replay (or none alive to place it on), or a share over its replica's caps."""
        requests = body.requests
        contexts = list(map(_CONTEXT, requests))
        with self._lock:
            # A decode step usually names the contexts of the last one, in its order: while no context
            # moved since, the last grouping holds.
            placement = self._placement
            if self._split is None or self._split[0] != placement.moves or self._split[1] != contexts:
                if placement.lost and not placement.lost.isdisjoint(contexts):
                    return None
                places = list(map(placement.owner.get, contexts))  # the placement table: a lookup per request
                if None in places:
                    try:
                        places = [placement.place(request, self.replicas).index if place is None else place
                                  for place, request in zip(places, requests, strict=True)]
                    except DriverError:
                        return None
                self._split = (placement.moves, contexts, Split.of(places, len(self.replicas)))
            split = self._split[2]
        shares = split.shares(requests)
        max_requests, max_tokens = self._replica_caps
        if (len(requests) > max_requests or body.tokens > max_tokens) and any(
                len(share) > max_requests or token_bound(share) > max_tokens for share in shares):
            return None
        sent = [(index, self._calls.send_frame(index, lambda request_id, share=share: encode_share(request_id, share)))
                for index, share in enumerate(shares) if share]
        replies = self._calls.gather([(index, request_id) for index, request_id in sent if request_id is not None])
        joined: list[Any] = []  # every share's results, one share after the other
        for index, request_id in sent:
            received = None if request_id is None else replies.get(request_id)
            if received is None or received[1].results is None:
                failure = self._lost_result(index, request_id) if received is None else \
                    {"ok": False, "error": received[1].error}
                failures = [failure] * len(shares[index])
                self._counters.add_failures(failures)
                joined += failures
            elif FAILED_MARK in received[0]:
                self._fenced.answered(index, received[0])
                slots = split.slots(index)
                results = [_renumbered(result, j, slot)
                           for j, (slot, result) in enumerate(zip(slots, received[1].results, strict=True))]
                self._counters.add_failures(results)
                joined += results
            else:
                if len(received[1].results) != len(shares[index]):
                    raise RuntimeError(f"replica {index} answered {len(received[1].results)} results for "
                                       f"{len(shares[index])} requests")
                joined += received[1].results
        return split.in_request_order(joined)

    # ------------------------------------------------------------------ routing

    def _forward(self, items: list[ForwardItem | DriverError]) -> list[dict[str, Any] | msgspec.Raw]:
        """Place every request, send each replica its share in sub-forwards within its caps (all of them
        before waiting for any), then join the replies in request order."""
        results: list[dict[str, Any] | msgspec.Raw | None] = [None] * len(items)
        failed: list[int] = []  # the requests whose result may be a failure, to count in `stats.errors`
        shares: dict[int, list[Piece]] = {}
        for index, item in enumerate(items):
            if isinstance(item, DriverError):
                results[index] = _failed(item)
                failed.append(index)
                continue
            try:
                share = shares.setdefault(self._place(item).index, [])
            except DriverError as exc:
                results[index] = _failed(exc)
                failed.append(index)
                continue
            share += pieces(index, item, self._replica_caps[1])
        subs = round_robin([[SubForward(replica, cut) for cut in sub_forwards(share, *self._replica_caps)]
                            for replica, share in shares.items()])
        for sub in subs:
            self._send(sub)
        replies = self._calls.gather([(sub.replica, sub.request_id) for sub in subs if sub.request_id is not None])
        parts: dict[int, list[tuple[Piece, Any]]] = {}
        for sub in subs:
            received = None if sub.request_id is None else replies.get(sub.request_id)
            clean = received is not None and received[1].results is not None and FAILED_MARK not in received[0]
            if received is not None and not clean:
                self._fenced.answered(sub.replica, received[0])
            for piece, result in zip(sub.pieces, self._outcome(sub, replies), strict=True):
                if piece.samplers is None:
                    results[piece.request] = result
                    if not clean:
                        failed.append(piece.request)
                else:
                    decoded = msgspec.msgpack.decode(result) if isinstance(result, msgspec.Raw) else result
                    parts.setdefault(piece.request, []).append((piece, decoded))
        for index, received in parts.items():
            results[index] = joined = join_parts(items[index], received)  # type: ignore[arg-type]
            if not joined.get("ok"):
                failed.append(index)
                self._counters.add_outputs_not_returned(sum(len(r["outputs"]) for _, r in received if r.get("ok")))
        self._counters.add_failures([results[index] for index in failed])  # type: ignore[misc]
        return results  # type: ignore[return-value]

    def _send(self, sub: SubForward) -> None:
        """Queue one sub-forward on its replica's socket; a replica already down leaves it unsent."""
        sub.request_id = self._calls.send_frame(
            sub.replica, lambda request_id: encode_forward(request_id, [piece.item for piece in sub.pieces]))

    def _lost_result(self, index: int, request_id: int | None) -> dict[str, Any]:
        device = self.replicas[index].device
        what = "is not reachable" if request_id is None else "died"
        return _failed(DriverError(ErrorCode.REPLICA_LOST, f"replica {index} ({device}) {what}; "
                                   "replay the context from position 0"))

    def _outcome(self, sub: SubForward, replies: dict[int, tuple[bytes, ForwardReply] | None]
                 ) -> list[dict[str, Any] | msgspec.Raw]:
        """The result of each piece of one sub-forward, as its replica encoded it or as a failure."""
        received = None if sub.request_id is None else replies.get(sub.request_id)
        if received is None:
            return [self._lost_result(sub.replica, sub.request_id)] * len(sub.pieces)
        if received[1].results is None:  # the replica refused this sub-forward whole
            return [{"ok": False, "error": received[1].error}] * len(sub.pieces)
        return list(received[1].results)  # each result passes through as the replica encoded it

    def _place(self, item: ForwardItem) -> Replica:
        with self._lock:
            return self._placement.place(item, self.replicas)

    def _owner_of(self, context: int) -> Replica:
        with self._lock:
            return self._placement.owner_of(context, self.replicas)

    def _fork(self, body: Fork) -> dict[str, Any]:
        source = self._owner_of(body.src)
        # The source's replica checks the fork first, so a refused fork leaves dst where it was, intact.
        reply = self._calls.call(source, "fork", src=body.src, dst=body.dst, length=body.length)
        target = self._placement.owner.get(body.dst)
        if target is not None and target != source.index:  # dst moved to src's replica: drop the old copy
            self._forget(body.dst)
            with contextlib.suppress(DriverError):  # a replica that is down holds nothing any more
                self._calls.call(self.replicas[target], "release", contexts=[body.dst])
        with self._lock:
            self._placement.assign(body.dst, source)
        return reply

    def _release(self, contexts: tuple[int, ...]) -> int:
        with self._lock:
            groups = self._placement.by_owner(contexts)
        released = 0
        for index, group in groups.items():
            released += self._calls.call(self.replicas[index], "release", contexts=group)["released"]
            for context in group:
                self._forget(context)
        return released

    def _forget(self, context: int) -> None:
        with self._lock:
            self._placement.forget(context, self.replicas)

_CONTEXT = operator.attrgetter("context")


def _failed(error: DriverError) -> dict[str, Any]:
    return {"ok": False, "error": error.to_wire()}


def _renumbered(result: msgspec.Raw, share_index: int, index: int) -> dict[str, Any] | msgspec.Raw:
    """A replica's result, its validation failure (if it is one) naming the request by its index in
    the host's forward instead of in the replica's share."""
    if FAILED_MARK not in bytes(result):
        return result
    decoded = msgspec.msgpack.decode(result)
    prefix = f"requests[{share_index}]: "
    if not decoded.get("ok") and decoded["error"].get("message", "").startswith(prefix):
        decoded["error"]["message"] = f"requests[{index}]: " + decoded["error"]["message"][len(prefix):]
    return decoded

