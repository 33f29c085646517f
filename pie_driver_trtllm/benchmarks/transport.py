"""transport: round trip of a 1-context, 1-token greedy forward through the driver's server with a trivial
engine, against a raw pyzmq DEALER/ROUTER ping-pong of the same request bytes, in the same run.

The driver side is the real stack (DriverServer + LocalBackend + DriverCore, wired as `driver._build_backend`
wires them) around an engine whose step costs nothing; the host side is the real `DriverClient` over ipc.
Both servers run in one spawned subprocess each (`isolation = "process"`, the headline, as the raw numbers
in the ecosystem anchors were taken) and again as threads of this process (`"thread"`, same GIL as the
client). Blocks of driver and raw round trips alternate so that machine noise hits both alike.
"""

from __future__ import annotations

import multiprocessing
import shutil
import tempfile
import threading
import time
from typing import Any

import msgpack
import zmq

from pie_driver_trtllm.benchmarks.common import Bench, header, summary_us, table, write_result
from pie_driver_trtllm.engines.base import ModelInfo, Row, RowResult

VOCAB = 32000


class TrivialEngine:
    """An engine whose step is free: the next token is a function of the position."""

    kind = "trivial"
    version = "0"
    execution_mode = "none"
    samplers = frozenset({"greedy"})

    def __init__(self) -> None:
        self.model = ModelInfo(name="trivial", arch_name="TrivialForBenchmarks", vocab_size=VOCAB,
                               max_model_len=1 << 24, eos_token_id=None, pad_token_id=None)

    def step(self, rows: list[Row]) -> list[RowResult]:
        return [RowResult(tokens=[(row.length * 7919) % (VOCAB - 3) + 3] * row.steps) for row in rows]

    def fork(self, src: int, dst: int, length: int) -> None:
        pass

    def drop(self, contexts: list[int]) -> None:
        pass

    def close(self) -> None:
        pass


def build_server(url: str, wrap: bool = True) -> Any:
    """DriverCore + LocalBackend + DriverServer around the trivial engine, as `driver._build_backend` does."""
    from pie_driver_trtllm.config import parse_config
    from pie_driver_trtllm.core.driver_core import DriverCore
    from pie_driver_trtllm.serving import driver
    from pie_driver_trtllm.serving.backend import LocalBackend
    from pie_driver_trtllm.serving.driver import build_caps, build_handshake, build_limits
    from pie_driver_trtllm.serving.endpoint import resolve_endpoint
    from pie_driver_trtllm.serving.server import DriverServer

    config = parse_config({"model": {"snapshot_dir": "/nonexistent/trivial"},
                           "driver": {"device": ["cpu"], "options": {"engine": "reference", "lookahead_tokens": 1}}})
    engine: Any = TrivialEngine()
    wrapper = getattr(driver, "_wrap_engine", None)  # the driver's own wrappers (step deadline), where it has them
    if wrapper is not None and wrap:
        engine = wrapper(engine, config)
    core = DriverCore(engine, max_contexts=config.options.max_session_histories,
                      lookahead_tokens=config.options.lookahead_tokens, random_seed=config.driver.random_seed)
    limits = build_limits(config, engine)
    handshake = build_handshake(config, engine, build_caps(config, engine, limits))
    return DriverServer(resolve_endpoint(url), limits, LocalBackend(core, "cpu"), handshake,
                        busy_poll_s=config.options.busy_poll_us / 1e6)


def serve_driver(url: str, ready: Any, wrap: bool = True) -> None:
    server = build_server(url, wrap)
    ready.set()
    server.serve()  # until the client sends `shutdown`


def serve_echo(url: str, ready: Any) -> None:
    """ROUTER bind; every message goes straight back to its sender; b"stop" ends it."""
    context = zmq.Context()
    router = context.socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    router.bind(url)
    ready.set()
    try:
        while True:
            identity, payload = router.recv_multipart(copy=False)
            router.send_multipart([identity, payload], copy=False)
            if payload.bytes == b"stop":
                return
    finally:
        router.close(0)
        context.term()


