"""Data-parallel replicas: one driver subprocess per device behind the one socket the host talks to.

Each replica is this same driver started with `--replica N` on its own device and a private ipc socket;
the parent routes with context affinity, splits a forward by replica (and a replica's share into
sub-forwards within that replica's caps, see `replica_batches`) and joins the results in order.
A monitor thread notices a dead replica within a poll interval, fails its contexts with REPLICA_LOST
and restarts it with backoff while the other replicas keep serving.
"""

from __future__ import annotations

import itertools
import os
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec
import zmq

from .backend import Pending
from .client import DriverClient, DriverFailed, DriverProcess, parse_reply, spawn
from .errors import DriverError, ErrorCode, StartupError
from .protocol import Fork, Forward, ForwardItem, Release, Request, Truncate, encode_forward
from .replica_batches import (
    ForwardReply,
    Piece,
    SubForward,
    join_parts,
    pieces,
    round_robin,
    router_caps,
    sub_forwards,
    take_replies,
)

MONITOR_INTERVAL_S = 0.1
BACKOFF_S = (1.0, 2.0, 4.0, 8.0, 16.0, 30.0)
STATS_TIMEOUT_S = 0.5


@dataclass
class Replica:
    index: int
    device: str
    process: DriverProcess | None = None
    work: DriverClient | None = None       # used by whichever thread runs state ops (one at a time)
    control: DriverClient | None = None    # used under the socket lock only
    alive: bool = False
    restarting: bool = False
    restarts: int = 0
    failures: int = 0
    next_start: float = 0.0
    contexts: set[int] = field(default_factory=set)
    # A socket belongs to one thread: a dead replica's clients wait here for their owner to close them.
    retired_work: list[DriverClient] = field(default_factory=list)
    retired_control: list[DriverClient] = field(default_factory=list)


