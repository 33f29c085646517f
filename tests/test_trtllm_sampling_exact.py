"""Every sampler the TensorRT-LLM engine advertises is served exactly, on the strict double.

TensorRT-LLM 1.2.x's default sampler ignores per-request seeds and `min_p` (the double does too), so the
engine must sample in the driver: a seeded draw is the reference engine's draw on the same logits.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM
from trtllm_support import load_double_engine

from pie_driver_trtllm.engines.sampling import sample_token
from pie_driver_trtllm.sampler import ALL_SAMPLERS, Sampler

SAMPLERS = [
    {"type": "multinomial", "temperature": 1.5},
    {"type": "top_k", "temperature": 1.2, "top_k": 5},
    {"type": "top_p", "temperature": 1.3, "top_p": 0.8},
    {"type": "min_p", "temperature": 1.4, "min_p": 0.05},
    {"type": "top_k_top_p", "temperature": 1.1, "top_k": 7, "top_p": 0.9},
]
PROMPT = [9, 8, 7, 6]


def last_logits(model_dir: Path, prompt: list[int]) -> torch.Tensor:
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.inference_mode():
        return model(torch.tensor([prompt])).logits[0, -1].float()


@pytest.mark.parametrize("mode", ["generate", "pyexecutor"])
def test_seeded_draws_are_the_reference_draws_in_every_context(double: None, tiny_model: Path, mode: str) -> None:
    harness, _ = load_double_engine(tiny_model, execution_mode=mode)
    assert harness.engine.samplers == frozenset(ALL_SAMPLERS)
    logits = last_logits(tiny_model, PROMPT)
    for seed in (1, 2, 3):
        requests = [{"context": 10 * seed + c, "tokens": PROMPT, "positions": [0, 1, 2, 3],
                     "samplers": [{"at": 3, **sampler, "seed": seed}]}
                    for c, sampler in enumerate(SAMPLERS * 2)]  # each sampler in two contexts
        results = harness.forward(requests)
        tokens = [r["outputs"][0]["token"] for r in results]
        expected = [sample_token(logits, Sampler(at=0, **s), seed) for s in SAMPLERS]
        assert tokens == expected * 2, (seed, tokens)


@pytest.mark.parametrize("sampler", [{"type": "min_p", "temperature": 3.0, "min_p": 0.999},
                                     {"type": "top_p", "temperature": 3.0, "top_p": 1e-300},  # 0 in float32
                                     {"type": "top_k_top_p", "temperature": 3.0, "top_k": 9, "top_p": 5e-324}])
@pytest.mark.parametrize("mode", ["generate", "pyexecutor"])
def test_filters_that_keep_only_the_top_token(double: None, tiny_model: Path, mode: str, sampler: dict) -> None:
    harness, _ = load_double_engine(tiny_model, execution_mode=mode)
    top = int(torch.argmax(last_logits(tiny_model, PROMPT)))
    requests = [{"context": c, "tokens": PROMPT, "positions": [0, 1, 2, 3],
                 "samplers": [{"at": 3, **sampler, "seed": c}]} for c in range(6)]
    assert [r["outputs"][0]["token"] for r in harness.forward(requests)] == [top] * 6


def test_a_stochastic_step_keeps_the_resident_request_when_it_drew_the_greedy_token(double: None,
                                                                                  tiny_model: Path) -> None:
    harness, trt = load_double_engine(tiny_model, execution_mode="pyexecutor", lookahead_tokens=1)
    first = harness.forward([{"context": 1, "tokens": PROMPT, "positions": [0, 1, 2, 3],
                              "samplers": [{"at": 3, "type": "min_p", "temperature": 1.0, "min_p": 0.999}]}])
    token = first[0]["outputs"][0]["token"]
    harness.forward([{"context": 1, "tokens": [token], "positions": [4], "samplers": [{"at": 0, "type": "greedy"}]}])
    created = [c for c in trt.CALLS if c["kind"] == "executor_request_to_llm_request"]
    assert len(created) == 1  # min_p 0.999 drew the argmax, which the greedy request had appended: reused

