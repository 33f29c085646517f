"""ZeroMQ transport: one ROUTER socket, control ops answered inline, state ops run on a worker thread.

The socket loop never waits on the engine: `handshake`, `health` and `stats` are answered from this
thread while a forward runs on the worker. Replies from the worker come back through an inproc pipe
so that only this thread touches the ROUTER socket.
"""

from __future__ import annotations

import os
import queue
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlparse

import zmq

from .errors import DriverError, ErrorCode, StartupError
from .protocol import FrameRejected, Limits, Request, decode_frame, encode_error, encode_ok

IPC_PATH_MAX = 107
HARD_CAP_FACTOR = 4  # ZeroMQ drops a peer whose message exceeds this many times the frame limit
_LOOPBACK = {"127.0.0.1", "localhost", "[::1]", "::1"}


class Backend(Protocol):
    """What the transport serves: the core of one replica (or, later, a router over several)."""

    def handle(self, request: Request) -> dict[str, Any]: ...
    def health(self) -> dict[str, Any]: ...
    def stats(self) -> dict[str, Any]: ...
    def count_error(self, code: str) -> None: ...


@dataclass(frozen=True)
class CurveKeys:
    """The server's CURVE key pair (Z85 bytes) and, optionally, the client public keys it admits."""

    secret_key: bytes
    public_key: bytes
    client_keys: frozenset[bytes] | None = None


def _read_key_file(path: str, what: str) -> str:
    try:
        mode = os.stat(path).st_mode
        text = Path(path).read_text(encoding="ascii")
    except (OSError, UnicodeDecodeError) as exc:
        raise StartupError(f"endpoint: cannot read the CURVE {what} {path}: {exc}") from None
    if what == "secret key file" and mode & 0o077:
        raise StartupError(f"endpoint: the CURVE secret key file {path} is readable by others "
                           f"(mode {oct(mode & 0o777)}); chmod 600 it")
    return text


def load_curve(secret_key_file: str | None, client_keys_file: str | None) -> CurveKeys | None:
    """Read the configured CURVE keys; None when CURVE is off."""
    if secret_key_file is None:
        return None
    if not zmq.has("curve"):
        raise StartupError("endpoint: CURVE keys are configured but this libzmq was built without CURVE")
    secret = _read_key_file(secret_key_file, "secret key file").strip().encode()
    try:
        public = zmq.curve_public(secret)
    except (zmq.ZMQError, ValueError):
        raise StartupError(f"endpoint: {secret_key_file} does not hold a 40-character Z85 CURVE secret key "
                           "(make one with python -c 'import zmq; print(zmq.curve_keypair()[1].decode())')") from None
    clients = None
    if client_keys_file is not None:
        lines = _read_key_file(client_keys_file, "client keys file").split()
        bad = [key for key in lines if len(key) != 40]
        if bad or not lines:
            raise StartupError(f"endpoint: {client_keys_file} must list 40-character Z85 public keys, one per "
                               f"line; got {bad[0]!r}" if bad else f"endpoint: {client_keys_file} lists no keys")
        clients = frozenset(key.encode() for key in lines)
    return CurveKeys(secret, public, clients)


class _AllowedClients:
    """ZAP callback: admit a CURVE client only if its public key is listed."""

    def __init__(self, keys: frozenset[bytes]) -> None:
        self.keys = keys

    def callback(self, domain: str, key: bytes) -> bool:
        return key in self.keys


@dataclass
class Endpoint:
    url: str
    private_dir: str | None = None  # created by us, removed on exit
    socket_path: str | None = None


