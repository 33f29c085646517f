"""Aggregate tokens/s of one replica against two on the same workload (reference engine).

    python benchmarks/replica_scaling.py --size 1b --dtype bfloat16 --devices cuda:0 cuda:1 --out result.json

Each configuration starts a real driver subprocess, prefills `--contexts` contexts, then runs `--steps`
greedy decode steps with lookahead off (every token is an engine step); the first steps are warm-up.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

from pie_driver_trtllm.client import spawn
from pie_driver_trtllm.modelgen import make_model


def write_config(directory: Path, model: Path, devices: list[str], dtype: str) -> Path:
    path = directory / f"driver-{len(devices)}.toml"
    path.write_text(f'[model]\nsnapshot_dir = "{model}"\n\n[driver]\ndevice = {json.dumps(devices)}\n'
                    f'activation_dtype = "{dtype}"\n\n[driver.options]\nengine = "reference"\nlookahead_tokens = 1\n'
                    f'max_concurrent_requests = 512\n')
    return path


def run(config: Path, contexts: int, prompt_len: int, steps: int, warmup: int) -> dict[str, float]:
    driver = spawn(config, ready_timeout_s=600)
    try:
        client = driver.client(timeout_s=600)
        histories = {c: [(7 * c + i) % 1000 + 3 for i in range(prompt_len)] for c in range(contexts)}
        requests = [{"context": c, "tokens": h, "positions": list(range(len(h))),
                     "samplers": [{"at": len(h) - 1, "type": "greedy"}]} for c, h in histories.items()]
        started = None
        for step in range(warmup + steps):
            if step == warmup:
                started = time.perf_counter()
            results = client.forward(requests)
            requests = []
            for (context, history), result in zip(histories.items(), results, strict=True):
                assert result["ok"], result
                history.append(result["outputs"][0]["token"])
                requests.append({"context": context, "tokens": [history[-1]], "positions": [len(history) - 1],
                                 "samplers": [{"at": 0, "type": "greedy"}]})
        seconds = time.perf_counter() - started  # type: ignore[operator]
        return {"seconds": seconds, "tokens": contexts * steps, "tokens_per_s": contexts * steps / seconds,
                "step_ms": seconds / steps * 1000}
    finally:
        driver.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="tiny")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--devices", nargs="+", default=["cpu", "cpu"])
    parser.add_argument("--contexts", type=int, default=64)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--warmup", type=int, default=4)
    parser.add_argument("--model-dir", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="pie-bench-"))
    model = make_model(args.model_dir or work / f"model-{args.size}", args.size, seed=0, dtype=args.dtype)
    one = run(write_config(work, model, args.devices[:1], args.dtype), args.contexts, args.prompt_len,
              args.steps, args.warmup)
    many = run(write_config(work, model, args.devices, args.dtype), args.contexts, args.prompt_len,
               args.steps, args.warmup)
    result = {"size": args.size, "dtype": args.dtype, "devices": args.devices, "contexts": args.contexts,
              "prompt_len": args.prompt_len, "steps": args.steps, "host": platform.node(),
              "one_replica": one, f"{len(args.devices)}_replicas": many,
              "speedup": many["tokens_per_s"] / one["tokens_per_s"]}
    print(f"{'replicas':>8} {'tokens/s':>10} {'step ms':>9}")
    print(f"{1:>8} {one['tokens_per_s']:>10.1f} {one['step_ms']:>9.1f}")
    print(f"{len(args.devices):>8} {many['tokens_per_s']:>10.1f} {many['step_ms']:>9.1f}")
    print(f"speedup: {result['speedup']:.2f}x")
    if args.out:
        args.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
