"""Frames to the replicas' work sockets and their replies, matched by request id.

A replica found down when a frame is sent, or dead while a reply is still owed, is marked dead; what it
owed comes back as None, for the caller to answer REPLICA_LOST.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from typing import Any

import zmq

from pie_driver_trtllm.client import parse_reply
from pie_driver_trtllm.replicas.batches import ForwardReply, take_replies
from pie_driver_trtllm.replicas.pool import Replica
from pie_driver_trtllm.wire.errors import DriverError, ErrorCode


class ReplicaCalls:
    def __init__(self, replicas: list[Replica], mark_dead: Callable[[Replica], None]) -> None:
        self.replicas = replicas
        self.mark_dead = mark_dead
        self.ids = itertools.count(1)

    def send_frame(self, index: int, encode: Callable[[int], bytes]) -> int | None:
        """Queue the frame `encode` makes for a fresh request id on a replica's socket: that id, or None
        when the replica is down (it is marked dead)."""
        replica = self.replicas[index]
        request_id = next(self.ids)
        try:
            replica.work.send_raw(encode(request_id))  # type: ignore[union-attr]
        except (AttributeError, TimeoutError, zmq.ZMQError):  # AttributeError: no client, marked dead
            self.mark_dead(replica)
            return None
        return request_id

    def gather(self, sent: list[tuple[int, int]]) -> dict[int, tuple[bytes, ForwardReply] | None]:
        """Wait for the reply to every (replica index, request id) sent, keyed by id (its frame, decoded
        as a forward reply); each id still waiting on a replica that dies yields None."""
        waiting: dict[int, set[int]] = {}
        for index, request_id in sent:
            waiting.setdefault(index, set()).add(request_id)
        replies: dict[int, tuple[bytes, ForwardReply] | None] = {}
        while waiting:
            poller = zmq.Poller()
            sockets = {}
            for index in list(waiting):
                replica = self.replicas[index]
                if not replica.alive or replica.work is None or replica.process.process.poll() is not None:  # type: ignore
                    self.mark_dead(replica)
                    replies.update(dict.fromkeys(waiting.pop(index)))
                    continue
                poller.register(replica.work.socket, zmq.POLLIN)
                sockets[replica.work.socket] = index
            for socket, _ in poller.poll(50) if sockets else ():
                take_replies(_queued(socket), waiting[sockets[socket]], replies)
                if not waiting[sockets[socket]]:
                    del waiting[sockets[socket]]
        return replies

    def call(self, replica: Replica, op: str, **fields: Any) -> dict[str, Any]:
        """One op on one replica and its result; DriverError for its error, or REPLICA_LOST."""
        client = replica.work
        if not replica.alive or client is None:
            raise DriverError(ErrorCode.REPLICA_LOST, f"replica {replica.index} ({replica.device}) is down")
        request_id = client.send(op, **{k: v for k, v in fields.items() if v is not None})
        received = self.gather([(replica.index, request_id)]).get(request_id)
        if received is None:
            raise DriverError(ErrorCode.REPLICA_LOST, f"replica {replica.index} ({replica.device}) died")
        reply = parse_reply(received[0])
        if not reply.ok:
            raise DriverError(ErrorCode(reply.error.code), reply.error.message)  # type: ignore[union-attr]
        return reply.result


def _queued(socket: zmq.Socket) -> Iterator[bytes]:
    """Every frame already waiting on a socket, taken without blocking."""
    while True:
        try:
            yield socket.recv(zmq.NOBLOCK)
        except zmq.Again:
            return
