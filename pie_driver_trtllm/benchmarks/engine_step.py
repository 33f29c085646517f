"""Decode step time of the reference engine in process, by batch size, against the weight-read floor.

    python -m pie_driver_trtllm.benchmarks.engine_step --size 1b --dtype bfloat16 --device cuda:0 --batches 1 16 64

The floor is the time to read every weight once at the device-to-device copy bandwidth measured in the
same run (a decode step must at least read all weights). `decode ms` is the batched decoder alone, called
back to back (logits of the rows, no wait); `greedy ms` is the decoder plus fetching each row's greedy
token every step, which is what a greedy engine step needs; `first step s` is the first decode step of a
batch size, which captures (and, with torch.compile, compiles) its graph. `--profile-out FILE` writes the
device kernels of a few engine steps at the largest batch (the captured graph as replayed, and the same
decode body run eagerly) with their count and time.
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
from pie_driver_trtllm.engines.reference.engine import ReferenceEngine
from pie_driver_trtllm.modelgen import make_model
from pie_driver_trtllm.sampler import Sampler

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


def greedy_tokens(decoder, slots: list[int], tokens: list[int], positions: list[int]) -> list[int]:
    run = getattr(decoder, "run", None)
    if run is not None:
        return run(slots, tokens, positions).tokens()
    return torch.argmax(decoder.decode(slots, tokens, positions), dim=-1).tolist()


def kernels(prof) -> list[tuple[str, float]]:
    """(name, microseconds) of every device kernel a profile recorded."""
    found = []
    for event in prof.events():
        if getattr(event.device_type, "name", "") == "CUDA":
            found.append((event.name, event.time_range.elapsed_us()))
    return found


GEMM_NAMES = ("gemm", "nvjet", "xmma", "cutlass", "splitk", "gemv")


def kernel_report(title: str, found: list[tuple[str, float]], steps: int) -> str:
    totals: dict[str, list[float]] = {}
    for name, us in found:
        totals.setdefault(name, []).append(us)
    gemm = sum(us for name, us in found if any(g in name.lower() for g in GEMM_NAMES))
    total = sum(us for _, us in found)
    lines = [f"== {title}: {len(found) / steps:.0f} kernels/step, {total / steps / 1e3:.3f} ms/step of kernel "
             f"time, GEMM {gemm / steps / 1e3:.3f} ms, other {(total - gemm) / steps / 1e3:.3f} ms"]
    for name, times in sorted(totals.items(), key=lambda item: -sum(item[1]))[:30]:
        lines.append(f"{sum(times) / steps:9.1f} us/step {len(times) / steps:6.1f}x  {name[:150]}")
    return "\n".join(lines)


def profile(engine, histories: dict[int, list[int]], device: str, steps: int = 5) -> str:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    decoder = engine.decoder
    with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            engine.step([Row(c, h, len(h), GREEDY) for c, h in histories.items()])
        sync(device)
    report = [kernel_report(f"engine steps, batch {len(histories)}", kernels(prof), steps)]
    slots = [engine.slot_index(c) for c in histories]
    bucket = decoder._bucket(slots)  # the batch and window a captured step of these contexts uses
    tokens = torch.full((bucket,), 3, dtype=torch.long, device=device)
    positions = torch.full((bucket,), decoder.scratch, dtype=torch.long, device=device)
    positions[slots] = torch.tensor([len(h) for h in histories.values()], device=device)
    length = decoder._window(max(len(h) for h in histories.values()) + 1)
    with torch.inference_mode():
        decoder._decode_rows(tokens, positions, length)
        sync(device)
        with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(steps):
                decoder._decode_rows(tokens, positions, length)
            sync(device)
    report.append(kernel_report(f"decode body run eagerly (no graph), bucket {bucket}", kernels(prof), steps))
    return "\n".join(report)


def step_time(engine, batch: int, prompt: int, steps: int, device: str,
              profile_out: Path | None = None) -> tuple[float, float, float, float]:
    vocab = engine.model.vocab_size
    histories = {c: [(31 * c + i) % (vocab - 3) + 3 for i in range(prompt)] for c in range(batch)}
    engine.step([Row(c, h, len(h), GREEDY) for c, h in histories.items()])  # prefill
    sync(device)
    first = float("nan")
    for warm in range(10):  # warm-up (the first step captures, and may compile, the graph of this batch)
        started = time.perf_counter()
        for c, result in zip(histories, engine.step([Row(c, h, len(h), GREEDY) for c, h in histories.items()]),
                             strict=True):
            assert result.error is None, result.error
            histories[c].append(result.tokens[0])
        if warm == 0:
            first = time.perf_counter() - started
    sync(device)
    started = time.perf_counter()
    for _ in range(steps):
        results = engine.step([Row(c, h, len(h), GREEDY) for c, h in histories.items()])
        for c, result in zip(histories, results, strict=True):
            assert result.error is None, result.error
            histories[c].append(result.tokens[0])
    sync(device)
    seconds = (time.perf_counter() - started) / steps
    kernel = greedy = float("nan")
    decoder = getattr(engine, "decoder", None)
    if decoder is not None:  # the batched decode alone, without the engine's per-row bookkeeping
        slots = [engine.slot_index(c) for c in histories]
        positions = [len(h) for h in histories.values()]
        decoder.decode(slots, [3] * batch, positions)
        sync(device)
        started = time.perf_counter()
        for _ in range(steps):
            decoder.decode(slots, [3] * batch, positions)
        sync(device)
        kernel = (time.perf_counter() - started) / steps
        started = time.perf_counter()
        for _ in range(steps):
            greedy_tokens(decoder, slots, [3] * batch, positions)
        greedy = (time.perf_counter() - started) / steps
        if profile_out is not None:
            profile_out.write_text(profile(engine, histories, device) + "\n")
    engine.drop(list(histories))
    return seconds, kernel, greedy, first


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="tiny")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--model-dir", type=Path, default=None,
                        help="where to make (or reuse, same recipe) the checkpoint; default a fresh temp folder")
    parser.add_argument("--profile-out", type=Path, default=None,
                        help="write a device-kernel profile of the largest batch here (CUDA only)")
    args = parser.parse_args()
    model_dir = make_model(args.model_dir or Path(tempfile.mkdtemp()) / args.size, args.size, seed=0,
                           dtype=args.dtype)
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
        profile_out = args.profile_out if batch == max(args.batches) and args.device.startswith("cuda") else None
        seconds, kernel, greedy, first = step_time(engine, batch, args.prompt, args.steps, args.device,
                                                   profile_out)
        rows.append({"batch": batch, "step_ms": seconds * 1e3, "decode_only_ms": kernel * 1e3,
                     "greedy_only_ms": greedy * 1e3, "first_step_s": first, "tokens_per_s": batch / seconds,
                     "x_floor": seconds / floor if floor == floor else None})
    print(f"engine {engine.execution_mode}; weights {weights / 1e9:.2f} GB; read floor {floor * 1e3:.3f} ms")
    print(f"{'batch':>6} {'step ms':>9} {'decode ms':>10} {'greedy ms':>10} {'tokens/s':>10} {'x floor':>8} "
          f"{'first step s':>13}")
    for r in rows:
        print(f"{r['batch']:>6} {r['step_ms']:>9.3f} {r['decode_only_ms']:>10.3f} {r['greedy_only_ms']:>10.3f} "
              f"{r['tokens_per_s']:>10.1f} {(r['x_floor'] or float('nan')):>8.2f} {r['first_step_s']:>13.2f}")
    if args.out:
        args.out.write_text(json.dumps({"size": args.size, "dtype": args.dtype, "device": args.device,
                                        "engine": engine.execution_mode, "weights_bytes": weights,
                                        "floor_ms": floor * 1e3, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
