"""Aggregate tokens/s of one replica against N on the same workloads (reference engine).

    python -m pie_driver_trtllm.benchmarks.replica_scaling --size 1b --dtype bfloat16 --devices cuda:0 cuda:1 \
        --workload decode prefill mixed --out result.json

Each configuration (the first device alone, then every device) starts a real driver subprocess and runs
each workload on it: prefill `--contexts` contexts with a `--prompt-len` prompt, then `--steps` timed
steps after `--warmup` untimed ones, lookahead off (every token is an engine step). In a step each context
either decodes (feeds back its last sampled token) or prefills (sends `--prefill-tokens` fresh tokens
continuing its history); both sample one greedy token.

- decode: every context decodes. The CPU-side cost per request dominates for small models.
- prefill: every context prefills. GPU work dominates.
- mixed: a rotating `--prefill-fraction` of the contexts prefills, the rest decode.

Counted tokens are the sampled tokens plus the tokens of prefill chunks (decode counts sampled tokens
only, as before). A step is split into forwards within the driver's `max_forward_requests` and
`max_forward_tokens` caps; a context that would pass `max_model_len` is released and restarts at
position 0. Both are part of the timed step.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pie_driver_trtllm.client import DriverClient, spawn
from pie_driver_trtllm.modelgen import make_model

WORKLOADS = ("decode", "prefill", "mixed")


@dataclass
class Workload:
    name: str
    contexts: int
    prompt_len: int
    steps: int
    warmup: int
    prefill_tokens: int = 256
    prefill_fraction: float = 0.25

    def prefilling(self, step: int) -> set[int]:
        """The contexts that get a prefill chunk in `step` (mixed: rotates so every context takes turns)."""
        if self.name == "decode":
            return set()
        if self.name == "prefill":
            return set(range(self.contexts))
        count = round(self.contexts * self.prefill_fraction)
        return {(step * count + i) % self.contexts for i in range(count)}


@dataclass
class Limits:
    """What the handshake says bounds a forward."""

    vocab_size: int
    max_model_len: int
    max_requests: int
    max_tokens: int

    @classmethod
    def of(cls, client: DriverClient) -> Limits:
        reply = client.call("handshake")
        caps = reply["caps"]
        return cls(reply["model"]["vocab_size"], reply["model"]["max_model_len"], caps["max_forward_requests"],
                   caps["max_forward_tokens"])


def write_config(directory: Path, model: Path, devices: list[str], dtype: str,
                 max_batched_tokens: int | None = None) -> Path:
    path = directory / f"driver-{len(devices)}.toml"
    batched = f"max_batched_tokens = {max_batched_tokens}\n" if max_batched_tokens else ""
    path.write_text(f'[model]\nsnapshot_dir = "{model}"\n\n[driver]\ndevice = {json.dumps(devices)}\n'
                    f'activation_dtype = "{dtype}"\n\n[driver.options]\nengine = "reference"\nlookahead_tokens = 1\n'
                    f'max_concurrent_requests = 512\n{batched}')
    return path


def split(requests: list[dict[str, Any]], limits: Limits) -> Iterator[list[dict[str, Any]]]:
    """Consecutive groups of requests, each within the forward caps (one request never exceeds them)."""
    batch: list[dict[str, Any]] = []
    tokens = 0
    for request in requests:
        if batch and (len(batch) == limits.max_requests or tokens + len(request["tokens"]) > limits.max_tokens):
            yield batch
            batch, tokens = [], 0
        batch.append(request)
        tokens += len(request["tokens"])
    if batch:
        yield batch


def run_workload(client: DriverClient, limits: Limits, work: Workload) -> dict[str, float]:
    longest = min(limits.max_tokens, limits.max_model_len)
    if not all(0 < n <= longest for n in (work.prompt_len, work.prefill_tokens if work.name != "decode" else 1)):
        raise SystemExit(f"--prompt-len and --prefill-tokens must be in 1..{longest} (the driver's max_forward_tokens"
                         " and max_model_len)")
    histories: dict[int, list[int]] = {c: [] for c in range(work.contexts)}  # what the driver holds
    sampled: dict[int, int] = {}  # last sampled token of each context, not yet fed back
    # Prompt token p of context c is (7c + p) mod (vocab - 3) + 3: a slice of this table, so that the
    # host's own per-token Python does not weigh on the measured step.
    period = limits.vocab_size - 3
    table = [i % period + 3 for i in range(period + limits.max_model_len)]

    def step(prefill: set[int], length: int) -> int:
        """One step; returns the number of prompt tokens sent in prefill chunks."""
        requests, restart = [], []
        for context, history in histories.items():
            count = length if context in prefill else 1
            if len(history) + count > limits.max_model_len:
                restart.append(context)
                history.clear()
            start = len(history)
            offset = (7 * context + start) % period
            tokens = table[offset:offset + count] if context in prefill else [sampled[context]]
            requests.append({"context": context, "tokens": tokens, "positions": list(range(start, start + count)),
                             "samplers": [{"at": count - 1, "type": "greedy"}]})
        if restart:
            client.call("release", contexts=restart)
        results = [result for batch in split(requests, limits) for result in client.forward(batch)]
        for request, result in zip(requests, results, strict=True):
            assert result["ok"], result
            histories[request["context"]].extend(request["tokens"])
            sampled[request["context"]] = result["outputs"][0]["token"]
        return sum(len(r["tokens"]) for r in requests if r["context"] in prefill)

    step(set(histories), work.prompt_len)
    for index in range(work.warmup):
        step(work.prefilling(index), work.prefill_tokens)
    before = client.call("stats").result
    started = time.perf_counter()
    prompt_tokens = sum(step(work.prefilling(work.warmup + i), work.prefill_tokens) for i in range(work.steps))
    seconds = time.perf_counter() - started
    after = client.call("stats").result
    tokens_in = after["tokens_in"] - before["tokens_in"]
    # Engine calls per step on each replica (one driver: itself): more than the forwards a step needs
    # means a share was cut into several sub-forwards.
    replicas = list(zip(after.get("replicas", [after]), before.get("replicas", [before]), strict=True))
    calls = [a.get("engine_calls", 0) - b.get("engine_calls", 0) for a, b in replicas]
    engine_s = [a.get("engine_s", 0.0) - b.get("engine_s", 0.0) for a, b in replicas]
    client.call("release", contexts=list(histories))
    tokens = prompt_tokens + work.contexts * work.steps
    return {"seconds": seconds, "tokens": tokens, "prompt_tokens": prompt_tokens,
            "sampled_tokens": work.contexts * work.steps, "driver_tokens_in": tokens_in,
            "tokens_per_s": tokens / seconds, "step_ms": seconds / work.steps * 1000,
            "engine_calls_per_step": [c / work.steps for c in calls],
            "engine_ms_per_step": [t / work.steps * 1000 for t in engine_s]}


def run(config: Path, workloads: list[Workload]) -> dict[str, dict[str, float]]:
    """Every workload in turn on one driver subprocess."""
    driver = spawn(config, ready_timeout_s=600)
    try:
        client = driver.client(timeout_s=600)
        limits = Limits.of(client)
        return {work.name: run_workload(client, limits, work) for work in workloads}
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
    parser.add_argument("--workload", nargs="+", choices=WORKLOADS, default=["decode"])
    parser.add_argument("--prefill-tokens", type=int, default=256, help="tokens of one prefill chunk")
    parser.add_argument("--prefill-fraction", type=float, default=0.25, help="share of contexts prefilling (mixed)")
    parser.add_argument("--max-batched-tokens", type=int, default=None,
                        help="driver's max_batched_tokens (default: the driver's); steps are split to fit it")
    parser.add_argument("--model-dir", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    names = list(dict.fromkeys(args.workload))
    workloads = [Workload(name, args.contexts, args.prompt_len, args.steps, args.warmup, args.prefill_tokens,
                          args.prefill_fraction) for name in names]
    work = Path(tempfile.mkdtemp(prefix="pie-bench-"))
    model = make_model(args.model_dir or work / f"model-{args.size}", args.size, seed=0, dtype=args.dtype)
    many_key = f"{len(args.devices)}_replicas"
    one = run(write_config(work, model, args.devices[:1], args.dtype, args.max_batched_tokens), workloads)
    many = run(write_config(work, model, args.devices, args.dtype, args.max_batched_tokens), workloads)
    results = {name: {"one_replica": one[name], many_key: many[name],
                      "speedup": many[name]["tokens_per_s"] / one[name]["tokens_per_s"]} for name in names}
    result = {"size": args.size, "dtype": args.dtype, "devices": args.devices, "contexts": args.contexts,
              "prompt_len": args.prompt_len, "steps": args.steps, "warmup": args.warmup,
              "prefill_tokens": args.prefill_tokens, "prefill_fraction": args.prefill_fraction,
              "max_batched_tokens": args.max_batched_tokens, "host": platform.node(),
              **results.get("decode", {}),  # the decode numbers also at the top level, where they always were
              "workloads": results}
    print(f"{'workload':>8} {'replicas':>8} {'tokens/s':>10} {'step ms':>9} {'speedup':>8}")
    for name, entry in results.items():
        print(f"{name:>8} {1:>8} {entry['one_replica']['tokens_per_s']:>10.1f} "
              f"{entry['one_replica']['step_ms']:>9.1f}")
        print(f"{name:>8} {len(args.devices):>8} {entry[many_key]['tokens_per_s']:>10.1f} "
              f"{entry[many_key]['step_ms']:>9.1f} {entry['speedup']:>7.2f}x")
    if args.out:
        args.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
