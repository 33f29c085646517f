"""Soak: many contexts, many steps, history bounds on; the driver's memory, fds and threads must stay flat.

    python -m pie_driver_trtllm.benchmarks.soak --contexts 2000 --steps 100000 --out soak.json
    python -m pie_driver_trtllm.benchmarks.soak --minutes 10 --faults --out soak-faults.json

Not part of CI (minutes of CPU). It starts a real driver on the tiny random-weight model with
`max_session_histories` below `--contexts` (so contexts are evicted and come back through HISTORY_GAP)
and `max_history_tokens` small (so histories hit the bound and are truncated, released or forked).
Each forward carries `--batch` contexts, round-robin: greedy mostly, some seeded multinomial and `dist`.
RSS, open fds and threads of the driver are read from /proc after the first tenth of the steps (or of
`--minutes`: warm-up) and then every `--sample-every` forwards; the report gives start, end and peak.
`--faults` mixes in the faults of `soak_faults.py`; every request must still get its reply and every
ok result its outputs (`lost` counts those that did not), and each fault its documented outcome.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from pie_driver_trtllm.benchmarks import soak_faults
from pie_driver_trtllm.client import DriverClient, spawn
from pie_driver_trtllm.engines.faults import ENV_VAR as FAULTS_ENV_VAR
from pie_driver_trtllm.modelgen import make_model


def probe(pid: int) -> dict[str, int]:
    """Resident memory (KiB), open file descriptors and threads of a process, from /proc."""
    fields = {}
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "Threads"):
                fields[key] = int(value.split()[0])
    return {"rss_kib": fields["VmRSS"], "fds": len(os.listdir(f"/proc/{pid}/fd")), "threads": fields["Threads"]}


def sampler(context: int, at: int, step: int) -> dict[str, Any]:
    if context % 10 == 3:
        return {"at": at, "type": "multinomial", "temperature": 0.8, "seed": step}
    if context % 50 == 7:
        return {"at": at, "type": "dist", "k": 4}
    return {"at": at, "type": "greedy"}


class Host:
    """The host side of the soak: its own copy of every history, the next request for each context."""

    def __init__(self, contexts: int, history_tokens: int, faults: bool = False) -> None:
        self.history: dict[int, list[int]] = {c: [] for c in range(contexts)}
        self.limit = history_tokens
        self.faults = faults
        self.maintenance = 0
        self.retried = 0  # results failed by an injected engine fault, sent again

    def request(self, context: int, step: int) -> dict[str, Any]:
        history = self.history[context]
        if not history:  # new, released, truncated to nothing or evicted: prefill a prompt
            history += [(7 * context + i) % 500 + 3 for i in range(4)]
            new, start = history, 0
        else:
            new, start = history[-1:], len(history) - 1
        return {"context": context, "tokens": list(new), "positions": list(range(start, start + len(new))),
                "samplers": [sampler(context, len(new) - 1, step)]}

    def apply(self, client: DriverClient, context: int, result: dict[str, Any]) -> bool:
        """Take one result; True when the context reached the bound and should make room for another."""
        history = self.history[context]
        if not result["ok"]:
            if self.faults and result["error"]["code"] == "ENGINE_ERROR":
                self.retried += 1  # its batch met a raising row: the history stands, the step is sent again
                return False
            assert result["error"]["code"] == "HISTORY_GAP", result  # evicted: start again
            history.clear()
            return False
        output = result["outputs"][0]
        token = output["token"] if "token" in output else output["dist"][0][0]
        trigger = self.faults and token in soak_faults.TRIGGERS  # fed back, it would fail every step after
        history.append(token)
        if trigger or len(history) >= self.limit - 1:  # at the bound: truncate, release or fork, in turn
            self.maintenance += 1
            kind = self.maintenance % 3
            if kind == 0:
                client.call("truncate", context=context, length=2)
                del history[2:]
            elif kind == 1:
                client.call("release", contexts=[context])
                history.clear()
            else:
                client.call("fork", src=context, dst=context ^ 1, length=3)
                self.history[context ^ 1] = history[:3]
                client.call("release", contexts=[context])
                history.clear()
            return True
        return False


def soak(args: argparse.Namespace) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="pie-soak-"))
    model = make_model(args.model_dir or work / "model-tiny", "tiny", seed=0)
    config = work / "driver.toml"
    config.write_text(f'[model]\nsnapshot_dir = "{model}"\n\n[driver]\ndevice = ["cpu"]\n'
                      'activation_dtype = "float32"\nrandom_seed = 0\n\n[driver.options]\nengine = "reference"\n'
                      f"max_session_histories = {args.histories}\nmax_history_tokens = {args.history_tokens}\n"
                      + (soak_faults.OPTIONS if args.faults else ""))
    driver = spawn(config, ready_timeout_s=300, env={FAULTS_ENV_VAR: soak_faults.ENV} if args.faults else None)
    pid = driver.process.pid
    client = driver.client(timeout_s=120)
    chaos = soak_faults.Chaos(driver.endpoint) if args.faults else None
    host = Host(args.contexts, args.history_tokens, args.faults)
    active = list(range(min(args.batch, args.contexts)))  # decoded together until they reach the bound
    upcoming = len(active)
    steps = forwards = lost = 0
    samples: list[dict[str, Any]] = []
    start_probe: dict[str, int] | None = None
    started = time.monotonic()
    until = started + args.minutes * 60 if args.minutes else None

    def running() -> bool:
        return time.monotonic() < until if until is not None else steps < args.steps

    def warm() -> bool:
        return time.monotonic() >= started + args.minutes * 6 if until is not None else steps >= args.steps // 10

    try:
        while running():
            requests = [host.request(c, steps) for c in active]
            poison = chaos.poison(forwards) if chaos else None
            results = client.forward(requests + [poison] if poison else requests)
            lost += abs(len(results) - len(requests) - (poison is not None))
            lost += sum(len(r["outputs"]) != len(q["samplers"]) for q, r in zip(requests, results, strict=False)
                        if r["ok"])
            if poison:
                chaos.check_poison(poison, results[-1])
            for slot, result in enumerate(results[:len(requests)]):
                if host.apply(client, active[slot], result):  # its turn is over: the next context comes in
                    active[slot] = upcoming % args.contexts
                    upcoming += 1
            steps += len(requests)
            forwards += 1
            if chaos:
                chaos.between(forwards)
            if start_probe is None and warm():
                start_probe = probe(pid)  # after a tenth of the run: model, caches and allocator are warm
                samples.append({"steps": steps, **start_probe})
            elif forwards % args.sample_every == 0:
                samples.append({"steps": steps, **probe(pid)})
        end_probe = probe(pid)
        samples.append({"steps": steps, **end_probe})
        stats = client.call("stats").result
        health = client.call("health").result
    finally:
        if chaos:
            chaos.close()
        code = driver.stop()
    elapsed = time.monotonic() - started
    assert start_probe is not None
    return {
        "contexts": args.contexts, "steps": steps, "forwards": forwards, "batch": args.batch,
        "max_session_histories": args.histories, "max_history_tokens": args.history_tokens,
        "seconds": round(elapsed, 1), "steps_per_s": round(steps / elapsed, 1),
        "start": start_probe, "end": end_probe,
        "peak": {k: max(s[k] for s in samples) for k in ("rss_kib", "fds", "threads")},
        "rss_growth_kib": end_probe["rss_kib"] - start_probe["rss_kib"],
        "stats": {k: stats[k] for k in ("requests", "engine_calls", "lookahead_hits", "contexts", "evictions",
                                        "errors", "dropped_replies", "oom_splits", "connections",
                                        "refused_connections")},
        "health": health["status"], "maintenance_ops": host.maintenance, "exit_code": code, "lost": lost,
        "faults": dict(chaos.injected) if chaos else {}, "unexpected": chaos.unexpected if chaos else [],
        "retried_after_engine_faults": host.retried,
        "samples": samples,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--contexts", type=int, default=2000)
    parser.add_argument("--steps", type=int, default=100_000, help="sampler rows served, all contexts together")
    parser.add_argument("--batch", type=int, default=64, help="contexts per forward")
    parser.add_argument("--histories", type=int, default=1024, help="max_session_histories")
    parser.add_argument("--history-tokens", type=int, default=64, help="max_history_tokens")
    parser.add_argument("--minutes", type=float, default=None, help="run this long instead of --steps")
    parser.add_argument("--faults", action="store_true", help="mix in the faults of soak_faults.py")
    parser.add_argument("--sample-every", type=int, default=100, help="forwards between /proc samples")
    parser.add_argument("--model-dir", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    result = soak(args)
    summary = {k: v for k, v in result.items() if k != "samples"}
    print(json.dumps(summary, indent=1))
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
