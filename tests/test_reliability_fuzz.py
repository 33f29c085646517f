"""Fuzzing at the protocol edge, through a live driver subprocess on the tiny model.

Hypothesis draws batches of frames: random bytes, msgpack of the wrong shape, every field with values of
the wrong type, huge arrays, negative and out-of-vocab ids, positions past `max_model_len`, sampler `at`
out of bounds, NaN/inf and tiny temperatures, forwards that ask for many rows and output values, duplicate
contexts in one forward, and interleaved fork/truncate/release. Invariants: every frame gets exactly one
reply, every code is a documented one, every probability is finite, no frame reaches the catch-all
`ENGINE_ERROR`, the driver stays up, and a control context's greedy tokens are the same afterwards.
Endpoint URLs are fuzzed too: whatever is accepted without CURVE listens on loopback only.
"""

from __future__ import annotations

import itertools
import math
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgpack
import pytest
import zmq
from conftest import write_config
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pie_driver_trtllm.client import DriverClient, DriverProcess, parse_reply, spawn
from pie_driver_trtllm.config import StartupError
from pie_driver_trtllm.serving.endpoint import check_bound_address, resolve_endpoint
from pie_driver_trtllm.wire.errors import ErrorCode

pytestmark = pytest.mark.slow

VOCAB, MAX_LEN, MAX_TOKENS, MAX_FRAME = 512, 256, 512, 1 << 20
MAX_ROWS, MAX_VALUES = 128, 4096  # max_sampler_rows, max_output_elements
CONTROL = 7_777_777  # never drawn by the strategies below
CONTROL_PROMPT = [5, 9, 14, 200, 31, 7]
BATCHES, FRAMES_PER_BATCH = 160, 64  # 10,240 frames
CODES = {code.value for code in ErrorCode}
SAMPLER_TYPES = ["greedy", "multinomial", "top_k", "top_p", "min_p", "top_k_top_p", "dist", "logprobs"]

_ids = itertools.count(1)


@pytest.fixture(scope="module")
def fuzz_driver(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path) -> Iterator[DriverProcess]:
    config = write_config(tmp_path_factory.mktemp("fuzz"), tiny_model, max_history_tokens=MAX_LEN,
                          max_batched_tokens=MAX_TOKENS, max_concurrent_requests=16, max_frame_bytes=MAX_FRAME,
                          max_logprob_labels=8, lookahead_tokens=4, max_session_histories=4096,
                          max_sampler_rows=MAX_ROWS, max_output_elements=MAX_VALUES)
    socket = config.parent / "f.sock"
    process = spawn(config, endpoint=f"ipc://{socket}")
    assert oct(socket.stat().st_mode & 0o777) == "0o600"  # an explicit ipc path is private too
    yield process
    process.stop()


# ---------------------------------------------------------------- strategies

anything = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**63), 2**64 - 1), st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=6), st.binary(max_size=6), st.lists(st.integers(-3, 600), max_size=4),
    st.dictionaries(st.text(max_size=3), st.integers(-3, 3), max_size=2),
)
contexts = st.one_of(st.integers(0, 12), st.sampled_from([2**32, 2**63, 2**64 - 1]))
token = st.one_of(st.integers(0, VOCAB - 1), st.integers(0, VOCAB - 1), st.sampled_from([VOCAB, 2**32 - 1, -1]))
temperature = st.one_of(st.floats(0, 3), st.sampled_from([0.0, -1.0, math.nan, math.inf, -math.inf]), st.none(),
                        st.sampled_from([5e-324, 1e-300, 1e-30, 1e-6, 1e-5]))
edges = st.sampled_from([0.0, 5e-324, 1e-300, 1e-46, 1.0])  # in range, with the ends and what float32 holds as 0


@st.composite
def sampler(draw: st.DrawFn, n_tokens: int) -> dict[str, Any]:
    kind = draw(st.sampled_from([*SAMPLER_TYPES, "beam"]))
    s: dict[str, Any] = {"at": draw(st.one_of(st.integers(0, max(n_tokens - 1, 0)), st.integers(0, 2**32 - 1))),
                         "type": kind}
    t = draw(temperature)
    if t is not None:
        s["temperature"] = t
    if kind in ("top_k", "top_k_top_p") or draw(st.booleans()):
        s["top_k"] = draw(st.integers(0, 600))
    if kind in ("top_p", "top_k_top_p"):
        s["top_p"] = draw(st.one_of(st.floats(-0.5, 1.5), edges))
    if kind == "min_p":
        s["min_p"] = draw(st.one_of(st.floats(-0.5, 1.5), edges))
    if kind == "dist":
        s["k"] = draw(st.integers(0, VOCAB + 2))
    if kind == "logprobs":
        s["token_ids"] = draw(st.lists(st.integers(0, VOCAB + 1), max_size=10))
    if draw(st.booleans()):
        s["seed"] = draw(st.integers(0, 2**64 - 1))
    if draw(st.integers(0, 3)) == 0:
        s["return_logprob"] = draw(st.booleans())
        if draw(st.booleans()):
            s["logprob_mode"] = draw(st.sampled_from(["raw", "processed", "Raw", ""]))
    return s


