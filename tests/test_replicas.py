"""Data-parallel replicas: two CPU replicas behind one socket, with supervision."""

from __future__ import annotations

import os
import signal
import time

import pytest

pytestmark = pytest.mark.slow

PROMPTS = {c: [2 + 3 * c + i for i in range(3 + c % 4)] for c in range(1, 9)}


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
