"""codec: the driver-side cost of one large forward frame: 64 requests carrying 8,192 tokens in all.

Per frame: `protocol.decode_frame` (with `Limits`, so every edge check runs) plus `protocol.encode_ok` of
the reply (one greedy token per request). The host-side `msgpack.packb` of the frame is reported apart.
"""

from __future__ import annotations

import random
import statistics
import time
from typing import Any

import msgpack

from pie_driver_trtllm.benchmarks.common import Bench, header, percentile, table, write_result
from pie_driver_trtllm.wire.codec import ForwardItem, Limits, decode_frame, encode_ok

REQUESTS, TOKENS = 64, 8192
LIMITS = Limits(vocab_size=32000, max_model_len=1 << 16, max_forward_requests=128, max_forward_tokens=TOKENS,
                max_logprob_labels=0, max_frame_bytes=64 << 20)


def build_forward(requests: int = REQUESTS, tokens: int = TOKENS, seed: int = 0) -> dict[str, Any]:
    """A forward map: `requests` prefills of `tokens // requests` random ids each, one greedy sampler each."""
    rng = random.Random(seed)
    per = tokens // requests
    return {"v": 1, "id": 7, "op": "forward", "requests": [
        {"context": c, "tokens": [rng.randrange(3, LIMITS.vocab_size) for _ in range(per)],
         "positions": list(range(1000, 1000 + per)), "samplers": [{"at": per - 1, "type": "greedy"}]}
        for c in range(requests)]}


def driver_side(frame: bytes) -> tuple[Any, bytes]:
    """What the driver does with one frame outside the engine: decode and check it, then encode a reply."""
    request = decode_frame(frame, LIMITS)
    results = [{"ok": True, "outputs": [{"token": (item.context * 31 + 7) % LIMITS.vocab_size}]}
               for item in request.body.items]
    return request, encode_ok(request.id, {"results": results})


def run(bench: Bench) -> dict[str, Any]:
    iterations, warmup = (50, 10) if bench.quick else (2000, 200)
    forward = build_forward()
    frame = msgpack.packb(forward)
    request, reply = driver_side(frame)
    items = [i for i in request.body.items if isinstance(i, ForwardItem)]
    for _ in range(warmup):
        driver_side(frame)
    decode_s, encode_s, total_s, host_s = [], [], [], []
    results = [{"ok": True, "outputs": [{"token": 5}]} for _ in items]
    for _ in range(iterations):
        t0 = time.perf_counter()
        decoded = decode_frame(frame, LIMITS)
        t1 = time.perf_counter()
        encode_ok(decoded.id, {"results": results})
        t2 = time.perf_counter()
        msgpack.packb(forward)
        t3 = time.perf_counter()
        decode_s.append(t1 - t0)
        encode_s.append(t2 - t1)
        total_s.append(t2 - t0)
        host_s.append(t3 - t2)
    ms = lambda xs: [x * 1e3 for x in xs]  # noqa: E731
    total = ms(total_s)
    result = {**header(bench, "codec"), "iterations": iterations, "frame_bytes": len(frame), "reply_bytes": len(reply),
              "requests": len(items), "tokens": sum(len(i.tokens) for i in items),
              "mean_ms": statistics.fmean(total), "p50_ms": percentile(total, 50), "p99_ms": percentile(total, 99),
              "decode_mean_ms": statistics.fmean(ms(decode_s)), "encode_reply_mean_ms": statistics.fmean(ms(encode_s)),
              "host_encode_mean_ms": statistics.fmean(ms(host_s)), "target_mean_ms_max": 1.0}
    print(table(f"codec: forward frame of {result['requests']} requests, {result['tokens']} tokens "
                f"({len(frame)} B), {iterations} frames",
                ["part", "mean ms", "p99 ms"],
                [["decode_frame + encode_ok", result["mean_ms"], result["p99_ms"]],
                 ["  decode_frame", result["decode_mean_ms"], percentile(ms(decode_s), 99)],
                 ["  encode_ok (reply)", result["encode_reply_mean_ms"], percentile(ms(encode_s), 99)],
                 ["host msgpack.packb (apart)", result["host_encode_mean_ms"], percentile(ms(host_s), 99)]]))
    print(f"driver-side codec per frame: {result['mean_ms']:.3f} ms mean (target < 1 ms)")
    write_result(bench, "codec", result)
    return result
