"""Tests for the TensorRT-LLM 1.2.1 TEST DOUBLE in tests/trtllm_double (not the real package).

The facts checked here come from /work/shared/reference/trtllm-api.md (sections 1-4, 8).
"""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from trtllm_support import DOUBLE_DIR, double_imported

from pie_driver_trtllm.modelgen import make_model

END_ID = 2  # the tiny checkpoint's eos_token_id


@pytest.fixture(scope="module")
def trt() -> Iterator[ModuleType]:
    with double_imported() as module:
        yield module


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_model(tmp_path_factory.mktemp("trtllm_double") / "tiny", "tiny", seed=0)


@pytest.fixture(scope="module")
def llm(trt: ModuleType, model_dir: Path) -> Iterator[Any]:
    with trt.LLM(str(model_dir), skip_tokenizer_init=True, max_seq_len=64, max_num_tokens=60) as engine:
        yield engine


def hf_greedy(model_dir: Path, prompt: list[int], max_tokens: int, end_id: int) -> list[int]:
    """Reference: transformers full-recompute greedy loop, stopping (exclusive) at end_id."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32, local_files_only=True).eval()
    ids, out = list(prompt), []
    with torch.inference_mode():
        for _ in range(max_tokens):
            token = int(model(torch.tensor([ids])).logits[0, -1].argmax())
            if token == end_id:
                break
            out.append(token)
            ids.append(token)
    return out


def test_import_prints_banner_and_version() -> None:
    env = {**os.environ, "PYTHONPATH": str(DOUBLE_DIR)}
    proc = subprocess.run([sys.executable, "-c", "import tensorrt_llm as t; assert t.__version__ == '1.2.1'"],
                          capture_output=True, text=True, env=env, check=True)
    assert proc.stdout.splitlines()[0] == "[TensorRT-LLM] TensorRT LLM version: 1.2.1"


def test_import_surface(trt: ModuleType) -> None:
    from tensorrt_llm.inputs import TokensPrompt, get_cache_salt_id
    from tensorrt_llm.llmapi import (
        LLM,
        CompletionOutput,
        KvCacheConfig,
        RequestError,
        RequestOutput,
        SamplingParams,
        TorchLlmArgs,
    )

    assert LLM is trt.LLM and SamplingParams is trt.SamplingParams and KvCacheConfig is trt.KvCacheConfig
    assert {"max_batch_size", "max_num_tokens", "max_seq_len", "kv_cache_config"} <= set(TorchLlmArgs.model_fields)
    assert TokensPrompt(prompt_token_ids=[1]) == {"prompt_token_ids": [1]}
    assert get_cache_salt_id("a") == get_cache_salt_id("a") != get_cache_salt_id("b")
    assert 0 <= get_cache_salt_id("a") < 2**64
    assert issubclass(RequestError, Exception) and CompletionOutput(index=0).token_ids == []
    with pytest.raises(RuntimeError):
        RequestOutput()


def test_unknown_and_trt_only_kwargs(trt: ModuleType, model_dir: Path) -> None:
    with pytest.raises(ValueError, match=r"^LLM got invalid argument: not_a_real_arg$"):
        trt.LLM(str(model_dir), not_a_real_arg=1)
    with pytest.raises(ValueError, match=r"specific to TensorRT backend .*\['build_config'\]"):
        trt.LLM(str(model_dir), build_config=object())


def test_sampling_params_defaults_and_validation(trt: ModuleType) -> None:
    import dataclasses

    sp = trt.SamplingParams()
    assert (sp.end_id, sp.pad_id, sp.max_tokens, sp.temperature, sp.top_k, sp.top_p, sp.min_p, sp.seed) == (
        None, None, 32, None, None, None, None, None)
    assert (sp.detokenize, sp.ignore_eos, sp.logprobs, sp.prompt_logprobs, sp.n, sp.best_of) == (
        True, False, None, None, 1, 1)
    assert (sp.use_beam_search, sp.return_context_logits, sp.return_generation_logits) == (False, False, False)
    assert sp.exclude_input_from_output is True and sp._greedy_decoding
    assert not hasattr(sp, "__dict__")  # slots=True
    assert "cache_salt" not in {f.name for f in dataclasses.fields(trt.SamplingParams)}
    assert trt.SamplingParams(end_id=7).pad_id == 7
    assert trt.SamplingParams(logprobs=True).logprobs == 1
    assert trt.SamplingParams(temperature=0)._greedy_decoding and trt.SamplingParams(top_k=1)._greedy_decoding
    assert not trt.SamplingParams(temperature=0.7)._greedy_decoding
    with pytest.raises(TypeError):
        trt.SamplingParams(0)  # keyword-only
    with pytest.raises(TypeError):
        trt.SamplingParams(max_new_tokens=3)
    for kwargs, message in [
        ({"top_p": 1.5}, "require 0 <= top_p <= 1, got top_p=1.5"),
        ({"top_k": -1}, "require top_k >= 0, got top_k=-1"),
        ({"temperature": -0.1}, "require temperature >= 0, got temperature=-0.1"),
        ({"n": 3, "best_of": 2, "temperature": 1.0}, r"best_of \(2\) cannot be less than n \(3\)"),
        ({"n": 2}, "Greedy decoding in the LLM API does not allow multiple returns"),
        ({"truncate_prompt_tokens": 0}, "truncate_prompt_tokens must be >= 1, got 0"),
    ]:
        with pytest.raises(ValueError, match=message):
            trt.SamplingParams(**kwargs)


def test_kv_cache_config_is_strict(trt: ModuleType) -> None:
    kv = trt.KvCacheConfig()
    assert (kv.enable_block_reuse, kv.free_gpu_memory_fraction, kv.max_tokens, kv.tokens_per_block) == (
        True, 0.9, None, 32)
    with pytest.raises(ValueError, match="extra"):
        trt.KvCacheConfig(not_a_field=1)
    with pytest.raises(ValueError):
        trt.KvCacheConfig(free_gpu_memory_fraction=1.5)


def test_greedy_matches_transformers(trt: ModuleType, llm: Any, model_dir: Path) -> None:
    prompt = [5, 17, 42, 99]
    out = llm.generate(prompt, trt.SamplingParams(end_id=END_ID, max_tokens=5))
    assert not isinstance(out, list) and out.finished and out.prompt_token_ids == prompt
    expected = hf_greedy(model_dir, prompt, 5, END_ID)
    assert out.outputs[0].token_ids == expected
    assert out.outputs[0].finish_reason == ("length" if len(expected) == 5 else "stop")
    assert out.outputs[0].text == ""
    # the same again through TokensPrompt, batched, and with temperature=0 (also greedy)
    batch = llm.generate([{"prompt_token_ids": prompt}, prompt],
                         [trt.SamplingParams(end_id=END_ID, max_tokens=5),
                          trt.SamplingParams(end_id=END_ID, max_tokens=5, temperature=0)])
    assert isinstance(batch, list) and [o.outputs[0].token_ids for o in batch] == [expected, expected]


def test_default_sampler_ignores_seed_and_min_p(trt: ModuleType, llm: Any) -> None:
    """1.2.x's TorchSampler: one generator seeded 42 per LLM; `seed` and `min_p` are not read."""
    def sample(**extra: Any) -> list[int]:
        sp = trt.SamplingParams(end_id=-1, max_tokens=8, temperature=2.0, **extra)
        return llm.generate([3, 4, 5], sp).outputs[0].token_ids

    draws = [sample(seed=11) for _ in range(3)]
    assert len(draws[0]) == 8 and len({tuple(d) for d in draws}) > 1  # the same seed, different draws
    filtered = [sample(min_p=0.999) for _ in range(3)]  # honoured, min_p 0.999 would leave the argmax only
    assert len({tuple(d) for d in filtered}) > 1


