"""overhead: served tokens/s through a real driver subprocess against the same engine called in-process.

Both sides run the reference engine on the same model with the same decode batches (batch 1, 16, 64;
greedy; lookahead 1, so both call the engine every step). The in-process side is `ReferenceEngine` +
`DriverCore` fed the validated objects directly (no socket, no codec). Each point is measured in `REPS`
repetitions of `STEPS` steps a side; within a repetition, blocks of the two sides alternate so that
machine noise hits both alike. A repetition gives one ratio and one driver cost; reported are their
median and spread (min, max). On a GPU the host busy-polls for replies (`HOST_BUSY_POLL_S`); on the
2-core CPU machine it does not, since a spinning host would take a core from the driver.
"""

from __future__ import annotations

import itertools
import statistics
import time
from pathlib import Path
from typing import Any

import msgspec

from pie_driver_trtllm.benchmarks.common import (
    Bench,
    Decode,
    core_forward,
    header,
    in_process_core,
    table,
    timed_steps,
    write_config,
    write_result,
)
from pie_driver_trtllm.client import DriverClient, parse_reply, spawn
from pie_driver_trtllm.wire.codec import Release

BATCHES = (1, 16, 64)
_ENCODER = msgspec.msgpack.Encoder()
# The host polls for each reply without sleeping for up to this long (an engine step is a few ms): the
# in-process side never sleeps, and a host's own wake-up (100-300 us on these VMs) is not driver cost.
HOST_BUSY_POLL_S = 0.05


REPS, STEPS, BLOCKS = 5, 400, 4  # repetitions per point, steps per side in each, blocks they alternate in


class TimedHost:
    """The host's side of each driver step, split: encoding the request, the round trip from sending it to
    the reply in hand (the driver's work plus the transport both ways), and decoding the reply."""

    def __init__(self, client: DriverClient, op: str = "forward") -> None:
        self.client = client
        self.op = op  # "step": each decode step (one token per context) goes as a `step` op, in columns
        self._ids = itertools.count(1 << 40)  # its own ids: the driver echoes them, nothing here checks them
        self.seconds = {"host_encode": 0.0, "round_trip": 0.0, "host_decode": 0.0}

    def forward(self, requests: list[dict[str, Any]]) -> list[dict[str, Any]]:
        clock, seconds = time.perf_counter, self.seconds
        start = clock()
        if self.op == "step" and all(len(r["tokens"]) == 1 for r in requests):
            request = _ENCODER.encode({"v": 1, "id": next(self._ids), "op": "step",
                                       "contexts": [r["context"] for r in requests],
                                       "tokens": [r["tokens"][0] for r in requests],
                                       "positions": [r["positions"][0] for r in requests],
                                       "sampler": requests[0]["samplers"][0]})
        else:
            request = _ENCODER.encode({"v": 1, "id": next(self._ids), "op": "forward", "requests": requests})
        sent = clock()
        self.client.send_raw(request)  # the send is part of the round trip: ZeroMQ's I/O thread is woken
        frame = self._receive()
        arrived = clock()
        results = parse_reply(frame)["results"]
        seconds["host_encode"] += sent - start
        seconds["round_trip"] += arrived - sent
        seconds["host_decode"] += clock() - arrived
        return results

    def _receive(self) -> bytes:
        """The reply's bytes, polling without sleeping for up to the client's `busy_poll_s` first."""
        socket, until = self.client.socket, time.perf_counter() + self.client.busy_poll_s
        while time.perf_counter() < until:
            if socket.poll(0):
                return socket.recv()
        if not socket.poll(int(self.client.timeout_s * 1000)):
            raise TimeoutError(f"no reply within {self.client.timeout_s} s")
        return socket.recv()


def _driver_takes(bench: Bench, model: Path, option: str, value: Any) -> bool:
    """Whether the driver under test knows `[driver.options] option` (an earlier tree may not)."""
    from pie_driver_trtllm.config import StartupError, parse_config

    try:
        parse_config({"model": {"snapshot_dir": str(model)},
                      "driver": {"device": [bench.device], "options": {option: value}}})
    except StartupError:
        return False
    return True


def plan(bench: Bench, batch: int) -> tuple[int, int, int, int, int]:
    """(prompt_len, warmup steps, repetitions, steps per side in each, alternating blocks) for one batch."""
    if bench.quick:
        return 8, 1, 2, 2, 1
    return 32, 16, REPS, STEPS, BLOCKS


