"""The stream socket (`stream_socket`): length-prefixed messages on a Unix stream socket beside the ROUTER.

Its framing is cut at every possible point; the driver is driven through it as a host would, against the
same driver's ZeroMQ socket, and with the hostile peers its bounds are for: a header over the frame
limit, a peer that never reads, one that leaves mid-message, more connections than the cap.
"""

from __future__ import annotations

import itertools
import os
import re
import signal
import socket
import stat
import struct
import threading
import time
from pathlib import Path

import msgspec
import pytest
from conftest import write_config
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from pie_driver_trtllm.client import DriverClient, DriverProcess, parse_reply, spawn
from pie_driver_trtllm.config import StartupError, parse_config
from pie_driver_trtllm.serving.stream_listener import StreamListener
from pie_driver_trtllm.wire.errors import ErrorCode
from pie_driver_trtllm.wire.stream_frames import FrameSplitter, FrameTooLarge

HEADER = struct.Struct(">I")


def framed(*payloads: bytes) -> bytes:
    return b"".join(HEADER.pack(len(p)) + p for p in payloads)


def cut(data: bytes, points: list[int]) -> list[bytes]:
    edges = sorted({0, len(data), *(p % (len(data) + 1) for p in points)})
    return [data[a:b] for a, b in itertools.pairwise(edges)]


@given(st.lists(st.binary(max_size=40), max_size=6), st.lists(st.integers(0, 1000), max_size=12))
@example([b"", b"x"], [1, 2, 3])  # an empty message, and a header cut in the middle
@example([b"a" * 40], [4])  # cut right after the header
def test_messages_come_out_whole_and_in_order_however_the_stream_is_cut(payloads, points):
    splitter = FrameSplitter(limit=64)
    for chunk in cut(framed(*payloads), points):
        splitter.feed(chunk)
    assert [bytes(frame) for frame in splitter.frames] == payloads
    assert splitter.buffered == 0 and splitter.missing == HEADER.size


@given(st.lists(st.binary(max_size=16), max_size=4), st.integers(17, 1 << 32 - 1), st.lists(st.integers(0, 200)))
def test_a_header_over_the_limit_stops_the_stream_after_the_messages_before_it(before, length, points):
    splitter = FrameSplitter(limit=16)
    data = framed(*before) + HEADER.pack(length) + b"rest"
    with pytest.raises(FrameTooLarge) as raised:
        for chunk in cut(data, points):
            splitter.feed(chunk)
    assert raised.value.length == length
    assert [bytes(frame) for frame in splitter.frames] == before


def test_memory_held_is_what_arrived_not_what_a_header_declares():
    splitter = FrameSplitter(limit=1 << 30)
    splitter.feed(HEADER.pack(1 << 30) + b"x" * 10)
    assert splitter.buffered == 14 and splitter.missing == (1 << 30) - 10


def test_a_stream_connections_identity_cannot_be_guessed(tmp_path):
    import zmq

    poller = zmq.Poller()
    identities = []
    for _ in range(2):
        listener = StreamListener(str(tmp_path), 1 << 16, 1 << 20, poller, lambda identity: False)
        peer = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        peer.connect(listener.path)
        listener.serve({listener.fd: zmq.POLLIN}, lambda: True, lambda *_: None, lambda *_: None)
        identities += [conn.identity for conn in listener._by_fd.values()]
        peer.close()
        listener.close()
    first, again = identities  # each listener's first connection
    assert first != again and len(first) >= 12 + len(b"\x00stream-1-")  # 12 random bytes a peer cannot guess


def test_stream_socket_and_curve_are_refused_together(tmp_path):
    with pytest.raises(StartupError, match="stream_socket serves without CURVE"):
        parse_config({"model": {"snapshot_dir": str(tmp_path)}, "driver": {"device": ["cpu"], "options": {
            "stream_socket": True, "curve_secret_key_file": str(tmp_path / "key")}}})
    with pytest.raises(ValueError, match="no CURVE"):
        DriverClient("unix:///nonexistent", curve_server_key=b"x" * 40)


# ---------------------------------------------------------------------------------------------- the driver


def step(context: int, tokens: list[int], at: int = 0) -> dict:
    return {"context": context, "tokens": tokens, "positions": list(range(at, at + len(tokens))),
            "samplers": [{"at": len(tokens) - 1, "type": "greedy"}]}