@st.composite
def forward_entry(draw: st.DrawFn) -> dict[str, Any]:
    n = draw(st.integers(0, 6))
    start = draw(st.one_of(st.just(0), st.integers(0, 12), st.sampled_from([MAX_LEN - 2, MAX_LEN, 2**32 - 1])))
    entry: dict[str, Any] = {"context": draw(contexts), "tokens": draw(st.lists(token, min_size=n, max_size=n)),
                             "positions": [min(start + i, 2**32 - 1) for i in range(n)]}
    if draw(st.booleans()):
        entry["samplers"] = draw(st.lists(sampler(n), max_size=3))
    return entry


def broken(entry: dict[str, Any], draw: st.DrawFn) -> dict[str, Any]:
    """One field replaced by a value of any type, removed, or an unknown field added."""
    entry = dict(entry)
    how = draw(st.sampled_from(["replace", "remove", "add", "sampler"]))
    key = draw(st.sampled_from(sorted(entry)))
    if how == "replace":
        entry[key] = draw(anything)
    elif how == "remove":
        entry.pop(key)
    elif how == "add":
        entry[draw(st.text(min_size=1, max_size=5))] = draw(anything)
    elif entry.get("samplers"):
        s = dict(entry["samplers"][0])
        s[draw(st.sampled_from([*sorted(s), "extra"]))] = draw(anything)
        entry["samplers"] = [s]
    return entry


@st.composite
def frame(draw: st.DrawFn) -> bytes | list[bytes]:
    """One message: bytes, or (rarely) a multi-part message."""
    kind = draw(st.sampled_from(["bytes", "shape", "envelope", "forward", "forward", "forward", "broken",
                                 "huge", "duplicates", "fork", "truncate", "release", "control", "multipart",
                                 "amplify", "step", "step"]))
    request_id = next(_ids)
    base = {"v": 1, "id": request_id}
    if kind == "bytes":
        return draw(st.binary(max_size=48))
    if kind == "shape":
        value = draw(st.one_of(anything, st.lists(anything, max_size=3),
                               st.dictionaries(st.integers(-2, 2), anything, max_size=2)))
        return msgpack.packb(value)
    if kind == "envelope":
        header = {**base, "op": draw(st.sampled_from(["forward", "fork", "health", "stats", "jump"]))}
        header[draw(st.sampled_from(["v", "id", "op"]))] = draw(anything)
        return msgpack.packb(header)
    if kind == "multipart":
        return [msgpack.packb({**base, "op": "health"}), b"x"]
    if kind == "control":
        return msgpack.packb({**base, "op": draw(st.sampled_from(["handshake", "health", "stats"])), "x": 1})
    if kind == "fork":
        fields = {"src": draw(contexts), "dst": draw(contexts)}
        if draw(st.booleans()):
            fields["length"] = draw(st.one_of(st.none(), st.integers(0, 20), anything))
        return msgpack.packb({**base, "op": "fork", **fields})
    if kind == "truncate":
        return msgpack.packb({**base, "op": "truncate", "context": draw(contexts),
                              "length": draw(st.one_of(st.integers(0, 20), anything))})
    if kind == "release":
        return msgpack.packb({**base, "op": "release", "contexts": draw(st.lists(contexts, max_size=4))})
    if kind == "step":  # columns of any lengths and values, one sampler, now and then a field of any type
        n = draw(st.integers(0, 5))
        fields: dict[str, Any] = {
            "contexts": draw(st.lists(contexts, min_size=n, max_size=n)),
            "tokens": draw(st.lists(token, min_size=n, max_size=n + draw(st.integers(0, 1)))),
            "positions": draw(st.lists(st.one_of(st.integers(0, 12), st.sampled_from([MAX_LEN, 2**32 - 1])),
                                       min_size=n, max_size=n))}
        if draw(st.booleans()):
            fields["sampler"] = draw(sampler(1))
        if draw(st.integers(0, 3)) == 0:
            fields[draw(st.sampled_from(["contexts", "tokens", "positions", "sampler", "extra"]))] = draw(anything)
        return msgpack.packb({**base, "op": "step", **fields})
    if kind == "huge":  # sizes from the strategy, contents built here: hypothesis need not draw 100k values
        n = draw(st.sampled_from([MAX_TOKENS + 1, 20_000, 200_000]))
        field = draw(st.sampled_from(["tokens", "positions", "requests", "contexts", "token_ids", "step"]))
        if field == "step":
            return msgpack.packb({**base, "op": "step", "contexts": list(range(n)), "tokens": [1] * n,
                                  "positions": [0] * n})
        if field == "requests":
            requests = [{"context": 1, "tokens": [1], "positions": [0]}] * min(n, 2000)
        else:
            entry = {"context": 1, "tokens": [1] * n, "positions": list(range(n))}
            if field == "token_ids":
                entry = {"context": 1, "tokens": [1], "positions": [0],
                         "samplers": [{"at": 0, "type": "logprobs", "token_ids": [1] * n}]}
            requests = [entry]
        if field == "contexts":
            return msgpack.packb({**base, "op": "release", "contexts": list(range(n))})
        return msgpack.packb({**base, "op": "forward", "requests": requests})
    if kind == "amplify":  # many rows and output values from a small frame
        requests = draw(st.integers(1, 16))
        per_request = draw(st.integers(1, 24))
        kind_of = draw(st.sampled_from(["dist", "greedy", "logprobs", "multinomial"]))
        s: dict[str, Any] = {"at": 0, "type": kind_of, "temperature": draw(temperature.filter(
            lambda t: t is not None and math.isfinite(t) and t >= 0))}
        if kind_of == "dist":
            s["k"] = draw(st.sampled_from([1, 64, VOCAB]))
        if kind_of == "logprobs":
            s["token_ids"] = list(range(8))
        if kind_of in ("greedy", "multinomial") and draw(st.booleans()):
            s["return_logprob"] = True
        return msgpack.packb({**base, "op": "forward", "requests": [
            {"context": 5000 + c, "tokens": [1], "positions": [0], "samplers": [s] * per_request}
            for c in range(requests)]})
    entries = draw(st.lists(forward_entry(), max_size=4))
    if kind == "broken" and entries:
        entries[0] = broken(entries[0], draw)
    if kind == "duplicates" and entries:
        entries = entries + [dict(entries[0])]
    return msgpack.packb({**base, "op": "forward", "requests": entries})


