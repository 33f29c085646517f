"""One row's bad number fails only that row: tiny temperatures, non-finite logits, and the batched
reference engine's decode step with one failing row among greedy ones."""

from __future__ import annotations

import math

import msgpack
import pytest
import torch
from transformers import AutoModelForCausalLM

from pie_driver_trtllm.config import parse_config
from pie_driver_trtllm.engines.base import Row
from pie_driver_trtllm.engines.model_facts import read_model_info
from pie_driver_trtllm.engines.reference.batched import BatchedReferenceEngine
from pie_driver_trtllm.engines.sampling import row_result, row_results
from pie_driver_trtllm.sampler import MIN_TEMPERATURE, Sampler
from pie_driver_trtllm.wire.codec import Limits, decode_frame

LIMITS = Limits(vocab_size=64, max_model_len=64, max_forward_requests=8, max_forward_tokens=64,
                max_logprob_labels=8, max_frame_bytes=1 << 16)
TINY = [1e-300, 5e-324, MIN_TEMPERATURE / 2]


def decoded_sampler(sampler: dict) -> Sampler:
    frame = msgpack.packb({"v": 1, "id": 1, "op": "forward", "requests": [
        {"context": 1, "tokens": [3], "positions": [0], "samplers": [sampler]}]})
    return decode_frame(frame, LIMITS).body.items[0].samplers[0]


@pytest.mark.parametrize("temperature", TINY)
@pytest.mark.parametrize("kind", ["multinomial", "top_k", "top_p", "min_p", "top_k_top_p"])
def test_a_token_sampler_below_the_epsilon_is_greedy(kind, temperature):
    sampler = decoded_sampler({"at": 0, "type": kind, "temperature": temperature, "top_k": 5, "top_p": 0.5,
                               "min_p": 0.1})
    assert sampler.is_greedy and sampler.temperature == 0.0
    assert not decoded_sampler({"at": 0, "type": kind, "temperature": MIN_TEMPERATURE, "top_k": 5, "top_p": 0.5,
                                "min_p": 0.1}).is_greedy


@pytest.mark.parametrize("temperature", TINY)
def test_dist_and_logprobs_at_a_tiny_temperature_are_finite(temperature):
    logits = torch.tensor([0.5, 2.0, -1.0, 1.5, 0.0])
    dist = row_result(logits, Sampler("dist", 0, temperature=temperature, k=3), None)
    assert dist.error is None
    ids, probs = dist.dist
    assert ids[0] == 1 and probs[0] == 1.0 and all(math.isfinite(p) for p in probs) and math.fsum(probs) == 1.0
    logprobs = row_result(logits, Sampler("logprobs", 0, temperature=temperature, token_ids=(1, 0)), None)
    assert logprobs.error is None and logprobs.logprobs[0] == 0.0 and logprobs.logprobs[1] <= -1e5


# Each passes the edge's check (0 < top_p <= 1) but is 0 in float32.
TINY_TOP_P = [5e-324, 1e-300, 1e-50, 1e-46]


@pytest.mark.parametrize("top_p", TINY_TOP_P)
@pytest.mark.parametrize("kind", ["top_p", "top_k_top_p"])
def test_a_top_p_too_small_for_float32_keeps_the_top_token(kind, top_p):
    sampler = decoded_sampler({"at": 0, "type": kind, "temperature": 0.8, "top_k": 3, "top_p": top_p,
                               "return_logprob": True})
    assert sampler.top_p == top_p and not sampler.is_greedy
    logits = torch.tensor([[0.5, 2.0, -1.0, 1.5, 0.0], [1.0, -2.0, 3.0, 0.0, 2.5]])
    alone = [row_result(logits[i], sampler, seed) for i, seed in enumerate((7, None))]
    together = row_results(logits, [sampler, sampler], [7, None])
    for row, result in enumerate(alone + together):  # the top token alone stays: its probability is 1
        assert result.error is None and result.tokens == [int(torch.argmax(logits[row % 2]))]
        assert result.token_logprobs == [0.0]


@pytest.mark.parametrize("sampler", [Sampler("multinomial", 0, temperature=0.7), Sampler("dist", 0, k=2),
                                     Sampler("logprobs", 0, token_ids=(0, 1)), Sampler("top_p", 0, top_p=0.9)])
def test_a_non_finite_logits_row_is_an_error_of_its_own(sampler):
    result = row_result(torch.tensor([0.5, float("nan"), 1.0]), sampler, 7)
    assert result.error is not None and "NaN" in result.error
    assert result.tokens is None and result.dist is None and result.logprobs is None


@pytest.fixture(scope="module")
def batched(tiny_model):
    config = parse_config({"model": {"snapshot_dir": str(tiny_model)},
                           "driver": {"device": ["cpu"], "activation_dtype": "float32",
                                      "options": {"engine": "reference"}}})
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    return BatchedReferenceEngine(model, "cpu", read_model_info(config), slots=40, version="test")


def test_one_failing_row_of_a_batched_decode_fails_alone(batched):
    greedy = Sampler("greedy", 0, temperature=0.0)
    # Not reachable from the wire (the edge makes it greedy); here it stands for any row whose sampling
    # raises: a float32 division by 1e-300 gives inf and NaN scores.
    broken = Sampler("multinomial", 0, temperature=1e-300)
    histories = {context: [5 + context, 9, 14] for context in range(33)}
    batched.step([Row(c, h, len(h), greedy) for c, h in histories.items()])  # prefill: later rows decode
    for history in histories.values():
        history.append(21)
    rows = [Row(c, h, len(h), broken if c == 0 else greedy, seed=3) for c, h in histories.items()]
    results = batched.step(rows)
    assert results[0].error is not None
    assert all(r.error is None and r.tokens for r in results[1:])
