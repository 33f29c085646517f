"""The faults a soak mixes into its traffic (`--faults`), and the reply each must get.

Engine faults ride on the host's own forwards (a poison request whose last token is a trigger of
`PIE_DRIVER_FAULTS`); the rest come from other connections: garbage, oversize and amplifying frames,
tiny temperatures, a host that leaves mid-forward, one that reads none of its large replies, and a
flood of connections past `max_connections`. Each is checked against its documented outcome.
"""

from __future__ import annotations

import os
import socket
import time
from collections import Counter
from typing import Any

import zmq

from pie_driver_trtllm.client import _ENCODER, DriverClient, parse_reply

RAISE_TOKEN, OOM_TOKEN = 511, 509
TRIGGERS = frozenset((RAISE_TOKEN, OOM_TOKEN))
ENV = f"raise_on_token:{RAISE_TOKEN},oom_on_token:{OOM_TOKEN}"
OPTIONS = "max_frame_bytes = 1048576\nmax_connections = 16\nmax_unread_reply_bytes = 1048576\n"
POISON_BASE = 1 << 30  # context ids of poison and chaos requests, apart from the host's


def _forward(request_id: int, requests: list[dict[str, Any]]) -> bytes:
    return _ENCODER.encode({"v": 1, "id": request_id, "op": "forward", "requests": requests})


class Chaos:
    """Injects one fault every few forwards, in turn, and counts what came back."""

    def __init__(self, endpoint: str) -> None:
        self.endpoint = endpoint
        self.client = DriverClient(endpoint, timeout_s=120)
        self.injected: Counter[str] = Counter()
        self.unexpected: list[str] = []
        self._next = POISON_BASE

    def _context(self) -> int:
        self._next += 1
        return self._next

    def poison(self, forward: int) -> dict[str, Any] | None:
        """A request to add to the host's forward: a raising row every 7th, an out-of-memory row every 11th."""
        token = RAISE_TOKEN if forward % 7 == 3 else OOM_TOKEN if forward % 11 == 5 else None
        if token is None:
            return None
        self.injected["engine_raise" if token == RAISE_TOKEN else "engine_oom"] += 1
        return {"context": self._context(), "tokens": [3, token], "positions": [0, 1],
                "samplers": [{"at": 1, "type": "greedy"}]}

    def check_poison(self, request: dict[str, Any], result: dict[str, Any]) -> None:
        if result["ok"] or result["error"]["code"] != "ENGINE_ERROR":
            self.unexpected.append(f"poison {request['tokens'][-1]}: {result}")
        self.client.call("release", contexts=[request["context"]])

    def between(self, forward: int) -> None:
        """A fault from another connection, every few forwards."""
        for every, fault in ((13, self.garbage), (17, self.amplify), (19, self.tiny_temperature),
                             (23, self.leave_mid_forward), (29, self.oversize), (31, self.flood),
                             (97, self.unread_large_replies)):
            if forward % every == every - 1:
                self.injected[fault.__name__] += 1
                fault()

    def _expect(self, name: str, reply: Any, code: str | None) -> None:
        got = "ok" if reply.ok else reply.error.code
        if got != (code or "ok"):
            self.unexpected.append(f"{name}: expected {code or 'ok'}, got {got}")

    def garbage(self) -> None:
        self.client.send_raw(os.urandom(64))
        self._expect("garbage", self.client.recv(), "BAD_FRAME")

    def oversize(self) -> None:
        self.client.send_raw(b"\x81" + b"\xa1v" + b"\x01" + b"\0" * (3 << 19))  # 1.5 MiB over a 1 MiB cap
        self._expect("oversize", self.client.recv(), "BAD_FRAME")

    def amplify(self) -> None:
        samplers = [{"at": 0, "type": "dist", "k": 512}] * 3000  # 1.5 M values, over max_output_elements
        reply = self.client.call("forward", check=False, requests=[
            {"context": self._context(), "tokens": [3], "positions": [0], "samplers": samplers}])
        self._expect("amplify", reply, "CAPACITY")

    def tiny_temperature(self) -> None:
        context = self._context()
        reply = self.client.call("forward", check=False, requests=[
            {"context": context, "tokens": [3, 4], "positions": [0, 1],
             "samplers": [{"at": 1, "type": "multinomial", "temperature": 1e-300}]}])
        self._expect("tiny_temperature", reply, None)
        self.client.call("release", contexts=[context])

    def leave_mid_forward(self) -> None:
        gone = zmq.Context.instance().socket(zmq.DEALER)
        gone.setsockopt(zmq.LINGER, 1000)
        gone.connect(self.endpoint)
        gone.send(_forward(1, [{"context": self._context(), "tokens": [3, 4, 5], "positions": [0, 1, 2],
                                "samplers": [{"at": 2, "type": "greedy"}]}]))
        gone.close()

    def unread_large_replies(self) -> None:
        """Five forwards of about 0.9 MB of reply each, none read while they run: past the 1 MiB bound the
        driver answers CAPACITY; then all five replies are read."""
        reader = zmq.Context.instance().socket(zmq.DEALER)
        reader.setsockopt(zmq.RCVHWM, 1)
        reader.setsockopt(zmq.RCVBUF, 4096)
        reader.setsockopt(zmq.LINGER, 0)
        reader.connect(self.endpoint)
        context = self._context()
        request = {"context": context, "tokens": list(range(3, 35)), "positions": list(range(32)),
                   "samplers": [{"at": i % 32, "type": "dist", "k": 512} for i in range(128)]}
        before = self.client.call("stats").result["requests"]
        for request_id in range(1, 6):
            reader.send(_forward(request_id, [request]))
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not (
                self.client.call("stats").result["requests"] >= before + 5
                and self.client.call("health").result["replicas"][0]["inflight"] == 0):
            time.sleep(0.01)
        codes = []
        while len(codes) < 5 and reader.poll(30_000):
            reply = parse_reply(reader.recv())
            result = reply.result["results"][0] if reply.ok else {"ok": False, "error": {"code": reply.error.code}}
            codes.append("ok" if result["ok"] else result["error"]["code"])
        if len(codes) < 5 or "CAPACITY" not in codes or set(codes) - {"ok", "CAPACITY"}:
            self.unexpected.append(f"unread_large_replies: {codes}")
        reader.close()
        self.client.call("release", contexts=[context])

    def flood(self) -> None:
        """More plain connections than `max_connections`, then gone; the host is served all along."""
        path = self.endpoint[len("ipc://"):]
        strangers = []
        for _ in range(40):
            stranger = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            stranger.connect(path)
            strangers.append(stranger)
        self._expect("flood", self.client.call("health", check=False), None)
        for stranger in strangers:
            stranger.close()

    def close(self) -> None:
        self.client.close()
