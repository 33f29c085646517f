"""Benchmarks of the driver against its floors, measured side by side in one run.

    python -m pie_driver_trtllm.benchmarks --workloads transport overhead lookahead history codec \
        --size tiny --device cpu --out DIR [--quick] [--plot PNG]

Each workload prints a table and writes `DIR/<workload>.json`; every JSON holds `workload`, `size`,
`device`, `dtype`, `quick`, `date` and:

- transport: `driver` and `raw_zmq` ({p50_us, p99_us, mean_us, samples}), `p50_ratio`, `p99_ratio`,
  `frame_bytes`, `isolation` ("process"), and `thread` (the same, both servers as threads of this process).
- overhead: `batches`, one row per batch (1, 16, 64) with `driver_tokens_per_s`, `in_process_tokens_per_s`,
  `ratio` (driver over in-process), `driver_step_ms`, `in_process_step_ms`, `driver_cost_us`.
- lookahead: `lookahead_16` and `lookahead_1` ({engine_calls_per_token, tokens_per_s, step_ms, ...}),
  `engine_calls_reduction`, `tokens_per_s_ratio`.
- history: `short` and `long` ({history_tokens, step_ms, step_p50_ms}), `ratio`, `p50_ratio`.
- codec: `requests`, `tokens`, `frame_bytes`, `mean_ms`, `p50_ms`, `p99_ms`, `decode_mean_ms`,
  `encode_reply_mean_ms`, `host_encode_mean_ms`.

Times come from `time.perf_counter`; on CUDA the device is synchronized before each clock read.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from pie_driver_trtllm.benchmarks.common import Bench, machine

WORKLOADS = ("transport", "overhead", "lookahead", "history", "codec")


def run_benchmarks(workloads: list[str], *, size: str = "tiny", device: str = "cpu", dtype: str = "float32",
                   out_dir: Path, quick: bool = False) -> dict[str, Any]:
    """Run the named workloads in order; returns {workload: result} and writes `out_dir/<workload>.json`."""
    unknown = [w for w in workloads if w not in WORKLOADS]
    if unknown:
        raise ValueError(f"unknown workload {unknown[0]!r}; known: {', '.join(WORKLOADS)}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {}
    seconds: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="pie-bench-", dir="/tmp") as work:
        bench = Bench(size=size, device=device, dtype=dtype, out_dir=out_dir, quick=quick, work_dir=Path(work))
        for name in workloads:
            start = time.perf_counter()
            load_before = os.getloadavg()
            module = importlib.import_module(f"pie_driver_trtllm.benchmarks.{name}")
            print(f"\n== {name}", flush=True)
            result = module.run(bench)
            seconds[name] = time.perf_counter() - start
            result["wall_s"] = seconds[name]
            result["load_average"] = {"before": load_before, "after": os.getloadavg()}  # other work on the box
            results[name] = result
            (out_dir / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
            sys.stdout.flush()
    summary = {"machine": machine(), "size": size, "device": device, "dtype": dtype, "quick": quick,
               "wall_s": seconds, "command": " ".join(sys.argv)}
    (out_dir / "run.json").write_text(json.dumps(summary, indent=2) + "\n")
    print("\n" + summarize(results))
    return results


def summarize(results: dict[str, Any]) -> str:
    """One line per target: the measured ratio next to its target."""
    lines = ["targets: measured vs target"]
    if "transport" in results:
        r = results["transport"]
        lines.append(_line("transport p50 / raw ZeroMQ p50", r["p50_ratio"], "<=", 2.0))
    if "overhead" in results:
        for row in results["overhead"]["batches"]:
            lines.append(_line(f"overhead ratio, batch {row['batch']}", row["ratio"], ">=", 0.95)
                         + f"  (driver cost {row['driver_cost_us']:.0f} us/step)")
    if "lookahead" in results:
        r = results["lookahead"]
        lines.append(_line("lookahead: fewer engine calls per token", r["engine_calls_reduction"], ">=", 8.0))
        bound = r.get("bound_over_lookahead_1")
        lines.append(_line("lookahead: tokens/s ratio", r["tokens_per_s_ratio"], ">=", 2.0)
                     + (f"  (a pass plus a buffered step bound it at {bound:.2f}x)" if bound else ""))
    if "history" in results:
        lines.append(_line("history 8192 / 128 step time", results["history"]["ratio"], "<=", 1.3))
    if "codec" in results:
        lines.append(_line("codec 64 req x 8192 tok, mean ms", results["codec"]["mean_ms"], "<", 1.0))
    return "\n".join(lines)


def _line(what: str, value: float, op: str, target: float) -> str:
    met = {"<=": value <= target, ">=": value >= target, "<": value < target}[op]
    return f"  {what:<42} {value:>8.3f}  target {op} {target:<5} {'met' if met else 'NOT met'}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pie_driver_trtllm.benchmarks",
                                     description="Driver benchmarks, measured side by side.")
    parser.add_argument("--workloads", nargs="+", default=list(WORKLOADS), choices=WORKLOADS)
    parser.add_argument("--size", default="tiny", help="modelgen size: tiny, small or 1b")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument("--dtype", default="float32", help="float32, bfloat16 or float16")
    parser.add_argument("--out", type=Path, required=True, help="directory for <workload>.json")
    parser.add_argument("--quick", action="store_true", help="small sizes (the test's; about a minute on CPU)")
    parser.add_argument("--plot", type=Path, default=None, help="write the overhead PNG here (needs matplotlib)")
    args = parser.parse_args(argv)
    results = run_benchmarks(args.workloads, size=args.size, device=args.device, dtype=args.dtype,
                             out_dir=args.out, quick=args.quick)
    if args.plot is not None and "overhead" in results:
        from pie_driver_trtllm.benchmarks.plot import plot_overhead

        print(f"plot: {plot_overhead(args.out / 'overhead.json', args.plot)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
