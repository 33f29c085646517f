"""Decode step time of the reference engine in process, by batch size, against the weight-read floor.

    python benchmarks/engine_step.py --size 1b --dtype bfloat16 --device cuda:0 --batches 1 16 64

The floor is the time to read every weight once at the device-to-device copy bandwidth measured in the
same run (a decode step must at least read all weights).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from pie_driver_trtllm.config import parse_config
from pie_driver_trtllm.engines.base import Row
from pie_driver_trtllm.engines.reference import ReferenceEngine
from pie_driver_trtllm.modelgen import make_model
from pie_driver_trtllm.protocol import Sampler

GREEDY = Sampler(type="greedy", at=0, temperature=0.0)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def copy_bandwidth(device: str) -> float:
    """Bytes per second of a large device-to-device copy (read + write counted)."""
    source = torch.empty(1 << 30, dtype=torch.uint8, device=device)
    target = torch.empty_like(source)
    for _ in range(3):
        target.copy_(source)
    sync(device)
    started = time.perf_counter()
    for _ in range(10):
        target.copy_(source)
    sync(device)
    return 2 * source.numel() * 10 / (time.perf_counter() - started)


def step_time(engine, batch: int, prompt: int, steps: int, device: str) -> tuple[float, float]:
    vocab = engine.model.vocab_size
    histories = {c: [(31 * c + i) % (vocab - 3) + 3 for i in range(prompt)] for c in range(batch)}
    engine.step([Row(c, h, len(h), GREEDY) for c, h in histories.items()])  # prefill
    for _ in range(3):  # warm-up (captures the graph of this batch size)
        for c, result in zip(histories, engine.step([Row(c, h, len(h), GREEDY) for c, h in histories.items()]),
                             strict=True):
            assert result.error is None, result.error
            histories[c].append(result.tokens[0])
    sync(device)
    started = time.perf_counter()
    for _ in range(steps):
        results = engine.step([Row(c, h, len(h), GREEDY) for c, h in histories.items()])
        for c, result in zip(histories, results, strict=True):
            assert result.error is None, result.error
            histories[c].append(result.tokens[0])
    sync(device)
    seconds = (time.perf_counter() - started) / steps
    kernel = float("nan")
    decoder = getattr(engine, "decoder", None)
    if decoder is not None:  # the batched decode alone, without the engine's per-row bookkeeping
        slots = [engine._slots[c].index for c in histories]
        positions = [len(h) for h in histories.values()]
        decoder.decode(slots, [3] * batch, positions)
        sync(device)
        started = time.perf_counter()
        for _ in range(steps):
            decoder.decode(slots, [3] * batch, positions)
        sync(device)
        kernel = (time.perf_counter() - started) / steps
    engine.drop(list(histories))
    return seconds, kernel


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="tiny")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    model_dir = make_model(Path(tempfile.mkdtemp()) / args.size, args.size, seed=0, dtype=args.dtype)
    config = parse_config({"model": {"snapshot_dir": str(model_dir)},
                           "driver": {"device": [args.device], "activation_dtype": args.dtype,
                                      "options": {"engine": "reference"}}})
    engine = ReferenceEngine.load(config, args.device)
    weights = sum(p.numel() * p.element_size() for p in engine.decoder.model.parameters()) \
        if hasattr(engine, "decoder") else 0
    # A copy's bandwidth counts bytes read and written: the rate at which memory moves bytes.
    floor = weights / copy_bandwidth(args.device) if args.device.startswith("cuda") else float("nan")
    rows = []
    for batch in args.batches:
        seconds, kernel = step_time(engine, batch, args.prompt, args.steps, args.device)
        rows.append({"batch": batch, "step_ms": seconds * 1e3, "decode_only_ms": kernel * 1e3,
                     "tokens_per_s": batch / seconds, "x_floor": seconds / floor if floor == floor else None})
    print(f"engine {engine.execution_mode}; weights {weights / 1e9:.2f} GB; read floor {floor * 1e3:.3f} ms")
    print(f"{'batch':>6} {'step ms':>9} {'decode ms':>10} {'tokens/s':>10} {'x floor':>8}")
    for r in rows:
        print(f"{r['batch']:>6} {r['step_ms']:>9.3f} {r['decode_only_ms']:>10.3f} {r['tokens_per_s']:>10.1f} "
              f"{(r['x_floor'] or float('nan')):>8.2f}")
    if args.out:
        args.out.write_text(json.dumps({"size": args.size, "dtype": args.dtype, "device": args.device,
                                        "engine": engine.execution_mode, "weights_bytes": weights,
                                        "floor_ms": floor * 1e3, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
