"""driver_cost: the driver's own work per decode step, around an engine that costs nothing.

    python -m pie_driver_trtllm.benchmarks.driver_cost [--batches 1 16 64 256] [--reps 5] [--steps 200]
                                                       [--profile BATCH]

The engine hands back a precomputed token per row, so what is timed is the driver alone: decoding the
frame, merging into histories, lookahead, building rows, the engine call's own Python, assembling and
encoding the reply. Two views, at each batch size (every context +1 token, one greedy sampler):

- `socket`: a real `DriverServer` in a subprocess, a host sending decode forwards back to back (frames
  encoded before the clock starts, replies polled for without sleeping and read but not parsed, so the
  host adds only its socket calls). Microseconds per round trip, over its ZeroMQ socket and over its
  stream socket (`stream`), and over the stream socket with each step sent as a `step` op, the decode
  step as columns (`stream_step`).
- `stages`: the same backend in this process, each stage timed alone: `decode` (`decode_frame`), `core`
  (the backend's plan, engine call and result assembly) and `encode` (the reply bytes); `step_in_process`
  is their sum for `step` frames (`step_decode` and `step_core` its first two stages).

Each of `reps` repetitions runs `steps` steps; its median is one sample. Reported: the median of the
repetitions and their spread (min, max). `--profile` prints cProfile's top functions for the in-process
step at one batch size.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import multiprocessing
import os
import pstats
import shutil
import statistics
import tempfile
import time
from typing import Any

import msgspec

from pie_driver_trtllm.benchmarks.common import Bench, header, table, write_result
from pie_driver_trtllm.benchmarks.transport import VOCAB, TrivialEngine
from pie_driver_trtllm.engines.base import ModelInfo, Row, RowResult

BATCHES = (1, 16, 64, 256)
PROMPT = 8
_ENCODER = msgspec.msgpack.Encoder()


class NullEngine(TrivialEngine):
    """An engine whose step does nothing: a precomputed token per row, built once per batch size. With
    `evict_bytes`, each step first copies a buffer that large, as a real engine call's work would, leaving
    the CPU's caches full of other data."""

    kind = "null"

    def __init__(self, evict_bytes: int = 0) -> None:
        super().__init__()
        self._evict = bytearray(evict_bytes) if evict_bytes else None
        self.model = ModelInfo(name="null", arch_name="NullForBenchmarks", vocab_size=VOCAB, max_model_len=1 << 24,
                               eos_token_id=None, pad_token_id=None)
        self._results: list[RowResult] = []

    def step(self, rows: list[Row]) -> list[RowResult]:
        if self._evict is not None:
            bytes(self._evict)
        n = len(rows)
        if len(self._results) < n:
            self._results += [RowResult(tokens=[(i * 7919) % (VOCAB - 3) + 3]) for i in range(len(self._results), n)]
        return self._results[:n]


def build(max_requests: int, evict_bytes: int = 0) -> tuple[Any, Any, Any]:
    """(backend, limits, handshake) around the null engine, wired as the driver wires one device."""
    from pie_driver_trtllm.config import parse_config
    from pie_driver_trtllm.core.driver_core import DriverCore
    from pie_driver_trtllm.serving.backend import LocalBackend
    from pie_driver_trtllm.serving.driver import _wrap_engine, build_caps, build_handshake, build_limits

    config = parse_config({"model": {"snapshot_dir": "/nonexistent/null"},
                           "driver": {"device": ["cpu"], "options": {
                               "engine": "reference", "lookahead_tokens": 1,
                               "max_concurrent_requests": max_requests,
                               "max_batched_tokens": max(8192, max_requests * PROMPT)}}})
    engine = _wrap_engine(NullEngine(evict_bytes), config)
    core = DriverCore(engine, max_contexts=config.options.max_session_histories,
                      lookahead_tokens=config.options.lookahead_tokens, random_seed=config.driver.random_seed)
    limits = build_limits(config, engine)
    handshake = build_handshake(config, engine, build_caps(config, engine, limits))
    return LocalBackend(core, "cpu"), limits, handshake


def serve(url: str, max_requests: int, ready: Any, rehearse: bool = False, evict_bytes: int = 0) -> None:
    """The driver's server around the null engine, until the host sends `shutdown`; `ready` gets the URL of
    its stream socket."""
    from pie_driver_trtllm.serving.endpoint import resolve_endpoint
    from pie_driver_trtllm.serving.server import DriverServer

    backend, limits, handshake = build(max_requests, evict_bytes)
    server = DriverServer(resolve_endpoint(url), limits, backend, handshake, busy_poll_s=200e-6, stage_times=True,
                          stream_socket=True, rehearse=rehearse)
    ready.put(server.stream_url)
    server.serve()


