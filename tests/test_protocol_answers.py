"""What docs/protocol.md answers where the contract is silent, pinned against a real driver: refused
entries are not merged, how refusals count in `stats`, the order of fork's checks, integers and nil as
a JavaScript host sends them, and, with replicas, fork and the step deadline."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import msgpack
import pytest
from conftest import write_config
from test_docs import DOCS, first_column, page_text, section

from pie_driver_trtllm.client import DriverClient, DriverProcess, spawn

pytestmark = pytest.mark.slow

CAPS = {"max_concurrent_requests": 4, "max_batched_tokens": 64}
HANG = 510  # a step whose row ends with this token hangs (the test-only fault wrapper)


def prefill(context: int, tokens: list[int], start: int = 0, sample: bool = False) -> dict:
    request = {"context": context, "tokens": tokens, "positions": list(range(start, start + len(tokens)))}
    if sample:
        request["samplers"] = [{"at": len(tokens) - 1, "type": "greedy"}]
    return request


def code(result: dict) -> str | None:
    return None if result["ok"] else result["error"]["code"]


def raw_call(client: DriverClient, message: dict) -> dict:
    client.send_raw(msgpack.packb(message))
    return msgpack.unpackb(client.socket.recv(), strict_map_key=False) if client.socket.poll(60_000) else {}


@pytest.fixture(scope="module")
def one(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path) -> Iterator[DriverProcess]:
    process = spawn(write_config(tmp_path_factory.mktemp("answers"), tiny_model, **CAPS))
    yield process
    process.stop()


def test_an_entry_refused_with_out_of_range_is_not_merged(one):
    client = one.client()
    assert client.forward([prefill(1, [5, 6, 7])])[0]["ok"]
    refused = client.forward([
        prefill(1, [8, 100_000], start=3),                                                   # a token
        {**prefill(1, [8], start=3), "samplers": [{"at": 1, "type": "greedy"}]},             # `at`
        {**prefill(1, [8], start=3), "samplers": [{"at": 0, "type": "dist", "k": 10_000}]},  # `k`
    ])
    assert [code(r) for r in refused] == ["OUT_OF_RANGE"] * 3
    gap = client.forward([prefill(1, [9], start=4)])[0]  # had token 8 been merged, this would extend it
    assert gap["error"]["code"] == "HISTORY_GAP" and gap["error"]["known_length"] == 3


def test_a_forward_refused_whole_is_one_error_and_no_requests(one):
    client = one.client()
    before = client.call("stats").result
    too_many = [prefill(20 + i, [1]) for i in range(CAPS["max_concurrent_requests"] + 1)]
    assert client.call("forward", check=False, requests=too_many).error.code == "CAPACITY"
    too_long = [prefill(30, list(range(1, CAPS["max_batched_tokens"] + 2)))]
    assert client.call("forward", check=False, requests=too_long).error.code == "CAPACITY"
    after = client.call("stats").result
    assert after["errors"].get("CAPACITY", 0) - before["errors"].get("CAPACITY", 0) == 2
    assert (after["requests"], after["tokens_in"], after["tokens_out"]) == (
        before["requests"], before["tokens_in"], before["tokens_out"])


def test_refused_entries_each_count(one):
    client = one.client()
    before = client.call("stats").result
    results = client.forward([prefill(40, [100_000])] * 4)
    assert [code(r) for r in results] == ["OUT_OF_RANGE"] * 4
    after = client.call("stats").result
    assert after["requests"] - before["requests"] == 4
    assert after["errors"]["OUT_OF_RANGE"] - before["errors"].get("OUT_OF_RANGE", 0) == 4


def test_fork_checks_run_in_the_documented_order(one):
    client = one.client()
    assert client.forward([prefill(50, [5, 6, 7]), prefill(51, [9, 9])]) == [{"ok": True, "outputs": []}] * 2

    def fork(**fields) -> str | None:
        reply = client.call("fork", check=False, **fields)
        return None if reply.ok else reply.error.code

    assert fork(src=777, dst=777, length=99) == "BAD_REQUEST"    # src == dst before src is looked up
    assert fork(src=777, dst=51, length=99) == "UNKNOWN_CONTEXT"  # unknown src before its length
    assert fork(src=50, dst=51, length=4) == "OUT_OF_RANGE"
    assert fork(src=50, dst=51, length=-1) == "BAD_REQUEST"
    extended = client.forward([prefill(51, [3], start=2, sample=True)])[0]  # dst kept its 2 tokens
    assert extended["ok"], extended


def test_large_integers_must_be_integers_and_nil_only_where_optional(one):
    client = one.client()
    top = 2**64 - 1
    reply = raw_call(client, {"v": 1, "id": top, "op": "health"})
    assert reply["id"] == top and reply["ok"]
    reply = raw_call(client, {"v": 1, "id": float(2**40), "op": "health"})  # an id sent as float64
    assert reply["id"] is None and reply["error"]["code"] == "BAD_REQUEST"
    sampler = {"at": 0, "type": "multinomial", "seed": 2**63 + 5, "temperature": None, "top_k": None}
    big = client.forward([{**prefill(2**40 + 3, [4]), "samplers": [sampler]},
                          {"context": float(2**40 + 4), "tokens": [4], "positions": [0]},
                          {**prefill(60, [4]), "samplers": None}])
    assert [code(r) for r in big] == [None, "BAD_REQUEST", "BAD_REQUEST"]
    assert client.call("fork", src=2**40 + 3, dst=top, length=None)["length"] == 1


# ---------------------------------------------------------------- with replicas


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path) -> Iterator[DriverProcess]:
    """Two CPU replicas; a step whose row ends with HANG sleeps 3 s against a 1 s deadline."""
    process = spawn(write_config(tmp_path_factory.mktemp("pair"), tiny_model, driver={"device": ["cpu", "cpu"]},
                                 engine_step_timeout_s=1.0),
                    env={"PIE_DRIVER_FAULTS": f"hang_on_token:{HANG},hang_s:3"})
    yield process
    process.stop()


def test_a_refused_fork_leaves_dst_on_another_replica_intact(pair):
    client = pair.client()
    # A new context goes to the replica with the fewest contexts: these two land on different replicas.
    assert all(r["ok"] for r in client.forward([prefill(1, [5, 6, 7])]))
    assert all(r["ok"] for r in client.forward([prefill(2, [9, 9])]))
    assert [r["contexts"] for r in client.call("health")["replicas"]] == [1, 1]
    assert client.call("fork", check=False, src=1, dst=2, length=4).error.code == "OUT_OF_RANGE"
    extended = client.forward([prefill(2, [3], start=2, sample=True)])[0]
    assert extended["ok"], extended
    assert client.call("fork", src=1, dst=2)["length"] == 3  # an accepted fork moves dst to src's replica
    assert [r["contexts"] for r in client.call("health")["replicas"]] == [2, 0]


def test_replica_health_has_the_documented_fields(pair):
    health = pair.client().call("health").result
    assert [set(entry) for entry in health["replicas"]] == [
        {"device", "alive", "contexts", "inflight", "engine", "restarts", "pid"}] * 2


def test_replica_stats_fields_are_the_documented_ones(pair):
    stats = pair.client().call("stats").result
    documented = set(first_column(section(page_text(DOCS / "protocol.md"), "5.7 stats")))
    only_sometimes = {"stages", "engine"}  # with `stage_times` on; `engine` is each replica's own
    assert set(stats) == documented - only_sometimes
    assert stats["engine_timeouts"] == sum(r["engine_timeouts"] for r in stats["replicas"])


def test_each_replica_counts_its_own_step_timeouts(pair):
    client = pair.client()
    hung = client.forward([prefill(9, [4, HANG], sample=True)])[0]
    assert hung["error"]["code"] == "ENGINE_ERROR" and "engine_step_timeout_s" in hung["error"]["message"]
    stats = client.call("stats").result
    assert sorted(r.get("engine_timeouts") for r in stats["replicas"]) == [0, 1]
    assert stats["engine_timeouts"] == 1
    # The hung step has not returned: its replica is fenced off, and health says so at once.
    asked = time.monotonic()
    health = client.call("health").result
    assert time.monotonic() - asked < 0.5
    assert health["status"] == "degraded"
    assert sorted(r["engine"] for r in health["replicas"]) == ["ok", "stuck"]
    stuck = next(r for r in health["replicas"] if r["engine"] == "stuck")
    assert 1.0 <= stuck["stuck_s"] < 3.0 and stuck["alive"]
    deadline = time.monotonic() + 30
    while client.call("health")["status"] != "ok":  # the hung step returns; the replica serves again
        assert time.monotonic() < deadline, "the replica stayed fenced off"
        time.sleep(0.1)
    health = client.call("health").result
    assert [r["engine"] for r in health["replicas"]] == ["ok", "ok"]
    assert not any("stuck_s" in r for r in health["replicas"])
    assert client.forward([prefill(9, [4, 5], sample=True)])[0]["ok"]