def test_calls_recorded_with_cache_salt(trt: ModuleType, llm: Any) -> None:
    trt.reset_calls()
    assert trt.CALLS == [] and trt.LLM.calls is trt.CALLS
    sp = trt.SamplingParams(end_id=END_ID, max_tokens=2)
    llm.generate([[7, 8], [9]], sp, cache_salt=["u1", "u2"], use_tqdm=False)
    kinds = [c["kind"] for c in trt.CALLS]
    assert kinds == ["generate", "generate_async", "generate_async"]
    assert trt.CALLS[0]["inputs"] == [[7, 8], [9]] and trt.CALLS[0]["sampling_params"] is sp
    assert [c["cache_salt"] for c in trt.CALLS] == [["u1", "u2"], "u1", "u2"]
    assert trt.CALLS[1]["inputs"] == [7, 8]


def test_constructor_call_recorded(trt: ModuleType, model_dir: Path) -> None:
    trt.reset_calls()
    kv = trt.KvCacheConfig(enable_block_reuse=False)
    with trt.LLM(str(model_dir), skip_tokenizer_init=True, kv_cache_config=kv, max_batch_size=8) as engine:
        assert engine.tokenizer is None and engine.args.max_batch_size == 8
        assert engine.args.max_num_tokens == 8192 and engine.args.kv_cache_config is kv
        assert engine.max_seq_len == 2048  # from max_position_embeddings
        with pytest.raises(RuntimeError, match="can not be pickled"):
            pickle.dumps(engine)
    call = trt.CALLS[0]
    assert call["kind"] == "LLM.__init__" and call["skip_tokenizer_init"] is True
    assert call["kwargs"] == {"kv_cache_config": kv, "max_batch_size": 8}
    with pytest.raises(RuntimeError, match="LLM is shutting down"):
        engine.generate([1, 2], trt.SamplingParams(end_id=END_ID))
    engine.shutdown()  # idempotent


