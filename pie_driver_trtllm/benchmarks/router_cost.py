"""The replica router's own CPU time per forward: what it adds to one driver's, replicas left out.

    python -m pie_driver_trtllm.benchmarks.router_cost --contexts 64 256 --forwards 2000

A router over two stand-in replicas that answer at once serves decode forwards of N contexts (one token
and one greedy sampler each; the contexts alternate between the replicas). Per forward it times
the router's own work on the critical path: decoding the host's frame, placing every request,
encoding each replica's share, decoding the replies and encoding the reply to the host. The stand-ins
answer with replies made before the clock starts. Times are the thread's CPU time, which a machine
busy with other work disturbs far less than wall time. Both paths run on the
same frames: `spliced` (the one-pass path every well-formed forward within the caps takes) and
`general` (the path of anything else: one validated object per request, re-encoded).
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import msgspec

from pie_driver_trtllm.replicas.batches import ForwardReply, take_replies
from pie_driver_trtllm.replicas.replica_calls import ReplicaCalls
from pie_driver_trtllm.replicas.router import ReplicaSet
from pie_driver_trtllm.wire.codec import Limits, Request, decode_frame, encode_ok

LIMITS = Limits(vocab_size=32000, max_model_len=4096, max_forward_requests=1024, max_forward_tokens=16384,
                max_logprob_labels=20, max_frame_bytes=64 << 20)
REPLICA_CAPS = (512, 8192)
_REPLY = msgspec.msgpack.Encoder()


class _StandIn:
    """A replica's work socket that takes every sub-forward and keeps nothing; the replies are made
    before the clock starts."""

    def send_raw(self, frame: bytes) -> None:
        pass


class _Router(ReplicaSet):
    """The router's routing code over stand-ins instead of subprocesses."""

    def __init__(self, replicas: int) -> None:
        self._routing_state()
        self._lock = threading.RLock()
        self._pool = SimpleNamespace(mark_dead=lambda replica: None, close_retired=lambda kind: None)
        self.replicas = [SimpleNamespace(index=i, device="cpu", alive=True, contexts=set(), work=_StandIn())
                         for i in range(replicas)]
        self._calls = _StandInCalls(self.replicas, lambda replica: None)  # type: ignore[arg-type]
        self._replica_caps = REPLICA_CAPS
        self.replies = self._calls.replies


class _StandInCalls(ReplicaCalls):
    """A stand-in for the router's replica calls: the replies are made beforehand (`fill_replies`)."""

    def __init__(self, replicas: list[Any], mark_dead: Callable[[Any], None]) -> None:
        super().__init__(replicas, mark_dead)
        self.replies: dict[int, bytes] = {}

    def gather(self, sent: list[tuple[int, int]]) -> dict[int, Any]:
        """The replies, decoded as the router's wait decodes them (the wait itself left out)."""
        replies: dict[int, tuple[bytes, ForwardReply] | None] = {}
        take_replies([self.replies.pop(request_id) for _, request_id in sent], {i for _, i in sent}, replies)
        return replies


def frame(contexts: int, request_id: int, position: int) -> bytes:
    requests = [{"context": c, "tokens": [100 + c % 1000], "positions": [position],
                 "samplers": [{"at": 0, "type": "greedy"}]} for c in range(contexts)]
    return msgspec.msgpack.encode({"v": 1, "id": request_id, "op": "forward", "requests": requests})


def fill_replies(router: _Router, contexts: int, forwards: int) -> None:
    """The stand-ins' replies to the next `forwards` forwards of `contexts` contexts, made beforehand:
    one sub-forward per replica with a share, the next ids in turn, each result its own."""
    request_id = next(router._calls.ids)
    router._calls.ids = itertools.count(request_id)
    for _ in range(forwards):
        for share in (contexts - contexts // 2, contexts // 2):  # replica 0 takes the odd one
            if share:
                results = [{"ok": True, "outputs": [{"token": request_id * 1000 + i}]} for i in range(share)]
                router.replies[request_id] = _REPLY.encode({"v": 1, "id": request_id, "ok": True, "results": results})
                request_id += 1


def forward(router: _Router, decode: Callable[[bytes, Limits], Request], data: bytes) -> bytes:
    """One forward through the router: the host's frame in, the reply frame out."""
    request = decode(data, LIMITS)
    return encode_ok(request.id, router.handle(request))


def measure(contexts: int, forwards: int, spliced: bool) -> dict[str, float]:
    """Microseconds of CPU per forward of the router's own work (median and spread over `forwards`)."""
    router = _Router(2)
    decode = router.decode_frame if spliced else decode_frame
    warmup = 50
    frames = [frame(contexts, i + 1, 16 + i % 64) for i in range(forwards + warmup)]
    fill_replies(router, contexts, len(frames))
    samples = []
    for index, data in enumerate(frames):
        started = time.thread_time()
        reply = forward(router, decode, data)
        elapsed = time.thread_time() - started
        if index >= warmup:  # the first ones place every context
            samples.append(elapsed * 1e6)
        assert len(reply) > contexts
    samples.sort()
    return {"median_us": statistics.median(samples), "p10_us": samples[len(samples) // 10],
            "p90_us": samples[len(samples) * 9 // 10], "forwards": forwards}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--contexts", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--forwards", type=int, default=2000)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    results: dict[str, Any] = {}
    print(f"{'contexts':>8} {'path':>8} {'median us':>10} {'p10':>7} {'p90':>7}")
    for contexts in args.contexts:
        for name in ("spliced", "general"):
            result = results.setdefault(str(contexts), {})[name] = measure(contexts, args.forwards, name == "spliced")
            print(f"{contexts:>8} {name:>8} {result['median_us']:>10.1f} {result['p10_us']:>7.1f} "
                  f"{result['p90_us']:>7.1f}")
    if args.out:
        args.out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
