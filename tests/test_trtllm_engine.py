"""The TensorRT-LLM engine (generate mode) against the TensorRT-LLM 1.2.1 test double, in process.

These tests assert what the engine sends to TensorRT-LLM: the exact `LLM(...)` arguments, the
`SamplingParams` of each sampler type, cache salts, seeds and the number of `generate` calls.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM
from trtllm_support import load_double_engine

from pie_driver_trtllm.config import StartupError
from pie_driver_trtllm.engines.tensorrt_llm.startup import TEST_DOUBLE_ENV, TensorRTLLMEngine


def calls(trt, kind):
    return [c for c in trt.CALLS if c["kind"] == kind]


def greedy_request(context, tokens, start=0):
    return {"context": context, "tokens": tokens, "positions": list(range(start, start + len(tokens))),
            "samplers": [{"at": len(tokens) - 1, "type": "greedy"}]}


def test_llm_constructor_arguments(double, tiny_model):
    _, trt = load_double_engine(
        tiny_model, max_seq_len=512, max_batch_size=8, kv_cache_free_gpu_memory_fraction=0.5,
        enable_chunked_prefill=False, attn_backend="VANILLA",
        llm_kwargs={"max_num_tokens": 1024, "enable_chunked_prefill": True})
    (init,) = calls(trt, "LLM.__init__")
    assert init["model"] == str(tiny_model)
    assert (init["skip_tokenizer_init"], init["trust_remote_code"], init["tensor_parallel_size"], init["dtype"]) \
        == (True, True, 1, "float32")
    kwargs = dict(init["kwargs"])
    kv = kwargs.pop("kv_cache_config")
    assert kwargs == {"max_seq_len": 512, "max_batch_size": 8, "max_num_tokens": 1024,
                      "enable_chunked_prefill": True, "attn_backend": "VANILLA"}  # llm_kwargs wins
    assert isinstance(kv, trt.KvCacheConfig)
    assert kv.enable_block_reuse is True and kv.free_gpu_memory_fraction == 0.5


def test_unknown_llm_kwarg_is_a_one_line_startup_error(double, tiny_model):
    with pytest.raises(StartupError) as failure:
        load_double_engine(tiny_model, llm_kwargs={"not_an_llm_arg": 1})
    message = str(failure.value)
    assert "not_an_llm_arg" in message and "\n" not in message


def test_no_gpu_is_refused_without_the_double_flag(double, tiny_model, monkeypatch):
    monkeypatch.delenv(TEST_DOUBLE_ENV)
    from trtllm_support import trt_config

    with pytest.raises(StartupError, match="CUDA"):
        TensorRTLLMEngine.load(trt_config(tiny_model), "cpu")


# Every sampler but greedy asks TensorRT-LLM for one position's logits and samples in the driver.
LOGITS = {"temperature": 0.0, "max_tokens": 1, "return_generation_logits": True, "seed": None, "min_p": None,
          "top_k": None, "top_p": None, "logprobs": None}
SAMPLERS = [
    ({"type": "greedy"}, {"temperature": 0.0, "max_tokens": 16}),
    ({"type": "multinomial", "temperature": 0.7, "seed": 11}, LOGITS),
    ({"type": "top_k", "temperature": 0.9, "top_k": 5, "seed": 12}, LOGITS),
    ({"type": "top_p", "temperature": 1.1, "top_p": 0.8, "seed": 13}, LOGITS),
    ({"type": "min_p", "temperature": 0.6, "min_p": 0.1, "seed": 14}, LOGITS),
    ({"type": "top_k_top_p", "temperature": 0.5, "top_k": 7, "top_p": 0.9, "seed": 15}, LOGITS),
    ({"type": "top_k", "temperature": 0.0, "top_k": 5}, {"temperature": 0.0, "max_tokens": 16}),  # T=0 is greedy
    ({"type": "dist", "k": 4}, LOGITS),
    ({"type": "logprobs", "token_ids": [1, 2]}, LOGITS),
]


def test_sampling_params_for_each_sampler_type_in_one_generate_call(double, tiny_model):
    harness, trt = load_double_engine(tiny_model)
    requests = [{"context": c, "tokens": [5, 6, 7 + c], "positions": [0, 1, 2],
                 "samplers": [{"at": 2, **sampler}]} for c, (sampler, _) in enumerate(SAMPLERS)]
    results = harness.forward(requests)
    assert all(r["ok"] for r in results), results
    (call,) = calls(trt, "generate")
    assert call["inputs"] == [[5, 6, 7 + c] for c in range(len(SAMPLERS))]
    for params, (_, expected) in zip(call["sampling_params_at_call"], SAMPLERS, strict=True):
        assert (params.end_id, params.pad_id, params.detokenize, params.ignore_eos) == (2, 0, False, True)
        for field, value in expected.items():
            assert getattr(params, field) == value, (field, params)
    assert call["cache_salt"] == [str(c) for c in range(len(SAMPLERS))]


def test_cache_salt_follows_fork_and_can_be_turned_off(double, tiny_model):
    harness, trt = load_double_engine(tiny_model)
    harness.forward([{"context": 1, "tokens": [4, 5, 6], "positions": [0, 1, 2]}])
    from pie_driver_trtllm.wire.codec import Fork

    harness.core.fork(Fork(src=1, dst=9, length=2))
    harness.forward([{"context": 9, "tokens": [8], "positions": [2],
                      "samplers": [{"at": 0, "type": "multinomial", "temperature": 1.0}]}])
    assert calls(trt, "generate")[-1]["cache_salt"] == ["1"]  # the fork shares its parent's prefix blocks

    harness_off, trt_off = load_double_engine(tiny_model, enable_cache_salt=False)
    harness_off.forward([greedy_request(3, [4, 5])])
    assert calls(trt_off, "generate")[-1]["cache_salt"] is None


def test_one_generate_per_forward_and_lookahead_serves_without_calling(double, tiny_model):
    harness, trt = load_double_engine(tiny_model, lookahead_tokens=8)
    prompts = {c: [3 + c, 4, 5] for c in range(8)}
    first = harness.forward([greedy_request(c, p) for c, p in prompts.items()])
    assert len(calls(trt, "generate")) == 1
    for step in range(7):  # the next 7 tokens of every context come from the lookahead buffer
        requests = []
        for c, result in zip(prompts, first, strict=True):
            token = result["outputs"][0]["token"]
            prompts[c].append(token)
            requests.append({"context": c, "tokens": [token], "positions": [len(prompts[c]) - 1],
                             "samplers": [{"at": 0, "type": "greedy"}]})
        first = harness.forward(requests)
        assert len(calls(trt, "generate")) == 1, f"step {step} called the engine"
    assert harness.core.lookahead.hits == 7 * 8


def test_dist_and_logprobs_match_the_model_at_any_temperature(double, tiny_model):
    harness, _ = load_double_engine(tiny_model)
    prompt = [9, 8, 7, 6]
    results = harness.forward([
        {"context": 1, "tokens": prompt, "positions": [0, 1, 2, 3], "samplers": [{"at": 3, "type": "dist", "k": 3}]},
        {"context": 2, "tokens": prompt, "positions": [0, 1, 2, 3],
         "samplers": [{"at": 3, "type": "dist", "k": 3, "temperature": 0.5}]},
        {"context": 3, "tokens": prompt, "positions": [0, 1, 2, 3],
         "samplers": [{"at": 3, "type": "logprobs", "token_ids": [1, 5]}]},
    ])
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    with torch.inference_mode():
        logits = model(torch.tensor([prompt])).logits[0, -1]
    for result, temperature in ((results[0], 1.0), (results[1], 0.5)):
        top = torch.topk(torch.softmax(logits / temperature, -1), 3)
        ids, values = result["outputs"][0]["dist"]
        assert ids == top.indices.tolist()
        assert values == pytest.approx(top.values.tolist(), rel=1e-4)
    expected = torch.log_softmax(logits, -1)[[1, 5]].tolist()
    assert results[2]["outputs"][0]["logprobs"] == pytest.approx(expected, rel=1e-4)


def test_lookahead_is_clamped_to_the_room_left(double, tiny_model):
    harness, trt = load_double_engine(tiny_model, max_seq_len=20, lookahead_tokens=16)
    harness.forward([greedy_request(1, list(range(1, 15)))])  # 14 tokens: room for 6 more
    assert calls(trt, "generate")[-1]["sampling_params_at_call"][0].max_tokens == 6


def test_a_request_the_engine_refuses_fails_alone(double, tiny_model):
    harness, _ = load_double_engine(tiny_model, llm_kwargs={"max_num_tokens": 16})
    results = harness.forward([greedy_request(1, [5, 6, 7]), greedy_request(2, list(range(1, 30))),
                               greedy_request(3, [5, 6, 7])])
    assert [r["ok"] for r in results] == [True, False, True]
    assert results[1]["error"]["code"] == "ENGINE_ERROR" and "max_num_tokens" in results[1]["error"]["message"]
    assert results[0]["outputs"] == results[2]["outputs"]


def test_pyexecutor_mode_stops_the_worker_and_decodes_one_token_per_step(double, tiny_model, monkeypatch):
    harness, trt = load_double_engine(tiny_model, execution_mode="pyexecutor", lookahead_tokens=1)
    assert len(calls(trt, "enqueue_shutdown_request")) == 1  # the background loop was stopped at load
    history = [5, 6, 7, 8, 9]
    result = harness.forward([greedy_request(1, history)])
    for _ in range(5):
        history.append(result[0]["outputs"][0]["token"])
        result = harness.forward([{"context": 1, "tokens": [history[-1]], "positions": [len(history) - 1],
                                   "samplers": [{"at": 0, "type": "greedy"}]}])
    steps = [c["new_tokens"] for c in calls(trt, "PyExecutor._forward_step")]
    assert steps == [{1: 5}] + [{1: 1}] * 5  # prefill once, then one token per host step: KV stayed resident
    (created,) = calls(trt, "executor_request_to_llm_request")
    assert created["prompt_len"] == 5 and created["max_tokens"] == min(4096, 2048 - 5)  # window vs room left


def test_pyexecutor_mode_refuses_a_different_version(double, tiny_model, monkeypatch):
    import tensorrt_llm

    monkeypatch.setattr(tensorrt_llm, "__version__", "1.3.0rc1")
    with pytest.raises(StartupError, match=r"1\.2\.1.*1\.3\.0rc1"):
        load_double_engine(tiny_model, execution_mode="pyexecutor")


def test_pyexecutor_mode_refuses_missing_private_attributes(double, tiny_model, monkeypatch):
    from tensorrt_llm._torch.pyexecutor.py_executor import PyExecutor

    monkeypatch.delattr(PyExecutor, "_forward_step")
    with pytest.raises(StartupError, match="_forward_step"):
        load_double_engine(tiny_model, execution_mode="pyexecutor")