# ---------------------------------------------------------------- invariants

def expected_reply_id(message: bytes | list[bytes]) -> int | None:
    """The reply id the protocol promises: a readable u64 id of a well-formed map, else null."""
    if isinstance(message, list):
        return None
    try:
        value = msgpack.unpackb(message, strict_map_key=False)
    except Exception:
        return None
    if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
        return None
    request_id = value.get("id")
    if type(request_id) is int and 0 <= request_id < 2**64 and len(message) <= MAX_FRAME:
        return request_id
    return None


ENGINE_ERRORS: list[str] = []  # the first few ENGINE_ERROR messages, for the assertion that there are none


def check_codes(reply: dict[str, Any], codes: Counter[str]) -> None:
    if not reply.get("ok"):
        assert reply["error"]["code"] in CODES, reply
        codes[reply["error"]["code"]] += 1
        if reply["error"]["code"] == "ENGINE_ERROR" and len(ENGINE_ERRORS) < 3:
            ENGINE_ERRORS.append(reply["error"]["message"])
        return
    for result in reply.get("results", ()):
        if not result["ok"]:
            assert result["error"]["code"] in CODES, result
            codes[result["error"]["code"]] += 1
            if result["error"]["code"] == "ENGINE_ERROR" and len(ENGINE_ERRORS) < 3:
                ENGINE_ERRORS.append(result["error"]["message"])
            continue
        for output in result.get("outputs", ()):
            values = output.get("dist", [[], []])[1] if output else []
            assert all(math.isfinite(p) and 0.0 <= p <= 1.0 for p in values), output
            assert not any(math.isnan(v) for v in (output or {}).get("logprobs", ())), output


def control_tokens(client: DriverClient) -> list[int]:
    request = {"context": CONTROL, "tokens": CONTROL_PROMPT, "positions": list(range(len(CONTROL_PROMPT))),
               "samplers": [{"at": i, "type": "greedy"} for i in range(len(CONTROL_PROMPT))]}
    result = client.forward([request])[0]
    assert result["ok"], result
    return [output["token"] for output in result["outputs"]]