def test_end_id_required_without_tokenizer(trt: ModuleType, llm: Any) -> None:
    sp = trt.SamplingParams(max_tokens=3)
    with pytest.raises(ValueError, match=r"^tokenizer is required to reset end_id if it is None, or you can "
                                         r"explicitly specify the end_id for sampling_params$"):
        llm.generate([1, 2, 3], sp)
    with pytest.raises(ValueError, match="tokenizer is required"):
        llm.generate([1, 2, 3])  # sampling_params=None -> SamplingParams()


def test_logprobs_shape(trt: ModuleType, llm: Any) -> None:
    out = llm.generate([10, 11, 12], trt.SamplingParams(end_id=-1, max_tokens=4, logprobs=3)).outputs[0]
    assert len(out.token_ids) == 4 and len(out.logprobs) == 4
    total = 0.0
    for token, entry in zip(out.token_ids, out.logprobs, strict=True):
        assert isinstance(entry, dict) and len(entry) == 3  # greedy: the chosen id is the top-1
        assert sorted(lp.rank for lp in entry.values()) == [1, 2, 3]
        assert entry[token].rank == 1 and all(lp.logprob <= 0 for lp in entry.values())
        total += entry[token].logprob
    assert out.cumulative_logprob == pytest.approx(total)
    # sampled: the chosen token is present even outside the top-k
    sampled = llm.generate([10, 11], trt.SamplingParams(end_id=-1, max_tokens=6, logprobs=1, temperature=5.0,
                                                        seed=1)).outputs[0]
    assert all(t in e and 1 <= len(e) <= 2 for t, e in zip(sampled.token_ids, sampled.logprobs, strict=True))
    assert llm.generate([10], trt.SamplingParams(end_id=-1, max_tokens=2)).outputs[0].logprobs == []


def test_length_checks(trt: ModuleType, llm: Any) -> None:
    from tensorrt_llm.llmapi import RequestError

    # max_seq_len=64: max_tokens clamps to 64 - prompt_len
    out = llm.generate(list(range(3, 63)), trt.SamplingParams(end_id=-1, max_tokens=10))
    assert len(out.outputs[0].token_ids) == 4 and out.outputs[0].finish_reason == "length"
    with pytest.raises(RequestError, match="should not exceed max_num_tokens"):
        llm.generate(list(range(3, 64)), trt.SamplingParams(end_id=-1))  # 61 > max_num_tokens=60
    with pytest.raises(RequestError, match=r"`max_tokens` \(0\) must be greater than 0"):
        llm.generate([3, 4], trt.SamplingParams(end_id=-1, max_tokens=0))
    with pytest.raises(IndexError):
        llm.generate([], trt.SamplingParams(end_id=-1))
    with pytest.raises(TypeError, match="Invalid type of inputs"):
        llm.generate_async((1, 2), trt.SamplingParams(end_id=-1))


def test_stop_token_ids_and_streaming(trt: ModuleType, llm: Any) -> None:
    prompt = [20, 21, 22]
    greedy = llm.generate(prompt, trt.SamplingParams(end_id=-1, max_tokens=4)).outputs[0].token_ids
    k = next((i for i in range(1, 4) if greedy[i] not in greedy[:i]), 0)  # first position of a new id
    stop = greedy[k]
    out = llm.generate(prompt, trt.SamplingParams(end_id=-1, max_tokens=4, stop_token_ids=[stop])).outputs[0]
    assert out.token_ids == greedy[:k] and out.finish_reason == "stop" and out.stop_reason == stop
    kept = llm.generate(prompt, trt.SamplingParams(end_id=-1, max_tokens=4, stop_token_ids=[stop],
                                                   include_stop_str_in_output=True)).outputs[0]
    assert kept.token_ids == greedy[:k + 1]
    # the end id ends generation and is not in token_ids; ignore_eos disables it
    assert llm.generate(prompt, trt.SamplingParams(end_id=stop, max_tokens=4)).outputs[0].token_ids == greedy[:k]
    assert llm.generate(prompt, trt.SamplingParams(end_id=stop, max_tokens=4, ignore_eos=True)
                        ).outputs[0].token_ids == greedy
    stream = llm.generate_async(prompt, trt.SamplingParams(end_id=-1, max_tokens=4), streaming=True)
    diffs = [list(step.outputs[0].token_ids_diff) for step in stream]
    assert diffs == [[t] for t in greedy] and stream.finished


def test_cached_tokens_follow_cache_salt(trt: ModuleType, model_dir: Path) -> None:
    with trt.LLM(str(model_dir), skip_tokenizer_init=True) as engine:
        sp = trt.SamplingParams(end_id=-1, max_tokens=2)
        prompt = list(range(3, 73))  # 70 tokens = 2 full blocks of 32 + 6
        assert engine.generate(prompt, sp, cache_salt="a").cached_tokens == 0
        assert engine.generate(prompt, sp, cache_salt="a").cached_tokens == 64
        assert engine.generate(prompt, sp, cache_salt="b").cached_tokens == 0
