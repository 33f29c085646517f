"""Runs (protocol 1.1 multi-token samplers): a run equals one-token forwards fed back one by one, and
feeding back any part of it (or none) continues exactly as a driver that never ran ahead."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from trtllm_support import CoreHarness, double_imported, trt_config

from pie_driver_trtllm.config import parse_config
from pie_driver_trtllm.engines.reference.engine import ReferenceEngine
from pie_driver_trtllm.engines.runs import step_seed
from pie_driver_trtllm.engines.tensorrt_llm.startup import TEST_DOUBLE_ENV

RUN = 16
OTHER = 99  # a context that decodes one greedy token per forward beside the run


def reference_harness(model) -> CoreHarness:
    config = parse_config({"model": {"snapshot_dir": str(model)},
                           "driver": {"device": ["cpu"], "activation_dtype": "float32",
                                      "options": {"engine": "reference", "lookahead_tokens": 4}}})
    return CoreHarness(config, ReferenceEngine.load(config, "cpu"))


@pytest.fixture(params=["reference", "generate", "pyexecutor"])
def harnesses(request, tiny_model, monkeypatch):
    """A factory of fresh drivers on one engine kind (the TensorRT-LLM engine on its test double)."""
    if request.param == "reference":
        yield lambda: reference_harness(tiny_model)
        return
    monkeypatch.setenv(TEST_DOUBLE_ENV, "1")
    with double_imported():
        from pie_driver_trtllm.engines.tensorrt_llm.startup import TensorRTLLMEngine

        def make() -> CoreHarness:
            config = trt_config(tiny_model, lookahead_tokens=4, execution_mode=request.param)
            return CoreHarness(config, TensorRTLLMEngine.load(config, "cpu"))

        yield make


def sampler(kind: str, seed: int | None, at: int, **run: Any) -> dict[str, Any]:
    extra = {"greedy": {}, "multinomial": {"temperature": 0.9}, "top_k": {"top_k": 5},
             "top_p": {"top_p": 0.8, "temperature": 1.3}, "min_p": {"min_p": 0.05}}[kind]
    out = {"at": at, "type": kind, **extra, **run}
    if seed is not None and kind != "greedy":
        out["seed"] = seed
    return out


def request(context: int, tokens: list[int], start: int, *samplers: dict[str, Any]) -> dict[str, Any]:
    return {"context": context, "tokens": tokens, "positions": list(range(start, start + len(tokens))),
            "samplers": list(samplers)}


def one_by_one(harness: CoreHarness, prompt: list[int], kind: str, seed: int, stops: list[int],
               steps: int) -> list[int]:
    """What a v1 host gets feeding back each token, with the documented per-step seeds."""
    made: list[int] = []
    tokens, start = prompt, 0
    while len(made) < steps:
        (reply,) = harness.forward([request(1, tokens, start, sampler(kind, step_seed(seed, len(made)),
                                                                      len(tokens) - 1))])
        made.append(reply["outputs"][0]["token"])
        if made[-1] in stops:
            break
        start, tokens = len(prompt) + len(made) - 1, [made[-1]]
    return made


KINDS = st.sampled_from(["greedy", "multinomial", "top_k", "top_p", "min_p"])


@settings(max_examples=4, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(prompt=st.lists(st.integers(0, 511), min_size=1, max_size=12), kind=KINDS,
       seed=st.integers(0, 2**64 - 1), stop_at=st.integers(0, RUN))
@example(prompt=[5], kind="top_k", seed=2**64 - 1, stop_at=3)  # per-step seeds wrap at 2**64
@example(prompt=[1, 2, 3], kind="greedy", seed=0, stop_at=RUN)
def test_run_equals_one_token_forwards(harnesses, prompt, kind, seed, stop_at):
    run_driver = harnesses()
    (reply,) = run_driver.forward([request(1, prompt, 0, sampler(kind, seed, len(prompt) - 1, max_tokens=RUN))])
    full = reply["outputs"][0]
    assert full["stop"] == "max_tokens" and len(full["tokens"]) == RUN
    assert full["tokens"] == one_by_one(harnesses(), prompt, kind, seed, [], RUN)
    # A stop id taken from the run itself: the run ends at its first occurrence, which is included.
    stops = [full["tokens"][stop_at]] if stop_at < RUN else []
    (reply,) = harnesses().forward([request(1, prompt, 0, sampler(kind, seed, len(prompt) - 1, max_tokens=RUN,
                                                                  stop_token_ids=stops))])
    stopped = reply["outputs"][0]
    assert stopped["tokens"] == one_by_one(harnesses(), prompt, kind, seed, stops, RUN)
    assert stopped["stop"] == ("stop_token" if stops else "max_tokens")


FEEDBACK = st.sampled_from(["all", "prefix", "different", "nothing"])


@settings(max_examples=4, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(prompt=st.lists(st.integers(0, 511), min_size=1, max_size=12), kind=KINDS, seed=st.integers(0, 2**63),
       feedback=FEEDBACK, keep=st.integers(1, RUN - 1), continue_with=st.integers(1, RUN))
@example(prompt=[7, 8], kind="greedy", seed=0, feedback="different", keep=4, continue_with=1)
@example(prompt=[7, 8], kind="top_p", seed=3, feedback="nothing", keep=1, continue_with=5)
@example(prompt=[7, 8], kind="greedy", seed=3, feedback="all", keep=1, continue_with=16)
def test_feeding_back_any_part_continues_as_if_never_run_ahead(harnesses, prompt, kind, seed, feedback, keep,
                                                               continue_with):
    ahead, plain = harnesses(), harnesses()
    other = request(OTHER, [3, 1, 4], 0, sampler("greedy", None, 2))
    (run, first_other) = ahead.forward([request(1, prompt, 0, sampler(kind, seed, len(prompt) - 1, max_tokens=RUN)),
                                        other])
    assert plain.forward([request(1, prompt, 0), other])[1] == first_other  # the run did not touch it
    made = run["outputs"][0]["tokens"]
    fed = {"all": made, "prefix": made[:keep], "nothing": [],
           "different": [*made[:keep - 1], (made[keep - 1] + 1) % 512]}[feedback]
    tokens = fed or [prompt[-1]]  # feeding nothing back: resend the last prompt token (a no-op merge)
    start = len(prompt) if fed else len(prompt) - 1
    step = [request(1, tokens, start, sampler(kind, seed + 7, len(tokens) - 1, max_tokens=continue_with)),
            request(OTHER, [first_other["outputs"][0]["token"]], 3, sampler("greedy", None, 0))]
    assert ahead.forward(step) == plain.forward(step)