def test_fuzzed_frames_each_get_one_documented_reply(fuzz_driver):
    client = fuzz_driver.client(timeout_s=30)
    before = control_tokens(client)
    totals = {"frames": 0}
    codes: Counter[str] = Counter()

    @settings(max_examples=BATCHES, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    @given(st.lists(frame(), min_size=FRAMES_PER_BATCH, max_size=FRAMES_PER_BATCH))
    def one_batch(messages: list[bytes | list[bytes]]) -> None:
        for message in messages:
            if isinstance(message, list):
                client.socket.send_multipart(message)
            else:
                client.send_raw(message)
        replies = [client.socket.recv() for _ in messages if client.socket.poll(30_000)]
        assert len(replies) == len(messages), "a frame got no reply"
        decoded = [parse_reply(r) for r in replies]
        assert Counter(r.id for r in decoded) == Counter(expected_reply_id(m) for m in messages)
        for raw in replies:
            check_codes(msgpack.unpackb(raw, strict_map_key=False), codes)
        totals["frames"] += len(messages)

    started = time.monotonic()
    one_batch()
    elapsed = time.monotonic() - started
    assert not client.socket.poll(300), "a frame got a second reply"
    assert totals["frames"] >= 10_000
    assert fuzz_driver.process.poll() is None
    stats = client.call("stats")
    # nothing fell through to the catch-all
    assert "ENGINE_ERROR" not in stats["errors"], (stats["errors"], ENGINE_ERRORS)
    assert client.call("health")["status"] == "ok"
    assert control_tokens(client) == before
    assert codes["BAD_FRAME"] and codes["BAD_REQUEST"] and codes["OUT_OF_RANGE"] and codes["CAPACITY"], codes
    print(f"fuzz: {totals['frames']} frames in {elapsed:.1f} s; codes {dict(codes)}")


def test_value_rules_give_their_documented_codes(fuzz_driver):
    """The targeted shapes of the fuzz list, each with the one code the protocol documents."""
    client = fuzz_driver.client()

    def code(entry: dict[str, Any]) -> str | None:
        result = client.forward([entry])[0]
        return None if result["ok"] else result["error"]["code"]

    def one(tokens: list[int], positions: list[int], **s: Any) -> dict[str, Any]:
        return {"context": 3000, "tokens": tokens, "positions": positions, "samplers": [{"at": 0, **s}]}

    for bad in (math.nan, math.inf, -math.inf, -0.5):
        assert code(one([1], [0], type="multinomial", temperature=bad)) == "BAD_REQUEST"
        assert code(one([1], [0], type="greedy", temperature=bad)) == "BAD_REQUEST"
    assert code(one([VOCAB], [0], type="greedy")) == "OUT_OF_RANGE"
    assert code(one([1], [MAX_LEN], type="greedy")) == "OUT_OF_RANGE"
    assert code({"context": 3000, "tokens": [1], "positions": [0], "samplers": [{"at": 1, "type": "greedy"}]}) \
        == "OUT_OF_RANGE"
    assert code({"context": 3000, "tokens": [-1], "positions": [0]}) == "BAD_REQUEST"
    assert code({"context": -1, "tokens": [1], "positions": [0]}) == "BAD_REQUEST"
    assert code({"context": 3000, "tokens": "abc", "positions": [0]}) == "BAD_REQUEST"
    assert code(one([1], [0], type="greedy")) is None


HOSTS = ["127.0.0.1", "127.1", "127.0.1", "2130706433", "0x7f.1", "0177.0.0.1", "localhost", "[::1]", "[::]",
         "[::ffff:127.0.0.1]", "[::ffff:0.0.0.0]", "0.0.0.0", "0", "*", "10.0.0.1", "example.com", "lo", "eth0",
         "127.0.0.1.", "localhost.", "[0:0:0:0:0:0:0:1]"]
JUNK = ["", "", "", "@127.0.0.1", "@0.0.0.0", ";127.0.0.1:*", ";0.0.0.0:*", "/x", "?a", "#f", " ", "%00", ":1",
        "\n", "\x00"]


@settings(max_examples=300, deadline=None, derandomize=True, database=None)
@given(host=st.sampled_from(HOSTS), user=st.sampled_from(["", "", "0.0.0.0:9@", "u@", "127.0.0.1@"]),
       port=st.sampled_from(["*", "*", "0", "65535", "99999", ""]), junk=st.sampled_from(JUNK))
def test_fuzzed_tcp_urls_listen_on_loopback_only_without_curve(host, user, port, junk):
    url = f"tcp://{user}{host}:{port}{junk}" if port else f"tcp://{user}{host}{junk}"
    try:
        endpoint = resolve_endpoint(url)
    except StartupError:
        return
    socket = zmq.Context.instance().socket(zmq.ROUTER)
    socket.setsockopt(zmq.IPV6, 1)
    try:
        try:
            socket.bind(endpoint.url)
        except zmq.ZMQError:
            return  # the driver refuses to start on a bind error
        bound = socket.getsockopt_string(zmq.LAST_ENDPOINT)
        check_bound_address(bound, curve=False)  # raises if what ZeroMQ bound is beyond loopback
    finally:
        socket.close(0)