class ReplicaSet:
    """A Backend over several replica subprocesses."""

    def __init__(self, config_path: str | Path, devices: list[str], private_dir: str) -> None:
        self.config_path = str(Path(config_path).resolve())
        self.private_dir = private_dir
        self.replicas = [Replica(i, d) for i, d in enumerate(devices)]
        self._owner: dict[int, int] = {}
        self._lost: set[int] = set()
        self._lock = threading.RLock()
        self._ids = itertools.count(1)
        self._errors: Counter[str] = Counter()
        self._stop = threading.Event()
        self._cpus = cpu_partition(len(devices))
        starters = [threading.Thread(target=self._start, args=(r,)) for r in self.replicas]
        for thread in starters:
            thread.start()
        for thread in starters:
            thread.join()
        dead = [r for r in self.replicas if not r.alive]
        if dead:
            self.close()
            raise StartupError(f"replica {dead[0].index} on {dead[0].device} did not start; see its error above")
        handshake = self.replicas[0].control.call("handshake").result  # type: ignore[union-attr]
        caps = handshake["caps"]  # every replica runs the same config, so replica 0's caps are each one's
        self._replica_caps = (caps["max_forward_requests"], caps["max_forward_tokens"])
        handshake["caps"] = {**router_caps(caps, len(devices)), "replicas": len(devices), "devices": list(devices)}
        self.handshake = handshake
        self._monitor = threading.Thread(target=self._watch, name="replica-monitor", daemon=True)
        self._monitor.start()

    # ------------------------------------------------------------------ lifecycle

    def _start(self, replica: Replica) -> None:
        env = {}
        if replica.device.startswith("cuda:"):
            env["CUDA_VISIBLE_DEVICES"] = replica.device.split(":", 1)[1]  # before any CUDA import there
        cpus = self._cpus[replica.index]
        if cpus and "OMP_NUM_THREADS" not in os.environ:
            env["OMP_NUM_THREADS"] = str(len(cpus))
        endpoint = f"ipc://{self.private_dir}/r{replica.index}.sock"
        try:
            process = spawn(self.config_path, endpoint=endpoint, env=env, stderr_path="/dev/stderr",
                            extra_args=["--replica", str(replica.index)], cpus=cpus)
        except (DriverFailed, OSError) as exc:
            with self._lock:
                replica.failures += 1
                replica.next_start = time.monotonic() + BACKOFF_S[min(replica.failures, len(BACKOFF_S)) - 1]
                replica.restarting = False
            print(f"pie-driver-trtllm: replica {replica.index} ({replica.device}) failed to start: {exc}",
                  file=os.sys.stderr)
            return
        with self._lock:
            replica.process = process
            replica.work = process.client()
            replica.control = process.client(timeout_s=STATS_TIMEOUT_S)
            replica.alive, replica.restarting, replica.failures = True, False, 0

    def _watch(self) -> None:
        while not self._stop.wait(MONITOR_INTERVAL_S):
            for replica in self.replicas:
                if replica.alive and replica.process and replica.process.process.poll() is not None:
                    self._mark_dead(replica)
                with self._lock:
                    due = not replica.alive and not replica.restarting and time.monotonic() >= replica.next_start
                    if due:
                        replica.restarting = True
                        replica.restarts += 1
                if due and not self._stop.is_set():
                    threading.Thread(target=self._start, args=(replica,), daemon=True).start()

    def _mark_dead(self, replica: Replica) -> None:
        with self._lock:
            if not replica.alive:
                return
            replica.alive = False
            replica.failures += 1
            replica.next_start = time.monotonic() + BACKOFF_S[min(replica.failures, len(BACKOFF_S)) - 1]
            for context in replica.contexts:
                self._owner.pop(context, None)
                self._lost.add(context)
            replica.contexts.clear()
            replica.retired_work += [replica.work] if replica.work else []
            replica.retired_control += [replica.control] if replica.control else []
            replica.work = replica.control = None
        print(f"pie-driver-trtllm: replica {replica.index} ({replica.device}) died; restarting",
              file=os.sys.stderr)

    def close(self) -> None:
        self._stop.set()
        for replica in self.replicas:
            if replica.process is not None:
                replica.process.process.terminate()
        for replica in self.replicas:
            if replica.process is not None:
                replica.process.stop(timeout_s=10)
            for client in (replica.work, replica.control, *replica.retired_work, *replica.retired_control):
                if client is not None:
                    client.close()

    def _close_retired(self, kind: str) -> None:
        with self._lock:
            for replica in self.replicas:
                retired = replica.retired_control if kind == "control" else replica.retired_work
                for client in retired:
                    client.close()
                retired.clear()

    # ------------------------------------------------------------------ Backend

    def begin(self, request: Request) -> Pending:
        """Every state op waits on replicas: all of it runs outside the socket lock."""
        return Pending(run=lambda: self.handle(request), finish=lambda reply: reply, expire=lambda: None)

    def handle(self, request: Request) -> dict[str, Any]:
        self._close_retired(kind="work")
        body = request.body
        if isinstance(body, Forward):
            return {"results": self._forward(body.items)}
        if isinstance(body, Fork):
            return self._fork(body)
        if isinstance(body, Truncate):
            replica = self._owner_of(body.context)
            return self._call(replica, "truncate", context=body.context, length=body.length)
        if isinstance(body, Release):
            return {"released": self._release(body.contexts)}
        raise AssertionError(f"op {request.op!r} reached the backend")

    def health(self) -> dict[str, Any]:
        with self._lock:
            replicas = [{"device": r.device, "alive": r.alive, "contexts": len(r.contexts),
                         "restarts": r.restarts, "pid": r.process.process.pid if r.process else None}
                        for r in self.replicas]
        return {"status": "ok" if all(r["alive"] for r in replicas) else "degraded", "replicas": replicas}

    def stats(self) -> dict[str, Any]:
        total: dict[str, Any] = {"requests": 0, "tokens_in": 0, "tokens_out": 0, "engine_calls": 0,
                                 "engine_s": 0.0, "lookahead_hits": 0, "contexts": 0, "evictions": 0}
        self._close_retired(kind="control")
        errors = Counter(self._errors)
        per_replica = []
        for replica in self.replicas:
            entry: dict[str, Any] = {"device": replica.device, "alive": replica.alive}
            client = replica.control
            if replica.alive and client is not None:
                try:
                    stats = client.call("stats").result
                except (TimeoutError, RuntimeError, zmq.ZMQError):
                    stats = {}
                for key in total:
                    total[key] += stats.get(key, 0)
                errors.update(stats.get("errors", {}))
                entry.update(stats)
            per_replica.append(entry)
        return {**total, "errors": dict(errors), "replicas": per_replica}

    def count_error(self, code: str) -> None:
        with self._lock:
            self._errors[str(code)] += 1

    # ------------------------------------------------------------------ routing

    def _forward(self, items: list[ForwardItem | DriverError]) -> list[dict[str, Any] | msgspec.Raw]:
        """Place every request, send each replica its share in sub-forwards within its caps (all of them
        before waiting for any), then join the replies in request order."""
        results: list[dict[str, Any] | msgspec.Raw | None] = [None] * len(items)
        shares: dict[int, list[Piece]] = {}
        for index, item in enumerate(items):
            if isinstance(item, DriverError):
                results[index] = _failed(item)
                continue
            try:
                share = shares.setdefault(self._place(item).index, [])
            except DriverError as exc:
                results[index] = _failed(exc)
                continue
            share += pieces(index, item, self._replica_caps[1])
        subs = round_robin([[SubForward(replica, cut) for cut in sub_forwards(share, *self._replica_caps)]
                            for replica, share in shares.items()])
        for sub in subs:
            self._send(sub)
        replies = self._gather([(sub.replica, sub.request_id) for sub in subs if sub.request_id is not None])
        parts: dict[int, list[tuple[Piece, Any]]] = {}
        for sub in subs:
            for piece, result in zip(sub.pieces, self._outcome(sub, replies), strict=True):
                if piece.samplers is None:
                    results[piece.request] = result
                else:
                    decoded = msgspec.msgpack.decode(result) if isinstance(result, msgspec.Raw) else result
                    parts.setdefault(piece.request, []).append((piece, decoded))
        for index, received in parts.items():
            results[index] = join_parts(items[index], received)  # type: ignore[arg-type]
        return results  # type: ignore[return-value]

    def _send(self, sub: SubForward) -> None:
        """Queue one sub-forward on its replica's socket; a replica already down leaves it unsent."""
        replica = self.replicas[sub.replica]
        request_id = next(self._ids)
        try:
            replica.work.send_raw(encode_forward(request_id, [piece.item for piece in sub.pieces]))  # type: ignore
            sub.request_id = request_id
        except (AttributeError, TimeoutError, zmq.ZMQError):  # AttributeError: no client, marked dead
            self._mark_dead(replica)

    def _outcome(self, sub: SubForward, replies: dict[int, tuple[bytes, ForwardReply] | None]
                 ) -> list[dict[str, Any] | msgspec.Raw]:
        """The result of each piece of one sub-forward, as its replica encoded it or as a failure."""
        device = self.replicas[sub.replica].device
        received = None if sub.request_id is None else replies.get(sub.request_id)
        if received is None:
            what = "is not reachable" if sub.request_id is None else "died"
            lost = _failed(DriverError(ErrorCode.REPLICA_LOST, f"replica {sub.replica} ({device}) {what}; "
                                       "replay the context from position 0"))
            return [lost] * len(sub.pieces)
        if received[1].results is None:  # the replica refused this sub-forward whole
            return [{"ok": False, "error": received[1].error}] * len(sub.pieces)
        return list(received[1].results)  # each result passes through as the replica encoded it

    def _gather(self, sent: list[tuple[int, int]]) -> dict[int, tuple[bytes, ForwardReply] | None]:
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
                    self._mark_dead(replica)
                    replies.update(dict.fromkeys(waiting.pop(index)))
                    continue
                poller.register(replica.work.socket, zmq.POLLIN)
                sockets[replica.work.socket] = index
            for socket, _ in poller.poll(50) if sockets else ():
                take_replies(_queued(socket), waiting[sockets[socket]], replies)
                if not waiting[sockets[socket]]:
                    del waiting[sockets[socket]]
        return replies

    def _place(self, item: ForwardItem) -> Replica:
        with self._lock:
            if item.context in self._lost:
                if not item.positions or item.positions[0] != 0:
                    raise DriverError(ErrorCode.REPLICA_LOST, f"context {item.context} lived on a replica that "
                                      "died; replay it from position 0")
                self._lost.discard(item.context)
            owner = self._owner.get(item.context)
            if owner is not None:
                return self.replicas[owner]
            alive = [r for r in self.replicas if r.alive]
            if not alive:
                raise DriverError(ErrorCode.REPLICA_LOST, "no replica is alive; retry shortly")
            replica = min(alive, key=lambda r: (len(r.contexts), r.index))
            self._owner[item.context] = replica.index
            replica.contexts.add(item.context)
            return replica

    def _owner_of(self, context: int) -> Replica:
        with self._lock:
            if context in self._lost:
                raise DriverError(ErrorCode.REPLICA_LOST, f"context {context} lived on a replica that died")
            owner = self._owner.get(context)
            if owner is None or not self.replicas[owner].alive:
                raise DriverError(ErrorCode.UNKNOWN_CONTEXT, f"context {context} is not known")
            return self.replicas[owner]

    def _fork(self, body: Fork) -> dict[str, Any]:
        source = self._owner_of(body.src)
        target = self._owner.get(body.dst)
        if target is not None and target != source.index:  # dst moves to src's replica, history copied there
            self._call(self.replicas[target], "release", contexts=[body.dst])
            self._forget(body.dst)
        reply = self._call(source, "fork", src=body.src, dst=body.dst, length=body.length)
        with self._lock:
            self._lost.discard(body.dst)
            self._owner[body.dst] = source.index
            source.contexts.add(body.dst)
        return reply

    def _release(self, contexts: tuple[int, ...]) -> int:
        groups: dict[int, list[int]] = {}
        with self._lock:
            for context in contexts:
                self._lost.discard(context)
                owner = self._owner.get(context)
                if owner is not None:
                    groups.setdefault(owner, []).append(context)
        released = 0
        for index, group in groups.items():
            released += self._call(self.replicas[index], "release", contexts=group)["released"]
            for context in group:
                self._forget(context)
        return released

    def _forget(self, context: int) -> None:
        with self._lock:
            owner = self._owner.pop(context, None)
            if owner is not None:
                self.replicas[owner].contexts.discard(context)

    def _call(self, replica: Replica, op: str, **fields: Any) -> dict[str, Any]:
        client = replica.work
        if not replica.alive or client is None:
            raise DriverError(ErrorCode.REPLICA_LOST, f"replica {replica.index} ({replica.device}) is down")
        request_id = client.send(op, **{k: v for k, v in fields.items() if v is not None})
        received = self._gather([(replica.index, request_id)]).get(request_id)
        if received is None:
            raise DriverError(ErrorCode.REPLICA_LOST, f"replica {replica.index} ({replica.device}) died")
        reply = parse_reply(received[0])
        if not reply.ok:
            raise DriverError(ErrorCode(reply.error.code), reply.error.message)  # type: ignore[union-attr]
        return reply.result


def cpu_partition(parts: int) -> list[set[int]]:
    """Split this process's CPUs into `parts` sets of whole physical cores (hyperthread siblings together).

    Replicas spend much of a step in single-threaded Python and kernel launches; two of them on sibling
    hyperthreads slow each other down. An empty set means "do not pin" (too few cores to split).
    """
    allowed = sorted(os.sched_getaffinity(0))
    cores: dict[str, list[int]] = {}
    for cpu in allowed:
        try:
            siblings = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology/thread_siblings_list").read_text().strip()
        except OSError:
            siblings = str(cpu)
        cores.setdefault(siblings, []).append(cpu)
    groups = list(cores.values())
    if len(groups) < parts:
        return [set() for _ in range(parts)]
    per = len(groups) // parts
    return [{cpu for group in groups[i * per:(i + 1) * per] for cpu in group} for i in range(parts)]


def _queued(socket: zmq.Socket) -> Iterator[bytes]:
    """Every frame already waiting on a socket, taken without blocking."""
    while True:
        try:
            yield socket.recv(zmq.NOBLOCK)
        except zmq.Again:
            return


def _failed(error: DriverError) -> dict[str, Any]:
    return {"ok": False, "error": error.to_wire()}

