"""Data-parallel replicas: two CPU replicas behind one socket, with supervision."""

from __future__ import annotations

import os
import signal
import socket
import time

import msgspec
import pytest

from pie_driver_trtllm.replicas.batches import join_parts, pieces, round_robin, sub_forwards, take_replies
from pie_driver_trtllm.sampler import Sampler
from pie_driver_trtllm.wire.messages import ForwardItem

pytestmark = pytest.mark.slow

PROMPTS = {c: [2 + 3 * c + i for i in range(3 + c % 4)] for c in range(1, 9)}
PAIR = {"device": ["cpu", "cpu"]}
# One replica's forward caps, small so that a forward over them is cheap; the pair's are 128 tokens, 8 requests.
SMALL = {"max_batched_tokens": 64, "max_concurrent_requests": 4}
ROOMY = {"max_batched_tokens": 128, "max_concurrent_requests": 8}  # a single driver taking the pair's forwards


def decode(client, prompts, steps):
    histories = {c: list(p) for c, p in prompts.items()}
    requests = [{"context": c, "tokens": p, "positions": list(range(len(p))),
                 "samplers": [{"at": len(p) - 1, "type": "greedy"}]} for c, p in prompts.items()]
    for _ in range(steps):
        results = client.forward(requests)
        requests = []
        for (context, history), result in zip(histories.items(), results, strict=True):
            assert result["ok"], result
            history.append(result["outputs"][0]["token"])
            requests.append({"context": context, "tokens": [history[-1]], "positions": [len(history) - 1],
                             "samplers": [{"at": 0, "type": "greedy"}]})
    return {c: h[len(prompts[c]):] for c, h in histories.items()}


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split()[2] != "Z"
    except FileNotFoundError:
        return False


def wait_for(predicate, timeout_s: float, step_s: float = 0.05):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(step_s)
    raise AssertionError(f"condition not met within {timeout_s} s")


def test_two_replicas_match_one_and_spread_contexts(start_driver):
    pair = start_driver(driver={"device": ["cpu", "cpu"]})
    single = start_driver()
    client = pair.client()
    caps = client.call("handshake")["caps"]
    assert caps["replicas"] == 2 and caps["devices"] == ["cpu", "cpu"]
    assert decode(client, PROMPTS, 12) == decode(single.client(), PROMPTS, 12)
    health = client.call("health").result
    assert health["status"] == "ok"
    assert [r["contexts"] for r in health["replicas"]] == [4, 4]
    stats = client.call("stats").result
    assert stats["requests"] == 8 * 12 and len(stats["replicas"]) == 2
    assert all(r["requests"] > 0 for r in stats["replicas"])
    assert all(r["engine_s"] > 0 for r in stats["replicas"])
    assert stats["engine_s"] == pytest.approx(sum(r["engine_s"] for r in stats["replicas"]))


def test_fork_across_replicas_copies_the_history(start_driver):
    client = start_driver(driver={"device": ["cpu", "cpu"]}).client()
    client.forward([{"context": 1, "tokens": [5, 6, 7, 8], "positions": [0, 1, 2, 3]},
                    {"context": 2, "tokens": [9], "positions": [0]}])  # 1 on replica 0, 2 on replica 1
    assert client.call("fork", src=1, dst=2, length=3)["length"] == 3
    sampler = [{"at": 0, "type": "greedy"}]
    forked = client.forward([{"context": 2, "tokens": [8], "positions": [3], "samplers": sampler}])
    parent = client.forward([{"context": 1, "tokens": [8], "positions": [3], "samplers": sampler}])
    assert forked[0]["outputs"] == parent[0]["outputs"]
    assert client.call("release", contexts=[1, 2, 3])["released"] == 2


