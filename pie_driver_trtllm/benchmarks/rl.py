"""rl: a GRPO-shaped rollout through the driver, and the ops an RL loop runs between rollouts.

One driver subprocess (reference engine) and the client. P prompts of L tokens, S samples each, N sampled
tokens per sample, seeded multinomial sampling. Each prompt's context is its first sample; `fork` makes
the other S - 1 after the prompt's forward, and each of them sends the prompt's last token again with its
own sampler. Prompts go in waves small enough that every live sample keeps its cache slot. The same
rollout also runs with every sample sent as a fresh context with the whole prompt (no forks), the two
alternating three times. Reported: prompt tokens the engine computed over P x L (its `stats`), and
tokens/s of both ways (the engine copies a resident prompt into a fresh context too, so the difference
is what forks save the host and the wire).

When the driver's handshake advertises them (`rl_ops` in its capabilities), also: `load_weights` of a
second checkpoint against a floor measured in the same run (reading its safetensors files plus the copy of
every tensor to the device), and `sleep` level 2 then `wake` plus the first forward after it; on CUDA the
GPU memory sleep frees, read with `torch.cuda.mem_get_info` from this process. Otherwise each says why
it was skipped.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from pie_driver_trtllm.benchmarks.common import Bench, header, table, write_config, write_result
from pie_driver_trtllm.client import DriverClient, spawn

FORKS_IN_FLIGHT = 128  # half the driver's default max_queued_requests
REFITS = 3  # load_weights calls timed (alternating checkpoints), each against a floor read just after it
PAIRS = 3  # rollouts of each side, alternating, in one run: medians hold up beside other work


def plan(bench: Bench) -> dict[str, int]:
    """The rollout's shape: prompts, prompt tokens, samples per prompt, sampled tokens per sample, and the
    most samples alive at once (a wave)."""
    if bench.quick:
        return {"prompts": 4, "prompt_tokens": 32, "samples": 4, "new_tokens": 8, "wave": 16}
    if bench.size == "1b":
        return {"prompts": 64, "prompt_tokens": 512, "samples": 8, "new_tokens": 128, "wave": 256}
    return {"prompts": 8, "prompt_tokens": 128, "samples": 8, "new_tokens": 32, "wave": 64}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m pie_driver_trtllm.benchmarks.rl", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="tiny")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", type=Path, required=True, help="directory for rl.json")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="pie-bench-", dir="/tmp") as work:
        run(Bench(size=args.size, device=args.device, dtype=args.dtype, out_dir=args.out, quick=args.quick,
                  work_dir=Path(work)))


def prompt_tokens(p: int, length: int, vocab: int) -> list[int]:
    return [(31 * p + 17 * i + (i * i) % 13) % (vocab - 3) + 3 for i in range(length)]


def sampler(p: int, s: int, step: int, at: int) -> dict[str, Any]:
    """Sample s of prompt p, its token `step`: the same seed both ways."""
    return {"at": at, "type": "multinomial", "temperature": 1.0, "seed": (p * 1_000 + s) * 10_000 + step}


def engine_computed(client: DriverClient) -> int:
    return int(client.call("stats")["engine"].get("prompt_tokens_computed", 0))


def rollout(client: DriverClient, shape: dict[str, int], vocab: int, forks: bool, first_id: int) -> dict[str, Any]:
    """Every prompt's S samples to N tokens; the tokens, wall seconds and the prompt tokens computed."""
    prompts, length, samples, new = (shape[k] for k in ("prompts", "prompt_tokens", "samples", "new_tokens"))
    per_wave = max(1, shape["wave"] // samples)
    made: dict[tuple[int, int], list[int]] = {}
    before = engine_computed(client)
    began = time.perf_counter()
    for first in range(0, prompts, per_wave):
        wave = range(first, min(prompts, first + per_wave))
        ids = {first_id + p * samples + s: (p, s) for p in wave for s in range(samples)}
        requests = []
        if forks:  # the prompt's context is sample 0; the others are forked from it after its forward
            for p in wave:
                tokens = prompt_tokens(p, length, vocab)
                requests.append({"context": first_id + p * samples, "tokens": tokens,
                                 "positions": list(range(length)), "samplers": [sampler(p, 0, 0, length - 1)]})
            pending = _step(client, requests, made, ids, new)
            _forks(client, [(first_id + p * samples, first_id + p * samples + s) for p in wave
                            for s in range(1, samples)], length)
            for p in wave:
                last = prompt_tokens(p, length, vocab)[-1:]
                pending += [{"context": first_id + p * samples + s, "tokens": last, "positions": [length - 1],
                             "samplers": [sampler(p, s, 0, 0)]} for s in range(1, samples)]
        else:
            pending = [{"context": first_id + p * samples + s, "tokens": prompt_tokens(p, length, vocab),
                        "positions": list(range(length)), "samplers": [sampler(p, s, 0, length - 1)]}
                       for p in wave for s in range(samples)]
        while pending:
            pending = _step(client, pending, made, ids, new)
        client.call("release", contexts=list(ids))
    seconds = time.perf_counter() - began
    return {"tokens": made, "seconds": seconds, "prompt_tokens_computed": engine_computed(client) - before}


def _forks(client: DriverClient, pairs: list[tuple[int, int]], length: int) -> None:
    """The forks sent back to back, then their replies read (a host need not wait for each; the driver
    answers state ops in order and holds up to `max_queued_requests` of them)."""
    for first in range(0, len(pairs), FORKS_IN_FLIGHT):
        sent = [client.send("fork", src=src, dst=dst, length=length)
                for src, dst in pairs[first:first + FORKS_IN_FLIGHT]]
        for request_id in sent:
            reply = client.recv()
            if reply.id != request_id or not reply.ok:
                raise RuntimeError(f"fork {request_id} answered {reply!r}")


def _step(client: DriverClient, requests: list[dict[str, Any]], made: dict[tuple[int, int], list[int]],
          ids: dict[int, tuple[int, int]], new: int) -> list[dict[str, Any]]:
    """One forward; the next request of each sample that wants more (its token fed back, the next seed)."""
    out = []
    for request, result in zip(requests, client.forward(requests), strict=True):
        if not result["ok"]:
            raise RuntimeError(f"rl forward failed: {result['error']}")
        token = result["outputs"][0]["token"]
        p, s = ids[request["context"]]
        tokens = made.setdefault((p, s), [])
        tokens.append(token)
        if len(tokens) < new:
            out.append({"context": request["context"], "tokens": [token],
                        "positions": [request["positions"][-1] + 1], "samplers": [sampler(p, s, len(tokens), 0)]})
    return out


def _floor(bench: Bench, checkpoint: Path) -> float:
    """Seconds to read every tensor of the checkpoint's safetensors files and copy each to the device."""
    from safetensors import safe_open

    bench.sync()
    began = time.perf_counter()
    for path in sorted(checkpoint.glob("*.safetensors")):
        with safe_open(str(path), framework="pt", device="cpu") as f:
            for name in f.keys():  # noqa: SIM118 - safe_open is not a mapping
                tensor = f.get_tensor(name)
                if bench.device != "cpu":
                    tensor.to(bench.device, non_blocking=False)
    bench.sync()
    seconds = time.perf_counter() - began
    if bench.device != "cpu":  # this process's cached blocks would count against the driver's memory
        import torch

        torch.cuda.empty_cache()
    return seconds


def rl_ops(handshake: dict[str, Any]) -> list[str]:
    """The RL ops the driver advertises (none when its handshake has no `rl_ops`)."""
    caps = handshake.get("caps", {})
    return list(caps.get("rl_ops", handshake.get("rl_ops", [])))


def refit(bench: Bench, client: DriverClient, checkpoints: list[Path], probe: dict[str, Any]) -> dict[str, Any]:
    """`load_weights` timed against the floor of the same files; the forward after each names its version."""
    times, floors = [], []
    for version in range(1, REFITS + 1):
        checkpoint = checkpoints[version % 2]
        _floor(bench, checkpoint)  # the files in the page cache for both sides
        began = time.perf_counter()
        reply = client.call("load_weights", path=str(checkpoint), version=version)
        times.append(time.perf_counter() - began)
        floors.append(_floor(bench, checkpoint))
        if reply["weights_version"] != version:
            raise RuntimeError(f"load_weights answered {reply.result!r} for version {version}")
        after = client.call("forward", requests=[probe])
        if after.result.get("weights_version") != version:
            raise RuntimeError(f"the forward after load_weights {version} names weights {after.result!r}")
    refit_s, floor_s = statistics.median(times), statistics.median(floors)
    return {"refit_s": refit_s, "floor_s": floor_s, "ratio": refit_s / floor_s, "refit_values_s": times,
            "floor_values_s": floors, "checkpoint_bytes": sum(f.stat().st_size for f in
                                                              checkpoints[0].glob("*.safetensors"))}


def sleep_wake(bench: Bench, client: DriverClient, probe: dict[str, Any], driver_bytes: int | None,
               refit_s: float | None) -> dict[str, Any]:
    """Sleep level 2, the memory it frees (CUDA), then wake plus the first forward, timed together."""
    free = _free_bytes(bench)
    client.call("sleep", level=2)
    freed = None if free is None else _free_bytes(bench) - free  # type: ignore[operator]
    asleep = client.call("forward", check=False, requests=[probe])
    entry = asleep.result["results"][0] if asleep.ok else {"error": {"code": asleep.error.code}}  # type: ignore[union-attr]
    began = time.perf_counter()
    client.call("wake")
    results = client.forward([probe])
    wake_s = time.perf_counter() - began
    if not results[0]["ok"]:
        raise RuntimeError(f"the first forward after wake failed: {results[0]['error']}")
    out: dict[str, Any] = {"wake_and_first_forward_s": wake_s,
                           "asleep_forward_error": None if entry.get("ok") else entry["error"]["code"]}
    if refit_s:
        out["wake_over_refit"] = wake_s / refit_s
    if freed is not None and driver_bytes:
        out.update(driver_bytes=driver_bytes, freed_bytes=freed, freed_share=freed / driver_bytes)
    return out


def _free_bytes(bench: Bench) -> int | None:
    if not bench.device.startswith("cuda"):
        return None
    import torch

    return int(torch.cuda.mem_get_info(bench.device)[0])


def run(bench: Bench) -> dict[str, Any]:
    from pie_driver_trtllm.modelgen import make_model

    shape = plan(bench)
    model = bench.model()
    total_prompt = shape["prompts"] * shape["prompt_tokens"]
    free_before = _free_bytes(bench)
    config = write_config(bench, bench.work_dir / "rl", model, lookahead_tokens=1,
                          max_concurrent_requests=shape["wave"],
                          max_batched_tokens=max(8192, shape["wave"] * shape["prompt_tokens"]),
                          max_seq_len=shape["prompt_tokens"] + shape["new_tokens"] + 8)
    driver = spawn(config, ready_timeout_s=600)
    skipped: dict[str, str] = {}
    try:
        client = driver.client(timeout_s=600)
        hello = client.call("handshake").result
        vocab = hello["model"]["vocab_size"]
        warm = {**shape, "prompts": min(shape["prompts"], max(1, shape["wave"] // shape["samples"])), "new_tokens": 2}
        for forks in (True, False):  # warm-up: every shape the timed runs use, both ways
            rollout(client, warm, vocab, forks, 1 << 40)
        pairs = [{name: rollout(client, shape, vocab, name == "forks", (1 << 41) * (2 * i + j + 1))
                  for j, name in enumerate(("forks", "fresh"))} for i in range(PAIRS)]
        driver_bytes = None if free_before is None else free_before - _free_bytes(bench)  # type: ignore[operator]
        ops = rl_ops(hello)
        probe = {"context": 7, "tokens": prompt_tokens(0, 16, vocab), "positions": list(range(16)),
                 "samplers": [{"at": 15, "type": "greedy"}]}
        refit_result: dict[str, Any] | None = None
        if "load_weights" in ops:
            second = make_model(bench.work_dir / "models" / f"{bench.size}-seed1", bench.size, seed=1,
                                dtype=bench.dtype)
            refit_result = refit(bench, client, [model, second], probe)
        else:
            skipped["refit"] = "the driver does not advertise load_weights (no rl_ops in its handshake caps)"
        sleep_result: dict[str, Any] | None = None
        if "sleep" in ops and "wake" in ops and 2 in hello.get("caps", {}).get("sleep_levels", [2]):
            sleep_result = sleep_wake(bench, client, probe, driver_bytes,
                                      refit_result["refit_s"] if refit_result else None)
        else:
            skipped["sleep"] = "the driver does not advertise sleep level 2 and wake (rl_ops, sleep_levels)"
        client.close()
    finally:
        driver.stop()
    for reason in skipped.values():
        print(f"rl: skipped: {reason}")
    # The worst prompt count of the pairs; the median time of each side and of the pairs' ratios.
    forks = {"prompt_tokens_computed": max(p["forks"]["prompt_tokens_computed"] for p in pairs),
             "seconds": statistics.median(p["forks"]["seconds"] for p in pairs)}
    fresh = {"prompt_tokens_computed": max(p["fresh"]["prompt_tokens_computed"] for p in pairs),
             "seconds": statistics.median(p["fresh"]["seconds"] for p in pairs)}
    tokens = shape["prompts"] * shape["samples"] * shape["new_tokens"]
    made = [(p["forks"]["tokens"][k], p["fresh"]["tokens"][k]) for p in pairs for k in p["forks"]["tokens"]]
    result: dict[str, Any] = {
        **header(bench, "rl"), **shape, "pairs": PAIRS,
        "prompt_ratio": forks["prompt_tokens_computed"] / total_prompt,
        "fresh_prompt_ratio": fresh["prompt_tokens_computed"] / total_prompt,
        "forks_tokens_per_s": tokens / forks["seconds"], "fresh_tokens_per_s": tokens / fresh["seconds"],
        "tokens_per_s_ratio": statistics.median(p["fresh"]["seconds"] / p["forks"]["seconds"] for p in pairs),
        "same_tokens_share": sum(a == b for a, b in made) / len(made),
        "refit": refit_result, "sleep": sleep_result, "skipped": skipped,
        "target_prompt_ratio_max": 1.05, "target_refit_ratio_max_h100": 1.5,
        "target_sleep_freed_share_min": 0.9, "target_wake_over_refit_max": 2.0}
    rows = [["forks", forks["prompt_tokens_computed"], result["prompt_ratio"], result["forks_tokens_per_s"]],
            ["fresh contexts", fresh["prompt_tokens_computed"], result["fresh_prompt_ratio"],
             result["fresh_tokens_per_s"]]]
    print(table(f"rl: {shape['prompts']} prompts x {shape['prompt_tokens']} tokens, {shape['samples']} samples, "
                f"{shape['new_tokens']} tokens each", ["samples by", "prompt tokens computed", "/ (P x L)",
                                                       "tokens/s"], rows))
    if refit_result:
        print(f"rl: load_weights {refit_result['refit_s'] * 1e3:.1f} ms, floor {refit_result['floor_s'] * 1e3:.1f} ms"
              f" (x{refit_result['ratio']:.2f})")
    if sleep_result:
        print(f"rl: wake + first forward {sleep_result['wake_and_first_forward_s'] * 1e3:.1f} ms"
              + (f", sleep 2 freed {sleep_result['freed_share']:.1%} of the driver's GPU memory"
                 if "freed_share" in sleep_result else ""))
    write_result(bench, "rl", result)
    return result


if __name__ == "__main__":
    main()
