"""The serving loop: the ROUTER socket (and the stream socket beside it, when on), owned by whichever thread
holds the socket lock.

The owner decodes, plans, runs and answers each request itself, so a forward crosses no thread on its
way. Only while it makes an engine call does it let the lock go: if the call takes longer than
`TAKEOVER_S`, a standby thread takes the socket, answers `handshake`, `health` and `stats`, queues state
ops (they run in arrival order) and, at the engine's deadline, answers the forward with errors and stays
the owner; the late call's thread is then abandoned. A finished call takes the socket back through a
pipe polled next to it.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Callable
from typing import Any

import zmq

from pie_driver_trtllm.serving import endpoint as endpoints
from pie_driver_trtllm.serving.backend import Backend, Pending
from pie_driver_trtllm.serving.backlog import Backlog
from pie_driver_trtllm.serving.endpoint import CurveKeys, Endpoint
from pie_driver_trtllm.serving.engine_guard import Abandoned
from pie_driver_trtllm.serving.listener import Delimited, Listener, read_message
from pie_driver_trtllm.serving.stage_clock import StageClock
from pie_driver_trtllm.serving.stream_listener import StreamListener, StreamPeer
from pie_driver_trtllm.serving.unread_replies import TRACKED_BYTES, UnreadReplies
from pie_driver_trtllm.serving.wakeup import Wakeup
from pie_driver_trtllm.wire.codec import ForwardTokens, FrameRejected, Limits, Request, encode_error, encode_ok
from pie_driver_trtllm.wire.errors import DriverError, ErrorCode

TAKEOVER_S = 0.01  # an engine call longer than this gets the socket served by the standby thread


class _Run:
    """An op whose slow part runs on its thread without the socket lock."""

    __slots__ = ("done", "identity", "pending", "request", "started")

    def __init__(self, identity: bytes, request: Request, pending: Pending) -> None:
        self.identity, self.request, self.pending = identity, request, pending
        self.started = time.monotonic()
        self.done = False


class DriverServer:
    def __init__(self, endpoint: Endpoint, limits: Limits, backend: Backend,
                 handshake: dict[str, Any], parent_pid: int | None = None, curve: CurveKeys | None = None,
                 busy_poll_s: float = 0.0, max_queued: int = 256, max_queued_bytes: int = 64 << 20,
                 max_connections: int = 64, max_unread_reply_bytes: int = 64 << 20,
                 stage_times: bool = False, stream_socket: bool = False, rehearse: bool = False) -> None:
        self.endpoint = endpoint
        self.limits = limits
        self.backend = backend
        self.handshake = handshake
        self.parent_pid = parent_pid
        self.started = time.monotonic()
        self.stop_requested = threading.Event()
        self.dropped_replies = 0
        self.busy_poll_s = busy_poll_s
        self._spin_until = 0.0  # busy-poll the socket until then: the host's next request is likely near
        self.stages = StageClock() if stage_times else None
        self.rehearse = rehearse  # between decode steps, run the last one's driver side again (`_wait`)
        self._forward_frame: bytes | memoryview | None = None  # the frame of the forward being served
        self._rehearsal: bytes | memoryview | None = None  # the frame to rehearse before the next one comes
        self.rehearsals = 0
        self._lock = threading.Lock()  # its holder owns the ROUTER socket and the driver state
        self._run: _Run | None = None
        self._backlog = Backlog(max_queued, max_queued_bytes)  # state ops waiting behind the run
        self._unread = UnreadReplies(max_unread_reply_bytes)
        self._closed = threading.Event()
        self._listener = Listener(zmq.Context.instance(), endpoint, limits.max_frame_bytes, curve, max_connections)
        self._router, self._connections = self._listener.router, self._listener.connections
        self._wakeup = Wakeup()
        self._poller = zmq.Poller()
        self._poller.register(self._router, zmq.POLLIN)
        self._poller.register(self._wakeup.fd, zmq.POLLIN)
        self._poller.register(self._connections.socket, zmq.POLLIN)
        self._stream: StreamListener | None = None
        if stream_socket:
            try:
                stream = StreamListener(endpoint.private_dir, limits.max_frame_bytes, max_unread_reply_bytes,
                                        self._poller, self._answering)
            except BaseException:
                self._listener.close(linger=0)
                raise
            self._stream = stream
            self._connections.elsewhere = lambda: stream.connections

    @property
    def stream_url(self) -> str | None:
        """`unix://PATH` of the stream socket, when it is on."""
        return self._stream.url if self._stream is not None else None

    # ------------------------------------------------------------------ socket ownership

    def serve(self) -> None:
        """Serve until shutdown (op, signal or parent death) and clean up. The socket is served by other
        threads: the calling (main) thread only waits, so that signals reach it during an engine call."""
        threading.Thread(target=self._primary, name="driver-socket", daemon=True).start()
        self._start_standby()
        while not self._closed.wait(0.1):
            pass

    def _primary(self) -> None:
        self._lock.acquire()
        try:
            self._serve_socket()
        except Abandoned:
            return  # the lock went with the engine call; the standby owns the socket now
        self._lock.release()

    def _start_standby(self) -> None:
        threading.Thread(target=self._standby, name="driver-standby", daemon=True).start()

    def _standby(self) -> None:
        while not self._closed.wait(TAKEOVER_S):
            run = self._run
            if run is None or run.done or time.monotonic() - run.started < TAKEOVER_S:
                continue
            self._lock.acquire()
            try:
                if self._run is run and not run.done:
                    self._serve_socket()
            except Abandoned:
                return
            self._lock.release()

    def _serve_socket(self) -> None:
        """With the lock held: serve until shutdown, or until another thread's run is done (that thread
        takes the socket back)."""
        while True:
            run = self._run
            if run is not None:
                if run.done:
                    return
                if run.pending.deadline is not None and time.monotonic() >= run.pending.deadline:
                    self._expire(run)
                    continue
            elif self._backlog:
                self._start(*self._backlog.pop())
                continue
            elif self.stop_requested.is_set():
                self._answer_what_arrived()
                self._shutdown()
                return
            events = self._wait()
            if self._wakeup.fd in events:
                self._wakeup.clear()
            if self._connections.socket in events:
                self._connections.drain()
            if self._router in events:
                self._receive_frames()
            if self._stream is not None:
                self._serve_stream(events)
            if self.parent_pid is not None and os.getppid() != self.parent_pid:
                self.stop_requested.set()

    def _wait(self) -> dict[Any, int]:
        if self._stream is not None and self._stream.waiting:  # read, not served yet: no sleep
            return dict(self._poller.poll(0))
        if self._rehearsal is not None:
            frame, self._rehearsal = self._rehearsal, None
            events = self._poller.poll(0)
            if events:  # the next request is here already: serve it instead
                return dict(events)
            self._rehearse(frame)
        # A reply usually brings the host's next request within tens of microseconds: polling without
        # blocking until then saves the thread's sleep and wake-up (100-300 us on virtual machines).
        while time.perf_counter() < self._spin_until:
            events = self._poller.poll(0)
            if events:
                return dict(events)
        if self.stages is not None:
            self.stages.slept = True
        return dict(self._poller.poll(self._poll_timeout_ms()))

    def _poll_timeout_ms(self) -> int:
        deadline = self._run.pending.deadline if self._run is not None else None
        if deadline is None:
            return 50
        return max(1, min(50, int((deadline - time.monotonic()) * 1000) + 1))

    def _answer_what_arrived(self) -> None:
        """At shutdown: every message read or waiting gets its SHUTTING_DOWN, within a second (a flood
        cannot hold the exit)."""
        until = time.monotonic() + 1.0
        while time.monotonic() < until:
            more = self._receive_frames()
            if self._stream is not None:
                self._serve_stream(dict(self._poller.poll(0)))
                more = more or self._stream.waiting
            if not more:
                return

    def _receive_frames(self) -> bool:
        """Serve what the ROUTER holds, up to a bound; True when it stopped at the bound."""
        for _ in range(256):  # bounded, so replies keep flowing under a flood
            try:
                identity, frame, count = read_message(self._router)
            except zmq.Again:
                return False
            if count == 1:
                self._take(identity, frame.buffer)
                continue
            if self.stages is not None:
                self.stages.frame()
            self._reject(identity, None, DriverError(ErrorCode.BAD_FRAME,
                                                     f"expected one frame per message, got {count}"))
        return True

    def _serve_stream(self, events: dict[Any, int]) -> None:
        assert self._stream is not None
        self._stream.serve(events, self._connections.has_room, self._take, self._refuse)

    def _refuse(self, identity: bytes, error: DriverError) -> None:
        """A message that cannot be read as one (its id unknown)."""
        self._reject(identity, None, error)

    def _take(self, identity: bytes, frame: bytes | memoryview) -> None:
        """Serve one message from either socket."""
        if self.stages is not None:
            self.stages.frame()
        try:
            self._on_frame(identity, frame)
        except Exception as exc:  # last line of defence: a frame must never stop the socket loop
            self._reject(identity, None, DriverError(ErrorCode.BAD_FRAME, f"{type(exc).__name__}: {exc}"))

    def _on_frame(self, identity: bytes, frame: bytes | memoryview) -> None:
        try:
            request = self.backend.decode_frame(frame, self.limits)
        except FrameRejected as rejected:
            self._reject(identity, rejected.request_id, rejected.error)
            return
        if self.stages is not None:
            self.stages.mark("decode")
        if self.stop_requested.is_set():
            self._reject(identity, request.id, DriverError(ErrorCode.SHUTTING_DOWN, "the driver is shutting down"))
        elif request.op == "handshake":
            self._send(identity, encode_ok(request.id, self.handshake))
        elif request.op == "health":
            self._send(identity, encode_ok(request.id, self.health()))
        elif request.op == "stats":
            cap, stream = self._connections, self._stream
            stats = {**self.backend.stats(), "dropped_replies": self.dropped_replies, "rehearsals": self.rehearsals,
                     "connections": cap.connections + cap.elsewhere(),
                     "refused_connections": cap.refused + (stream.refused if stream else 0)}
            if self.stages is not None:
                stats["stages"] = self.stages.report()
            self._send(identity, encode_ok(request.id, stats))
        elif request.op == "shutdown":
            self._send(identity, encode_ok(request.id, {}))
            self.stop_requested.set()
        elif self._run is None and not self._backlog:
            if self.rehearse and request.op == "forward":
                self._forward_frame = frame
            self._start(identity, request)
        elif not self._backlog.push(identity, request, len(frame)):
            self._reject(identity, request.id, DriverError(
                ErrorCode.CAPACITY, f"the driver is busy: {len(self._backlog)} state ops ({self._backlog.bytes} "
                "bytes of frames) wait; send it again after a reply", busy=True))

    def _answering(self, identity: bytes) -> bool:
        """Whether an op of this connection runs or waits to run."""
        run = self._run
        return (run is not None and run.identity == identity) or self._backlog.holds(identity)

    @property
    def inflight(self) -> int:
        """Forwards started or waiting."""
        run = self._run
        return self._backlog.forwards() + (run is not None and run.request.op == "forward")

    def health(self) -> dict[str, Any]:
        health = self.backend.health()
        for replica in health["replicas"]:
            replica.setdefault("inflight", self.inflight)
        health["uptime_s"] = round(time.monotonic() - self.started, 3)
        return health

    def _reject(self, identity: bytes, request_id: int | None, error: DriverError) -> None:
        self.backend.count_error(error.code)
        self._send(identity, encode_error(request_id, error))

    def _send(self, identity: bytes, payload: bytes, forward: bool = False) -> None:
        self._spin_until = time.perf_counter() + self.busy_poll_s
        if type(identity) is StreamPeer:
            assert self._stream is not None
            if not self._stream.send(identity, payload):
                self.dropped_replies += 1
            if self.stages is not None:
                self.stages.sent(forward)
            return
        frames = [identity, b"", payload] if type(identity) is Delimited else [identity, payload]
        tracked = len(payload) >= TRACKED_BYTES  # counted against the connection until ZeroMQ lets go of it
        try:
            tracker = self._router.send_multipart(frames, zmq.NOBLOCK, copy=False, track=tracked)
        except zmq.ZMQError:  # host gone (ROUTER_MANDATORY) or its queue is full: drop, never block
            self.dropped_replies += 1
            tracker, tracked = None, False
        if tracked:
            self._unread.sent(identity, tracker, len(payload))
        if self.stages is not None:
            self.stages.sent(forward)

    # ------------------------------------------------------------------ state ops

    def _start(self, identity: bytes, request: Request) -> None:
        if self.stop_requested.is_set():
            self._reject(identity, request.id, DriverError(
                ErrorCode.SHUTTING_DOWN, "the driver is shutting down; not started"))
        else:
            self._reply(identity, request, lambda: self.backend.begin(request))

    def _reply(self, identity: bytes, request: Request,
               step: Callable[[], dict[str, Any] | ForwardTokens | Pending | None], stage: str = "plan") -> bool:
        """Send the reply that `step` gives, running its slow part first if it has one. False when `step`
        had no reply (an expiry that found the engine call just returned)."""
        try:
            outcome = step()
            if outcome is None:
                return False
            if self.stages is not None:
                self.stages.mark(stage)
            if isinstance(outcome, Pending):
                self._execute(_Run(identity, request, outcome))
                return True
            payload = encode_ok(request.id, outcome)
            if self.stages is not None:
                self.stages.mark("encode")
            unread = self._stream if type(identity) is StreamPeer else self._unread
            assert unread is not None
            if not unread.admits(identity, len(payload)):
                raise DriverError(ErrorCode.CAPACITY, f"{unread.unread(identity)} bytes of replies to this "
                                  "connection are unread; read them, then send it again", busy=True)
        except DriverError as exc:
            self.backend.count_error(exc.code)
            payload = encode_error(request.id, exc)
        except Exception as exc:  # a bug or an engine failure: fail this request, keep serving
            self.backend.count_error(ErrorCode.ENGINE_ERROR)
            payload = encode_error(request.id, DriverError(ErrorCode.ENGINE_ERROR, f"{type(exc).__name__}: {exc}"))
        self._send(identity, payload, request.op == "forward")
        if self._forward_frame is not None:
            self._rehearsal, self._forward_frame = self._forward_frame, None
        return True

    def _rehearse(self, frame: bytes | memoryview) -> None:
        """The last forward's driver side once more, changing nothing (`LocalBackend.rehearse`): the engine
        call between two steps evicts the driver's code and data from the CPU's caches, and a step that
        finds them cold pays several times its warm cost. An optimisation only: it never fails a request."""
        with contextlib.suppress(Exception):  # whatever went wrong, the next request is served as ever
            self.rehearsals += self.backend.rehearse(frame, self.limits, lambda: bool(self._poller.poll(0)))

    def _execute(self, run: _Run) -> None:
        """Run the slow part without the lock, take the socket back, answer. Abandoned propagates
        without the lock: the standby answered this op at its deadline and owns the socket."""
        self._run = run
        self._lock.release()
        try:
            result = run.pending.run()
            error: Exception | None = None
            if self.stages is not None:
                self.stages.mark("engine")
        except Exception as exc:  # Abandoned is a BaseException: it passes, and leaves the lock alone
            result, error = None, exc
        run.done = True
        if not self._lock.acquire(blocking=False):
            self._wakeup.set()  # the standby holds the socket: have it hand the socket back
            self._lock.acquire()
        self._run = None
        if error is not None:
            self._reply(run.identity, run.request, lambda: _raise(error), "finish")
        else:
            self._reply(run.identity, run.request, lambda: run.pending.finish(result), "finish")

    def _expire(self, run: _Run) -> None:
        """The run's deadline passed (we are the standby): answer it now and stay the socket's owner."""
        self._run = None
        if self.stages is not None:
            self.stages.drop()
        if not self._reply(run.identity, run.request, run.pending.expire):
            self._run = run  # its call returned just now; its own thread answers
            return
        self._start_standby()  # for this thread's own engine calls from now on

    def _shutdown(self) -> None:
        if self._stream is not None:
            self._stream.close(linger_s=1.0)  # as the ROUTER's linger
        self._listener.close()
        self._wakeup.close()
        endpoints.release(self.endpoint)
        self._closed.set()


def _raise(error: Exception) -> Any:
    raise error