def test_sigkill_of_a_replica_fails_only_its_contexts_and_it_restarts(start_driver):
    driver = start_driver(driver={"device": ["cpu", "cpu"]})
    client = driver.client()
    decode(client, PROMPTS, 2)
    health = client.call("health").result
    victim = health["replicas"][1]
    victim_contexts = {c for i, c in enumerate(PROMPTS) if i % 2 == 1}  # placed alternately, least-loaded
    long_prompt = list(range(1, 200))
    requests = [{"context": c, "tokens": long_prompt, "positions": list(range(199)),
                 "samplers": [{"at": 198, "type": "greedy"}]} for c in range(100, 116)]
    client.send("forward", requests=requests)
    os.kill(victim["pid"], signal.SIGKILL)
    started = time.monotonic()
    reply = client.recv(60)
    lost = [r for r in reply["results"] if not r["ok"]]
    assert lost and all(r["error"]["code"] == "REPLICA_LOST" for r in lost)
    assert len(lost) < len(requests)  # the other replica's share was served
    wait_for(lambda: client.call("health")["status"] == "degraded", 1.0)
    assert time.monotonic() - started < 5

    # Contexts of the dead replica get REPLICA_LOST; the others keep decoding.
    step = [{"context": c, "tokens": [1], "positions": [len(p)], "samplers": [{"at": 0, "type": "greedy"}]}
            for c, p in PROMPTS.items()]
    results = dict(zip(PROMPTS, client.forward(step), strict=True))
    assert {c for c, r in results.items() if not r["ok"]} == victim_contexts
    assert all(r["error"]["code"] == "REPLICA_LOST" for c, r in results.items() if c in victim_contexts)
    # Every REPLICA_LOST answer the router built is counted.
    assert client.call("stats")["errors"] == {"REPLICA_LOST": len(lost) + len(victim_contexts)}
    gone = sorted(victim_contexts)[0]  # a fork from it, or a truncate of it, names the loss too
    for op, fields in (("fork", {"src": gone, "dst": 500}), ("truncate", {"context": gone, "length": 1})):
        refused = client.call(op, check=False, **fields)
        assert refused.error is not None and refused.error.code == "REPLICA_LOST", (op, refused)

    # The replica comes back; a lost context replayed from position 0 and a new context are served.
    wait_for(lambda: client.call("health")["status"] == "ok", 60, 0.2)
    health = client.call("health").result
    assert health["replicas"][1]["restarts"] == 1 and health["replicas"][1]["pid"] != victim["pid"]
    lost_context = sorted(victim_contexts)[0]
    replay = client.forward([{"context": lost_context, "tokens": PROMPTS[lost_context],
                              "positions": list(range(len(PROMPTS[lost_context]))),
                              "samplers": [{"at": len(PROMPTS[lost_context]) - 1, "type": "greedy"}]}])
    assert replay[0]["ok"]
    assert client.call("health")["replicas"][1]["contexts"] >= 1


def test_shutdown_leaves_no_replica_process(start_driver):
    driver = start_driver(driver={"device": ["cpu", "cpu"]})
    pids = [r["pid"] for r in driver.client().call("health")["replicas"]]
    assert all(alive(pid) for pid in pids)
    driver.process.send_signal(signal.SIGTERM)
    assert driver.process.wait(20) == 0
    wait_for(lambda: not any(alive(pid) for pid in pids), 10)


def request(context: int, tokens: list[int], start: int = 0, greedy: bool = True) -> dict:
    return {"context": context, "tokens": tokens, "positions": list(range(start, start + len(tokens))),
            "samplers": [{"at": len(tokens) - 1, "type": "greedy"}] if greedy else []}


def item(context: int, tokens: int, at: tuple[int, ...] = ()) -> ForwardItem:
    return ForwardItem(context, list(range(tokens)), list(range(tokens)),
                       tuple(Sampler(type="greedy", at=a, temperature=0.0) for a in at))


def test_long_requests_are_cut_and_shares_packed_within_one_replicas_caps():
    whole = pieces(0, item(1, 64, (63,)), 64)
    assert len(whole) == 1 and whole[0].samplers is None and whole[0].item.tokens == list(range(64))
    parts = pieces(3, item(2, 150, (149, 5, 70, 64)), 64)
    assert [p.item.positions[0] for p in parts] == [0, 64, 128] and [len(p.item.tokens) for p in parts] == [64, 64, 22]
    assert [p.samplers for p in parts] == [[1], [2, 3], [0]]  # the request's sampler indexes each part carries
    assert [[s.at for s in p.item.samplers] for p in parts] == [[5], [6, 0], [21]]  # re-based on the part
    assert {p.request for p in parts} == {3}
    joined = join_parts(item(2, 150, (149, 5, 70, 64)), [
        (parts[0], {"ok": True, "outputs": ["b"]}), (parts[1], {"ok": True, "outputs": ["c", "d"]}),
        (parts[2], {"ok": True, "outputs": ["a"]})])
    assert joined == {"ok": True, "outputs": ["a", "b", "c", "d"]}
    failed = {"ok": False, "error": {"code": "ENGINE_ERROR", "message": "x"}}
    first_ok = (parts[0], {"ok": True, "outputs": ["b"]})
    assert join_parts(item(2, 150, (149, 5, 70, 64)), [first_ok, (parts[1], failed)]) == failed

    def sizes(share, max_requests, max_tokens):
        return [[len(p.item.tokens) for p in cut] for cut in sub_forwards(share, max_requests, max_tokens)]

    share = [p for i, n in enumerate([30, 30, 4, 30, 1, 1]) for p in pieces(i, item(i, n), 64)]
    assert sizes(share, 4, 64) == [[30, 30, 4], [30, 1, 1]]
    assert sizes(share, 2, 100) == [[30, 30], [4, 30], [1, 1]]
    assert sizes(pieces(0, item(1, 150), 64) + pieces(1, item(2, 10), 64), 4, 64) == [[64], [64], [22, 10]]
    assert sub_forwards([], 4, 64) == []
    assert round_robin([["a0", "a1", "a2"], ["b0"], ["c0", "c1"]]) == ["a0", "b0", "c0", "a1", "c1", "a2"]


