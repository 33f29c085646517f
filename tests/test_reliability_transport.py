"""Transport security: socket permissions, loopback-only tcp without CURVE, CURVE keeping strangers out,
and bounded decoding of what arrives."""

from __future__ import annotations

import os
import time
from pathlib import Path

import msgpack
import pytest
import zmq
from conftest import write_config

from pie_driver_trtllm.client import DriverClient, DriverFailed, spawn
from pie_driver_trtllm.wire.codec import FrameRejected, Limits, decode_frame
from pie_driver_trtllm.wire.errors import ErrorCode

pytestmark = pytest.mark.slow


def test_non_loopback_tcp_needs_curve(tmp_path, tiny_model):
    started = time.monotonic()
    for host in ("0.0.0.0", "10.1.2.3", "example.com"):
        with pytest.raises(DriverFailed, match="curve_secret_key_file"):
            spawn(write_config(tmp_path, tiny_model), endpoint=f"tcp://{host}:5555")
    assert time.monotonic() - started < 30


def _key_file(path: Path, text: str, mode: int = 0o600) -> Path:
    path.write_text(text + "\n")
    os.chmod(path, mode)
    return path


@pytest.mark.skipif(not zmq.has("curve"), reason="libzmq without CURVE")
def test_curve_admits_only_clients_with_the_keys(tmp_path, tiny_model):
    server_public, server_secret = zmq.curve_keypair()
    allowed = zmq.curve_keypair()
    stranger = zmq.curve_keypair()
    secret_file = _key_file(tmp_path / "server.key", server_secret.decode())
    clients_file = _key_file(tmp_path / "clients.txt", allowed[0].decode(), 0o644)
    config = write_config(tmp_path, tiny_model, curve_secret_key_file=str(secret_file),
                          curve_client_keys_file=str(clients_file))
    driver = spawn(config, endpoint="tcp://0.0.0.0:*")  # beyond loopback: allowed with CURVE
    port = driver.endpoint.rsplit(":", 1)[1]
    url = f"tcp://127.0.0.1:{port}"
    try:
        good = DriverClient(url, curve_server_key=server_public, curve_keypair=allowed)
        assert good.call("health")["status"] == "ok"
        assert good.forward([{"context": 1, "tokens": [1, 2], "positions": [0, 1]}])[0]["ok"]
        plain = DriverClient(url, timeout_s=1.0)
        wrong_server = DriverClient(url, timeout_s=1.0, curve_server_key=stranger[0], curve_keypair=allowed)
        unlisted = DriverClient(url, timeout_s=1.0, curve_server_key=server_public, curve_keypair=stranger)
        for client in (plain, wrong_server, unlisted):
            with pytest.raises(TimeoutError):  # at the send (handshake already refused) or the reply
                client.send("health")
                client.recv(1.0)
        assert good.call("stats")["requests"] == 1  # nothing from the others reached the driver
    finally:
        assert driver.stop() == 0

    os.chmod(secret_file, 0o644)
    with pytest.raises(DriverFailed, match="chmod 600"):
        spawn(config, endpoint="tcp://127.0.0.1:*")
    _key_file(secret_file, "not a key")
    with pytest.raises(DriverFailed, match="Z85"):
        spawn(config, endpoint="tcp://127.0.0.1:*")


LIMITS = Limits(vocab_size=512, max_model_len=2048, max_forward_requests=8, max_forward_tokens=64,
                max_logprob_labels=8, max_frame_bytes=4096)


@pytest.mark.parametrize("frame", [
    b"\xdd\xff\xff\xff\xff",                                   # an array claiming 4 billion entries
    b"\xdf\xff\xff\xff\xff",                                   # a map claiming 4 billion pairs
    b"\xdb\xff\xff\xff\xff",                                   # a 4 GiB string
    b"\x84\xa1v\x01\xa2id\x01\xa2op\xa7forward\xa8requests" + b"\xdd\x7f\xff\xff\xff",  # inner claim
    b"\x83\xa1v\x01\xa2id\x01\xa2op\xa7forward" + b"\xdd\x7f\xff\xff\xff",  # bytes after the map
])
def test_decoding_refuses_length_claims_without_allocating(frame):
    started = time.monotonic()
    with pytest.raises(FrameRejected) as rejected:
        decode_frame(frame, LIMITS)
    assert rejected.value.error.code is ErrorCode.BAD_FRAME
    assert time.monotonic() - started < 0.05


def test_frame_over_the_limit_is_refused_before_decoding():
    frame = msgpack.packb({"v": 1, "id": 1, "op": "release", "contexts": list(range(2000))})
    assert len(frame) > LIMITS.max_frame_bytes
    with pytest.raises(FrameRejected) as rejected:
        decode_frame(frame, LIMITS)
    assert rejected.value.error.code is ErrorCode.BAD_FRAME and "limit" in rejected.value.error.message
