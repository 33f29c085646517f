"""What every benchmark workload shares: settings, models, driver configs, decode batches, tables, JSON."""

from __future__ import annotations

import datetime
import itertools
import json
import math
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pie_driver_trtllm.sampler import Sampler
from pie_driver_trtllm.wire.messages import ForwardItem

GREEDY = Sampler(type="greedy", at=0, temperature=0.0)


@dataclass
class Bench:
    """The settings of one `run_benchmarks` call, passed to every workload."""

    size: str
    device: str
    dtype: str
    out_dir: Path
    quick: bool = False
    work_dir: Path = field(default_factory=lambda: Path("."))

    def model(self, max_position_embeddings: int | None = None) -> Path:
        """A random-weight checkpoint of `size` (made once per run, reused by every workload)."""
        from pie_driver_trtllm.modelgen import SIZES, make_model

        name = self.size if max_position_embeddings is None else f"{self.size}-{max_position_embeddings}"
        if max_position_embeddings is not None and max_position_embeddings <= SIZES[self.size][
                "max_position_embeddings"]:
            max_position_embeddings = None  # the size already allows it
        return make_model(self.work_dir / "models" / name, self.size, seed=0, dtype=self.dtype,
                          max_position_embeddings=max_position_embeddings)

    def sync(self) -> None:
        """Wait for queued device work, so that a host clock read after it is honest."""
        if self.device.startswith("cuda"):
            import torch

            torch.cuda.synchronize(self.device)


def driver_options(bench: Bench, **options: Any) -> dict[str, Any]:
    return {"engine": "reference", **options}


def write_config(bench: Bench, directory: Path, model: Path, **options: Any) -> Path:
    """A startup TOML for the reference engine; keyword arguments become `[driver.options]`."""
    directory.mkdir(parents=True, exist_ok=True)
    lines = ["[model]", f"snapshot_dir = {json.dumps(str(model))}", "", "[driver]",
             f"device = [{json.dumps(bench.device)}]", f"activation_dtype = {json.dumps(bench.dtype)}", "",
             "[driver.options]"]
    lines += [f"{k} = {json.dumps(v)}" for k, v in driver_options(bench, **options).items()]
    path = directory / "driver.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def in_process_core(bench: Bench, model: Path, **options: Any) -> Any:
    """The same engine and core a driver subprocess would build, in this process (no socket, no codec)."""
    from pie_driver_trtllm.config import parse_config
    from pie_driver_trtllm.core.driver_core import DriverCore
    from pie_driver_trtllm.engines import load_engine

    config = parse_config({"model": {"snapshot_dir": str(model)},
                           "driver": {"device": [bench.device], "activation_dtype": bench.dtype,
                                      "options": driver_options(bench, **options)}})
    engine = load_engine(config, bench.device)
    return DriverCore(engine, max_contexts=config.options.max_session_histories,
                      lookahead_tokens=config.options.lookahead_tokens, random_seed=config.driver.random_seed)


class Decode:
    """Greedy decode of a batch of contexts: the same request dicts for the socket and the core.

    `requests()` gives the next step's requests (the prompt first, then one token per context);
    `accept(results)` appends each context's new token.
    """

    def __init__(self, contexts: list[int], prompt_len: int, vocab: int = 500) -> None:
        self.histories = {c: [(7 * c + 13 * i) % vocab + 3 for i in range(prompt_len)] for c in contexts}
        self.fresh = True

    def requests(self) -> list[dict[str, Any]]:
        out = []
        for context, history in self.histories.items():
            start = 0 if self.fresh else len(history) - 1
            out.append({"context": context, "tokens": history[start:], "positions": list(range(start, len(history))),
                        "samplers": [{"at": len(history) - 1 - start, "type": "greedy"}]})
        return out

    def accept(self, results: list[dict[str, Any]]) -> None:
        self.fresh = False
        for history, result in zip(self.histories.values(), results, strict=True):
            if not result["ok"]:
                raise RuntimeError(f"benchmark forward failed: {result['error']}")
            history.append(result["outputs"][0]["token"])


def as_items(requests: list[dict[str, Any]]) -> list[ForwardItem]:
    """Request dicts as the validated objects the core takes (what `decode_frame` would produce)."""
    return [ForwardItem(r["context"], r["tokens"], r["positions"],
                        tuple(Sampler(type="greedy", at=s["at"], temperature=0.0) for s in r["samplers"]))
            for r in requests]


def core_forward(core: Any) -> Callable[[list[dict[str, Any]]], list[dict[str, Any]]]:
    from pie_driver_trtllm.wire.codec import Forward

    return lambda requests: core.forward(Forward(as_items(requests)))["results"]


def timed_steps(bench: Bench, decode: Decode, forward: Callable[[list[dict[str, Any]]], list[dict[str, Any]]],
                steps: int) -> list[float]:
    """Run `steps` decode steps back to back; the wall seconds of each, from its start to the next one's
    (the host's own work between them included, on both sides of every comparison). The device is
    synchronized before the first step and after the last only: work an engine launches ahead of the next
    step then counts where it finishes, instead of being forced to finish inside each step, which would
    deny an in-process engine the overlap a driver subprocess gets."""
    bench.sync()
    clock = [time.perf_counter()]
    for _ in range(steps):
        decode.accept(forward(decode.requests()))
        if len(clock) == steps:
            bench.sync()
        clock.append(time.perf_counter())
    return [b - a for a, b in itertools.pairwise(clock)]


# ---------------------------------------------------------------- statistics and output

def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0..100) with linear interpolation."""
    ordered = sorted(values)
    if not ordered:
        raise ValueError("no samples")
    rank = (len(ordered) - 1) * q / 100
    lo, hi = math.floor(rank), math.ceil(rank)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (rank - lo)


def summary_us(seconds: list[float]) -> dict[str, float]:
    us = [s * 1e6 for s in seconds]
    return {"p50_us": percentile(us, 50), "p99_us": percentile(us, 99), "mean_us": statistics.fmean(us),
            "samples": len(us)}


def machine() -> dict[str, Any]:
    info: dict[str, Any] = {"host": platform.node(), "platform": platform.platform(),
                            "python": platform.python_version(), "cpus": os.cpu_count()}
    try:
        import zmq

        info["pyzmq"] = zmq.pyzmq_version()
        info["libzmq"] = zmq.zmq_version()
    except ImportError:  # pragma: no cover - a dependency
        pass
    return info


def header(bench: Bench, workload: str) -> dict[str, Any]:
    return {"workload": workload, "size": bench.size, "device": bench.device, "dtype": bench.dtype,
            "quick": bench.quick, "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")}


def table(title: str, columns: list[str], rows: list[list[Any]]) -> str:
    """A fixed-width text table; floats get 4 significant digits (3 decimals at most)."""
    def cell(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.3f}" if abs(v) < 10 else f"{v:.1f}" if abs(v) < 10_000 else f"{v:.0f}"
        return str(v)

    body = [[cell(v) for v in row] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in body)) for i, c in enumerate(columns)]
    lines = [title, "  ".join(c.rjust(w) for c, w in zip(columns, widths, strict=True))]
    lines += ["  ".join(v.rjust(w) for v, w in zip(r, widths, strict=True)) for r in body]
    return "\n".join(lines)


def write_result(bench: Bench, name: str, result: dict[str, Any]) -> Path:
    bench.out_dir.mkdir(parents=True, exist_ok=True)
    path = bench.out_dir / f"{name}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    return path