def test_take_replies_keeps_the_awaited_ids_and_skips_an_older_one():
    frames = [msgspec.msgpack.encode({"v": 1, "id": i, "ok": True, "results": [{"ok": True, "n": i}]})
              for i in (3, 5, 6)]
    waiting, replies = {5, 6, 7}, {}
    take_replies(frames, waiting, replies)
    assert waiting == {7} and sorted(replies) == [5, 6]
    assert replies[6][0] == frames[2] and msgspec.msgpack.decode(replies[6][1].results[0]) == {"ok": True, "n": 6}


def test_router_caps_are_the_sum_over_replicas(start_driver):
    pair = start_driver(driver=PAIR, **SMALL)
    caps = pair.client().call("handshake")["caps"]
    assert (caps["max_forward_tokens"], caps["max_forward_requests"]) == (128, 8)
    assert (caps["replica_max_forward_tokens"], caps["replica_max_forward_requests"]) == (64, 4)
    assert caps["max_logit_rows"] == caps["max_prob_rows"] == 64  # row caps stay one replica's
    assert caps["max_sampler_rows"] == 8192 and caps["total_pages"] == caps["max_page_refs"] == 65536
    assert caps["replicas"] == 2 and pair.handshake_line["caps"] == caps


def test_a_forward_over_one_replicas_caps_is_split_and_joined_in_order(start_driver):
    # Contexts alternate between the replicas: the odd ones, 96 of the 112 tokens, all land on replica 0.
    prompts = {c: [2 + 5 * c + i for i in range(24 if c % 2 else 4)] for c in range(1, 9)}
    pair = start_driver(driver=PAIR, **SMALL)
    single = start_driver(**ROOMY)
    tokens = decode(pair.client(), prompts, 4)
    assert tokens == decode(single.client(), prompts, 4)
    assert len({tuple(t) for t in tokens.values()}) == len(prompts)  # a result joined out of place would show
    assert [r["contexts"] for r in pair.client().call("health")["replicas"]] == [4, 4]


def test_a_forward_over_the_routers_caps_is_refused_whole(start_driver):
    client = start_driver(driver=PAIR, **SMALL).client()
    for requests in ([request(c, [1]) for c in range(1, 10)],           # 9 requests > 8
                     [request(c, [1] * 33) for c in range(1, 5)]):      # 132 tokens > 128
        reply = client.call("forward", check=False, requests=requests)
        assert not reply.ok and reply.error.code == "CAPACITY"
    assert [r["contexts"] for r in client.call("health")["replicas"]] == [0, 0]  # nothing reached a replica
    assert all(r["ok"] for r in client.forward([request(c, [1] * 32) for c in range(1, 5)]))  # 128 tokens


def test_a_degraded_router_serves_a_forward_over_the_survivors_caps(start_driver):
    pair = start_driver(driver=PAIR, **SMALL)
    single = start_driver(**ROOMY)
    client = pair.client()
    os.kill(client.call("health")["replicas"][1]["pid"], signal.SIGKILL)
    wait_for(lambda: client.call("health")["status"] == "degraded", 2.0)
    # 8 new contexts, 116 tokens: all on the survivor, whose caps are 4 requests and 64 tokens.
    prompts = {c: [3 + 7 * c + i for i in range(n)] for c, n in enumerate([30, 30, 4, 4, 4, 4, 30, 10], 1)}
    tokens = decode(client, prompts, 3)
    assert [r["contexts"] for r in client.call("health")["replicas"]] == [8, 0]
    assert tokens == decode(single.client(), prompts, 3)


def test_a_replica_dying_fails_all_its_pending_sub_forwards(start_driver):
    # Replica 1's first sub-forward hangs on token 499, so both of its sub-forwards are pending when it dies.
    client = start_driver(driver=PAIR, env={"PIE_DRIVER_FAULTS": "hang_on_token:499,hang_s:5"}, **SMALL).client()
    victim = client.call("health")["replicas"][1]["pid"]
    # Alternate placement: 1, 3, 5, 7 (4 tokens each) on replica 0; 2, 4, 6, 8 (28 each, so 2 + 2) on replica 1.
    lengths = {c: 4 if c % 2 else 28 for c in range(1, 9)}
    requests = [request(c, [9] * (lengths[c] - 1) + [499 if c == 2 else 7]) for c in range(1, 9)]
    client.send("forward", requests=requests)
    time.sleep(1.0)
    os.kill(victim, signal.SIGKILL)
    results = client.recv(10)["results"]
    assert [r["ok"] for r in results] == [True, False] * 4
    assert all(r["error"]["code"] == "REPLICA_LOST" for r in results[1::2])