@pytest.fixture
def start(tmp_path, tiny_model):
    started: list[DriverProcess] = []

    def run(env: dict[str, str] | None = None, endpoint: str | None = None, **options) -> DriverProcess:
        directory = tmp_path / f"d{len(started)}"
        directory.mkdir()
        started.append(spawn(write_config(directory, tiny_model, stream_socket=True, **options), env=env,
                             endpoint=endpoint))
        return started[-1]

    yield run
    for process in started:
        process.stop()


def raw_connection(driver: DriverProcess) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(30)
    sock.connect(driver.stream_endpoint.removeprefix("unix://"))
    return sock


def read_message(sock: socket.socket) -> dict:
    def exactly(n: int) -> bytes:
        data = b""
        while len(data) < n:
            piece = sock.recv(n - len(data))
            assert piece, "the driver closed the connection"
            data += piece
        return data

    (length,) = HEADER.unpack(exactly(HEADER.size))
    return msgspec.msgpack.decode(exactly(length))


def request(request_id: int, op: str, **fields) -> bytes:
    return msgspec.msgpack.encode({"v": 1, "id": request_id, "op": op, **fields})


@pytest.mark.slow
def test_the_stream_socket_serves_what_the_zeromq_socket_serves_and_is_private(start):
    driver = start()
    url = driver.stream_endpoint
    assert url is not None and url.startswith("unix://")
    path = Path(url.removeprefix("unix://"))
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    stream, dealer = driver.client(stream=True), driver.client()
    prompt = [5, 9, 14, 2, 7]
    assert stream.call("handshake").result == dealer.call("handshake").result
    a = stream.forward([step(1, prompt)])
    b = dealer.forward([step(2, prompt)])
    assert a == b and a[0]["ok"]
    for n in range(6):  # decode steps, the fast path's, feeding back each token
        a = stream.forward([step(1, [a[0]["outputs"][0]["token"]], len(prompt) + n)])
        b = dealer.forward([step(2, [b[0]["outputs"][0]["token"]], len(prompt) + n)])
        assert a == b
    # A reply larger than the kernel's socket buffer: written in pieces as the host reads.
    vocab = driver.handshake_line["caps"]["vocab_size"]
    wide = {"context": 3, "tokens": prompt, "positions": list(range(len(prompt))),
            "samplers": [{"at": i % len(prompt), "type": "logprobs", "token_ids": list(range(min(vocab, 1024)))}
                         for i in range(128)]}
    assert len(msgspec.msgpack.encode(stream.forward([wide]))) > 400_000
    assert stream.forward([wide]) == dealer.forward([wide])
    stats = stream.call("stats").result
    assert stats["connections"] == 2 and stats["dropped_replies"] == 0
    stream.close()
    dealer.close()
    assert driver.stop() == 0
    assert not path.exists() and not path.parent.exists()


@pytest.mark.slow
def test_with_an_explicit_endpoint_the_stream_socket_has_a_private_directory_of_its_own(start, tmp_path):
    driver = start(endpoint=f"ipc://{tmp_path}/explicit.sock")
    path = Path(driver.stream_endpoint.removeprefix("unix://"))
    assert path.parent.name.startswith("pie-trtllm-s-") and path.parent.parent == Path("/tmp")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert driver.client(stream=True).call("health").ok
    assert driver.stop() == 0
    assert not path.parent.exists()


@pytest.mark.slow
def test_messages_in_any_pieces_are_served_in_order(start):
    driver = start()
    sock = raw_connection(driver)
    data = b"".join(HEADER.pack(len(f)) + f for f in (request(1, "health"), request(2, "handshake"),
                                                     request(3, "forward", requests=[step(7, [3, 4, 5])])))
    for offset in range(0, len(data), 3):  # three bytes at a time, each a write of its own
        sock.sendall(data[offset:offset + 3])
        time.sleep(0.001)
    replies = [read_message(sock) for _ in range(3)]
    assert [r["id"] for r in replies] == [1, 2, 3] and all(r["ok"] for r in replies)
    sock.sendall(data)  # and all three in one write
    assert [read_message(sock)["id"] for _ in range(3)] == [1, 2, 3]