def run(bench: Bench, overlaps: tuple[bool, ...] | None = None, host_op: str = "forward",
        **driver_options: Any) -> dict[str, Any]:
    """`driver_options`: more `[driver.options]` for the driver side (say `busy_poll_us`); `overlaps`: the
    engine's `reference_overlap` settings to measure (default: on and off on CUDA, off on CPU); `host_op`:
    "step" sends each decode step as a `step` op (one sampler, columns) instead of a forward."""
    model = bench.model()
    # On CUDA the reference engine runs the predicted next decode step ahead (option reference_overlap),
    # which hides the driver's per-step cost behind the GPU; measured without it too, that cost shows.
    if overlaps is None:
        overlaps = (True, False) if bench.device.startswith("cuda") else (False,)
    runs = {overlap: _measure(bench, model, overlap, driver_options, host_op) for overlap in overlaps}
    rows = runs[overlaps[0]]
    result = {**header(bench, "overhead"), "engine": "reference", "lookahead_tokens": 1,
              "reference_overlap": overlaps[0], "driver_options": driver_options, "host_op": host_op,
              "host_busy_poll_s": HOST_BUSY_POLL_S if bench.device != "cpu" else 0.0,
              "torch_threads": 1 if bench.device == "cpu" else None, "batches": rows,
              "batches_without_overlap": runs.get(False) if len(overlaps) > 1 else None,
              "target_ratio_min": 0.95}
    for overlap, measured in runs.items():
        print(table(f"overhead: reference engine through the driver vs in-process (greedy, lookahead 1, "
                    f"reference_overlap {str(overlap).lower()}); median (min-max) of the repetitions",
                    ["batch", "reps x steps", "driver tok/s", "in-proc tok/s", "ratio", "driver ms", "in-proc ms",
                     "engine ms driver / in-proc", "driver cost us"],
                    [[r["batch"], f"{len(r['reps'])} x {r['steps'] // len(r['reps'])}", r["driver_tokens_per_s"],
                      r["in_process_tokens_per_s"], f"{r['ratio']:.3f} ({r['ratio_min']:.3f}-{r['ratio_max']:.3f})",
                      r["driver_step_ms"], r["in_process_step_ms"],
                      f"{r['driver_engine_ms']:.3f} / {r['in_process_engine_ms']:.3f}",
                      f"{r['driver_cost_us']:.0f} ({r['driver_cost_us_min']:.0f}-{r['driver_cost_us_max']:.0f})"]
                     for r in measured]))
        stages, host = list(measured[0]["driver_stage_us"]), list(measured[0]["host_us"])
        print(table(f"overhead: where a driver step goes, us (median of the repetitions; reference_overlap "
                    f"{str(overlap).lower()}): the driver's stages, the host's, and the transport both ways "
                    "(the host's round trip less the driver's stages)", ["batch", *stages, *host, "transport", "slept"],
                    [[r["batch"], *(f"{r['driver_stage_us'][s]:.1f}" for s in stages),
                      *(f"{r['host_us'][h]:.1f}" for h in host), f"{r['transport_us']:.1f}",
                      f"{r['driver_slept_share']:.0%}"] for r in measured]))
    write_result(bench, "overhead", result)
    return result


def _measure(bench: Bench, model: Path, overlap: bool, driver_options: dict[str, Any] | None = None,
             host_op: str = "forward") -> list[dict[str, Any]]:
    """Both sides at every batch size, with the engine's overlap on or off on both."""
    config = bench.work_dir / f"overhead-{'overlap' if overlap else 'plain'}"
    # On CPU both sides get one intra-op thread: two torch processes whose idle OpenMP threads spin on the
    # same few cores would otherwise slow whichever side runs next.
    threads = {"OMP_NUM_THREADS": "1"} if bench.device == "cpu" else {}
    # stage_times: the driver also reports where its time goes (about 1 us a forward, charged to it here)
    options = {"lookahead_tokens": 1, "reference_overlap": overlap, **(driver_options or {})}
    if _driver_takes(bench, model, "stage_times", True):  # an earlier tree timed by this harness may not
        options["stage_times"] = True
    driver = spawn(write_config(bench, config, model, **options),
                   ready_timeout_s=600, env=threads)
    core = in_process_core(bench, model, lookahead_tokens=1, reference_overlap=overlap)
    if threads:
        import torch

        previous_threads = torch.get_num_threads()
        torch.set_num_threads(1)
    rows: list[dict[str, Any]] = []
    try:
        # With `stream_socket` among the options, the host talks to the driver over its stream socket.
        url = driver.handshake_line.get("stream_endpoint") or driver.endpoint
        client = DriverClient(url, timeout_s=600, busy_poll_s=HOST_BUSY_POLL_S if bench.device != "cpu" else 0.0)
        # A throwaway decode on both sides first: a fresh engine's first steps pay one-time costs (kernel
        # and allocator set-up for each new shape) that are tens of times a warm step on CPU.
        for forward in (client.forward, core_forward(core)):
            timed_steps(bench, Decode([999_999], 32), forward, 4 if bench.quick else 64)
        client.call("release", contexts=[999_999])
        core.release(Release((999_999,)))
        for batch in BATCHES:
            rows.append({**_batch(bench, batch, client, core, host_op),
                         "host_transport": "stream" if url.startswith("unix://") else "zeromq"})
        client.close()
    finally:
        driver.stop()
        core.engine.close()
        if threads:
            torch.set_num_threads(previous_threads)
    return rows