def test_a_request_over_one_replicas_token_cap_is_served_in_parts(start_driver):
    """100 tokens against a replica cap of 64: the router sends two parts in order and joins their
    samplers' outputs in the request's order; the answer and the history equal a single driver's."""
    pair = start_driver(driver=PAIR, **SMALL)
    single = start_driver(**ROOMY)
    prompt = [3 + (11 * i) % 97 for i in range(100)]
    samplers = [{"at": 99, "type": "greedy"}, {"at": 10, "type": "dist", "k": 3},
                {"at": 70, "type": "greedy"}, {"at": 63, "type": "logprobs", "token_ids": [5, 6]}]
    requests = [{"context": 5, "tokens": prompt, "positions": list(range(100)), "samplers": samplers},
                request(6, [4, 5, 6])]
    got, want = pair.client().forward(requests), single.client().forward(requests)
    assert all(r["ok"] for r in got)
    assert [o.get("token") for o in got[0]["outputs"]] == [o.get("token") for o in want[0]["outputs"]]
    assert got[0]["outputs"][1]["dist"][0] == want[0]["outputs"][1]["dist"][0]
    assert got[0]["outputs"][3]["logprobs"] == pytest.approx(want[0]["outputs"][3]["logprobs"], rel=1e-4)
    assert got[1] == want[1]
    history = {5: prompt + [got[0]["outputs"][0]["token"]], 6: [4, 5, 6, got[1]["outputs"][0]["token"]]}
    assert decode(pair.client(), history, 3) == decode(single.client(), history, 3)


def test_replicas_start_when_the_drivers_stderr_is_a_socket(tmp_path, tiny_model):
    """A host whose stdio are sockets (Node.js's default): the replicas inherit that descriptor."""
    from conftest import write_config

    from pie_driver_trtllm.client import spawn

    ours, theirs = socket.socketpair()
    try:
        driver = spawn(write_config(tmp_path, tiny_model, driver=PAIR),
                       stderr_fd=theirs.fileno())
        try:
            client = driver.client()
            assert client.call("health")["status"] == "ok"
            assert client.forward([request(1, [4, 5, 6]), request(2, [7])])[0]["ok"]
        finally:
            driver.stop()
    finally:
        ours.close()
        theirs.close()


def test_stats_count_the_hosts_requests_and_every_error_it_received(start_driver):
    pair = start_driver(driver=PAIR, **SMALL)
    single = start_driver(**ROOMY)
    client = pair.client()
    # One request cut into two parts for a replica's 64-token cap is one request.
    assert client.forward([request(5, [3 + (11 * i) % 97 for i in range(100)])])[0]["ok"]
    stats = client.call("stats").result
    assert stats["requests"] == 1 and stats["errors"] == {} and stats["oom_splits"] == 0
    assert sum(r["requests"] for r in stats["replicas"]) == 2  # what the replicas saw: the two parts

    # Refused entries, each counted and each answered as one driver answers it (the message naming its
    # place in the host's forward): first as the replicas refuse them, then as the router does (a
    # request with an unknown field sends the forward down the router's general path).
    vocab = client.call("handshake")["model"]["vocab_size"]
    requests = [request(1, [4, 5]), request(2, [vocab]), request(3, [6]) | {"samplers": [{"at": 3, "type": "greedy"}]},
                request(4, [7]), {"context": 6, "tokens": [1, 2], "positions": [0]}, request(7, [vocab + 1]),
                request(8, [vocab + 2]), request(9, [vocab + 3])]
    for forward in (requests, [*requests[:-1], request(10, [8]) | {"extra": 1}]):
        got = pair.client().call("forward", requests=forward)["results"]
        want = single.client().call("forward", requests=forward)["results"]
        assert [r["ok"] for r in got] == [r["ok"] for r in want] == [True, False, False, True] + [False] * 4
        assert [r.get("error") for r in got] == [r.get("error") for r in want]
    stats, alone = client.call("stats").result, single.client().call("stats").result
    assert stats["requests"] == 1 + 8 + 8 and alone["requests"] == 8 + 8
    assert stats["errors"] == alone["errors"] == {"OUT_OF_RANGE": 5 + 4, "BAD_REQUEST": 1 + 2}
