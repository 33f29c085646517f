"""cold_steps: the driver's own stages when each engine call leaves the CPU's caches cold, with and without
rehearsal (`rehearse_steps`).

    python -m pie_driver_trtllm.benchmarks.cold_steps [--batches 1 64] [--reps 5] [--steps 100] [--evict-mib 16]
                                                      [--host-us 100]

A real engine call runs a few milliseconds of other code between two decode steps, and the driver's next
step then finds its code and data evicted: on an H100 host its decode and plan took several times their
back-to-back cost. Here the null engine copies a buffer of `--evict-mib` each step to the same effect.
Two servers, one rehearsing and one not, take turns; a host on each one's stream socket sends decode
forwards and polls for the replies, spending `--host-us` on its own work between a reply and the next
forward (a host that sends at once leaves no time to rehearse in). Each server's `stats.stages` give its
own stages per forward: `decode`, `plan`, `finish`, `encode` and `send` (their `total`), and `wait`, from
a reply to the next forward's frame in hand: the host's time, plus any delay a rehearsal still under way
adds to it. Reported: the median of the repetitions' means and their spread (min, max), in microseconds.
"""

from __future__ import annotations

import argparse
import multiprocessing
import shutil
import statistics
import tempfile
from typing import Any

from pie_driver_trtllm.benchmarks.common import table
from pie_driver_trtllm.benchmarks.driver_cost import Frames, _check, _round_trip, serve, socket_times

STAGES = ("decode", "plan", "finish", "encode", "send")


def measure(batches: tuple[int, ...] = (1, 64), reps: int = 5, steps: int = 100,
            evict_bytes: int = 16 << 20, host_us: float = 100.0) -> list[dict[str, Any]]:
    from pie_driver_trtllm.client import DriverClient

    directory = tempfile.mkdtemp(prefix="pie-bench-", dir="/tmp")
    mp = multiprocessing.get_context("spawn")
    workers, clients = [], {}
    try:
        for rehearse in (False, True):
            ready = mp.Queue()
            url = f"ipc://{directory}/{int(rehearse)}.sock"
            worker = mp.Process(target=serve, args=(url, max(batches), ready, rehearse, evict_bytes), daemon=True)
            worker.start()
            workers.append(worker)
            clients[rehearse] = DriverClient(ready.get(timeout=60), timeout_s=30)
        rows = []
        for batch in batches:
            frames = {rehearse: Frames(batch, batch * 10_000) for rehearse in clients}
            samples: dict[tuple[bool, str], list[float]] = {}
            for rehearse, client in clients.items():
                _check(_round_trip(client, frames[rehearse].prefill()), batch)
                socket_times(client, frames[rehearse].steps(10), batch)
            for _ in range(reps):  # the two servers take turns, so that machine noise hits both alike
                for rehearse, client in clients.items():
                    before = client.call("stats")["stages"]["seconds"]
                    socket_times(client, frames[rehearse].steps(steps), batch, host_us / 1e6)
                    after = client.call("stats")["stages"]["seconds"]
                    per = {stage: (after[stage] - before[stage]) / steps * 1e6 for stage in STAGES}
                    for stage, us in per.items():
                        samples.setdefault((rehearse, stage), []).append(us)
                    samples.setdefault((rehearse, "total"), []).append(sum(per.values()))
                    samples.setdefault((rehearse, "wait"), []).append((after["wait"] - before["wait"]) / steps * 1e6)
            for rehearse, client in clients.items():
                client.call("release", contexts=frames[rehearse].contexts)
            rows.append({"batch": batch, "steps": steps, "reps": reps, "evict_bytes": evict_bytes, "host_us": host_us,
                         **{f"{'rehearsed' if rehearse else 'plain'}_{stage}": _spread(values)
                            for (rehearse, stage), values in samples.items()}})
        for client in clients.values():
            client.call("shutdown")
            client.close()
    finally:
        for worker in workers:
            worker.join(10)
            if worker.is_alive():
                worker.kill()
        shutil.rmtree(directory, ignore_errors=True)
    return rows


def _spread(values: list[float]) -> dict[str, float]:
    return {"median_us": statistics.median(values), "min_us": min(values), "max_us": max(values)}


def report(rows: list[dict[str, Any]]) -> str:
    def cell(r: dict[str, Any], name: str) -> str:
        s = r[name]
        return f"{s['median_us']:.1f} ({s['min_us']:.1f}-{s['max_us']:.1f})"

    return table(f"cold_steps: the driver's stages per forward, us, the engine evicting {rows[0]['evict_bytes'] >> 20} "
                 f"MiB a step, the host spending {rows[0]['host_us']:g} us between steps; median (min-max) of "
                 f"{rows[0]['reps']} repetitions of {rows[0]['steps']} steps",
                 ["batch", "rehearsal", *STAGES, "total", "wait"],
                 [[r["batch"], label, *(cell(r, f"{prefix}_{stage}") for stage in (*STAGES, "total", "wait"))]
                  for r in rows for label, prefix in (("off", "plain"), ("on", "rehearsed"))])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 64])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--evict-mib", type=int, default=16)
    parser.add_argument("--host-us", type=float, default=100.0)
    args = parser.parse_args()
    print(report(measure(tuple(args.batches), args.reps, args.steps, args.evict_mib << 20, args.host_us)))


if __name__ == "__main__":
    main()
