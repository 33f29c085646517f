"""RL operations of the TensorRT-LLM engine (`rl_ops = true`) on the TensorRT-LLM 1.2.1 test double, in process.

Refit through `update_weights`, sleep and wake through memory tags, cache salts per fork family and
weights epoch, and the log-probability of a drawn token in both modes.
"""

from __future__ import annotations

import shutil

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from transformers import AutoModelForCausalLM
from trtllm_support import load_double_engine, trt_config

from pie_driver_trtllm.config import StartupError
from pie_driver_trtllm.engines.base import Row, WeightsLoadError
from pie_driver_trtllm.modelgen import make_model
from pie_driver_trtllm.sampler import Sampler
from pie_driver_trtllm.serving.driver import build_caps
from pie_driver_trtllm.wire.codec import Fork, LoadWeights, Sleep, Wake
from pie_driver_trtllm.wire.errors import DriverError, ErrorCode

PROMPT = [5 + (i * 7) % 200 for i in range(40)]  # past one 32-token block, so block reuse has something to serve


@pytest.fixture(scope="module")
def second_model(tmp_path_factory):
    """Another random-weight checkpoint of the same architecture: its greedy tokens differ from tiny_model's."""
    return make_model(tmp_path_factory.mktemp("models") / "tiny-b", "tiny", seed=1)


def calls(trt, kind):
    return [c for c in trt.CALLS if c["kind"] == kind]


def greedy(context, tokens, start=0):
    return {"context": context, "tokens": tokens, "positions": list(range(start, start + len(tokens))),
            "samplers": [{"at": len(tokens) - 1, "type": "greedy"}]}


def hf_greedy(model_dir, tokens, n):
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    out = list(tokens)
    with torch.inference_mode():
        for _ in range(n):
            out.append(int(torch.argmax(model(torch.tensor([out])).logits[0, -1])))
    return out[len(tokens):]


def decode(harness, context, tokens, n):
    """n greedy tokens one forward each (lookahead 1), the history replayed from `tokens`."""
    made = []
    results = harness.forward([greedy(context, tokens)])
    for _ in range(n):
        made.append(results[0]["outputs"][0]["token"])
        results = harness.forward([greedy(context, [made[-1]], len(tokens) + len(made) - 1)])
    return made


def rl_engine(model, **options):
    return load_double_engine(model, rl_ops=True, lookahead_tokens=1, **options)


def test_rl_ops_start_llm_on_the_ray_orchestrator_with_sleep_and_the_worker_extension(double, tiny_model):
    harness, trt = rl_engine(tiny_model)
    kwargs = calls(trt, "LLM.__init__")[0]["kwargs"]
    assert (kwargs["orchestrator_type"], kwargs["enable_sleep"], kwargs["ray_worker_extension_cls"]) == \
        ("ray", True, "tensorrt_llm.llmapi.rlhf_utils.WorkerExtension")
    assert all(hasattr(harness.engine, op) for op in ("load_weights", "sleep", "wake"))
    plain, _ = load_double_engine(tiny_model)
    assert not any(hasattr(plain.engine, op) for op in ("load_weights", "sleep", "wake"))


@pytest.mark.parametrize("mode", ["generate", "pyexecutor"])
def test_without_rl_ops_the_engine_offers_none_and_each_is_unsupported(double, tiny_model, mode):
    harness, _ = load_double_engine(tiny_model, execution_mode=mode)
    config = trt_config(tiny_model, execution_mode=mode)
    caps = build_caps(config, harness.engine, harness.limits)
    assert caps["rl_ops"] == [] and caps["sleep_levels"] == []
    for call in (lambda: harness.core.load_weights(LoadWeights(str(tiny_model), 1)),
                 lambda: harness.core.sleep(Sleep(1)), lambda: harness.core.wake(Wake())):
        with pytest.raises(DriverError) as refused:
            call()
        assert refused.value.code == ErrorCode.UNSUPPORTED
    assert harness.core.weights_health() == {"weights_version": 0, "weights": "serving", "asleep": 0}


def test_rl_ops_need_generate_mode(tiny_model):
    with pytest.raises(StartupError, match="rl_ops"):
        trt_config(tiny_model, rl_ops=True, execution_mode="pyexecutor")


