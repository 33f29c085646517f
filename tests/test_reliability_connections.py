"""Connections: a cap on how many the socket holds, a bound on the reply bytes each leaves unread, and what a
peer that claims another's routing id gets (nothing of the other's)."""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

import pytest
import zmq
from conftest import write_config

from pie_driver_trtllm.client import DriverProcess, parse_reply, spawn

pytestmark = pytest.mark.slow


def fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def wait_for(condition, timeout_s: float = 30.0) -> None:
    until = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < until, "condition not reached"
        time.sleep(0.05)


def decode(context: int) -> dict:
    return {"context": context, "tokens": [3, 4], "positions": [0, 1], "samplers": [{"at": 1, "type": "greedy"}]}


@pytest.fixture
def start(tmp_path, tiny_model):
    started: list[DriverProcess] = []

    def run(**options) -> DriverProcess:
        directory = tmp_path / f"d{len(started)}"
        directory.mkdir()
        started.append(spawn(write_config(directory, tiny_model, **options)))
        return started[-1]

    yield run
    for process in started:
        process.stop()


def test_connections_past_the_cap_are_closed_and_the_served_host_keeps_its_own(start):
    driver = start(max_connections=4)
    host = driver.client()
    assert host.forward([decode(1)])[0]["ok"]
    pid = driver.process.pid
    before = fds(pid)
    path = driver.endpoint[len("ipc://"):]
    strangers = []
    for _ in range(300):  # a stranger's flood: plain connections that never speak
        stranger = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        stranger.connect(path)
        strangers.append(stranger)
    wait_for(lambda: host.call("stats").result["refused_connections"] >= 297)
    # The driver holds at most the cap's connections: four, the host's among them (before: 300 more fds).
    wait_for(lambda: fds(pid) <= before + 3)
    stats = host.call("stats").result
    assert stats["connections"] <= 4
    assert host.forward([decode(2)])[0]["ok"]  # the host served all along, on its own connection
    for stranger in strangers[3:]:  # accepted in the order they connected: all but the first three refused
        stranger.settimeout(10)
        while stranger.recv(4096):  # ZeroMQ's greeting, then the end of the stream
            pass
    for stranger in strangers:
        stranger.close()
    wait_for(lambda: host.call("stats").result["connections"] == 1)
    newcomer = driver.client()  # room again once the strangers are gone
    assert newcomer.forward([decode(3)])[0]["ok"]


def test_a_zeromq_peer_past_the_cap_is_refused_until_a_connection_frees(start):
    driver = start(max_connections=1)
    host = driver.client()
    assert host.call("health").ok
    late = driver.client(timeout_s=1.0)
    late.send("health")
    with pytest.raises(TimeoutError):
        late.recv()
    assert host.call("stats").result["refused_connections"] >= 1
    host.socket.close(0)
    # Its DEALER reconnects by itself and is served once there is room (what it wrote to a refused
    # connection may be lost with that connection: the host sends again).
    def served() -> bool:
        request_id = late.send("health")
        try:
            while (reply := late.recv()).id != request_id:
                pass
        except TimeoutError:
            return False
        return reply.ok

    wait_for(served)


def test_unread_reply_bytes_per_connection_are_bounded(start):
    budget = 1 << 20
    driver = start(max_unread_reply_bytes=budget, max_output_elements=1 << 16)
    pid = driver.process.pid
    watcher = driver.client()
    # A host that reads nothing: its own socket takes one message, and the kernel about 200 KiB.
    context = zmq.Context.instance()
    reader = context.socket(zmq.DEALER)
    reader.setsockopt(zmq.RCVHWM, 1)
    reader.setsockopt(zmq.RCVBUF, 4096)
    reader.setsockopt(zmq.LINGER, 0)
    reader.connect(driver.endpoint)
    # 128 `dist` samplers with k = vocab (512): a reply of about 0.9 MB.
    request = {"context": 7, "tokens": list(range(3, 131)), "positions": list(range(128)),
               "samplers": [{"at": i, "type": "dist", "k": 512} for i in range(128)]}
    frame = {"v": 1, "op": "forward", "requests": [request]}
    from pie_driver_trtllm.client import _ENCODER

    watcher.forward([decode(1)])
    start_rss = rss_kib(pid)
    sent = 40
    for request_id in range(1, sent + 1):
        reader.send(_ENCODER.encode({**frame, "id": request_id}))
    wait_for(lambda: watcher.call("stats").result["requests"] >= sent + 1, timeout_s=120)
    wait_for(lambda: watcher.call("health").result["replicas"][0]["inflight"] == 0, timeout_s=120)
    grown_kib = rss_kib(pid) - start_rss
    # Unbounded, the driver held 40 x 0.9 MB = 36 MB of replies. Bounded: 1 MiB, plus one reply, plus
    # what the allocator keeps and a reply's Python objects while it is built (about 11 MiB measured); 20 MiB
    # is about half the unbounded growth.
    assert grown_kib < 20 << 10, f"RSS grew {grown_kib} KiB"
    replies = []
    while len(replies) < sent:
        assert reader.poll(30_000)
        replies.append(parse_reply(reader.recv()))
    served = [reply for reply in replies if reply.ok]
    refused = [reply for reply in replies if not reply.ok]
    assert refused and all(r.error.code == "CAPACITY" and r.error.details.get("busy") for r in refused)
    assert "unread" in refused[0].error.message
    assert len(served) <= 6, len(served)  # the budget, the host's one message, the kernel's buffer
    reader.send(_ENCODER.encode({**frame, "id": 99}))  # read up: served in full again
    assert reader.poll(30_000) and parse_reply(reader.recv()).ok
    reader.close(0)


def test_a_peer_claiming_a_connected_peers_routing_id_gets_nothing_and_takes_nothing(start):
    driver = start()
    context = zmq.Context.instance()

    def dealer(routing_id: bytes) -> zmq.Socket:
        sock = context.socket(zmq.DEALER)
        sock.setsockopt(zmq.ROUTING_ID, routing_id)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(driver.endpoint)
        return sock

    from pie_driver_trtllm.client import _ENCODER

    holder = dealer(b"host-a")
    holder.send(_ENCODER.encode({"v": 1, "id": 1, "op": "health"}))
    assert holder.poll(30_000) and parse_reply(holder.recv()).ok
    claimant = dealer(b"host-a")
    time.sleep(0.2)
    claimant.send(_ENCODER.encode({"v": 1, "id": 2, "op": "health"}))
    holder.send(_ENCODER.encode({"v": 1, "id": 3, "op": "forward", "requests": [decode(5)]}))
    assert holder.poll(30_000)
    reply = parse_reply(holder.recv())
    assert reply.id == 3 and reply.ok  # the holder's replies reach the holder
    assert not claimant.poll(1000)  # ZeroMQ drops the claimant's frames: the driver never sees them
    assert not holder.poll(200)
    claimant.close(0)
    holder.close(0)


def test_start_up_needs_descriptors_for_max_connections_and_a_reserve():
    from pie_driver_trtllm.config import StartupError
    from pie_driver_trtllm.serving.driver import FD_RESERVE, raise_open_files_limit

    with pytest.raises(StartupError, match=rf"max_connections \+ {FD_RESERVE}"):
        raise_open_files_limit((1 << 20) + 1)  # more than any soft limit the driver asks for