@pytest.mark.slow
def test_bad_messages_get_structured_errors_and_the_connection_stays(start):
    driver = start()
    sock = raw_connection(driver)
    for garbage in (b"", b"\xc1", b"\x93\x01\x02\x03", msgspec.msgpack.encode({"v": 1, "id": 5, "op": "nope"})):
        sock.sendall(HEADER.pack(len(garbage)) + garbage)
        reply = read_message(sock)
        assert reply["ok"] is False and reply["error"]["code"] in ("BAD_FRAME", "BAD_REQUEST", "UNKNOWN_OP")
    sock.sendall(framed(request(6, "health")))
    assert read_message(sock)["id"] == 6


@pytest.mark.slow
def test_a_header_over_max_frame_bytes_is_answered_then_the_connection_closed(start):
    driver = start(max_frame_bytes=4096)
    other = driver.client(stream=True)
    sock = raw_connection(driver)
    sock.sendall(framed(request(1, "health")) + HEADER.pack(4097) + b"x" * 100)
    assert read_message(sock)["id"] == 1  # what came before the bad header is served first
    refusal = read_message(sock)
    assert refusal["id"] is None and refusal["error"]["code"] == "BAD_FRAME"
    assert "4097" in refusal["error"]["message"] and "max_frame_bytes" in refusal["error"]["message"]
    assert sock.recv(1) == b""  # closed
    assert other.call("health").ok  # nobody else is touched
    sock4096 = raw_connection(driver)  # exactly the limit is read, and decoded (it is no msgpack map)
    sock4096.sendall(HEADER.pack(4096) + b"\xc1" * 4096)
    assert read_message(sock4096)["error"]["code"] == "BAD_FRAME"
    sock4096.sendall(framed(request(2, "health")))
    assert read_message(sock4096)["id"] == 2


@pytest.mark.slow
def test_a_peer_that_leaves_mid_message_or_before_its_reply_costs_nobody_anything(start):
    driver = start()
    host = driver.client(stream=True)
    before = host.call("stats").result["requests"]
    for _ in range(20):
        sock = raw_connection(driver)
        frame = request(1, "forward", requests=[step(40, [3, 4, 5])])
        sock.sendall(HEADER.pack(len(frame)) + frame[:5])  # half a message, then gone
        sock.close()
        sock = raw_connection(driver)
        sock.sendall(framed(request(2, "forward", requests=[step(41, [3, 4, 5])])))  # a whole one, then gone
        sock.close()
    assert host.forward([step(1, [3, 4, 5])])[0]["ok"]
    deadline = time.monotonic() + 10
    while host.call("stats").result["connections"] != 1:
        assert time.monotonic() < deadline, "connections of peers that left were not closed"
        time.sleep(0.05)
    # The forwards that arrived whole still ran; their replies had nowhere to go.
    stats = host.call("stats").result
    assert stats["requests"] - before == 20 + 1 and stats["dropped_replies"] == 20  # and the host's forward


@pytest.mark.slow
def test_the_connection_cap_counts_both_sockets(start):
    driver = start(max_connections=2)
    dealer = driver.client()
    assert dealer.call("health").ok
    stream = driver.client(stream=True)
    assert stream.call("health").ok
    extra = raw_connection(driver)
    assert extra.recv(1) == b""  # past the cap: closed at once
    stats = stream.call("stats").result
    assert stats["connections"] == 2 and stats["refused_connections"] >= 1
    stream.close()
    deadline = time.monotonic() + 10
    while True:  # its place is free again, once the driver has seen the stream client leave
        late = raw_connection(driver)
        try:
            late.sendall(framed(request(9, "health")))
            if read_message(late)["id"] == 9:
                break
        except (AssertionError, OSError):  # closed as past the cap: with unread bytes, a reset rather than an end
            pass
        late.close()
        assert time.monotonic() < deadline
        time.sleep(0.05)


@pytest.mark.slow
def test_a_peer_that_never_reads_is_bounded_and_the_others_are_served(start):
    driver = start(max_unread_reply_bytes=1 << 16)
    sock = raw_connection(driver)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    vocab = driver.handshake_line["caps"]["vocab_size"]
    ask = {"context": 50, "tokens": [3, 4], "positions": [0, 1],
           "samplers": [{"at": 1, "type": "logprobs", "token_ids": list(range(min(vocab, 1024)))}]}
    frame = framed(request(1, "forward", requests=[ask]))
    for _ in range(400):  # far more reply bytes than the kernel buffers and the bound together
        sock.sendall(frame)
    host = driver.client(stream=True)
    deadline = time.monotonic() + 30
    while host.call("stats").result["dropped_replies"] == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    stats = host.call("stats").result
    assert stats["dropped_replies"] > 0 or stats["errors"].get("CAPACITY", 0) > 0
    assert host.forward([step(1, [3, 4, 5])])[0]["ok"]  # the driver serves others meanwhile
    status = Path(f"/proc/{driver.process.pid}/status").read_text()
    rss_kib = int(next(line for line in status.splitlines() if line.startswith("VmRSS:")).split()[1])
    assert rss_kib < 2 << 20  # nowhere near 400 replies held


