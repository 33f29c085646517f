"""Fault injection through a real driver subprocess: the engine raising, hanging, running out of memory;
hosts vanishing mid-forward or sharing the driver; SIGTERM during a forward.

The faults come from the test-only wrapper `pie_driver_trtllm.engines.faults`, switched on by the
`PIE_DRIVER_FAULTS` environment variable of the driver subprocess: a step whose row ends with one of the
trigger tokens below misbehaves. Ordinary prompts here never use tokens above 500.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import write_config

from pie_driver_trtllm.client import DriverClient, DriverProcess, spawn

pytestmark = pytest.mark.slow

RAISE, HANG, OOM = 511, 510, 509
FAULTS = f"raise_on_token:{RAISE},hang_on_token:{HANG},oom_on_token:{OOM}"
PROMPT = [3, 17, 29, 41, 53]


def start(directory: Path, model: Path, hang_s: float, **options: object) -> DriverProcess:
    directory.mkdir(parents=True, exist_ok=True)
    return spawn(write_config(directory, model, **options),
                 env={"PIE_DRIVER_FAULTS": f"{FAULTS},hang_s:{hang_s}"})


@pytest.fixture(scope="module")
def faulty(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path) -> Iterator[DriverProcess]:
    """One driver for the faults that leave it serving: a 2 s step deadline, a 4 s hang."""
    process = start(tmp_path_factory.mktemp("faulty"), tiny_model, hang_s=4.0, engine_step_timeout_s=2.0)
    greedy_run(process.client(), 999, PROMPT, steps=2)  # warm up: the first step is the slowest
    yield process
    process.stop()


def prefill(context: int, tokens: list[int], sample: bool = True) -> dict:
    request = {"context": context, "tokens": tokens, "positions": list(range(len(tokens)))}
    if sample:
        request["samplers"] = [{"at": len(tokens) - 1, "type": "greedy"}]
    return request


def greedy_run(client: DriverClient, context: int, prompt: list[int], steps: int = 4) -> list[int]:
    """Prefill `prompt` on `context` and decode `steps` greedy tokens, one forward per step."""
    history = list(prompt)
    out = []
    request = prefill(context, history)
    for _ in range(steps):
        result = client.forward([request])[0]
        assert result["ok"], result
        token = result["outputs"][0]["token"]
        out.append(token)
        request = {"context": context, "tokens": [token], "positions": [len(history)],
                   "samplers": [{"at": 0, "type": "greedy"}]}
        history.append(token)
    return out


def error_code(result: dict) -> str | None:
    return None if result["ok"] else result["error"]["code"]


def test_engine_raise_fails_that_batch_only(faulty):
    client = faulty.client()
    control = greedy_run(client, 1, PROMPT)
    results = client.forward([prefill(2, [*PROMPT, RAISE]), prefill(3, PROMPT)])
    assert [error_code(r) for r in results] == ["ENGINE_ERROR", "ENGINE_ERROR"]  # the whole call raised
    assert "injected fault" in results[0]["error"]["message"]
    # The failed entries stay merged: a retry sends only the last token again, at its own position.
    retry = client.forward([{"context": 3, "tokens": [PROMPT[-1]], "positions": [len(PROMPT) - 1],
                             "samplers": [{"at": 0, "type": "greedy"}]}])[0]
    assert retry["ok"] and retry["outputs"][0]["token"] == control[0]
    # The next batch is fine, and the batch's other context answers as if nothing had happened.
    assert greedy_run(client, 3, PROMPT) == control
    assert greedy_run(client, 4, PROMPT) == control
    assert client.call("health")["status"] == "ok"


def test_out_of_memory_batch_is_split_and_only_the_culprit_fails(faulty):
    client = faulty.client()
    control = greedy_run(client, 10, PROMPT, steps=1)
    splits = client.call("stats")["oom_splits"]
    batch = [prefill(11, PROMPT), prefill(12, [*PROMPT[:3], OOM]), prefill(13, PROMPT), prefill(14, PROMPT)]
    results = client.forward(batch)
    assert [error_code(r) for r in results] == [None, "ENGINE_ERROR", None, None]
    assert "OutOfMemoryError" in results[1]["error"]["message"] or "MemoryError" in results[1]["error"]["message"]
    assert all(r["outputs"][0]["token"] == control[0] for r in (results[0], results[2], results[3]))
    assert client.call("stats")["oom_splits"] > splits
    assert greedy_run(client, 12, PROMPT) == greedy_run(client, 15, PROMPT)


def test_engine_hang_past_deadline_fails_the_forward_and_fences_the_engine(faulty):
    client = faulty.client()
    control = greedy_run(client, 20, PROMPT)
    started = time.monotonic()
    hung = client.forward([prefill(21, [*PROMPT, HANG]), prefill(22, PROMPT)])
    waited = time.monotonic() - started
    assert [error_code(r) for r in hung] == ["ENGINE_ERROR", "ENGINE_ERROR"]
    assert "engine_step_timeout_s" in hung[0]["error"]["message"]
    assert 1.9 < waited < 3.5, waited
    # While the step is still stuck: health and stats answer at once and say so; forwards that need the
    # engine fail at once instead of queueing behind it.
    asked = time.monotonic()
    health = client.call("health")
    assert time.monotonic() - asked < 0.1
    assert health["status"] == "degraded" and health["replicas"][0]["engine"] == "stuck"
    assert client.call("stats")["engine_timeouts"] >= 1
    asked = time.monotonic()
    refused = client.forward([prefill(23, PROMPT)])[0]
    assert time.monotonic() - asked < 0.5
    assert refused["error"]["code"] == "ENGINE_ERROR" and "not started" in refused["error"]["message"]
    for op, fields in (("sleep", {"level": 1}), ("wake", {}), ("load_weights", {"path": "/nowhere", "version": 9})):
        reply = client.call(op, check=False, **fields)
        assert reply.error is not None and reply.error.code == "ENGINE_ERROR" and "not started" in reply.error.message
    assert client.call("health")["asleep"] == 0 and client.call("health")["weights_version"] == 0
    # History ops still work: a fork of a context whose engine state predates the hang, a truncate, a release.
    assert client.call("fork", src=20, dst=25)["length"] == len(PROMPT) + len(control) - 1
    assert client.call("truncate", context=25, length=len(PROMPT))["length"] == len(PROMPT)
    assert client.call("release", contexts=[26, 20])["released"] == 1
    # Once the stuck call returns the engine is back, and no context lost its state.
    deadline = time.monotonic() + 10
    while client.call("health")["status"] != "ok":
        assert time.monotonic() < deadline, "the engine never came back"
        time.sleep(0.1)
    assert greedy_run(client, 22, PROMPT) == control
    assert greedy_run(client, 23, PROMPT) == control
    forked = client.forward([{"context": 25, "tokens": [PROMPT[-1]], "positions": [len(PROMPT) - 1],
                              "samplers": [{"at": 0, "type": "greedy"}]}])[0]
    assert forked["outputs"][0]["token"] == control[0]  # the fork made while stuck decodes as its source did
    more = client.forward([{"context": 20, "tokens": PROMPT + control, "positions": list(range(9)),
                            "samplers": [{"at": 8, "type": "greedy"}]}])[0]
    assert more["ok"] and more["outputs"][0]["token"] == greedy_run(client, 24, PROMPT, steps=5)[4]


def test_host_disconnect_mid_forward_drops_the_reply_without_leaks(faulty):
    observer = faulty.client()
    pid = faulty.process.pid
    before = observer.call("stats")["dropped_replies"]
    leaver = faulty.client()
    leaver.send("forward", requests=[prefill(30, [*PROMPT, HANG])])
    time.sleep(0.2)  # the forward is running on the engine
    leaver.close()
    deadline = time.monotonic() + 10
    while observer.call("stats")["dropped_replies"] == before:
        assert time.monotonic() < deadline, "the reply to the vanished host was never accounted for"
        time.sleep(0.05)
    assert observer.call("stats")["dropped_replies"] == before + 1
    while observer.call("health")["status"] != "ok":  # the hang outlives the deadline; wait it out
        assert time.monotonic() < deadline
        time.sleep(0.1)
    # Many hosts coming and going mid-request leave no file descriptors or threads behind. (One engine
    # call first: after a deadline the standby thread owns the socket and runs engine calls, and torch
    # starts its intra-op threads for a thread on its first call.)
    greedy_run(observer, 31, PROMPT)
    fds, threads = _fds(pid), _threads(pid)
    for i in range(40):
        client = faulty.client()
        client.send("forward", requests=[prefill(1000 + i, PROMPT)])
        client.close()
    deadline = time.monotonic() + 10
    while (_fds(pid), _threads(pid)) != (fds, threads):
        assert time.monotonic() < deadline, (fds, _fds(pid), threads, _threads(pid))
        time.sleep(0.1)
    assert observer.call("health")["status"] == "ok"


def test_two_hosts_get_their_own_replies(faulty):
    first, second = faulty.client(), faulty.client()
    for _ in range(30):  # same ids on both connections; replies must still go to the right one
        first.send("forward", requests=[prefill(40, PROMPT, sample=False)])
        second.send("forward", requests=[prefill(41, PROMPT, sample=False)] * 2)
        first.send("fork", src=40, dst=42, length=2)
        second.send("truncate", context=41, length=3)
    got_first = [first.recv(10) for _ in range(60)]
    got_second = [second.recv(10) for _ in range(60)]
    assert sorted(r.id for r in got_first) == sorted(r.id for r in got_second) == list(range(1, 61))
    assert all(r.ok for r in got_first + got_second)
    assert {len(r["results"]) for r in got_first if "results" in r.result} == {1}
    assert {len(r["results"]) for r in got_second if "results" in r.result} == {2}
    assert {r["length"] for r in got_first if "length" in r.result} == {2}
    assert {r["length"] for r in got_second if "length" in r.result} == {3}
    for client in (first, second):
        with pytest.raises(TimeoutError):
            client.recv(0.2)


def test_sigterm_during_forward_replies_then_exits_zero(tmp_path, tiny_model):
    driver = start(tmp_path, tiny_model, hang_s=1.5)
    client = driver.client()
    running = client.send("forward", requests=[prefill(1, [*PROMPT, HANG])])
    queued = client.send("forward", requests=[prefill(2, PROMPT)])
    time.sleep(0.3)
    driver.process.send_signal(signal.SIGTERM)
    replies = {reply.id: reply for reply in (client.recv(10), client.recv(10))}
    assert replies[running].ok and replies[running]["results"][0]["ok"]
    assert replies[queued].error.code == "SHUTTING_DOWN"
    assert driver.process.wait(10) == 0
    assert not Path(driver.endpoint.removeprefix("ipc://")).exists()


def test_sigterm_while_the_engine_is_stuck_still_exits_zero(faulty):
    """Last in this module: it stops the shared driver. A wedged step must not hold up the exit."""
    client = faulty.client()
    sent = time.monotonic()
    result = client.forward([prefill(50, [*PROMPT, HANG])])[0]
    assert result["error"]["code"] == "ENGINE_ERROR"
    faulty.process.send_signal(signal.SIGTERM)
    assert faulty.process.wait(10) == 0
    assert time.monotonic() - sent < 3.5  # before the 4 s hang ends: the stuck step was not waited for


def _fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def _threads(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        return int(next(line for line in status if line.startswith("Threads:")).split()[1])
