"""history scaling: decode step time at a 128-token history against an 8,192-token one.

Reference engine + DriverCore in-process (the cost measured is the engine's and the core's, not the
socket's), batch 1, greedy, lookahead 1. Both contexts live in the same engine; rounds alternate between
them. The model is built with a context window that fits the long history plus the decode steps.
"""

from __future__ import annotations

import statistics
from typing import Any

from pie_driver_trtllm.benchmarks.common import (
    Bench,
    Decode,
    core_forward,
    header,
    in_process_core,
    table,
    timed_steps,
    write_result,
)

SHORT, LONG = 128, 8192


def plan(bench: Bench) -> tuple[int, int, int, int]:
    """(long history, warm-up steps, rounds, steps per round); quick runs shrink the long history to 1,024."""
    return (1024, 2, 2, 8) if bench.quick else (LONG, 8, 8, 32)


def run(bench: Bench) -> dict[str, Any]:
    long, warmup, rounds, steps = plan(bench)
    window = long + warmup + rounds * steps + 64
    model = bench.model(max_position_embeddings=window)
    core = in_process_core(bench, model, lookahead_tokens=1)
    forward = core_forward(core)
    try:
        decodes = {SHORT: Decode([1], SHORT), long: Decode([2], long)}
        for decode in decodes.values():
            timed_steps(bench, decode, forward, 1 + warmup)  # prefill, then warm-up decode steps
        times: dict[int, list[float]] = {SHORT: [], long: []}
        for _ in range(rounds):
            for history, decode in decodes.items():
                times[history] += timed_steps(bench, decode, forward, steps)
    finally:
        core.engine.close()
    sides = {h: {"history_tokens": h, "steps": len(t), "step_ms": statistics.fmean(t) * 1e3,
                 "step_p50_ms": statistics.median(t) * 1e3} for h, t in times.items()}
    result = {**header(bench, "history"), "model_max_position_embeddings": window,
              "short": sides[SHORT], "long": sides[long],
              "ratio": sides[long]["step_ms"] / sides[SHORT]["step_ms"],
              "p50_ratio": sides[long]["step_p50_ms"] / sides[SHORT]["step_p50_ms"], "target_ratio_max": 1.3}
    print(table("history scaling: decode step, reference engine in-process, batch 1",
                ["history", "steps", "mean ms", "p50 ms"],
                [[s["history_tokens"], s["steps"], s["step_ms"], s["step_p50_ms"]] for s in sides.values()]))
    print(f"step time {long} vs {SHORT} tokens: {result['ratio']:.2f}x (target <= 1.3x)")
    write_result(bench, "history", result)
    return result