@pytest.mark.slow
def test_a_slow_forward_leaves_its_connection_served_by_the_standby(start):
    driver = start(env={"PIE_DRIVER_FAULTS": "hang_on_token:77,hang_s:1.5"})
    sock = raw_connection(driver)
    sock.sendall(framed(request(1, "forward", requests=[step(3, [5, 77])]), request(2, "health")))
    first = read_message(sock)
    assert first["id"] == 2 and first["ok"]  # answered while the forward still runs
    second = read_message(sock)
    assert second["id"] == 1 and second["results"][0]["ok"]


@pytest.mark.slow
def test_a_header_over_the_limit_waits_for_the_replies_to_the_ops_before_it(start):
    driver = start(max_frame_bytes=4096, env={"PIE_DRIVER_FAULTS": "hang_on_token:77,hang_s:1.0"})
    sock = raw_connection(driver)
    # A forward that runs past TAKEOVER_S, a state op queued behind it, a health answered at once, then
    # a header over the limit: the refusal and the close come only after the replies to all three.
    sock.sendall(framed(request(1, "forward", requests=[step(3, [5, 77])]),
                        request(2, "forward", requests=[step(4, [5, 6])]), request(3, "health"))
                 + HEADER.pack(5000) + b"x" * 10)
    replies = [read_message(sock) for _ in range(4)]
    assert [r["id"] for r in replies] == [3, 1, 2, None]
    assert replies[1]["results"][0]["ok"] and replies[2]["results"][0]["ok"]
    assert replies[3]["error"]["code"] == "BAD_FRAME"
    assert sock.recv(1) == b""  # closed
    assert driver.client(stream=True).call("stats").result["dropped_replies"] == 0


@pytest.mark.slow
def test_shutdown_writes_the_replies_a_connection_has_not_read_yet(start):
    driver = start()
    sock = raw_connection(driver)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    wide = {"context": 9, "tokens": [5, 9, 14, 2, 7], "positions": list(range(5)),  # a reply of about 590 KB
            "samplers": [{"at": i % 5, "type": "logprobs", "token_ids": list(range(512))} for i in range(128)]}
    sock.sendall(framed(request(1, "forward", requests=[wide]), request(2, "shutdown")))
    time.sleep(1.0)  # the driver has written what the kernel takes and holds the rest when it shuts down
    replies = {reply["id"]: reply for reply in (read_message(sock), read_message(sock))}  # shutdown's may come first
    assert replies[1]["results"][0]["ok"] and len(replies[1]["results"][0]["outputs"]) == 128
    assert replies[2]["ok"]
    assert driver.process.wait(10) == 0


@pytest.mark.slow
def test_a_client_send_that_times_out_part_way_closes_its_connection(start):
    driver = start()
    client = DriverClient(driver.stream_endpoint, timeout_s=1.0)
    assert client.call("health").ok
    stop_until_stopped(driver.process.pid)  # the kernel's buffer fills and stays full
    try:
        with pytest.raises(TimeoutError, match="part of the message went out"):
            client.send_raw(request(2, "health", pad=b"p" * (8 << 20)))
    finally:
        os.kill(driver.process.pid, signal.SIGCONT)
    with pytest.raises(ConnectionError):  # never the rest of a message the driver would misread
        client.call("health")
    assert DriverClient(driver.stream_endpoint, timeout_s=5).call("health").ok


def stop_until_stopped(pid: int) -> None:
    """SIGSTOP, then wait until the kernel shows every thread stopped (the signal lands asynchronously)."""
    os.kill(pid, signal.SIGSTOP)
    deadline = time.monotonic() + 10

    def states() -> set[str]:
        return {stat.read_text().rsplit(")", 1)[1].split()[0] for stat in Path(f"/proc/{pid}/task").glob("*/stat")}

    while states() != {"T"}:
        assert time.monotonic() < deadline, "the driver did not stop"
        time.sleep(0.001)


