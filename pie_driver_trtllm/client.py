"""A small host-side client: spawn a driver, read its handshake, send ops, get typed replies."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec
import zmq

from pie_driver_trtllm.stream_socket import StreamSocket
from pie_driver_trtllm.wire.stream_frames import SCHEME as STREAM_SCHEME

_ENCODER = msgspec.msgpack.Encoder()  # msgspec reads and writes the same msgpack, about twice as fast
_DECODER = msgspec.msgpack.Decoder()


@dataclass
class ErrorInfo:
    code: str
    message: str
    details: dict[str, Any] = field(default_factory=dict)


@dataclass
class Reply:
    id: int | None
    ok: bool
    result: dict[str, Any]
    error: ErrorInfo | None = None

    def __getitem__(self, key: str) -> Any:
        return self.result[key]


@dataclass
class Generated:
    """What `DriverClient.generate` made: the tokens, why it stopped, and the forwards it took."""

    tokens: list[int]
    stop: str
    round_trips: int
    logprobs: list[float] | None = None


def run_sampler(at: int, sampler: dict[str, Any], max_tokens: int, stop_token_ids: list[int] | tuple[int, ...] = (),
                return_logprobs: bool = False, logprob_mode: str | None = None) -> dict[str, Any]:
    """`sampler` (a protocol sampler map without `at`) as a run of up to `max_tokens` tokens (protocol 1.1);
    `logprob_mode` ("raw" or "processed", the driver's default) says what `return_logprobs` reports."""
    out = {**sampler, "at": at, "max_tokens": max_tokens}
    if stop_token_ids:
        out["stop_token_ids"] = list(stop_token_ids)
    if return_logprobs:
        out["return_logprobs"] = True
        if logprob_mode is not None:
            out["logprob_mode"] = logprob_mode
    return out


def logprob_sampler(at: int, sampler: dict[str, Any], logprob_mode: str | None = None) -> dict[str, Any]:
    """`sampler` (a one-token sampler map without `at`) answering `{"token", "logprob"}` (protocol 1.1);
    `logprob_mode` is "raw" or "processed" (the driver's default)."""
    out = {**sampler, "at": at, "return_logprob": True}
    if logprob_mode is not None:
        out["logprob_mode"] = logprob_mode
    return out


class DriverFailed(RuntimeError):
    """The driver exited before it was ready; the message holds its standard error."""


class RequestFailed(RuntimeError):
    def __init__(self, reply: Reply) -> None:
        assert reply.error is not None
        super().__init__(f"{reply.error.code}: {reply.error.message}")
        self.reply = reply


def parse_reply(payload: bytes) -> Reply:
    data = _DECODER.decode(payload)
    if data.get("ok"):
        result = {k: v for k, v in data.items() if k not in ("v", "id", "ok")}
        return Reply(data.get("id"), True, result)
    error = dict(data.get("error") or {})
    info = ErrorInfo(error.pop("code", "?"), error.pop("message", ""), error)
    return Reply(data.get("id"), False, {}, info)


class DriverClient:
    """One connection to a driver: a DEALER socket, or the stream socket for a `unix://` endpoint (the
    handshake line's `stream_endpoint`). Not thread-safe: use one client per thread."""

    def __init__(self, endpoint: str, timeout_s: float = 60.0, *, curve_server_key: bytes | None = None,
                 curve_keypair: tuple[bytes, bytes] | None = None, busy_poll_s: float = 0.0) -> None:
        """`curve_server_key` (Z85) turns CURVE on; `curve_keypair` is (public, secret), fresh by default.
        `busy_poll_s`: how long `recv` polls without sleeping before it blocks."""
        self.endpoint = endpoint
        self.timeout_s = timeout_s
        self.busy_poll_s = busy_poll_s
        self._ids = itertools.count(1)
        if endpoint.startswith(STREAM_SCHEME):
            if curve_server_key is not None:
                raise ValueError("the stream socket has no CURVE; connect to the ZeroMQ endpoint for it")
            self.socket: zmq.Socket | StreamSocket = StreamSocket(endpoint, timeout_s)
            return
        self._context = zmq.Context.instance()
        dealer = self._context.socket(zmq.DEALER)
        dealer.setsockopt(zmq.LINGER, 0)
        # A DEALER without a connected peer (a refused CURVE handshake, say) blocks on send: bound it.
        dealer.setsockopt(zmq.SNDTIMEO, max(1, int(timeout_s * 1000)))
        if curve_server_key is not None:
            public, secret = curve_keypair or zmq.curve_keypair()
            dealer.curve_serverkey = curve_server_key
            dealer.curve_publickey = public
            dealer.curve_secretkey = secret
        dealer.connect(endpoint)
        self.socket = dealer

    def send(self, op: str, **fields: Any) -> int:
        request_id = next(self._ids)
        self.send_raw(_ENCODER.encode({"v": 1, "id": request_id, "op": op, **fields}))
        return request_id

    def send_raw(self, frame: bytes) -> None:
        try:
            self.socket.send(frame)
        except zmq.Again:
            raise TimeoutError(f"could not send to {self.endpoint} within {self.timeout_s} s: "
                               "no connected driver") from None

    def recv(self, timeout_s: float | None = None) -> Reply:
        timeout = self.timeout_s if timeout_s is None else timeout_s
        until = time.perf_counter() + self.busy_poll_s  # a latency-sensitive host spins before it sleeps
        while time.perf_counter() < until:
            if self.socket.poll(0):
                return parse_reply(self.socket.recv())
        if not self.socket.poll(int(timeout * 1000)):
            raise TimeoutError(f"no reply from {self.endpoint} within {timeout} s")
        return parse_reply(self.socket.recv())

    def call(self, op: str, check: bool = True, **fields: Any) -> Reply:
        request_id = self.send(op, **fields)
        reply = self.recv()
        if reply.id != request_id:
            raise RuntimeError(f"reply for id {reply.id} while waiting for {request_id}")
        if check and not reply.ok:
            raise RequestFailed(reply)
        return reply

    def forward(self, requests: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return self.call("forward", requests=requests)["results"]

    def step(self, contexts: list[int], tokens: list[int], positions: list[int],
             sampler: dict[str, Any] | None = None) -> list[dict[str, Any]]:
        """A decode step as columns (protocol 1.2): the results of the forward it stands for."""
        fields: dict[str, Any] = {"contexts": contexts, "tokens": tokens, "positions": positions}
        if sampler is not None:
            fields["sampler"] = sampler
        return self.call("step", **fields)["results"]

    def load_weights(self, path: str, version: int) -> int:
        """Replace the driver's weights from a safetensors directory; the version it now serves."""
        return self.call("load_weights", path=path, version=version)["weights_version"]

    def sleep(self, level: int) -> int:
        """Free the KV cache (level 1), and move the weights to host memory (level 2)."""
        return self.call("sleep", level=level)["asleep"]

    def wake(self) -> int:
        return self.call("wake")["asleep"]

    def generate(self, context: int, prompt: list[int], sampler: dict[str, Any], new_tokens: int, *,
                 max_tokens: int = 16, stop_token_ids: list[int] | tuple[int, ...] = (), start: int = 0,
                 return_logprobs: bool = False, logprob_mode: str | None = None) -> Generated:
        """Up to `new_tokens` tokens after `prompt` (sent at positions `start`...), `max_tokens` per forward,
        each run's tokens fed back with the next. A seeded sampler's run that starts after g tokens gets the
        seed plus g, so the whole generation equals the one-token loop fed back with the per-step seeds.
        `logprob_mode` says what `return_logprobs` reports ("raw" or "processed")."""
        made: list[int] = []
        logprobs: list[float] = []
        send, at, trips, stop = list(prompt), start, 0, "max_tokens"
        while len(made) < new_tokens:
            step = dict(sampler)
            if "seed" in step:
                step["seed"] = (step["seed"] + len(made)) % (1 << 64)
            run = run_sampler(len(send) - 1, step, min(max_tokens, new_tokens - len(made)), stop_token_ids,
                              return_logprobs, logprob_mode)
            (result,) = self.forward([{"context": context, "tokens": send,
                                       "positions": list(range(at, at + len(send))), "samplers": [run]}])
            trips += 1
            if not result["ok"]:
                error = dict(result["error"])
                raise RequestFailed(Reply(None, False, {}, ErrorInfo(error.pop("code"), error.pop("message"), error)))
            out = result["outputs"][0]
            made += out["tokens"]
            logprobs += out.get("logprobs", [])
            at, send, stop = at + len(send), out["tokens"], out["stop"]
            if stop != "max_tokens":
                break
        return Generated(made, stop, trips, logprobs if return_logprobs else None)

    def close(self) -> None:
        self.socket.close(0)


@dataclass
class DriverProcess:
    """A driver subprocess started with `spawn`."""

    process: subprocess.Popen[bytes]
    endpoint: str
    handshake_line: dict[str, Any]
    stderr_path: Path | None  # None: standard error went to a descriptor the caller passed

    @property
    def stream_endpoint(self) -> str | None:
        """The stream socket's `unix://` URL, when the driver serves one (`stream_socket`)."""
        return self.handshake_line.get("stream_endpoint")

    def client(self, timeout_s: float = 60.0, *, stream: bool = False, **options: Any) -> DriverClient:
        """A connection to the ZeroMQ endpoint, or with `stream` to the stream socket."""
        if stream and self.stream_endpoint is None:
            raise ValueError("this driver serves no stream socket (driver.options.stream_socket)")
        return DriverClient(self.stream_endpoint if stream else self.endpoint, timeout_s, **options)

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace") if self.stderr_path else ""

    def stop(self, timeout_s: float = 15.0) -> int:
        if self.process.poll() is None:
            self.process.terminate()
        try:
            return self.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait()


def spawn(config_path: str | Path, *, endpoint: str | None = None, ready_timeout_s: float = 120.0,
          env: dict[str, str] | None = None, stderr_path: str | Path | None = None, stderr_fd: int | None = None,
          extra_args: list[str] | tuple[str, ...] = (), cpus: set[int] | None = None,
          abandon: threading.Event | None = None) -> DriverProcess:
    """Start `python -m pie_driver_trtllm` and wait for its two handshake lines.

    Standard error goes to `stderr_fd` when given (an open descriptor the child inherits: a file, pipe or
    socket), else to `stderr_path` (default: next to the config file); `cpus` pins the process. Once
    `abandon` is set, a driver still starting is killed and DriverFailed raised.
    """
    command = [sys.executable, "-m", "pie_driver_trtllm", "--config", str(config_path), *extra_args]
    if endpoint:
        command += ["--endpoint", endpoint]
    log = Path(stderr_path) if stderr_path else Path(str(config_path) + ".stderr.log")
    if stderr_fd is not None:
        log = None
    environment = {**os.environ, **(env or {})}
    if log is None:
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=stderr_fd, env=environment)
    else:
        with open(log, "ab") as err:
            process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=err, env=environment)

    def tail() -> str:
        return log.read_text().strip()[-2000:] if log else "see its standard error"

    if cpus:
        os.sched_setaffinity(process.pid, cpus)  # before the engine starts its threads
    assert process.stdout is not None
    deadline = time.monotonic() + ready_timeout_s
    lines: list[dict[str, Any]] = []
    os.set_blocking(process.stdout.fileno(), False)
    buffer = b""
    while len(lines) < 2:
        if abandon is not None and abandon.is_set():
            process.kill()
            process.wait()
            raise DriverFailed("its start was abandoned")
        if time.monotonic() > deadline:
            process.kill()
            raise DriverFailed(f"driver not ready within {ready_timeout_s} s: {tail()}")
        chunk = process.stdout.read()
        if chunk:
            buffer += chunk
            while b"\n" in buffer and len(lines) < 2:
                line, buffer = buffer.split(b"\n", 1)
                lines.append(json.loads(line))
        elif process.poll() is not None:
            raise DriverFailed(f"driver exited with {process.returncode}: {tail()}")
        else:
            time.sleep(0.01)
    if not lines[1].get("ready"):
        process.kill()
        raise DriverFailed(f"unexpected second handshake line {lines[1]!r}")
    return DriverProcess(process, lines[0]["endpoint"], lines[0], log)