class Frames:
    """Decode-step frames for a batch of contexts: a prefill, then one token per context per step."""

    def __init__(self, batch: int, first_context: int, as_step: bool = False) -> None:
        self.contexts = list(range(first_context, first_context + batch))
        self.length = 0
        self.ids = 0
        self.as_step = as_step  # each step a `step` op (columns) rather than a forward

    def _frame(self, op: str, **fields: Any) -> bytes:
        self.ids += 1
        return _ENCODER.encode({"v": 1, "id": self.ids, "op": op, **fields})

    def prefill(self) -> bytes:
        self.length = PROMPT
        return self._frame("forward", requests=[
            {"context": c, "tokens": [(c + i) % 500 + 3 for i in range(PROMPT)], "positions": list(range(PROMPT)),
             "samplers": [{"at": PROMPT - 1, "type": "greedy"}]} for c in self.contexts])

    def steps(self, n: int) -> list[bytes]:
        frames = []
        greedy = {"at": 0, "type": "greedy"}
        for _ in range(n):
            tokens = [(c + self.length) % 500 + 3 for c in self.contexts]
            if self.as_step:
                frames.append(self._frame("step", contexts=self.contexts, tokens=tokens,
                                          positions=[self.length] * len(tokens), sampler=greedy))
            else:
                frames.append(self._frame("forward", requests=[
                    {"context": c, "tokens": [t], "positions": [self.length], "samplers": [greedy]}
                    for c, t in zip(self.contexts, tokens, strict=True)]))
            self.length += 1
        return frames


def _check(reply: bytes, batch: int) -> None:
    data = msgspec.msgpack.decode(reply)
    if not data.get("ok") or len(data["results"]) != batch or not all(r["ok"] for r in data["results"]):
        raise RuntimeError(f"benchmark forward failed: {str(data)[:300]}")


def stage_times(backend: Any, limits: Any, frames: list[bytes]) -> list[tuple[float, float, float]]:
    """(decode, core, encode) seconds of each frame, through the functions the server calls."""
    from pie_driver_trtllm.serving.backend import Pending
    from pie_driver_trtllm.wire.codec import encode_ok

    clock = time.perf_counter
    times = []
    reply = b""
    for frame in frames:
        t0 = clock()
        request = backend.decode_frame(frame, limits)
        t1 = clock()
        outcome = backend.begin(request)
        if isinstance(outcome, Pending):
            outcome = outcome.finish(outcome.run())
        t2 = clock()
        reply = encode_ok(request.id, outcome)
        t3 = clock()
        times.append((t1 - t0, t2 - t1, t3 - t2))
    _check(reply, len(request.body.items))
    return times


def socket_times(client: Any, frames: list[bytes], batch: int, host_s: float = 0.0) -> list[float]:
    """Round-trip seconds of each frame sent back to back by a host that only sends and receives (after
    spinning `host_s` between a reply and the next frame: a host's own work). The host polls for the reply
    without sleeping, as the driver does for the next request after a reply: a thread's wake-up (hundreds
    of microseconds on a busy machine) is the scheduler's cost, not the driver's."""
    socket = client.socket
    poll, recv = socket.poll, socket.recv
    clock = time.perf_counter
    times = []
    replies = []
    for frame in frames:
        if host_s:
            until = clock() + host_s
            while clock() < until:
                pass
        start = clock()
        socket.send(frame)
        while not poll(0):
            pass
        replies.append(recv())
        times.append(clock() - start)
    _check(replies[-1], batch)
    return times


def _spread(samples: list[float]) -> dict[str, float]:
    """Median and spread (min, max) of per-repetition medians, in microseconds."""
    us = [s * 1e6 for s in samples]
    return {"median_us": statistics.median(us), "min_us": min(us), "max_us": max(us)}


