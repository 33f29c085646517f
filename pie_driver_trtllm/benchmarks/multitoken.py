"""multitoken: decode through the driver with runs of 16 tokens per forward against one token per forward.

One driver subprocess (reference engine, default options: greedy lookahead 16). A host decodes C contexts
to N new tokens each, greedy or seeded top_p, feeding back every token it is given; it spends a fixed time
per round trip
(spinning, as a programmable host's per-step work would keep a core busy): 0 ms and 1.5 ms. Each setting is
run as the one-token loop of protocol 1.0 (plain samplers, `max_tokens` 1 in the result) and with runs of
`max_tokens` 16, on fresh contexts; both must make the same tokens (seeded runs use the documented per-step
seeds), which the result records.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

from pie_driver_trtllm.benchmarks.common import Bench, header, table, write_config, write_result
from pie_driver_trtllm.client import DriverClient, spawn

SAMPLERS = {"greedy": {"type": "greedy"}, "top_p": {"type": "top_p", "top_p": 0.9, "temperature": 0.8}}
MAX_TOKENS = (1, 16)
HOST_MS = (0.0, 1.5)
PROMPT = 16


def plan(bench: Bench) -> tuple[tuple[int, ...], int]:
    """(context counts, new tokens per context)."""
    return ((2, 4), 32) if bench.quick else ((8, 64), 256)


def main(argv: list[str] | None = None) -> None:
    """One context count at a time (`--contexts 8`), so that a slow machine can take the settings apart."""
    parser = argparse.ArgumentParser(prog="python -m pie_driver_trtllm.benchmarks.multitoken", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--contexts", type=int, nargs="+", default=[8, 64])
    parser.add_argument("--tokens", type=int, default=256, help="new tokens per context")
    parser.add_argument("--size", default="tiny")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--out", type=Path, required=True, help="directory for multitoken.json")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="pie-bench-", dir="/tmp") as work:
        bench = Bench(size=args.size, device=args.device, dtype=args.dtype, out_dir=args.out, work_dir=Path(work))
        run(bench, (tuple(args.contexts), args.tokens))


def decode(client: DriverClient, first_id: int, contexts: int, tokens: int, sampler: dict[str, Any],
           max_tokens: int, host_s: float) -> tuple[list[list[int]], int, float]:
    """Every context to `tokens` new tokens; (the tokens, forwards, wall seconds)."""
    ids = range(first_id, first_id + contexts)
    made: dict[int, list[int]] = {c: [] for c in ids}
    send = {c: [(11 * c + 7 * i) % 500 + 3 for i in range(PROMPT)] for c in ids}
    start = {c: 0 for c in ids}
    forwards = 0
    began = time.perf_counter()
    while any(len(m) < tokens for m in made.values()):
        requests = []
        for c in ids:
            if len(made[c]) >= tokens:
                continue
            run = {**sampler, "at": len(send[c]) - 1}
            if max_tokens > 1:  # one token: the plain sampler of protocol 1.0 (greedy may use lookahead)
                run["max_tokens"] = min(max_tokens, tokens - len(made[c]))
            if sampler["type"] != "greedy":
                run["seed"] = 1000 * c + len(made[c])  # the per-step seed of the token this run starts at
            positions = list(range(start[c], start[c] + len(send[c])))
            requests.append({"context": c, "tokens": send[c], "positions": positions, "samplers": [run]})
        results = client.forward(requests)
        forwards += 1
        for request, result in zip(requests, results, strict=True):
            if not result["ok"]:
                raise RuntimeError(f"multitoken forward failed: {result['error']}")
            output = result["outputs"][0]
            c, out = request["context"], output["tokens"] if "tokens" in output else [output["token"]]
            made[c] += out
            start[c] += len(send[c])
            send[c] = out
        until = time.perf_counter() + host_s
        while time.perf_counter() < until:  # the host's own work between round trips
            pass
    seconds = time.perf_counter() - began
    client.call("release", contexts=list(ids))
    return [made[c] for c in ids], forwards, seconds


def run(bench: Bench, sizes: tuple[tuple[int, ...], int] | None = None) -> dict[str, Any]:
    model = bench.model()
    counts, tokens = sizes or plan(bench)
    driver = spawn(write_config(bench, bench.work_dir / "multitoken", model,
                                max_concurrent_requests=max(counts)), ready_timeout_s=600)
    rows = []
    try:
        client = driver.client(timeout_s=600)
        next_id = 1
        for contexts in counts:
            for m in MAX_TOKENS:  # warm-up: every batch size, run length and history length once
                decode(client, next_id, contexts, tokens if m > 1 else 2, SAMPLERS["greedy"], m, 0.0)
                next_id += contexts
            for name, sampler in SAMPLERS.items():
                for host_ms in HOST_MS:
                    side: dict[int, Any] = {}
                    for m in MAX_TOKENS:
                        made, forwards, seconds = decode(client, 10_000 + 1000 * len(rows), contexts, tokens, sampler,
                                                         m, host_ms / 1e3)
                        side[m] = (made, forwards, seconds)
                    for m in MAX_TOKENS:
                        made, forwards, seconds = side[m]
                        rows.append({"contexts": contexts, "sampler": name, "host_ms": host_ms, "max_tokens": m,
                                     "tokens_per_context": tokens, "forwards": forwards,
                                     "round_trips_per_token": forwards / tokens,
                                     "tokens_per_s": contexts * tokens / seconds, "seconds": seconds,
                                     "same_tokens_as_one_token_loop": made == side[1][0]})
        client.close()
    finally:
        driver.stop()
    speedups = []
    for row in rows:
        if row["max_tokens"] != 1:
            base = next(r for r in rows if r["max_tokens"] == 1 and all(
                r[k] == row[k] for k in ("contexts", "sampler", "host_ms")))
            row["tokens_per_s_ratio"] = row["tokens_per_s"] / base["tokens_per_s"]
            speedups.append(row)
    result = {**header(bench, "multitoken"), "prompt_tokens": PROMPT, "rows": rows,
              "all_equal": all(r["same_tokens_as_one_token_loop"] for r in rows),
              "target_round_trips_per_token_max": 1 / 12, "target_tokens_per_s_ratio_min_host_1_5_ms": 5.0,
              "target_tokens_per_s_ratio_min_host_0_ms": 1.0}
    print(table(f"multitoken: {tokens} tokens per context through the driver, runs of 16 against one token",
                ["contexts", "sampler", "host ms", "max_tokens", "forwards", "trips/token", "tokens/s", "x", "equal"],
                [[r["contexts"], r["sampler"], r["host_ms"], r["max_tokens"], r["forwards"],
                  r["round_trips_per_token"], r["tokens_per_s"], r.get("tokens_per_s_ratio", 1.0),
                  "yes" if r["same_tokens_as_one_token_loop"] else "NO"] for r in rows]))
    write_result(bench, "multitoken", result)
    return result


if __name__ == "__main__":
    main()
