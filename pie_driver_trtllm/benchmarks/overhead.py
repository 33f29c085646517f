"""overhead: served tokens/s through a real driver subprocess against the same engine called in-process.

Both sides run the reference engine on the same model with the same decode batches (batch 1, 16, 64;
greedy; lookahead 1, so both call the engine every step). The in-process side is `ReferenceEngine` +
`DriverCore` fed the validated objects directly (no socket, no codec). Rounds of the two sides alternate
so that machine noise hits both alike. On a GPU the host busy-polls for replies (`HOST_BUSY_POLL_S`); on
the 2-core CPU machine it does not, since a spinning host would take a core from the driver.
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

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
from pie_driver_trtllm.client import spawn
from pie_driver_trtllm.wire.codec import Release

BATCHES = (1, 16, 64)
# The host polls for each reply without sleeping for up to this long (an engine step is a few ms): the
# in-process side never sleeps, and a host's own wake-up (100-300 us on these VMs) is not driver cost.
HOST_BUSY_POLL_S = 0.05


def plan(bench: Bench, batch: int) -> tuple[int, int, int, int]:
    """(prompt_len, warmup steps, rounds, steps per round) for one batch size."""
    if bench.quick:
        return 8, 1, 1, 2
    return 32, 16, 5, max(8, 256 // batch)


def run(bench: Bench) -> dict[str, Any]:
    model = bench.model()
    # On CUDA the reference engine runs the predicted next decode step ahead (option reference_overlap),
    # which hides the driver's per-step cost behind the GPU; measured without it too, that cost shows.
    overlaps = (True, False) if bench.device.startswith("cuda") else (False,)
    runs = {overlap: _measure(bench, model, overlap) for overlap in overlaps}
    rows = runs[overlaps[0]]
    result = {**header(bench, "overhead"), "engine": "reference", "lookahead_tokens": 1,
              "reference_overlap": overlaps[0],
              "host_busy_poll_s": HOST_BUSY_POLL_S if bench.device != "cpu" else 0.0,
              "torch_threads": 1 if bench.device == "cpu" else None, "batches": rows,
              "batches_without_overlap": runs.get(False) if len(overlaps) > 1 else None,
              "target_ratio_min": 0.95}
    for overlap, measured in runs.items():
        print(table(f"overhead: reference engine through the driver vs in-process (greedy, lookahead 1, "
                    f"reference_overlap {str(overlap).lower()})",
                    ["batch", "steps", "driver tok/s", "in-proc tok/s", "ratio", "ratio p50", "driver ms",
                     "in-proc ms", "driver cost us"],
                    [[r["batch"], r["steps"], r["driver_tokens_per_s"], r["in_process_tokens_per_s"], r["ratio"],
                      r["ratio_p50"], r["driver_step_ms"], r["in_process_step_ms"], r["driver_cost_us"]]
                     for r in measured]))
    write_result(bench, "overhead", result)
    return result


def _measure(bench: Bench, model: Path, overlap: bool) -> list[dict[str, Any]]:
    """Both sides at every batch size, with the engine's overlap on or off on both."""
    config = bench.work_dir / f"overhead-{'overlap' if overlap else 'plain'}"
    # On CPU both sides get one intra-op thread: two torch processes whose idle OpenMP threads spin on the
    # same few cores would otherwise slow whichever side runs next.
    threads = {"OMP_NUM_THREADS": "1"} if bench.device == "cpu" else {}
    driver = spawn(write_config(bench, config, model, lookahead_tokens=1, reference_overlap=overlap),
                   ready_timeout_s=600, env=threads)
    core = in_process_core(bench, model, lookahead_tokens=1, reference_overlap=overlap)
    if threads:
        import torch

        previous_threads = torch.get_num_threads()
        torch.set_num_threads(1)
    rows: list[dict[str, Any]] = []
    try:
        client = driver.client(timeout_s=600, busy_poll_s=HOST_BUSY_POLL_S if bench.device != "cpu" else 0.0)
        # A throwaway decode on both sides first: a fresh engine's first steps pay one-time costs (kernel
        # and allocator set-up for each new shape) that are tens of times a warm step on CPU.
        for forward in (client.forward, core_forward(core)):
            timed_steps(bench, Decode([999_999], 32), forward, 4 if bench.quick else 64)
        client.call("release", contexts=[999_999])
        core.release(Release((999_999,)))
        for batch in BATCHES:
            rows.append(_batch(bench, batch, client, core))
        client.close()
    finally:
        driver.stop()
        core.engine.close()
        if threads:
            torch.set_num_threads(previous_threads)
    return rows


def _batch(bench: Bench, batch: int, client: Any, core: Any) -> dict[str, Any]:
    prompt_len, warmup, rounds, steps = plan(bench, batch)
    contexts = list(range(batch * 1000, batch * 1000 + batch))
    sides = {"driver": (Decode(contexts, prompt_len), client.forward),
             "in_process": (Decode(contexts, prompt_len), core_forward(core))}
    times: dict[str, list[float]] = {"driver": [], "in_process": []}
    for decode, forward in sides.values():
        timed_steps(bench, decode, forward, 1 + warmup)  # prefill, then warm-up decode steps
    for _ in range(rounds):
        for name, (decode, forward) in sides.items():
            times[name] += timed_steps(bench, decode, forward, steps)
    client.call("release", contexts=contexts)  # free both engines' caches before the next batch
    core.release(Release(tuple(contexts)))
    driver_step = statistics.fmean(times["driver"])
    inproc_step = statistics.fmean(times["in_process"])
    return {"batch": batch, "steps": len(times["driver"]),
            "driver_tokens_per_s": batch / driver_step, "in_process_tokens_per_s": batch / inproc_step,
            "ratio": inproc_step / driver_step,
            "driver_step_ms": driver_step * 1e3, "in_process_step_ms": inproc_step * 1e3,
            "driver_step_p50_ms": statistics.median(times["driver"]) * 1e3,
            "in_process_step_p50_ms": statistics.median(times["in_process"]) * 1e3,
            "ratio_p50": statistics.median(times["in_process"]) / statistics.median(times["driver"]),
            "driver_cost_us": (driver_step - inproc_step) * 1e6}