@pytest.mark.slow
def test_at_shutdown_every_message_already_sent_gets_a_reply(start):
    driver = start()
    sockets = [raw_connection(driver) for _ in range(3)]
    stop_until_stopped(driver.process.pid)  # all of it arrives before the driver reads any
    try:
        sockets[0].sendall(framed(request(0, "shutdown")))
        for sock in sockets:
            sock.sendall(framed(*(request(n, "health") for n in range(1, 401))))
    finally:
        os.kill(driver.process.pid, signal.SIGCONT)
    replies: dict[int, list[dict]] = {}

    def read_all(index: int) -> None:  # every connection at once, as a host reads them
        replies[index] = [read_message(sockets[index]) for _ in range(401 if index == 0 else 400)]
        assert sockets[index].recv(1) == b""  # then closed

    readers = [threading.Thread(target=read_all, args=(index,)) for index in range(len(sockets))]
    for reader in readers:
        reader.start()
    for reader in readers:
        reader.join(30)
    assert sorted(replies) == [0, 1, 2]
    for answered in replies.values():
        assert {reply["error"]["code"] for reply in answered if not reply["ok"]} <= {"SHUTTING_DOWN"}
    assert driver.process.wait(10) == 0


def test_the_client_refuses_a_stream_url_nobody_serves(tmp_path):
    with pytest.raises(OSError):
        DriverClient(f"unix://{tmp_path}/none.sock", timeout_s=1)


def test_a_reply_larger_than_a_socket_buffer_reaches_the_client(tmp_path):
    """The client's side of the framing: a message arriving in many reads, and one sent past a full buffer."""
    path = str(tmp_path / "s.sock")
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    server.listen(1)
    client = DriverClient(f"unix://{path}", timeout_s=10)
    peer, _ = server.accept()
    big = msgspec.msgpack.encode({"v": 1, "id": 1, "ok": True, "blob": b"y" * (3 << 20)})
    peer.setblocking(True)
    writer = threading.Thread(target=peer.sendall, args=(framed(big),))
    writer.start()
    reply = parse_reply(client.socket.recv())
    writer.join()
    assert reply.ok and len(reply["blob"]) == 3 << 20
    got = bytearray()

    def read() -> None:
        while len(got) < HEADER.size + (2 << 20):
            got.extend(peer.recv(1 << 20))

    reader = threading.Thread(target=read)
    reader.start()
    client.send_raw(b"z" * (2 << 20))  # more than the kernel holds at once: the client waits for room
    reader.join()
    assert bytes(got) == framed(b"z" * (2 << 20))


@pytest.mark.slow
@pytest.mark.skipif(os.geteuid() != 0, reason="connecting as another user needs root")
def test_a_process_of_another_user_is_closed_even_where_the_modes_would_let_it_in(start):
    driver = start()
    path = Path(driver.stream_endpoint.removeprefix("unix://"))
    os.chmod(path.parent, 0o755)  # as if someone loosened the modes: the credential check still holds
    os.chmod(path, 0o777)
    read_end, write_end = os.pipe()
    child = os.fork()
    if child == 0:  # as nobody: connect, ask, and report what came back
        os.close(read_end)
        try:
            os.setgid(65534)
            os.setuid(65534)
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(10)
            sock.connect(str(path))
            sock.sendall(framed(request(1, "health")))
            os.write(write_end, b"closed" if sock.recv(1) == b"" else b"served")
        except (BrokenPipeError, ConnectionResetError):  # closed before the request was written
            os.write(write_end, b"closed")
        except OSError as exc:
            os.write(write_end, f"error {exc}".encode())
        os._exit(0)
    os.close(write_end)
    os.waitpid(child, 0)
    with os.fdopen(read_end, "rb") as outcome:
        assert outcome.read() == b"closed"
    assert driver.client(stream=True).call("stats").result["refused_connections"] == 1


@pytest.mark.slow
def test_a_driver_of_replicas_serves_the_stream_socket_too(start):
    driver = start(driver={"device": ["cpu", "cpu"]})
    stream, dealer = driver.client(stream=True), driver.client()
    assert stream.call("handshake").result["caps"]["replicas"] == 2
    forwards = [[step(c, [c + 3, c + 4, c + 5])] for c in range(4)]  # spread over both replicas
    assert [stream.forward(f) for f in forwards] == [dealer.forward(f) for f in forwards]