def measure(batches: tuple[int, ...] = BATCHES, reps: int = 5, steps: int = 200,
            warmup: int = 50) -> list[dict[str, Any]]:
    from pie_driver_trtllm.client import DriverClient
    from pie_driver_trtllm.wire.codec import Release, Request

    max_requests = max(batches)
    directory = tempfile.mkdtemp(prefix="pie-bench-", dir="/tmp")
    url = f"ipc://{directory}/d.sock"
    mp = multiprocessing.get_context("spawn")
    ready = mp.Queue()
    worker = mp.Process(target=serve, args=(url, max_requests, ready), daemon=True)
    worker.start()
    backend, limits, _ = build(max_requests)
    rows = []
    try:
        try:
            stream_url = ready.get(timeout=60)
        except Exception:
            raise RuntimeError("benchmark driver did not start within 60 s") from None
        client, stream = DriverClient(url, timeout_s=30), DriverClient(stream_url, timeout_s=30)
        for batch in batches:
            remote, local = Frames(batch, batch * 10_000), Frames(batch, batch * 10_000)
            streamed = Frames(batch, batch * 10_000 + 5_000)
            streamed_steps = Frames(batch, batch * 10_000 + 6_000, as_step=True)
            local_steps = Frames(batch, batch * 10_000 + 7_000, as_step=True)
            _check(_round_trip(client, remote.prefill()), batch)
            _check(_round_trip(stream, streamed.prefill()), batch)
            _check(_round_trip(stream, streamed_steps.prefill()), batch)
            stage_times(backend, limits, [local.prefill(), local_steps.prefill()])
            socket_times(client, remote.steps(warmup), batch)
            socket_times(stream, streamed.steps(warmup), batch)
            socket_times(stream, streamed_steps.steps(warmup), batch)
            stage_times(backend, limits, local.steps(warmup))
            stage_times(backend, limits, local_steps.steps(warmup))
            samples: dict[str, list[float]] = {
                "socket": [], "stream": [], "stream_step": [], "driver_stages": [], "driver_wait": [],
                "decode": [], "core": [], "encode": [], "in_process": [], "step_decode": [], "step_core": [],
                "step_in_process": []}
            for _ in range(reps):  # the two views alternate, so that machine noise hits both alike
                remote_frames, local_frames = remote.steps(steps), local.steps(steps)
                before = client.call("stats")["stages"]
                samples["socket"].append(statistics.median(socket_times(client, remote_frames, batch)))
                after = client.call("stats")["stages"]
                # The server's own account of those forwards (means): its stages, and its wait between them.
                seconds = {k: (after["seconds"][k] - before["seconds"][k]) / steps for k in after["seconds"]}
                samples["driver_wait"].append(seconds.pop("wait"))
                samples["driver_stages"].append(sum(seconds.values()))
                samples["stream"].append(statistics.median(socket_times(stream, streamed.steps(steps), batch)))
                samples["stream_step"].append(statistics.median(socket_times(stream, streamed_steps.steps(steps),
                                                                             batch)))
                staged = stage_times(backend, limits, local_frames)
                for index, name in enumerate(("decode", "core", "encode")):
                    samples[name].append(statistics.median(t[index] for t in staged))
                samples["in_process"].append(statistics.median(sum(t) for t in staged))
                staged = stage_times(backend, limits, local_steps.steps(steps))
                for index, name in enumerate(("step_decode", "step_core")):
                    samples[name].append(statistics.median(t[index] for t in staged))
                samples["step_in_process"].append(statistics.median(sum(t) for t in staged))
            client.call("release", contexts=remote.contexts + streamed.contexts + streamed_steps.contexts)
            backend.begin(Request(0, "release", Release(tuple(local.contexts + local_steps.contexts))))
            rows.append({"batch": batch, "steps": steps, "reps": reps,
                         **{name: _spread(values) for name, values in samples.items()}})
        client.call("shutdown")
        client.close()
        stream.close()
    finally:
        worker.join(10)
        if worker.is_alive():
            worker.kill()
        shutil.rmtree(directory, ignore_errors=True)
    return rows


def _round_trip(client: Any, frame: bytes) -> bytes:
    client.socket.send(frame)
    return client.socket.recv()


def profile(batch: int, steps: int = 400) -> str:
    """cProfile's top functions (by own time) over `steps` in-process decode steps at `batch`."""
    backend, limits, _ = build(batch)
    frames = Frames(batch, 0)
    stage_times(backend, limits, [frames.prefill(), *frames.steps(50)])
    work = frames.steps(steps)
    profiler = cProfile.Profile()
    profiler.enable()
    stage_times(backend, limits, work)
    profiler.disable()
    out = io.StringIO()
    pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(18)
    return out.getvalue()


def report(rows: list[dict[str, Any]]) -> str:
    def cell(r: dict[str, Any], name: str) -> str:
        s = r[name]
        return f"{s['median_us']:.1f} ({s['min_us']:.1f}-{s['max_us']:.1f})"

    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    return table(f"driver_cost: us per decode step, null engine, median (min-max) of {rows[0]['reps']} repetitions "
                 f"of {rows[0]['steps']} steps (load average {load})",
                 ["batch", "ZeroMQ round trip", "its driver stages (mean)", "its driver wait (mean)",
                  "stream round trip", "stream, step op", "in-process", "decode", "core", "encode",
                  "in-process, step op", "its decode", "its core"],
                 [[r["batch"], *(cell(r, name) for name in (
                     "socket", "driver_stages", "driver_wait", "stream", "stream_step", "in_process", "decode", "core",
                     "encode", "step_in_process", "step_decode", "step_core"))] for r in rows])


def run(bench: Bench) -> dict[str, Any]:
    rows = measure(reps=2, steps=20, warmup=5) if bench.quick else measure()
    print(report(rows))
    result = {**header(bench, "driver_cost"), "engine": "null", "batches": rows, "target_batch_256_us_max": 1000.0}
    write_result(bench, "driver_cost", result)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=int, nargs="+", default=list(BATCHES))
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--profile", type=int, default=None, metavar="BATCH",
                        help="print cProfile's top functions for the in-process step at this batch size instead")
    args = parser.parse_args()
    if args.profile is not None:
        print(profile(args.profile))
        return
    print(report(measure(tuple(args.batches), args.reps, args.steps)))


if __name__ == "__main__":
    main()
