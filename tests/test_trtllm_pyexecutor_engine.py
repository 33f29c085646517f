"""The pyexecutor mode against the strict double: capacity, residency, the scheduler's budget, errors."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from typing import Any

import pytest
from trtllm_support import DOUBLE_DIR, load_double_engine

from pie_driver_trtllm.config import StartupError
from pie_driver_trtllm.engines.tensorrt_llm.startup import TEST_DOUBLE_ENV


@pytest.fixture
def double(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.syspath_prepend(str(DOUBLE_DIR))
    monkeypatch.setenv(TEST_DOUBLE_ENV, "1")
    for name in [m for m in sys.modules if m == "tensorrt_llm" or m.startswith("tensorrt_llm.")]:
        monkeypatch.delitem(sys.modules, name)
    yield
    for name in [m for m in sys.modules if m == "tensorrt_llm" or m.startswith("tensorrt_llm.")]:
        del sys.modules[name]


def calls(trt: Any, kind: str) -> list[dict[str, Any]]:
    return [c for c in trt.CALLS if c["kind"] == kind]


def prefills(trt: Any) -> list[tuple[int, int]]:
    """(request id, tokens) of every context-phase chunk the executor ran."""
    return [(r["request_id"], r["new_tokens"]) for c in calls(trt, "PyExecutor._forward_step")
            for r in c["requests"] if r["phase"] == "context"]


def greedy_decode(harness: Any, prompts: list[list[int]], steps: int) -> list[list[int]]:
    requests = [{"context": c + 1, "tokens": p, "positions": list(range(len(p))),
                 "samplers": [{"at": len(p) - 1, "type": "greedy"}]} for c, p in enumerate(prompts)]
    lengths = [len(p) for p in prompts]
    out: list[list[int]] = [[] for _ in prompts]
    for _ in range(steps):
        results = harness.forward(requests)
        requests = []
        for c, result in enumerate(results):
            assert result["ok"], result
            token = result["outputs"][0]["token"]
            out[c].append(token)
            requests.append({"context": c + 1, "tokens": [token], "positions": [lengths[c]],
                             "samplers": [{"at": 0, "type": "greedy"}]})
            lengths[c] += 1
    return out


def test_capacity_is_read_from_the_executor_objects(double: None, tiny_model: Any) -> None:
    harness, _ = load_double_engine(tiny_model, execution_mode="pyexecutor", max_batch_size=5)
    assert harness.engine.capacity == 5
    harness, _ = load_double_engine(tiny_model, execution_mode="pyexecutor")
    assert harness.engine.capacity == 2048  # TorchLlmArgs' default max_batch_size


def test_capacity_that_cannot_be_read_is_a_startup_error(double: None, tiny_model: Any,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    from tensorrt_llm._torch.pyexecutor.py_executor import PyExecutor

    original = PyExecutor.__init__

    def without_cap(self: Any, *args: Any, **kwargs: Any) -> None:
        original(self, *args, **kwargs)
        del self.max_num_active_requests

    monkeypatch.setattr(PyExecutor, "__init__", without_cap)
    with pytest.raises(StartupError, match="max_num_active_requests"):
        load_double_engine(tiny_model, execution_mode="pyexecutor")


def test_eight_contexts_stay_resident_for_twenty_steps_with_max_batch_size_unset(double: None,
                                                                                   tiny_model: Any) -> None:
    harness, trt = load_double_engine(tiny_model, execution_mode="pyexecutor", lookahead_tokens=1)
    prompts = [[3 + 7 * c + i for i in range(4 + c)] for c in range(8)]
    greedy_decode(harness, prompts, 20)
    chunks = prefills(trt)
    assert len(chunks) == 8 and sorted(n for _, n in chunks) == [len(p) for p in prompts]  # one prefill each
    decode_rows = sum(len(c["request_ids"]) for c in calls(trt, "PyExecutor._forward_step")) - len(chunks)
    assert decode_rows == 8 * 19
    assert not calls(trt, "PyExecutor._terminate_request")