def resolve_endpoint(url: str | None, curve: bool = False) -> Endpoint:
    """The default is an ipc socket in a fresh 0700 directory; tcp stays on loopback unless CURVE is on."""
    if url is None:
        import tempfile

        private = tempfile.mkdtemp(prefix="pie-trtllm-", dir="/tmp")
        os.chmod(private, 0o700)
        path = os.path.join(private, "d.sock")
        return Endpoint(f"ipc://{path}", private, path)
    if url.startswith("ipc://"):
        path = url[len("ipc://"):]
        if len(path.encode()) > IPC_PATH_MAX:
            raise StartupError(f"endpoint: ipc path is {len(path.encode())} bytes, over the {IPC_PATH_MAX}-byte "
                               "limit of Unix sockets; choose a shorter path (e.g. under /tmp)")
        return Endpoint(url, None, path)
    if url.startswith("tcp://"):
        host = urlparse(url).hostname or ""
        if host not in _LOOPBACK and not curve:
            raise StartupError(f"endpoint: {url} binds beyond loopback; only 127.0.0.1 / [::1] are allowed "
                               "unless driver.options.curve_secret_key_file is set")
        return Endpoint(url)
    raise StartupError(f"endpoint: {url!r} is not an ipc:// or tcp:// URL")


def remove_endpoint_files(endpoint: Endpoint) -> None:
    if endpoint.socket_path and os.path.exists(endpoint.socket_path):
        os.unlink(endpoint.socket_path)
    if endpoint.private_dir:
        shutil.rmtree(endpoint.private_dir, ignore_errors=True)


