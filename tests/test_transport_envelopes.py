"""Message envelopes the ROUTER socket answers: a DEALER's bare frame and a REQ socket's delimited one."""

from __future__ import annotations

import msgpack
import pytest
import zmq

from pie_driver_trtllm.client import parse_reply

TIMEOUT_MS = 30_000


@pytest.fixture
def sockets(driver):
    """A factory of sockets connected to one driver, all closed at teardown."""
    opened: list[zmq.Socket] = []

    def connect(kind: int) -> zmq.Socket:
        socket = zmq.Context.instance().socket(kind)
        socket.setsockopt(zmq.LINGER, 0)
        socket.setsockopt(zmq.RCVTIMEO, TIMEOUT_MS)
        socket.connect(driver.endpoint)
        opened.append(socket)
        return socket

    yield connect
    for socket in opened:
        socket.close(0)


def frame(request_id: int, op: str, **fields) -> bytes:
    return msgpack.packb({"v": 1, "id": request_id, "op": op, **fields})


def test_a_req_socket_gets_its_replies(sockets):
    req = sockets(zmq.REQ)
    req.send(frame(1, "handshake"))
    assert parse_reply(req.recv())["protocol"] == 1
    prompt = {"context": 3, "tokens": [1, 15, 99], "positions": [0, 1, 2], "samplers": [{"at": 2, "type": "greedy"}]}
    req.send(frame(2, "forward", requests=[prompt]))
    reply = parse_reply(req.recv())
    assert reply.id == 2 and reply["results"][0]["ok"]
    req.send(frame(3, "forward", requests=[{"context": 3, "tokens": [7], "positions": [9]}]))
    result = parse_reply(req.recv())["results"][0]
    assert result["error"]["code"] == "HISTORY_GAP" and result["error"]["known_length"] == 3


def test_a_req_socket_sees_frame_errors(sockets):
    req = sockets(zmq.REQ)
    req.send(b"\xc1")  # never valid msgpack
    reply = parse_reply(req.recv())
    assert reply.id is None and reply.error is not None and reply.error.code == "BAD_FRAME"
    req.send_multipart([frame(4, "health"), b"x"])  # two frames after the delimiter
    reply = parse_reply(req.recv())
    assert reply.error is not None and reply.error.code == "BAD_FRAME"
    assert "got 2" in reply.error.message
    req.send(frame(5, "health"))  # the socket is still in step: a reply came for each request
    assert parse_reply(req.recv()).id == 5


def test_the_reply_keeps_the_envelope_it_came_with(sockets):
    dealer = sockets(zmq.DEALER)
    dealer.send_multipart([b"", frame(6, "health")])  # a DEALER speaking as a REQ
    delimiter, payload = dealer.recv_multipart()
    assert delimiter == b"" and parse_reply(payload).id == 6
    dealer.send(frame(7, "health"))  # and plainly, on the same connection
    [payload] = dealer.recv_multipart()
    assert parse_reply(payload).id == 7
    dealer.send_multipart([frame(8, "health"), b""])  # a trailing empty part is no envelope
    [payload] = dealer.recv_multipart()
    assert parse_reply(payload).error.code == "BAD_FRAME"


@pytest.mark.slow
def test_queued_ops_keep_each_their_own_envelope(start_driver):
    driver = start_driver(env={"PIE_DRIVER_FAULTS": "hang_on_token:77,hang_s:1.0"})
    dealer = zmq.Context.instance().socket(zmq.DEALER)
    dealer.setsockopt(zmq.LINGER, 0)
    dealer.connect(driver.endpoint)

    def entry(context: int, tokens: list[int]) -> dict:
        return {"context": context, "tokens": tokens, "positions": list(range(len(tokens))),
                "samplers": [{"at": len(tokens) - 1, "type": "greedy"}]}

    try:
        dealer.send(frame(1, "forward", requests=[entry(3, [5, 77])]))  # runs past TAKEOVER_S
        assert dealer.poll(200) == 0
        dealer.send(frame(2, "forward", requests=[entry(4, [5, 6])]))  # waits behind it, bare
        dealer.send_multipart([b"", frame(3, "forward", requests=[entry(5, [5, 6])])])  # waits, delimited
        envelopes = {}
        for _ in range(3):
            assert dealer.poll(TIMEOUT_MS)
            parts = dealer.recv_multipart()
            envelopes[parse_reply(parts[-1]).id] = parts[:-1]
        assert envelopes == {1: [], 2: [], 3: [b""]}
    finally:
        dealer.close(0)
