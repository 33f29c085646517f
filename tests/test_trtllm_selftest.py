"""`pie-driver-trtllm selftest` passes on the TensorRT-LLM test double and says so on every line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from trtllm_support import DOUBLE_DIR

from pie_driver_trtllm.tools.selftest import run_selftest

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("mode", ["generate", "pyexecutor"])
def test_selftest_passes_on_the_double(tmp_path: Path, tiny_model: Path, mode: str) -> None:
    lines: list[str] = []
    code = run_selftest("tensorrt_llm", tiny_model, mode, DOUBLE_DIR, tmp_path / "report.json",
                        tmp_path / "work", echo=lines.append)
    report = json.loads((tmp_path / "report.json").read_text())
    assert code == 0, [s for s in report["scenarios"] if not s["ok"]]
    assert all(line.startswith("[test double, NOT TensorRT-LLM] ") for line in lines)
    names = [s["name"] for s in report["scenarios"]]
    assert names == ["handshake", "greedy-parity", "lookahead", "fork", "rollback", "seeded-sampling",
                     "unseeded-sampling", "min-p", "dist-logprobs", "errors", "health-during-forward", "shutdown"]
    assert report["environment"]["test_double"] == str(DOUBLE_DIR)


def test_selftest_without_the_package_fails_with_the_remedy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("importlib.util.find_spec", lambda name, *a: None)
    lines: list[str] = []
    assert run_selftest("tensorrt_llm", tmp_path, "generate", None, None, tmp_path, echo=lines.append) == 1
    assert lines == ["[tensorrt_llm] FAIL setup: tensorrt_llm is not importable (run `pie-driver-trtllm doctor`)"]