def test_the_double_refuses_rl_calls_as_tensorrt_llm_does(double, tiny_model):
    import tensorrt_llm

    plain = tensorrt_llm.LLM(model=str(tiny_model), skip_tokenizer_init=True)
    with pytest.raises(ValueError, match="does not support collective RPC"):
        plain._collective_rpc("sleep", (["kv_cache"],))
    no_sleep = tensorrt_llm.LLM(model=str(tiny_model), skip_tokenizer_init=True, orchestrator_type="ray")
    with pytest.raises(ValueError, match="enable_sleep=True"):
        no_sleep._collective_rpc("sleep", (["kv_cache"],))
    with pytest.raises(AttributeError, match="update_weights"):  # no RLHF worker extension
        no_sleep._collective_rpc("update_weights", (None,))
    asleep = tensorrt_llm.LLM(model=str(tiny_model), skip_tokenizer_init=True, orchestrator_type="ray",
                              enable_sleep=True)
    with pytest.raises(ValueError, match="Unknown memory tag"):
        asleep._collective_rpc("sleep", (["weights"],))
    asleep._collective_rpc("sleep", (["kv_cache"],))
    with pytest.raises(RuntimeError, match="released"):
        asleep.generate([1, 2, 3], tensorrt_llm.SamplingParams(end_id=2, max_tokens=1))
    asleep._collective_rpc("wakeup", (["kv_cache"],))


def test_the_double_serves_stale_kv_when_the_prefix_cache_is_not_reset(double, tiny_model, second_model):
    """What the adapter guards against: reused blocks computed with other weights, or lost to a release."""
    import tensorrt_llm
    from safetensors.torch import load_file
    from torch.multiprocessing.reductions import reduce_tensor

    llm = tensorrt_llm.LLM(model=str(tiny_model), skip_tokenizer_init=True, orchestrator_type="ray",
                           enable_sleep=True, ray_worker_extension_cls="tensorrt_llm.llmapi.rlhf_utils.WorkerExtension")
    sp = tensorrt_llm.SamplingParams(end_id=-1, max_tokens=4, temperature=0.0)
    llm.generate(PROMPT, sp, cache_salt="s")
    weights = load_file(str(second_model / "model.safetensors"))
    llm._collective_rpc("update_weights", ({"GPU-test-double-0": [(k, reduce_tensor(v)) for k, v in weights.items()]},))
    stale = llm.generate(PROMPT, sp, cache_salt="s")  # no finalising call yet: the old prefix is reused
    assert stale.cached_tokens == 32
    fresh = hf_greedy(second_model, PROMPT, 4)
    assert list(stale.outputs[0].token_ids) != fresh
    llm._collective_rpc("update_weights", (None,))  # finalise: the prefix cache is reset
    served = llm.generate(PROMPT, sp, cache_salt="s")
    assert served.cached_tokens == 0 and list(served.outputs[0].token_ids) == fresh
    llm._collective_rpc("sleep", (["kv_cache"],))  # released without a reset: the index survives, KV does not
    llm._collective_rpc("wakeup", (["kv_cache"],))
    lost = llm.generate(PROMPT, sp, cache_salt="s")
    assert lost.cached_tokens == 32 and list(lost.outputs[0].token_ids) != fresh


def test_refit_serves_the_new_weights_to_old_and_new_contexts(double, tiny_model, second_model):
    harness, trt = rl_engine(tiny_model)
    assert decode(harness, 1, PROMPT, 3) == hf_greedy(tiny_model, PROMPT, 3)
    harness.engine.load_weights(str(second_model))
    updates = calls(trt, "update_weights")
    assert updates[-1]["names"] is None and len(calls(trt, "PyExecutor.reset_prefix_cache")) == 1
    expected = hf_greedy(second_model, PROMPT, 3)
    assert decode(harness, 2, PROMPT, 3) == expected  # a new context
    assert decode(harness, 1, PROMPT, 3) == expected  # the old context, replayed from its history
    generates = calls(trt, "generate")
    assert all(c["cache_salt"][0].endswith("@1") for c in generates[-8:])  # the weights epoch is in the salt
    fresh, _ = rl_engine(second_model)
    assert decode(fresh, 2, PROMPT, 3) == expected


