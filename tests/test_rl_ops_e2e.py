"""Weight refits, sleep and wake through a real driver's socket: one device, and two replicas that all load."""

from __future__ import annotations

import shutil

import pytest
from test_rl_ops import PROMPTS, greedy, harness, second_model  # noqa: F401  (second_model: a fixture)

from pie_driver_trtllm.client import DriverClient

pytestmark = pytest.mark.slow

SLOW_LOAD = {"PIE_DRIVER_FAULTS": "load_delay_s:1.0"}


def truncated(model, directory):
    shutil.copytree(model, directory)
    weights = directory / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size - 100])
    return directory


def start(client: DriverClient, prompts):
    histories = {}
    reply = client.call("forward", requests=[greedy(c, p, 0) for c, p in prompts.items()])
    for (context, prompt), result in zip(prompts.items(), reply["results"], strict=True):
        histories[context] = list(prompt) + [result["outputs"][0]["token"]]
    return histories, reply["weights_version"]


def step(client: DriverClient, histories):
    """One decode step of every context (the fast path's shape); the reply's weights_version."""
    reply = client.call("forward", requests=[greedy(c, [h[-1]], len(h) - 1) for c, h in histories.items()])
    for history, result in zip(histories.values(), reply["results"], strict=True):
        assert result["ok"], result
        history.append(result["outputs"][0]["token"])
    return reply["weights_version"]


def expected_after_refit(model, histories, steps):
    """What a fresh engine on `model` answers for these histories, replayed whole, then decoded."""
    fresh = harness(model)
    out = {c: list(h) for c, h in histories.items()}
    for context, history in out.items():
        history.append(fresh.forward([greedy(context, history, 0)])[0]["outputs"][0]["token"])
    for _ in range(steps - 1):
        for context, history in out.items():
            history.append(fresh.forward([greedy(context, [history[-1]], len(history) - 1)])[0]["outputs"][0]["token"])
    return out


def test_load_sleep_and_wake_through_the_socket(start_driver, second_model, tmp_path):  # noqa: F811
    driver = start_driver(env=SLOW_LOAD)
    client = driver.client()
    caps = client.call("handshake")["caps"]
    assert caps["rl_ops"] == ["load_weights", "sleep", "wake"] and caps["sleep_levels"] == [1, 2]
    histories, version = start(client, PROMPTS)
    assert version == 0 and step(client, histories) == 0

    load = client.send("load_weights", path=str(second_model), version=5)
    health = client.send("health")  # answered while the load runs (it sleeps a second first)
    first = client.recv(30)
    assert first.id == health and first["weights_version"] == 0 and first["weights"] == "serving"
    second = client.recv(60)
    assert second.id == load and second.ok and second["weights_version"] == 5
    health = client.call("health").result
    assert (health["weights_version"], health["weights"], health["asleep"], health["status"]) == (5, "serving", 0, "ok")

    want = expected_after_refit(second_model, histories, 3)
    assert {step(client, histories) for _ in range(3)} == {5}
    assert histories == want

    refused = client.call("load_weights", check=False, path=str(truncated(second_model, tmp_path / "t")), version=6)
    assert refused.error.code == "WEIGHTS_LOAD_FAILED" and refused.error.details == {"serving_previous": True}
    assert "truncated" in refused.error.message
    bad = client.call("load_weights", check=False, path=str(second_model), version=-1)
    assert bad.error.code == "BAD_REQUEST"
    assert step(client, histories) == 5

    assert client.sleep(2) == 2
    asleep = client.call("forward", requests=[greedy(c, [h[-1]], len(h) - 1) for c, h in histories.items()])
    assert {r["error"]["code"] for r in asleep["results"]} == {"ASLEEP"}
    assert client.call("health")["asleep"] == 2
    assert client.call("load_weights", check=False, path=str(second_model), version=7).error.code == "ASLEEP"
    assert client.call("fork", src=1, dst=50)["length"] == len(histories[1]) - 1
    assert client.wake() == 0 and client.wake() == 0
    want = expected_after_refit(second_model, histories, 1)
    assert step(client, histories) == 5
    assert histories == want


def test_every_replica_loads_and_the_reply_says_so(start_driver, second_model, tmp_path):  # noqa: F811
    pair = start_driver(driver={"device": ["cpu", "cpu"]})
    client = pair.client()
    assert client.call("handshake")["caps"]["rl_ops"] == ["load_weights", "sleep", "wake"]
    histories, _ = start(client, PROMPTS)
    assert all(r["contexts"] > 0 for r in client.call("health")["replicas"])  # spread over both
    assert client.load_weights(str(second_model), 3) == 3
    health = client.call("health").result
    assert (health["weights_version"], health["weights"]) == (3, "serving")
    want = expected_after_refit(second_model, histories, 2)
    assert {step(client, histories) for _ in range(2)} == {3}
    assert histories == want

    refused = client.call("load_weights", check=False, path=str(truncated(second_model, tmp_path / "t")), version=4)
    assert refused.error.code == "WEIGHTS_LOAD_FAILED"
    assert refused.error.details == {"serving_previous": True, "replicas_failed": [0, 1]}
    assert step(client, histories) == 3

    assert client.sleep(1) == 1
    asleep = client.call("forward", requests=[greedy(c, [h[-1]], len(h) - 1) for c, h in histories.items()])
    assert {r["error"]["code"] for r in asleep["results"]} == {"ASLEEP"}
    assert client.wake() == 0
    assert step(client, histories) == 3
