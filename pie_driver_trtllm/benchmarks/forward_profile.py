"""Where one decode forward's CPU time goes, stage by stage, on both sides of the socket.

    python -m pie_driver_trtllm.benchmarks.forward_profile --batch 64 --steps 300

The driver's own stack (`DriverCore` + codec) around an engine whose step is free, called in process so
that each stage can be timed alone: the host building and encoding the requests, the driver decoding the
frame, planning (histories, lookahead), the engine call, assembling and encoding the reply, and the host
decoding it. Medians in microseconds.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import time

from pie_driver_trtllm.benchmarks.transport import build_server
from pie_driver_trtllm.client import _ENCODER, parse_reply
from pie_driver_trtllm.wire.codec import decode_frame, encode_ok

STAGES = ("host build + encode", "driver decode", "driver plan", "engine (free)", "driver reply + encode",
          "host decode")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=300)
    args = parser.parse_args()
    server = build_server("ipc:///tmp/pie-forward-profile.sock")
    core, limits = server.backend.core, server.limits
    lengths = {c: 0 for c in range(args.batch)}

    def step() -> list[float]:
        clock = [time.perf_counter()]
        requests = [{"context": c, "tokens": [5], "positions": [n], "samplers": [{"at": 0, "type": "greedy"}]}
                    for c, n in lengths.items()]
        frame = _ENCODER.encode({"v": 1, "id": 1, "op": "forward", "requests": requests})
        clock.append(time.perf_counter())
        request = decode_frame(memoryview(frame), limits)
        clock.append(time.perf_counter())
        plan = core.plan_forward(request.body)
        clock.append(time.perf_counter())
        results = core.run_rows(plan.rows)
        clock.append(time.perf_counter())
        reply = encode_ok(request.id, core.finish_forward(plan, results))
        clock.append(time.perf_counter())
        parse_reply(reply)
        clock.append(time.perf_counter())
        for c in lengths:
            lengths[c] += 1
        return [(b - a) * 1e6 for a, b in itertools.pairwise(clock)]

    for _ in range(50):
        step()
    samples = [step() for _ in range(args.steps)]
    print(f"one decode forward of {args.batch} requests, median of {args.steps} (us)")
    for index, name in enumerate(STAGES):
        print(f"  {name:<24} {statistics.median(s[index] for s in samples):8.1f}")
    print(f"  {'total':<24} {statistics.median(sum(s) for s in samples):8.1f}")


if __name__ == "__main__":
    main()
