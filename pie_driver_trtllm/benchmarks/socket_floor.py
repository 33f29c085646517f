"""socket_floor: what a bare round trip costs on this host, with no driver at all.

A 120-byte message to a forked echo process and back, 20,000 times: ZeroMQ DEALER to ROUTER over ipc
(the driver's transport) with the client polling without sleeping and the echo side either polling too
or blocking in `recv`, and a Unix stream socket with both sides polling. ZeroMQ passes every message
through an I/O thread on each side, which sleeps in the kernel between messages, so its round trip wakes
threads four times; the Unix socket's spinning ends wake nobody. The difference is what any ZeroMQ host
pays per forward before the driver does anything.

    python -m pie_driver_trtllm.benchmarks.socket_floor [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import tempfile
import time
from collections.abc import Callable

import zmq

ROUND_TRIPS, WARMUP = 20_000, 1_000
PAYLOAD = b"x" * 120
STOP = b"stop"


def _spin(receive: Callable[[], bytes], again: type[Exception]) -> bytes:
    while True:
        try:
            return receive()
        except again:
            pass


def _zmq_echo(url: str, spin: bool) -> None:
    router = zmq.Context().socket(zmq.ROUTER)
    router.bind(url)
    while True:
        parts = _spin(lambda: router.recv_multipart(zmq.NOBLOCK), zmq.Again) if spin else router.recv_multipart()
        if parts[1] == STOP:
            return
        router.send_multipart(parts)


def zmq_round_trips(echo_spins: bool) -> list[float]:
    url = f"ipc://{tempfile.mkdtemp(prefix='pie-floor-')}/s"
    child = os.fork()
    if child == 0:
        _zmq_echo(url, echo_spins)
        os._exit(0)
    dealer = zmq.Context().socket(zmq.DEALER)
    dealer.connect(url)
    times = []
    for _ in range(ROUND_TRIPS):
        start = time.perf_counter()
        dealer.send(PAYLOAD)
        _spin(lambda: dealer.recv(zmq.NOBLOCK), zmq.Again)
        times.append(time.perf_counter() - start)
    dealer.send(STOP)
    os.waitpid(child, 0)
    return times


def unix_round_trips() -> list[float]:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    child = os.fork()
    if child == 0:
        ours.close()
        theirs.setblocking(False)
        while (message := _spin(lambda: theirs.recv(4096), BlockingIOError)) != STOP:
            theirs.send(message)
        os._exit(0)
    theirs.close()
    ours.setblocking(False)
    times = []
    for _ in range(ROUND_TRIPS):
        start = time.perf_counter()
        ours.send(PAYLOAD)
        _spin(lambda: ours.recv(4096), BlockingIOError)
        times.append(time.perf_counter() - start)
    ours.send(STOP)
    os.waitpid(child, 0)
    return times


def summary(name: str, times: list[float]) -> dict[str, object]:
    kept = times[WARMUP:]
    deciles = statistics.quantiles(kept, n=10)
    return {"transport": name, "median_us": round(statistics.median(kept) * 1e6, 1),
            "p10_us": round(deciles[0] * 1e6, 1), "p90_us": round(deciles[-1] * 1e6, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", help="also write the results here as JSON")
    args = parser.parse_args()
    results = [summary("zmq ipc, both ends poll", zmq_round_trips(echo_spins=True)),
               summary("zmq ipc, the echo side blocks", zmq_round_trips(echo_spins=False)),
               summary("unix stream socket, both ends poll", unix_round_trips())]
    for row in results:
        print(f"{row['transport']:38s} median {row['median_us']:7.1f} us  (p10 {row['p10_us']}, p90 {row['p90_us']})")
    if args.out:
        with open(args.out, "w") as out:
            json.dump(results, out, indent=1)


if __name__ == "__main__":
    main()