def _batch(bench: Bench, batch: int, client: Any, core: Any, host_op: str = "forward") -> dict[str, Any]:
    prompt_len, warmup, reps, steps, blocks = plan(bench, batch)
    contexts = list(range(batch * 1000, batch * 1000 + batch))
    host = TimedHost(client, host_op)
    sides = {"driver": (Decode(contexts, prompt_len), host.forward),
             "in_process": (Decode(contexts, prompt_len), core_forward(core))}
    for decode, forward in sides.values():
        timed_steps(bench, decode, forward, 1 + warmup)  # prefill, then warm-up decode steps
    # Seconds inside engine calls on each side (the driver's from its `stats`), read between timed blocks:
    # they split a step into the engine call and everything around it.
    # The driver's stage totals (`stats.stages`) split its side further: decode, plan, engine, ..., wait.
    # `slept`: forwards that found the driver blocked, its busy poll over (the host took longer than it).
    def counters(name: str) -> tuple[float, dict[str, float], int]:
        if name == "in_process":
            return core.counters.engine_s, {}, 0
        stats = client.call("stats").result
        stages = stats.get("stages", {"seconds": {}, "slept": 0})
        return stats["engine_s"], stages["seconds"], stages["slept"]

    repetitions = []
    for _ in range(reps):
        times: dict[str, list[float]] = {"driver": [], "in_process": []}
        in_engine = dict.fromkeys(sides, 0.0)
        stages: dict[str, float] = {}
        slept = 0
        host_before = dict(host.seconds)
        for _ in range(blocks):
            for name, (decode, forward) in sides.items():
                engine_before, stages_before, slept_before = counters(name)
                times[name] += timed_steps(bench, decode, forward, steps // blocks)
                engine_after, stages_after, slept_after = counters(name)
                in_engine[name] += engine_after - engine_before
                slept += slept_after - slept_before
                for stage, seconds in stages_after.items():
                    stages[stage] = stages.get(stage, 0.0) + seconds - stages_before[stage]
        driver_step, inproc_step = statistics.fmean(times["driver"]), statistics.fmean(times["in_process"])
        repetitions.append({"driver_step_ms": driver_step * 1e3, "in_process_step_ms": inproc_step * 1e3,
                            "driver_engine_ms": in_engine["driver"] / len(times["driver"]) * 1e3,
                            "in_process_engine_ms": in_engine["in_process"] / len(times["in_process"]) * 1e3,
                            "driver_stage_us": {k: v / len(times["driver"]) * 1e6 for k, v in stages.items()},
                            "driver_slept_share": slept / len(times["driver"]),
                            "host_us": {k: (v - host_before[k]) / len(times["driver"]) * 1e6
                                        for k, v in host.seconds.items()},
                            "ratio": inproc_step / driver_step, "driver_cost_us": (driver_step - inproc_step) * 1e6,
                            "ratio_p50": statistics.median(times["in_process"]) / statistics.median(times["driver"])})
    client.call("release", contexts=contexts)  # free both engines' caches before the next batch
    core.release(Release(tuple(contexts)))

    def median(key: str) -> float:
        return statistics.median(r[key] for r in repetitions)

    driver_step, inproc_step = median("driver_step_ms") / 1e3, median("in_process_step_ms") / 1e3
    ratios, costs = [r["ratio"] for r in repetitions], [r["driver_cost_us"] for r in repetitions]
    return {"batch": batch, "steps": reps * (steps // blocks) * blocks, "reps": repetitions,
            "driver_tokens_per_s": batch / driver_step, "in_process_tokens_per_s": batch / inproc_step,
            "ratio": median("ratio"), "ratio_min": min(ratios), "ratio_max": max(ratios),
            "ratio_p50": median("ratio_p50"),
            "driver_step_ms": driver_step * 1e3, "in_process_step_ms": inproc_step * 1e3,
            "driver_engine_ms": median("driver_engine_ms"), "in_process_engine_ms": median("in_process_engine_ms"),
            "driver_stage_us": {stage: statistics.median(r["driver_stage_us"][stage] for r in repetitions)
                                for stage in repetitions[0]["driver_stage_us"]},
            "driver_slept_share": median("driver_slept_share"),
            "host_us": {key: statistics.median(r["host_us"][key] for r in repetitions)
                        for key in repetitions[0]["host_us"]},
            "transport_us": statistics.median(r["host_us"]["round_trip"] - sum(
                us for stage, us in r["driver_stage_us"].items() if stage != "wait") for r in repetitions),
            "driver_cost_us": median("driver_cost_us"), "driver_cost_us_min": min(costs),
            "driver_cost_us_max": max(costs)}
