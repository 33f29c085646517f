"""lookahead: greedy decode through the driver with lookahead 16 against lookahead 1.

Two driver subprocesses (reference engine), the same contexts and prompts; rounds alternate between them.
Engine calls per token come from the driver's own `stats` counters, read around the timed steps only.
With lookahead 16 one engine call serves 16 steps of a context, so a window of 16k steps holds k calls.

The profile that bounds the ratio: the same engine in this process runs its batched decode pass for the
same contexts back to back. Lookahead still makes one token per pass over the weights, and every step it
serves from its buffer is still a round trip through the driver (the median step of the lookahead-16 side,
15 of whose 16 steps are such hits), so a step of lookahead 16 costs at least a pass plus a hit, and its
gain over lookahead 1 is at most lookahead 1's step time over that sum.
"""

from __future__ import annotations

import statistics
import time
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

LOOKAHEADS = (16, 1)


def plan(bench: Bench) -> tuple[int, int, int, int]:
    """(contexts, prompt_len, rounds, steps per round); steps are a multiple of 16."""
    return (2, 8, 1, 16) if bench.quick else (8, 32, 4, 64)


def run(bench: Bench) -> dict[str, Any]:
    model = bench.model()
    contexts, prompt_len, rounds, steps = plan(bench)
    # Started from this thread one after the other: a driver dies with the thread that spawned it.
    drivers = {n: spawn(write_config(bench, bench.work_dir / f"lookahead-{n}", model, lookahead_tokens=n),
                        ready_timeout_s=600) for n in LOOKAHEADS}
    try:
        clients = {n: d.client(timeout_s=600) for n, d in drivers.items()}
        decodes = {n: Decode(list(range(contexts)), prompt_len) for n in LOOKAHEADS}
        for n in LOOKAHEADS:  # prefill plus 15 steps: the next step of lookahead 16 is an engine call
            timed_steps(bench, decodes[n], clients[n].forward, 16)
        before = {n: clients[n].call("stats").result for n in LOOKAHEADS}
        times: dict[int, list[float]] = {n: [] for n in LOOKAHEADS}
        for _ in range(rounds):
            for n in LOOKAHEADS:
                times[n] += timed_steps(bench, decodes[n], clients[n].forward, steps)
        after = {n: clients[n].call("stats").result for n in LOOKAHEADS}
        for client in clients.values():
            client.close()
    finally:
        for driver in drivers.values():
            driver.stop()
    sides = {}
    for n in LOOKAHEADS:
        tokens = contexts * len(times[n])
        calls = after[n]["engine_calls"] - before[n]["engine_calls"]
        sides[n] = {"lookahead_tokens": n, "tokens": tokens, "engine_calls": calls,
                    "engine_calls_per_token": calls / tokens,
                    "lookahead_hits": after[n]["lookahead_hits"] - before[n]["lookahead_hits"],
                    "tokens_per_s": tokens / sum(times[n]), "step_ms": statistics.fmean(times[n]) * 1e3}
    pass_s = _decode_pass_s(bench, model, contexts, prompt_len)
    on, off = sides[16], sides[1]
    hit_s = statistics.median(times[16])
    bound = off["step_ms"] / 1e3 / (pass_s + hit_s) if pass_s else None
    result = {**header(bench, "lookahead"), "contexts": contexts, "steps": rounds * steps,
              "lookahead_16": on, "lookahead_1": off,
              "engine_calls_reduction": off["engine_calls_per_token"] / on["engine_calls_per_token"],
              "tokens_per_s_ratio": on["tokens_per_s"] / off["tokens_per_s"],
              "decode_pass_ms": pass_s * 1e3 if pass_s else None, "hit_step_p50_ms": hit_s * 1e3,
              "bound_over_lookahead_1": bound,
              "target_engine_calls_reduction_min": 8.0, "target_tokens_per_s_ratio_min": 2.0}
    print(table(f"lookahead: greedy decode through the driver, {contexts} contexts, {rounds * steps} steps",
                ["lookahead", "engine calls", "calls/token", "hits", "tokens/s", "step ms"],
                [[s["lookahead_tokens"], s["engine_calls"], s["engine_calls_per_token"], s["lookahead_hits"],
                  s["tokens_per_s"], s["step_ms"]] for s in (on, off)]))
    print(f"engine calls per token: {result['engine_calls_reduction']:.1f}x fewer (target >= 8x); "
          f"tokens/s: {result['tokens_per_s_ratio']:.2f}x (target >= 2x)")
    if bound:
        print(f"decode pass of {contexts} contexts {pass_s * 1e3:.3f} ms + a buffered step {hit_s * 1e3:.3f} ms: "
              f"lookahead 16 can reach at most {bound:.2f}x lookahead 1's tokens/s (its step: {off['step_ms']:.3f} ms)")
    write_result(bench, "lookahead", result)
    return result


def _decode_pass_s(bench: Bench, model: Any, contexts: int, prompt_len: int) -> float | None:
    """Seconds of one batched decode pass over `contexts` contexts (same model and options, in this process,
    passes back to back); None for an engine without a batched decoder."""
    core = in_process_core(bench, model, lookahead_tokens=1)
    try:
        decode = Decode(list(range(contexts)), prompt_len)
        timed_steps(bench, decode, core_forward(core), 17)  # prefill, then warm-up steps
        engine = core.engine
        decoder = getattr(engine, "decoder", None)
        if decoder is None:
            return None
        slots = [engine.slot_index(c) for c in decode.histories]
        positions = [len(h) - 1 for h in decode.histories.values()]
        tokens = [h[-1] for h in decode.histories.values()]
        passes = 16 if bench.quick else 256
        for _ in range(8):
            decoder.run(slots, tokens, positions)
        bench.sync()
        started = time.perf_counter()
        for _ in range(passes):
            decoder.run(slots, tokens, positions)
        bench.sync()
        return (time.perf_counter() - started) / passes
    finally:
        core.engine.close()