class _Servers:
    """The driver server and the echo server, as subprocesses or threads, plus a client for each."""

    def __init__(self, isolation: str, wrap: bool) -> None:
        from pie_driver_trtllm.client import DriverClient

        self.directory = tempfile.mkdtemp(prefix="pie-bench-", dir="/tmp")
        self.driver_url = f"ipc://{self.directory}/d.sock"
        self.echo_url = f"ipc://{self.directory}/e.sock"
        if isolation == "process":
            mp = multiprocessing.get_context("spawn")
            events = [mp.Event(), mp.Event()]
            self.workers: list[Any] = [
                mp.Process(target=serve_driver, args=(self.driver_url, events[0], wrap), daemon=True),
                mp.Process(target=serve_echo, args=(self.echo_url, events[1]), daemon=True)]
        else:
            events = [threading.Event(), threading.Event()]
            self.workers = [threading.Thread(target=serve_driver, args=(self.driver_url, events[0], wrap), daemon=True),
                            threading.Thread(target=serve_echo, args=(self.echo_url, events[1]), daemon=True)]
        for worker in self.workers:
            worker.start()
        for event in events:
            if not event.wait(60):
                raise RuntimeError("benchmark server did not start within 60 s")
        self.client = DriverClient(self.driver_url, timeout_s=30)
        self.dealer = zmq.Context.instance().socket(zmq.DEALER)
        self.dealer.setsockopt(zmq.LINGER, 0)
        self.dealer.connect(self.echo_url)

    def close(self) -> None:
        try:
            self.client.call("shutdown")
            self.dealer.send(b"stop")
            self.dealer.poll(5000)
        finally:
            self.client.close()
            self.dealer.close(0)
            for worker in self.workers:
                worker.join(10)
            shutil.rmtree(self.directory, ignore_errors=True)


def _driver_block(servers: _Servers, state: dict[str, int], n: int) -> list[float]:
    times = []
    forward = servers.client.forward
    for _ in range(n):
        request = [{"context": 0, "tokens": [state["token"]], "positions": [state["position"]],
                    "samplers": [{"at": 0, "type": "greedy"}]}]
        start = time.perf_counter()
        result = forward(request)
        times.append(time.perf_counter() - start)
        state["token"] = result[0]["outputs"][0]["token"]
        state["position"] += 1
    return times


def _raw_block(servers: _Servers, frame: bytes, n: int) -> list[float]:
    times = []
    send, recv = servers.dealer.send, servers.dealer.recv
    for _ in range(n):
        start = time.perf_counter()
        send(frame)
        recv()
        times.append(time.perf_counter() - start)
    return times


def measure(isolation: str, round_trips: int, warmup: int, blocks: int, wrap: bool = True) -> dict[str, Any]:
    """One set of alternating blocks; `wrap` = False leaves out the driver's engine wrappers (step deadline)."""
    servers = _Servers(isolation, wrap)
    try:
        state = {"token": 5, "position": 0}
        # The raw side sends the bytes the client sends for this request (same size, same content).
        frame = msgpack.packb({"v": 1, "id": 1, "op": "forward", "requests": [
            {"context": 0, "tokens": [12345], "positions": [4321], "samplers": [{"at": 0, "type": "greedy"}]}]})
        _driver_block(servers, state, warmup)
        _raw_block(servers, frame, warmup)
        driver: list[float] = []
        raw: list[float] = []
        per_block = max(1, round_trips // blocks)
        for _ in range(blocks):
            driver += _driver_block(servers, state, per_block)
            raw += _raw_block(servers, frame, per_block)
        stats = servers.client.call("stats").result
    finally:
        servers.close()
    d, r = summary_us(driver), summary_us(raw)
    return {"isolation": isolation, "engine_wrappers": wrap, "frame_bytes": len(frame), "driver": d, "raw_zmq": r,
            "p50_ratio": d["p50_us"] / r["p50_us"], "p99_ratio": d["p99_us"] / r["p99_us"],
            "engine_calls": stats["engine_calls"]}


def run(bench: Bench) -> dict[str, Any]:
    round_trips, warmup, blocks = (400, 100, 4) if bench.quick else (10_000, 1_000, 10)
    headline = measure("process", round_trips, warmup, blocks)
    threaded = measure("thread", round_trips, warmup, blocks)
    result = {**header(bench, "transport"), "round_trips": round_trips, "warmup": warmup, **headline,
              "thread": threaded, "target_p50_ratio_max": 2.0}
    rows = []
    for label, m in (("process", headline), ("thread", threaded)):
        rows.append([f"{label}: driver", m["driver"]["p50_us"], m["driver"]["p99_us"], m["driver"]["mean_us"]])
        rows.append([f"{label}: raw zmq", m["raw_zmq"]["p50_us"], m["raw_zmq"]["p99_us"], m["raw_zmq"]["mean_us"]])
    print(table(f"transport: 1-context 1-token forward, {round_trips} round trips ({headline['frame_bytes']} B)",
                ["side", "p50 us", "p99 us", "mean us"], rows))
    print(f"p50 ratio driver/raw: {headline['p50_ratio']:.2f}x (target <= 2x); server as threads "
          f"{threaded['p50_ratio']:.2f}x; p99 ratio {headline['p99_ratio']:.2f}x")
    write_result(bench, "transport", result)
    return result