class DriverServer:
    def __init__(self, endpoint: Endpoint, limits: Limits, backend: Backend,
                 handshake: dict[str, Any], parent_pid: int | None = None, curve: CurveKeys | None = None) -> None:
        self.endpoint = endpoint
        self.limits = limits
        self.backend = backend
        self.handshake = handshake
        self.parent_pid = parent_pid
        self.started = time.monotonic()
        self.stop_requested = threading.Event()
        self.dropped_replies = 0
        self._queued = 0      # written by the socket thread only
        self._finished = 0    # written by the worker thread only
        self._work: queue.Queue[tuple[bytes, Request] | None] = queue.Queue()
        self._context = zmq.Context.instance()
        self._router = self._context.socket(zmq.ROUTER)
        self._router.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self._router.setsockopt(zmq.MAXMSGSIZE, limits.max_frame_bytes * HARD_CAP_FACTOR)
        self._router.setsockopt(zmq.LINGER, 1000)
        self._pipe_url = f"inproc://replies-{id(self)}"
        self._replies = self._context.socket(zmq.PULL)
        self._replies.bind(self._pipe_url)
        if endpoint.url.startswith("tcp://["):
            self._router.setsockopt(zmq.IPV6, 1)
        self._auth = self._secure(curve) if curve is not None else None
        try:
            self._router.bind(endpoint.url)
        except zmq.ZMQError as exc:
            self._router.close(0)
            self._replies.close(0)
            if self._auth is not None:
                self._auth.stop()
            remove_endpoint_files(endpoint)
            raise StartupError(f"endpoint: cannot bind {endpoint.url}: {exc}") from None
        endpoint.url = self._router.getsockopt_string(zmq.LAST_ENDPOINT)  # resolves a tcp wildcard port
        if endpoint.socket_path:
            os.chmod(endpoint.socket_path, 0o600)
        self._worker = threading.Thread(target=self._work_loop, name="driver-worker", daemon=True)
        self._worker.start()

    def _secure(self, curve: CurveKeys) -> Any:
        """CURVE on the ROUTER: a peer that does not know the server's public key never completes the
        handshake, so it gets nothing back. With a client list, a ZAP thread admits listed keys only."""
        auth = None
        if curve.client_keys is not None:
            from zmq.auth.thread import ThreadAuthenticator

            auth = ThreadAuthenticator(self._context)
            auth.start()
            auth.configure_curve_callback("*", _AllowedClients(curve.client_keys))
        self._router.curve_secretkey = curve.secret_key
        self._router.curve_publickey = curve.public_key
        self._router.curve_server = True
        return auth

    # ------------------------------------------------------------------ socket thread

    def serve(self) -> None:
        """Serve until shutdown (op, signal or parent death), then clean up."""
        poller = zmq.Poller()
        poller.register(self._router, zmq.POLLIN)
        poller.register(self._replies, zmq.POLLIN)
        while not self.stop_requested.is_set():
            events = dict(poller.poll(50))
            if self._replies in events:
                self._flush_replies()
            if self._router in events:
                self._receive_frames()
            if self.parent_pid is not None and os.getppid() != self.parent_pid:
                self.stop_requested.set()
        self._shutdown()

    def _receive_frames(self) -> None:
        for _ in range(256):  # bounded, so replies keep flowing under a flood
            try:
                parts = self._router.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            identity = parts[0].bytes
            if len(parts) != 2:
                self._reject(identity, None, DriverError(
                    ErrorCode.BAD_FRAME, f"expected one frame per message, got {len(parts) - 1}"))
                continue
            try:
                self._on_frame(identity, parts[1].buffer)
            except Exception as exc:  # last line of defence: a frame must never stop the socket loop
                self._reject(identity, None, DriverError(ErrorCode.BAD_FRAME, f"{type(exc).__name__}: {exc}"))

    def _on_frame(self, identity: bytes, frame: memoryview) -> None:
        try:
            request = decode_frame(frame, self.limits)
        except FrameRejected as rejected:
            self._reject(identity, rejected.request_id, rejected.error)
            return
        if self.stop_requested.is_set():
            self._reject(identity, request.id, DriverError(ErrorCode.SHUTTING_DOWN, "the driver is shutting down"))
        elif request.op == "handshake":
            self._send(identity, encode_ok(request.id, self.handshake))
        elif request.op == "health":
            self._send(identity, encode_ok(request.id, self.health()))
        elif request.op == "stats":
            stats = self.backend.stats()
            stats["dropped_replies"] = self.dropped_replies
            self._send(identity, encode_ok(request.id, stats))
        elif request.op == "shutdown":
            self._send(identity, encode_ok(request.id, {}))
            self.stop_requested.set()
        else:
            self._work.put((identity, request))
            if request.op == "forward":
                self._queued += 1

    @property
    def inflight(self) -> int:
        return self._queued - self._finished

    def health(self) -> dict[str, Any]:
        health = self.backend.health()
        for replica in health["replicas"]:
            replica.setdefault("inflight", self.inflight)
        health["uptime_s"] = round(time.monotonic() - self.started, 3)
        return health

    def _reject(self, identity: bytes, request_id: int | None, error: DriverError) -> None:
        self.backend.count_error(error.code)
        self._send(identity, encode_error(request_id, error))

    def _send(self, identity: bytes, payload: bytes) -> None:
        try:
            self._router.send_multipart([identity, payload], zmq.NOBLOCK, copy=False)
        except zmq.ZMQError:  # host gone (ROUTER_MANDATORY) or its queue is full: drop, never block
            self.dropped_replies += 1

    def _flush_replies(self) -> None:
        while True:
            try:
                identity, payload = self._replies.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            self._send(identity.bytes, payload)

    def _shutdown(self) -> None:
        self._work.put(None)
        while self._worker.is_alive():  # a running forward finishes; queued frames get SHUTTING_DOWN
            self._worker.join(0.02)
            self._flush_replies()
            self._receive_frames()  # frames arriving meanwhile are answered SHUTTING_DOWN too
        self._flush_replies()
        self._router.close()
        self._replies.close(0)
        if self._auth is not None:
            self._auth.stop()
        remove_endpoint_files(self.endpoint)

    # ------------------------------------------------------------------ worker thread

    def _work_loop(self) -> None:
        push = self._context.socket(zmq.PUSH)
        push.connect(self._pipe_url)
        try:
            while (item := self._work.get()) is not None:
                identity, request = item
                if self.stop_requested.is_set():
                    error = DriverError(ErrorCode.SHUTTING_DOWN, "the driver is shutting down; not started")
                    self.backend.count_error(error.code)
                    reply = encode_error(request.id, error)
                else:
                    reply = self._run(request)
                push.send_multipart([identity, reply], copy=False)
                if request.op == "forward":
                    self._finished += 1
        finally:
            push.close(linger=1000)

    def _run(self, request: Request) -> bytes:
        try:
            return encode_ok(request.id, self.backend.handle(request))
        except DriverError as exc:
            self.backend.count_error(exc.code)
            return encode_error(request.id, exc)
        except Exception as exc:  # a bug or an engine failure: fail this request, keep serving
            self.backend.count_error(ErrorCode.ENGINE_ERROR)
            return encode_error(request.id, DriverError(ErrorCode.ENGINE_ERROR, f"{type(exc).__name__}: {exc}"))
