"""`stage_times`: the driver's own per-stage totals in `stats.stages`, through a real driver subprocess."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from pie_driver_trtllm.client import DriverClient, DriverProcess
from pie_driver_trtllm.serving.stage_clock import STAGES

HANG = 507
HANG_S = 0.3


def forward(client: DriverClient, context: int, tokens: list[int], position: int) -> int:
    result = client.forward([{"context": context, "tokens": tokens, "positions": list(range(position,
                              position + len(tokens))), "samplers": [{"at": len(tokens) - 1, "type": "greedy"}]}])
    assert result[0]["ok"], result
    return result[0]["outputs"][0]["token"]


def test_off_by_default_and_reports_nothing(driver: DriverProcess) -> None:
    client = driver.client()
    forward(client, 1, [3, 4, 5], 0)
    assert "stages" not in client.call("stats").result


def test_each_stage_gets_its_own_time(start_driver: Callable[..., DriverProcess]) -> None:
    """A slow engine call lands in `engine` alone; a host's pause between two forwards lands in `wait`,
    and a pause that a `health` call interrupts does not (its reply is not a forward's)."""
    client = start_driver(stage_times=True, env={"PIE_DRIVER_FAULTS": f"hang_on_token:{HANG},hang_s:{HANG_S}"}).client()
    token = forward(client, 1, [3, 4, 5], 0)
    before = client.call("stats").result["stages"]
    token = forward(client, 1, [token], 3)  # a forward right after `stats`: no wait counted
    time.sleep(0.2)
    token = forward(client, 1, [token], 4)  # waited 0.2 s since the last forward's reply
    time.sleep(0.5)
    client.call("health")
    forward(client, 2, [3, HANG], 0)  # the engine hangs HANG_S; the 0.5 s pause is cut by `health`
    after = client.call("stats").result["stages"]

    assert after["forwards"] - before["forwards"] == 3
    seconds = {stage: after["seconds"][stage] - before["seconds"][stage] for stage in STAGES}
    assert set(after["seconds"]) == set(STAGES)
    # Bounds with room for a loaded machine, each below what a misplaced pause would add (0.5 s or more).
    assert HANG_S <= seconds["engine"] < HANG_S + 0.35, seconds
    assert 0.2 <= seconds["wait"] < 0.65, seconds
    for stage in ("decode", "plan", "finish", "encode", "send"):
        assert 0 <= seconds[stage] < 0.2, (stage, seconds)


def test_requests_answered_during_a_long_engine_call_leave_its_times_alone(
        start_driver: Callable[..., DriverProcess]) -> None:
    """The standby thread answers `health` and `stats` while the engine hangs: the forward being timed
    keeps its stages, and those replies are not forwards."""
    process = start_driver(stage_times=True, env={"PIE_DRIVER_FAULTS": f"hang_on_token:{HANG},hang_s:{HANG_S}"})
    client, other = process.client(), process.client()
    forward(client, 1, [3, 4, 5], 0)
    before = client.call("stats").result["stages"]
    hanging = threading.Thread(target=forward, args=(client, 2, [3, HANG], 0))
    hanging.start()
    time.sleep(0.05)
    while hanging.is_alive():
        other.call("health")
        other.call("stats")
        time.sleep(0.02)
    hanging.join()
    after = other.call("stats").result["stages"]
    assert after["forwards"] - before["forwards"] == 1
    seconds = {stage: after["seconds"][stage] - before["seconds"][stage] for stage in STAGES}
    assert HANG_S <= seconds["engine"] < HANG_S + 0.35, seconds
    assert sum(seconds.values()) - seconds["engine"] < 0.2, seconds  # the hang (0.3 s) stays in `engine`


def test_slept_counts_the_forwards_that_came_after_the_busy_poll(start_driver: Callable[..., DriverProcess]) -> None:
    """With no busy poll every forward after a pause finds the driver asleep; with a 100 ms one, a forward
    sent right after a reply finds it polling."""
    for busy_poll_us, pause_s, slept in ((0, 0.02, 4), (100_000, 0.0, 0)):
        client = start_driver(stage_times=True, busy_poll_us=busy_poll_us).client()
        token = forward(client, 1, [3, 4, 5], 0)
        before = client.call("stats").result["stages"]
        for position in range(3, 7):
            time.sleep(pause_s)
            token = forward(client, 1, [token], position)
        after = client.call("stats").result["stages"]
        assert after["forwards"] - before["forwards"] == 4
        assert after["slept"] - before["slept"] == slept, (busy_poll_us, after, before)
