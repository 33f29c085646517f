"""The rl workload's refit and sleep parts against a stand-in client that offers the RL ops."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from pie_driver_trtllm.benchmarks import rl
from pie_driver_trtllm.benchmarks.common import Bench
from pie_driver_trtllm.client import ErrorInfo, Reply


class OpsClient:
    """Answers `load_weights`, `sleep`, `wake` and `forward` as the protocol describes them."""

    def __init__(self) -> None:
        self.version = 0
        self.asleep = 0
        self.ops: list[str] = []

    def call(self, op: str, check: bool = True, **fields: Any) -> Reply:
        self.ops.append(op)
        if op == "load_weights":
            assert Path(fields["path"]).is_dir()
            self.version = fields["version"]
            return Reply(1, True, {"weights_version": self.version})
        if op == "sleep":
            self.asleep = fields["level"]
            return Reply(1, True, {"asleep": self.asleep})
        if op == "wake":
            self.asleep = 0
            return Reply(1, True, {"asleep": 0})
        if op == "forward":
            if self.asleep:
                error = {"code": "ASLEEP", "message": "asleep"}
                return Reply(1, True, {"results": [{"ok": False, "error": error}] * len(fields["requests"])})
            return Reply(1, True, {"results": [{"ok": True, "outputs": [{"token": 1}]}] * len(fields["requests"]),
                                   "weights_version": self.version})
        return Reply(1, False, {}, ErrorInfo("BAD_REQUEST", f"unknown op {op}"))

    def forward(self, requests: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return self.call("forward", requests=requests)["results"]


@pytest.fixture
def bench(tmp_path: Path) -> Bench:
    return Bench(size="tiny", device="cpu", dtype="float32", out_dir=tmp_path / "out", work_dir=tmp_path)


def test_refit_is_timed_against_reading_the_same_files(bench, tiny_model, tmp_path):
    from pie_driver_trtllm.modelgen import make_model

    second = make_model(tmp_path / "second", "tiny", seed=1)
    client = OpsClient()
    probe = {"context": 7, "tokens": [1, 2], "positions": [0, 1], "samplers": [{"at": 1, "type": "greedy"}]}
    result = rl.refit(bench, client, [tiny_model, second], probe)  # type: ignore[arg-type]
    assert client.version == rl.REFITS
    assert len(result["refit_values_s"]) == len(result["floor_values_s"]) == rl.REFITS
    assert result["floor_s"] > 0 and result["ratio"] == result["refit_s"] / result["floor_s"]
    assert result["checkpoint_bytes"] > 0


def test_sleep_then_wake_and_the_first_forward(bench):
    client = OpsClient()
    probe = {"context": 7, "tokens": [1, 2], "positions": [0, 1], "samplers": [{"at": 1, "type": "greedy"}]}
    result = rl.sleep_wake(bench, client, probe, None, 0.5)  # type: ignore[arg-type]
    assert client.ops == ["sleep", "forward", "wake", "forward"]
    assert result["asleep_forward_error"] == "ASLEEP"
    assert result["wake_over_refit"] == result["wake_and_first_forward_s"] / 0.5
    assert "freed_share" not in result  # memory is measured on CUDA only


def test_rl_ops_are_read_from_the_handshake_caps():
    assert rl.rl_ops({"caps": {"rl_ops": ["load_weights", "sleep", "wake"]}}) == ["load_weights", "sleep", "wake"]
    assert rl.rl_ops({"caps": {}}) == []


SMALLEST = {"prompts": 2, "prompt_tokens": 8, "samples": 3, "new_tokens": 3, "wave": 6}


def test_a_driver_without_the_ops_skips_them_with_a_reason(bench, capsys, monkeypatch):
    """The whole workload at its smallest through a real driver, read as one that offers no RL ops."""
    monkeypatch.setattr(rl, "plan", lambda _: SMALLEST)
    monkeypatch.setattr(rl, "rl_ops", lambda _: [])
    result = rl.run(bench)
    assert result["prompt_ratio"] == result["fresh_prompt_ratio"] == 1.0
    assert result["refit"] is None and result["sleep"] is None and set(result["skipped"]) == {"refit", "sleep"}
    assert "rl: skipped: the driver does not advertise load_weights" in capsys.readouterr().out


def test_a_driver_with_the_ops_is_refitted_put_to_sleep_and_woken(bench, monkeypatch):
    from pie_driver_trtllm.engines.reference.engine import ReferenceEngine

    if not hasattr(ReferenceEngine, "load_weights"):
        pytest.skip("this build's reference engine offers no load_weights")
    monkeypatch.setattr(rl, "plan", lambda _: SMALLEST)
    result = rl.run(bench)
    assert not result["skipped"] and result["prompt_ratio"] == 1.0
    assert result["refit"]["ratio"] > 0 and len(result["refit"]["refit_values_s"]) == rl.REFITS
    assert result["sleep"]["asleep_forward_error"] == "ASLEEP" and result["sleep"]["wake_over_refit"] > 0
