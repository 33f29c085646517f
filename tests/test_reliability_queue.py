"""The queue of state ops behind a running one: connections take turns, and the queue is bounded (a frame
past the bound gets CAPACITY with `busy: true` at once, while control ops keep being answered)."""

from __future__ import annotations

import time

import pytest
import zmq
from conftest import write_config

from pie_driver_trtllm.client import parse_reply, spawn

pytestmark = pytest.mark.slow

HANG = 510  # a step with a row ending in this token sleeps hang_s first


def slow(context: int) -> dict:
    return {"context": context, "tokens": [3, HANG], "positions": [0, 1], "samplers": [{"at": 1, "type": "greedy"}]}


def quick(context: int) -> dict:
    return {"context": context, "tokens": [3, 4], "positions": [0, 1], "samplers": [{"at": 1, "type": "greedy"}]}


@pytest.fixture
def driver(tmp_path, tiny_model):
    process = spawn(write_config(tmp_path, tiny_model, max_queued_requests=6),
                    env={"PIE_DRIVER_FAULTS": f"hang_on_token:{HANG},hang_s:0.3"})
    yield process
    process.stop()


def test_connections_take_turns(driver):
    busy, light = driver.client(), driver.client()
    for context in range(6):
        busy.send("forward", requests=[slow(context)])
    time.sleep(0.1)  # the first runs, the other five wait
    light.send("forward", requests=[quick(100)])
    poller = zmq.Poller()
    poller.register(busy.socket, zmq.POLLIN)
    poller.register(light.socket, zmq.POLLIN)
    order = []
    while len(order) < 7:
        events = poller.poll(30_000)
        assert events, f"replies stopped after {order}"
        for sock, _ in events:
            reply = parse_reply(sock.recv())
            assert reply.ok
            order.append("light" if sock is light.socket else "busy")
    # The light connection's op waits for the running op and one of the busy connection's, not for all five.
    assert order.index("light") <= 2, order


def test_the_queue_is_bounded_and_a_full_queue_answers_busy(driver):
    host = driver.client()
    ids = [host.send("forward", requests=[slow(context)]) for context in range(7)]  # 1 runs, 6 wait
    time.sleep(0.1)
    extra = host.send("forward", requests=[quick(50)])
    health = host.send("health")
    replies = {}
    while len(replies) < 9:
        reply = host.recv()
        replies[reply.id] = reply
    assert not replies[extra].ok and replies[extra].error.code == "CAPACITY"
    assert replies[extra].error.details.get("busy") is True
    assert replies[health].ok
    assert all(replies[i].ok for i in ids)
    assert host.forward([quick(51)])[0]["ok"]  # served again once the queue drained
