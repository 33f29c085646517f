"""The pyexecutor mode against the strict double: capacity, residency, the scheduler's budget, errors."""

from __future__ import annotations

from typing import Any

import pytest
from trtllm_support import load_double_engine

from pie_driver_trtllm.config import StartupError


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


def hf_greedy(model_dir: Any, prompt: list[int], steps: int) -> list[int]:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    sequence = list(prompt)
    with torch.inference_mode():
        for _ in range(steps):
            sequence.append(int(model(torch.tensor([sequence])).logits[0, -1].argmax()))
    return sequence[len(prompt):]


def test_a_long_prompt_is_prefilled_in_chunks_within_the_token_budget(double: None, tiny_model: Any) -> None:
    harness, trt = load_double_engine(tiny_model, execution_mode="pyexecutor", lookahead_tokens=1,
                                      enable_chunked_prefill=True, max_num_tokens=8,
                                      llm_kwargs={"kv_cache_config": {"tokens_per_block": 4}})
    prompt = [3 + i % 50 for i in range(100)]
    assert greedy_decode(harness, [prompt], 3) == [hf_greedy(tiny_model, prompt, 3)]
    assert [n for _, n in prefills(trt)] == [8] * 12 + [4]


def test_a_prompt_over_the_budget_without_chunking_is_refused_alone(double: None, tiny_model: Any) -> None:
    harness, _ = load_double_engine(tiny_model, execution_mode="pyexecutor", max_num_tokens=16)
    results = harness.forward([
        {"context": 1, "tokens": list(range(3, 23)), "positions": list(range(20)),
         "samplers": [{"at": 19, "type": "greedy"}]},
        {"context": 2, "tokens": [3, 4, 5], "positions": [0, 1, 2], "samplers": [{"at": 2, "type": "greedy"}]}])
    assert results[0]["error"]["code"] == "OUT_OF_RANGE" and "max_num_tokens (16)" in results[0]["error"]["message"]
    assert results[1]["ok"]


def test_requests_the_scheduler_never_admits_fail_instead_of_spinning(double: None, tiny_model: Any,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    from tensorrt_llm._torch.pyexecutor.scheduler import SchedulerOutput

    harness, _ = load_double_engine(tiny_model, execution_mode="pyexecutor")
    monkeypatch.setattr(harness.engine._executor.scheduler, "schedule_request", lambda *a: SchedulerOutput())
    (result,) = harness.forward([{"context": 1, "tokens": [3, 4, 5], "positions": [0, 1, 2],
                                  "samplers": [{"at": 2, "type": "greedy"}]}])
    assert result["error"]["code"] == "ENGINE_ERROR" and "admitted none" in result["error"]["message"]


def test_an_executor_error_reports_tensorrt_llms_own_message(double: None, tiny_model: Any,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    harness, _ = load_double_engine(tiny_model, execution_mode="pyexecutor")

    def fail(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(harness.engine._executor.model_engine, "forward", fail)
    (result,) = harness.forward([{"context": 1, "tokens": [3, 4, 5], "positions": [0, 1, 2],
                                  "samplers": [{"at": 2, "type": "greedy"}]}])
    assert "Encountered an error in forward function" in result["error"]["message"]
    assert "illegal memory access" in result["error"]["message"]


def test_a_finished_request_is_dropped_and_replaced(double: None, tiny_model: Any) -> None:
    harness, trt = load_double_engine(tiny_model, execution_mode="pyexecutor", lookahead_tokens=4,
                                      pyexecutor_max_tokens=2)
    prompt = [3, 4, 5]
    assert greedy_decode(harness, [prompt], 6) == [hf_greedy(tiny_model, prompt, 6)]
    assert len([c for c in trt.CALLS if c["kind"] == "executor_request_to_llm_request"]) >= 3


def test_free_gpu_memory_fraction_of_one_is_refused_at_config_time(tiny_model: Any) -> None:
    from trtllm_support import trt_config

    for options in ({"kv_cache_free_gpu_memory_fraction": 1.0},
                    {"llm_kwargs": {"kv_cache_config": {"free_gpu_memory_fraction": 1.0}}}):
        with pytest.raises(StartupError, match=r"must be smaller than 1\.0"):
            trt_config(tiny_model, **options)


def test_a_resident_context_keeps_decoding_past_the_token_budget(double: None, tiny_model: Any) -> None:
    harness, _ = load_double_engine(tiny_model, execution_mode="pyexecutor", lookahead_tokens=1, max_num_tokens=8)
    prompt = [3, 4, 5, 6, 7, 8]
    assert greedy_decode(harness, [prompt], 6) == [hf_greedy(tiny_model, prompt, 6)]  # history grows to 11
