"""Which replicas have their engine fenced off: a step there overran `engine_step_timeout_s` and has not
returned (`serving.engine_guard`), so the router's `health` is `degraded` as one device's would be.

The router learns of it from the forward reply it is reading anyway: a replica answers the overrunning
step at its deadline with `EngineUnresponsive` results. It then asks that replica's own `health` for how
long the call has run, and from then on `health` asks that replica again until it reports its engine
responsive. A fenced-off replica runs no engine call, so it answers at once; no other replica is asked.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable
from typing import Any

import zmq

from pie_driver_trtllm.client import DriverClient
from pie_driver_trtllm.replicas.pool import Replica
from pie_driver_trtllm.wire.errors import DriverError

# In a replica's failed result whose engine call overran its deadline, or was not started behind one.
FENCED_MARK = b"EngineUnresponsive"
HEALTH_TIMEOUT_S = 0.2  # a fenced-off replica answers at once; past this, it stays marked as it was


class FencedEngines:
    """The router's view of each replica's engine; `lock` guards the marks on the `Replica`s."""

    def __init__(self, replicas: list[Replica], lock: threading.RLock,
                 call: Callable[..., dict[str, Any]]) -> None:
        self.replicas = replicas
        self.lock = lock
        self._call = call  # an op on a replica's work socket (`ReplicaCalls.call`)

    def answered(self, index: int, frame: bytes) -> None:
        """On the thread running forwards, after replica `index` sent a reply with a failed result: mark
        its engine fenced off when the reply says so. Asked on the work socket, idle once a forward's
        replies are in: the control socket belongs to the thread holding the server's socket lock."""
        replica = self.replicas[index]
        if FENCED_MARK not in frame:
            return
        with self.lock:
            replica.fenced_notes += 1  # a mark newer than a question `refresh` has out
            notes = replica.fenced_notes
            if replica.stuck_since is not None:
                return
        with contextlib.suppress(DriverError):  # a replica lost meanwhile holds no engine to report
            self._learn(replica, notes, self._call(replica, "health"))

    def refresh(self) -> None:
        """Under the server's socket lock: ask each replica marked fenced off whether it still is."""
        for replica in self.replicas:
            with self.lock:
                client, notes = replica.control, replica.fenced_notes
                marked = replica.alive and replica.stuck_since is not None
            if marked and client is not None:
                health = ask(client, "health", HEALTH_TIMEOUT_S)
                if health is not None:
                    self._learn(replica, notes, health)

    def entry(self, replica: Replica) -> dict[str, Any]:
        """The `engine` and `stuck_s` fields of a replica's `health` entry, as one device reports them."""
        since = replica.stuck_since
        if since is None:
            return {"engine": "ok"}
        return {"engine": "stuck", "stuck_s": round(time.monotonic() - since, 3)}

    def _learn(self, replica: Replica, notes: int, health: dict[str, Any]) -> None:
        """Take a replica's own `health`, unless a newer fenced-off reply came in since it was asked."""
        engine = health["replicas"][0]
        with self.lock:
            if engine.get("engine") == "stuck":
                replica.stuck_since = time.monotonic() - engine["stuck_s"]
            elif replica.fenced_notes == notes:
                replica.stuck_since = None


def ask(client: DriverClient, op: str, timeout_s: float) -> dict[str, Any] | None:
    """`op`'s result from a replica's control socket, or None without one within `timeout_s`. A reply
    to an earlier question given up on is skipped, so a slow answer does not put the socket out of step."""
    until = time.monotonic() + timeout_s
    try:
        request_id = client.send(op)
        while (left := until - time.monotonic()) > 0:
            reply = client.recv(left)
            if reply.id == request_id:
                return reply.result if reply.ok else None
    except (TimeoutError, zmq.ZMQError):
        pass
    return None