def test_no_block_computed_with_old_weights_is_reused_after_a_refit(double, tiny_model, second_model):
    harness, _ = rl_engine(tiny_model)
    harness.forward([greedy(1, PROMPT)])
    harness.engine.load_weights(str(second_model))
    harness.forward([greedy(1, PROMPT)])
    computed_before = harness.engine.prompt_tokens_computed
    harness.forward([greedy(3, PROMPT)])  # another family: its own salt, nothing to reuse either
    assert harness.engine.prompt_tokens_computed - computed_before == len(PROMPT)
    assert harness.engine.stats()["prompt_tokens_computed"] == 3 * len(PROMPT)  # no step reused a block


def test_a_truncated_checkpoint_leaves_the_old_weights_served(double, tiny_model, second_model, tmp_path):
    harness, trt = rl_engine(tiny_model)
    broken = tmp_path / "broken"
    shutil.copytree(second_model, broken)
    data = (broken / "model.safetensors").read_bytes()
    (broken / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(WeightsLoadError, match="truncated") as failure:
        harness.engine.load_weights(str(broken))
    assert failure.value.serving_previous is True
    assert calls(trt, "update_weights") == []
    assert decode(harness, 1, PROMPT, 3) == hf_greedy(tiny_model, PROMPT, 3)


def test_a_checkpoint_of_another_shape_is_refused_before_any_update(double, tiny_model, tmp_path):
    harness, trt = rl_engine(tiny_model)
    other = make_model(tmp_path / "small", "tiny", seed=2, dtype="float16")
    with pytest.raises(WeightsLoadError, match="F16") as failure:
        harness.engine.load_weights(str(other))
    assert failure.value.serving_previous is True and calls(trt, "update_weights") == []
    with pytest.raises(WeightsLoadError, match=r"no \*\.safetensors"):
        harness.engine.load_weights(str(tmp_path))


def test_a_refit_that_fails_part_way_refuses_every_step_until_a_good_load(double, tiny_model, second_model,
                                                                          monkeypatch):
    harness, _ = rl_engine(tiny_model)
    monkeypatch.setenv("PIE_TRTLLM_DOUBLE_FAIL_UPDATE_AFTER", "3")
    with pytest.raises(WeightsLoadError) as failure:
        harness.engine.load_weights(str(second_model))
    assert failure.value.serving_previous is False
    (result,) = harness.engine.step([Row(1, PROMPT, len(PROMPT), Sampler("greedy", 0))])
    assert result.code == "WEIGHTS_UNAVAILABLE" and "part way" in result.error
    monkeypatch.delenv("PIE_TRTLLM_DOUBLE_FAIL_UPDATE_AFTER")
    with pytest.raises(WeightsLoadError) as still:  # a bad checkpoint now: still nothing served
        harness.engine.load_weights(str(second_model / "missing"))
    assert still.value.serving_previous is False
    harness.engine.load_weights(str(second_model))
    assert decode(harness, 1, PROMPT, 3) == hf_greedy(second_model, PROMPT, 3)


@pytest.mark.parametrize("level", [1, 2])
def test_sleep_frees_by_memory_tag_and_wake_restores_service(double, tiny_model, level):
    harness, trt = rl_engine(tiny_model)
    before = decode(harness, 1, PROMPT, 2)
    harness.engine.sleep(level)
    rpcs = [(c["method"], c["args"]) for c in calls(trt, "collective_rpc")]
    assert rpcs[0] == ("reset_prefix_cache", ())  # before the release: the index must not outlive the KV
    method, (tags,) = rpcs[1]
    assert method == "sleep" and "kv_cache" in tags and ("model" in tags) == (level == 2)
    (result,) = harness.engine.step([Row(1, PROMPT, len(PROMPT), Sampler("greedy", 0))])
    assert result.code == "ASLEEP" and result.tokens is None
    harness.engine.fork(1, 4, len(PROMPT))  # histories only: allowed while asleep
    harness.engine.wake()
    assert calls(trt, "collective_rpc")[-1]["method"] == "wakeup"
    computed = harness.engine.prompt_tokens_computed
    assert decode(harness, 5, PROMPT, 2) == before
    assert harness.engine.prompt_tokens_computed - computed >= len(PROMPT)  # nothing indexed before sleep reused
    assert calls(trt, "generate")[-1]["cache_salt"] == ["5@1"]


def test_forks_share_one_salt_so_the_prompt_is_computed_once(double, tiny_model):
    harness, trt = rl_engine(tiny_model)
    harness.forward([greedy(1, PROMPT)])  # the prompt's KV, computed once and indexed under family 1
    assert harness.engine.prompt_tokens_computed == len(PROMPT)
    for dst in (2, 3, 4):
        harness.core.fork(Fork(src=1, dst=dst, length=len(PROMPT)))
    computed = harness.engine.prompt_tokens_computed
    harness.forward([{"context": d, "tokens": [9], "positions": [len(PROMPT)],
                      "samplers": [{"at": 0, "type": "multinomial", "temperature": 1.0, "seed": d}]}
                     for d in (2, 3, 4)])
    assert calls(trt, "generate")[-1]["cache_salt"] == ["1", "1", "1"]
    assert harness.engine.prompt_tokens_computed - computed <= 3 * (len(PROMPT) + 1 - 32)


def logits_of(model_dir, tokens):
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    with torch.inference_mode():
        return model(torch.tensor([tokens])).logits[0, -1].float()


SAMPLERS = [Sampler("multinomial", 0, temperature=0.7, seed=3),
            Sampler("top_k", 0, temperature=1.3, top_k=5, seed=4),
            Sampler("top_p", 0, temperature=0.9, top_p=0.6, seed=5),
            Sampler("min_p", 0, temperature=1.0, min_p=0.2, seed=6),
            Sampler("greedy", 0)]


@pytest.mark.parametrize("sampler", SAMPLERS, ids=lambda s: s.type)
@pytest.mark.parametrize("mode", ["raw", "processed"])
def test_return_logprob_equals_the_logprob_of_the_same_token(double, tiny_model, sampler, mode):
    import dataclasses

    harness, _ = load_double_engine(tiny_model)
    asked = dataclasses.replace(sampler, return_logprob=True, logprob_mode=mode)
    (result,) = harness.engine.step([Row(1, PROMPT, len(PROMPT), asked, sampler.seed)])
    token, (logprob,) = result.tokens[0], result.token_logprobs
    (plain,) = harness.engine.step([Row(1, PROMPT, len(PROMPT), sampler, sampler.seed)])
    assert plain.tokens == [token]  # asking for the log-probability does not change the draw
    logits = logits_of(tiny_model, PROMPT)
    raw = float(torch.log_softmax(logits.double(), -1)[token])
    if mode == "raw" or sampler.is_greedy:
        assert logprob == pytest.approx(raw, abs=1e-5)
        return
    scaled = logits.double() / sampler.temperature
    keep = torch.ones_like(scaled, dtype=torch.bool)
    if sampler.top_k:
        keep &= scaled >= torch.topk(scaled, sampler.top_k).values[-1]
    probs = torch.softmax(scaled, -1)
    if sampler.top_p < 1.0:
        ordered, order = torch.sort(probs, descending=True)
        dropped = (ordered.cumsum(-1) - ordered) >= sampler.top_p
        keep[order[dropped]] = False
    if sampler.min_p:
        keep &= probs >= sampler.min_p * probs.max()
    kept = probs * keep
    assert logprob == pytest.approx(float(torch.log(kept[token] / kept.sum())), abs=1e-4)
    assert logprob >= raw - 1e-9 or sampler.temperature < 1.0  # renormalised over fewer tokens


def test_raw_logprob_equals_what_the_double_reports_as_logprobs(double, tiny_model):
    """TensorRT-LLM's PyTorch backend reports raw log-softmax values for `logprobs`; raw mode is the same number."""
    harness, trt = load_double_engine(tiny_model)
    asked = Sampler("greedy", 0, return_logprob=True, logprob_mode="raw")
    (result,) = harness.engine.step([Row(1, PROMPT, len(PROMPT), asked)])
    reported = harness.engine.llm.generate(PROMPT, trt.SamplingParams(end_id=-1, max_tokens=1, temperature=0.0,
                                                                      logprobs=1))
    token = reported.outputs[0].token_ids[0]
    assert result.tokens == [token]
    assert result.token_logprobs[0] == pytest.approx(reported.outputs[0].logprobs[0][token].logprob, abs=1e-5)


@pytest.mark.parametrize("mode", ["raw", "processed"])
def test_a_run_reports_each_tokens_logprob_in_the_mode_asked(double, tiny_model, mode):
    harness, _ = load_double_engine(tiny_model)
    sampler = Sampler("top_k", 0, temperature=0.8, top_k=4, seed=21, max_tokens=3, return_logprobs=True,
                      logprob_mode=mode)
    (run,) = harness.engine.step([Row(1, PROMPT, len(PROMPT), sampler, 21, steps=3)])
    assert len(run.tokens) == len(run.token_logprobs) == 3
    for i, token in enumerate(run.tokens):  # each equals a one-token step fed the run's earlier tokens
        one = Sampler("top_k", 0, temperature=0.8, top_k=4, return_logprob=True, logprob_mode=mode)
        history = PROMPT + run.tokens[:i]
        (step,) = harness.engine.step([Row(1, history, len(history), one, 21 + i)])
        assert step.tokens == [token] and step.token_logprobs[0] == pytest.approx(run.token_logprobs[i], abs=1e-6)


@given(st.lists(st.integers(0, 40), max_size=30), st.integers(1, 64))
def test_buckets_keep_every_tensor_once_in_order_within_the_limit(sizes, limit):
    from pie_driver_trtllm.engines.tensorrt_llm.refit import buckets

    tensors = {f"w{i}": torch.zeros(n, dtype=torch.uint8) for i, n in enumerate(sizes)}
    groups = buckets(tensors, limit)
    assert [name for group in groups for name in group] == list(tensors)
    for group in groups:
        assert len(group) == 1 or sum(tensors[n].numel() for n in group) <= limit


@given(st.integers(0, 2**31), st.floats(0.05, 3.0), st.integers(0, 60), st.floats(0.05, 1.0), st.floats(0.0, 0.9))
def test_processed_logprobs_are_the_distribution_the_token_is_drawn_from(seed, temperature, top_k, top_p, min_p):
    import math

    from pie_driver_trtllm.engines.sampling import sample_token
    from pie_driver_trtllm.engines.sampling import sampled_logprob as chosen_logprob

    logits = torch.randn(50, generator=torch.Generator().manual_seed(seed)) * 4
    sampler = Sampler("top_k_top_p", 0, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                      logprob_mode="processed")
    mass = sum(math.exp(chosen_logprob(logits, sampler, t)) for t in range(50))
    assert mass == pytest.approx(1.0, abs=1e-9)
    assert math.isfinite(chosen_logprob(logits, sampler, sample_token(logits, sampler, seed)))


def test_pyexecutor_mode_reports_the_same_logprobs_as_generate_mode(double, tiny_model):
    rows = [Row(1, PROMPT, len(PROMPT), Sampler("top_k", 0, temperature=0.8, top_k=4, return_logprob=True), 9),
            Row(2, PROMPT, len(PROMPT), Sampler("greedy", 0, return_logprob=True, logprob_mode="raw")),
            Row(3, PROMPT, len(PROMPT), Sampler("min_p", 0, min_p=0.1, return_logprobs=True, max_tokens=2,
                                                logprob_mode="raw"), 4, steps=2)]
    generate, _ = load_double_engine(tiny_model)
    expected = generate.engine.step(rows)
    pyexecutor, _ = load_double_engine(tiny_model, execution_mode="pyexecutor")
    assert pyexecutor.engine.logprob_modes == ("raw", "processed")
    for got, want in zip(pyexecutor.engine.step(rows), expected, strict=True):
        assert got.tokens == want.tokens and got.token_logprobs == pytest.approx(want.token_logprobs, abs=1e-5)


def test_without_per_context_salts_the_weights_epoch_still_salts_every_request(double, tiny_model, second_model):
    harness, trt = rl_engine(tiny_model, enable_cache_salt=False)
    harness.forward([greedy(1, PROMPT)])
    assert calls(trt, "generate")[-1]["cache_salt"] is None
    harness.engine.load_weights(str(second_model))
    assert decode(harness, 1, PROMPT, 2) == hf_greedy(second_model, PROMPT, 2)
    assert calls(trt, "generate")[-1]["cache_salt"] == ["@1"]


def test_pyexecutor_mode_counts_prefill_tokens_not_decode_steps(double, tiny_model):
    harness, _ = load_double_engine(tiny_model, execution_mode="pyexecutor", lookahead_tokens=1)
    made = decode(harness, 1, PROMPT, 4)  # one prefill, then decode steps on the resident request
    assert harness.engine.stats() == {"prompt_tokens_computed": len(PROMPT)}
    harness.forward([greedy(1, [made[0] + 1], len(PROMPT))])  # a rollback: the request is made again
    assert harness.engine.stats() == {"prompt_tokens_computed": 2 * len(PROMPT) + 1}


def test_deeper_sleep_releases_only_the_weights_and_a_load_waits_for_wake(double, tiny_model, second_model):
    harness, trt = rl_engine(tiny_model)
    harness.engine.sleep(1)
    harness.engine.sleep(2)
    harness.engine.sleep(1)  # already deeper: nothing to release
    sleeps = [c["args"][0] for c in calls(trt, "collective_rpc") if c["method"] == "sleep"]
    assert len(sleeps) == 2 and set(sleeps[1]) == {"model", "draft_model"}
    with pytest.raises(WeightsLoadError, match="wake") as failure:
        harness.engine.load_weights(str(second_model))
    assert failure.value.serving_previous is True and calls(trt, "update_weights") == []
    harness.engine.wake()
    harness.engine.wake()  # awake already: no second wakeup
    assert [c["method"] for c in calls(trt, "collective_rpc")].count("wakeup") == 1
    harness.engine.load_weights(str(second_model))
    assert decode(harness, 1, PROMPT, 2) == hf_greedy(second_model, PROMPT, 2)


def op(harness, name, **fields):
    import msgpack

    from pie_driver_trtllm.wire.codec import decode_frame

    body = decode_frame(msgpack.packb({"v": 1, "id": 1, "op": name, **fields}), harness.limits).body
    return getattr(harness.core, name)(body)


def test_the_driver_core_drives_the_rl_operations_of_this_engine(double, tiny_model, second_model, tmp_path):
    from pie_driver_trtllm.wire.errors import DriverError

    harness, _ = rl_engine(tiny_model)
    assert op(harness, "load_weights", path=str(second_model), version=7) == {"weights_version": 7}
    assert decode(harness, 1, PROMPT, 2) == hf_greedy(second_model, PROMPT, 2)
    (tmp_path / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}")
    with pytest.raises(DriverError) as failure:
        op(harness, "load_weights", path=str(tmp_path), version=8)
    assert failure.value.code == "WEIGHTS_LOAD_FAILED"
    assert harness.core.weights_health()["weights"] == "serving"
    assert op(harness, "sleep", level=2) == {"asleep": 2}
    assert op(harness, "wake") == {"asleep": 0}
    assert decode(harness, 2, PROMPT, 2) == hf_greedy(second_model, PROMPT, 2)


def test_a_release_that_fails_leaves_the_engine_awake_as_the_core_believes(double, tiny_model, monkeypatch):
    harness, trt = rl_engine(tiny_model)
    import tensorrt_llm.executor.ray_gpu_worker as worker

    def refuse(self, tags):
        raise RuntimeError("the release failed")

    monkeypatch.setattr(worker.RayGPUWorker, "sleep", refuse)
    with pytest.raises(RuntimeError, match="release failed"):
        harness.engine.sleep(1)
    assert harness.engine.asleep == 0 and calls(trt, "collective_rpc")[-1]["method"] == "wakeup"
    assert decode(harness, 1, PROMPT, 2) == hf_greedy(tiny_model, PROMPT, 2)