def read_until_closed(sock: socket.socket) -> bytes:
    """Everything the driver wrote before closing. A close with bytes of ours still unread reaches us as a
    reset once its replies have been read: the same end."""
    data = b""
    while True:
        try:
            piece = sock.recv(65536)
        except ConnectionResetError:
            return data
        if not piece:
            return data
        data += piece


messages = st.one_of(
    st.binary(max_size=64).map(lambda b: HEADER.pack(len(b)) + b),  # a whole message of garbage
    st.dictionaries(st.sampled_from(["v", "id", "op", "requests", "contexts", "level"]),
                    st.one_of(st.integers(-2, 1 << 33), st.text(max_size=8), st.lists(st.integers(0, 9), max_size=3)),
                    max_size=5).map(lambda m: framed(msgspec.msgpack.encode(m))),  # a map of the envelope's keys
    st.builds(lambda n, tail: HEADER.pack(n) + tail, st.integers(0, 1 << 32 - 1), st.binary(max_size=16)),  # any header
    st.binary(max_size=12),  # bytes with no framing at all
)


@pytest.mark.slow
@settings(max_examples=30, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(messages, min_size=1, max_size=5))
@example([HEADER.pack(4097)])  # over the frame limit, nothing after it
@example([b"\x00\x00"])  # half a header, then the end of the stream
def test_any_bytes_get_framed_replies_or_nothing_and_never_cost_another_connection(stream_driver, chunks):
    sock = raw_connection(stream_driver)
    sock.sendall(b"".join(chunks))
    sock.shutdown(socket.SHUT_WR)  # the driver answers what came whole, then closes
    replies = FrameSplitter(1 << 30)
    replies.feed(read_until_closed(sock))
    assert replies.buffered == 0  # only whole replies
    for reply in replies.frames:
        decoded = msgspec.msgpack.decode(reply)
        assert isinstance(decoded, dict) and isinstance(decoded["ok"], bool)
        if not decoded["ok"]:  # a structured refusal, never the serving loop's last line of defence
            error = decoded["error"]
            assert error["code"] in set(ErrorCode) - {ErrorCode.ENGINE_ERROR}
            assert not re.match(r"[A-Z]\w*(Error|Exception):", error["message"]), error
    assert stream_driver.process.poll() is None
    other = raw_connection(stream_driver)
    other.sendall(framed(request(1, "health")))
    assert read_message(other)["ok"]
    other.close()


@pytest.fixture(scope="module")
def stream_driver(tmp_path_factory, tiny_model):
    directory = tmp_path_factory.mktemp("stream-fuzz")
    driver = spawn(write_config(directory, tiny_model, stream_socket=True, max_frame_bytes=4096))
    yield driver
    driver.stop()


@pytest.mark.slow
def test_a_zeromq_peer_cannot_take_a_stream_connections_replies_by_its_routing_id(start):
    """State ops wait behind a slow forward, queued per connection: a DEALER naming itself like a stream
    connection must neither share its queue nor receive its replies."""
    import zmq

    driver = start(env={"PIE_DRIVER_FAULTS": "hang_on_token:77,hang_s:1.5"})
    stream = raw_connection(driver)  # the first stream connection
    stream.sendall(framed(request(1, "health")))
    assert read_message(stream)["ok"]
    slow = driver.client()
    slow.send("forward", requests=[step(3, [5, 77])])
    time.sleep(0.3)  # the forward holds the engine now
    impostor = zmq.Context.instance().socket(zmq.DEALER)
    impostor.setsockopt(zmq.ROUTING_ID, b"stream-1")
    impostor.setsockopt(zmq.LINGER, 0)
    impostor.connect(driver.endpoint)
    impostor.send(request(10, "release", contexts=[1001]))
    time.sleep(0.2)
    stream.sendall(framed(request(20, "release", contexts=[1002])))
    assert read_message(stream)["id"] == 20
    assert slow.recv().ok
    assert impostor.poll(5000)
    assert msgspec.msgpack.decode(impostor.recv())["id"] == 10
    assert not impostor.poll(300), "a ZeroMQ peer got a stream connection's reply"
    impostor.close()
