"""Protocol 1.1 runs at the edge and in the core: validation, reply shape, stop reasons, log-probabilities,
the handshake, and what a protocol 1.0 host sees."""

from __future__ import annotations

from typing import Any

import msgpack
import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from test_one_context_several_times import same
from test_protocol_fastpath import check_paths_agree
from transformers import AutoModelForCausalLM
from trtllm_support import CoreHarness, double_imported, trt_config

from pie_driver_trtllm.config import parse_config
from pie_driver_trtllm.core.runs import run_output
from pie_driver_trtllm.engines.base import RowResult
from pie_driver_trtllm.engines.model_facts import read_model_info
from pie_driver_trtllm.engines.reference.batched import BatchedReferenceEngine
from pie_driver_trtllm.engines.reference.engine import ReferenceEngine
from pie_driver_trtllm.engines.tensorrt_llm.startup import TEST_DOUBLE_ENV
from pie_driver_trtllm.sampler import Sampler
from pie_driver_trtllm.serving.driver import build_caps, build_handshake
from pie_driver_trtllm.wire.codec import Limits, decode_frame, encode_forward
from pie_driver_trtllm.wire.errors import DriverError, ErrorCode

LIMITS = Limits(vocab_size=100, max_model_len=64, max_forward_requests=4, max_forward_tokens=16,
                max_logprob_labels=8, max_frame_bytes=4096)


def frame(*samplers: dict[str, Any]) -> bytes:
    request = {"context": 1, "tokens": [5, 6], "positions": [0, 1], "samplers": list(samplers)}
    return msgpack.packb({"v": 1, "id": 3, "op": "forward", "requests": [request]})


def item(*samplers: dict[str, Any]) -> Any:
    return decode_frame(frame(*samplers), LIMITS).body.items[0]  # type: ignore[union-attr]


def test_run_fields_are_normalised_and_a_plain_sampler_stays_one_token() -> None:
    plain, run, defaulted = item({"at": 1, "type": "greedy"},
                                 {"at": 1, "type": "top_k", "top_k": 3, "seed": 9, "max_tokens": 16,
                                  "stop_token_ids": [2, 7], "return_logprobs": True},
                                 {"at": 1, "type": "greedy", "stop_token_ids": [4]}).samplers
    assert (plain.max_tokens, plain.is_run) == (0, False)
    assert (run.max_tokens, run.stop_token_ids, run.return_logprobs, run.is_run) == (16, (2, 7), True, True)
    assert (defaulted.max_tokens, defaulted.is_run) == (1, True)  # any run field makes a run, of one by default
    nil = item({"at": 1, "type": "greedy", "max_tokens": None, "stop_token_ids": None, "return_logprobs": None,
                "return_logprob": None, "logprob_mode": None}).samplers[0]
    assert (nil.max_tokens, nil.is_run, nil.return_logprob) == (0, False, False)  # nil means absent


@pytest.mark.parametrize(("tokens", "max_tokens", "stops", "length", "reason"), [
    ([4, 7], 2, (7,), 10, "stop_token"),        # a stop id that is also the max_tokens-th token
    ([4, 7], 2, (), 62, "max_tokens"),           # the max_tokens-th token is also the last position
    ([4, 7], 3, (), 62, "max_model_len"),
])
def test_a_run_names_the_first_stop_that_applies(tokens: list[int], max_tokens: int, stops: tuple[int, ...],
                                                 length: int, reason: str) -> None:
    sampler = Sampler("greedy", 0, temperature=0.0, max_tokens=max_tokens, stop_token_ids=stops)
    assert run_output(sampler, 64, length, RowResult(tokens=tokens)) == {"tokens": tokens, "stop": reason}


@pytest.mark.parametrize(("sampler", "code", "words"), [
    ({"at": 1, "type": "greedy", "max_tokens": 0}, ErrorCode.OUT_OF_RANGE, "max_tokens 0"),
    ({"at": 1, "type": "greedy", "max_tokens": 65}, ErrorCode.OUT_OF_RANGE, "1..64"),
    ({"at": 1, "type": "greedy", "stop_token_ids": [100]}, ErrorCode.OUT_OF_RANGE, "vocab_size 100"),
    ({"at": 1, "type": "greedy", "stop_token_ids": list(range(65))}, ErrorCode.OUT_OF_RANGE, "at most 64"),
    ({"at": 1, "type": "dist", "k": 2, "max_tokens": 2}, ErrorCode.BAD_REQUEST, "makes no token"),
    ({"at": 1, "type": "logprobs", "token_ids": [1], "return_logprobs": True}, ErrorCode.BAD_REQUEST, "makes no token"),
    ({"at": 1, "type": "greedy", "return_logprobs": 1}, ErrorCode.BAD_REQUEST, "bool"),
])
def test_bad_run_fields_fail_their_request_alone(sampler: dict[str, Any], code: ErrorCode, words: str) -> None:
    failed = item(sampler)
    assert isinstance(failed, DriverError) and failed.code == code and words in failed.message
    check_paths_agree(frame(sampler), LIMITS)


RUN_FIELDS = st.fixed_dictionaries({"at": st.integers(0, 2), "type": st.sampled_from(["greedy", "top_p", "dist"])},
                                   optional={"top_p": st.sampled_from([0.5, 2.0]), "k": st.just(3),
                                             "max_tokens": st.integers(-1, 70),
                                             "stop_token_ids": st.lists(st.integers(-1, 101), max_size=3),
                                             "return_logprobs": st.sampled_from([True, False, 0, None])})


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(RUN_FIELDS, max_size=3))
@example([{"at": 1, "type": "greedy", "max_tokens": 64, "stop_token_ids": [99]}])
def test_fast_and_general_paths_agree_on_runs(samplers: list[dict[str, Any]]) -> None:
    check_paths_agree(frame(*samplers), LIMITS)


def test_a_run_crosses_to_a_replica_unchanged() -> None:
    original = item({"at": 1, "type": "top_p", "top_p": 0.5, "seed": 4, "max_tokens": 5, "stop_token_ids": [3],
                     "return_logprobs": True}, {"at": 0, "type": "greedy"})
    assert decode_frame(encode_forward(3, [original]), LIMITS).body.items == [original]  # type: ignore[union-attr]


# ---------------------------------------------------------------- in the core, on an engine


@pytest.fixture(scope="module")
def reference(tiny_model):
    config = parse_config({"model": {"snapshot_dir": str(tiny_model)},
                           "driver": {"device": ["cpu"], "activation_dtype": "float32",
                                      "options": {"engine": "reference", "lookahead_tokens": 4,
                                                  "max_history_tokens": 40}}})
    engine = ReferenceEngine.load(config, "cpu")
    return config, lambda: CoreHarness(config, engine)


def test_handshake_advertises_protocol_1_2_and_keeps_v1_fields(reference) -> None:
    config, make = reference
    harness = make()
    hello = build_handshake(config, harness.engine, build_caps(config, harness.engine, harness.limits))
    assert hello["protocol"] == 1 and hello["protocol_version"] == [1, 2]
    assert hello["caps"]["max_sampler_tokens"] == 64


def test_a_plain_sampler_answers_as_in_protocol_1_0(reference) -> None:
    samplers = [{"at": 1, "type": "greedy"}, {"at": 1, "type": "top_k", "top_k": 4}]
    (reply,) = reference[1]().forward([{"context": 1, "tokens": [1, 2], "positions": [0, 1], "samplers": samplers}])
    assert [set(out) for out in reply["outputs"]] == [{"token"}, {"token"}]


def test_a_run_before_the_end_of_its_history_fails_alone(reference) -> None:
    harness = reference[1]()
    harness.forward([{"context": 1, "tokens": [1, 2, 3, 4], "positions": [0, 1, 2, 3]}])
    bad, good = harness.forward([
        {"context": 1, "tokens": [7, 8], "positions": [1, 2],
         "samplers": [{"at": 0, "type": "greedy", "max_tokens": 4}]},
        {"context": 2, "tokens": [9], "positions": [0], "samplers": [{"at": 0, "type": "greedy", "max_tokens": 4}]}])
    assert bad["ok"] is False and bad["error"]["code"] == "BAD_REQUEST"
    assert "end of context 1" in bad["error"]["message"]
    assert harness.core.store.get(1) == [1, 7, 8]  # its tokens stay merged (the rollback included), as documented
    assert good["ok"] is True and len(good["outputs"][0]["tokens"]) == 4
    assert harness.core.stats()["tokens_out"] == 4  # the run's tokens; the refused entry's none


def test_tokens_out_counts_a_run_token_by_token_and_a_failed_entry_not_at_all(reference) -> None:
    harness = reference[1]()
    inner = harness.engine.step

    def failing_dist(rows: list[Any]) -> list[Any]:  # an engine that fails every dist row alone
        return [RowResult(error="Injected: row fails") if row.sampler.type == "dist" else result
                for row, result in zip(rows, inner(rows), strict=True)]

    harness.engine.step = failing_dist
    run = {"at": 2, "type": "greedy", "max_tokens": 4}
    prompt = {"tokens": [1, 15, 99], "positions": [0, 1, 2]}
    failed, good = harness.forward([{"context": 1, **prompt, "samplers": [run, {"at": 2, "type": "dist", "k": 2}]},
                                    {"context": 2, **prompt, "samplers": [run, {"at": 1, "type": "greedy"}]}])
    assert failed["ok"] is False and good["ok"] is True and len(good["outputs"][0]["tokens"]) == 4
    assert harness.core.stats()["tokens_out"] == 4 + 1


def test_a_run_at_the_end_of_its_history_after_out_of_order_positions_is_a_run(reference) -> None:
    scattered, plain = reference[1](), reference[1]()
    run = {"at": 2, "type": "greedy", "max_tokens": 3}
    (reply,) = scattered.forward([{"context": 1, "tokens": [5, 6, 7], "positions": [0, 1, 1], "samplers": [run]}])
    (expected,) = plain.forward([{"context": 1, "tokens": [5, 7], "positions": [0, 1], "samplers": [{**run, "at": 1}]}])
    assert reply == expected and len(reply["outputs"][0]["tokens"]) == 3


def test_a_run_stops_at_max_model_len(reference) -> None:
    harness = reference[1]()  # max_history_tokens 40: positions 0..39
    prompt = list(range(1, 38))
    (reply,) = harness.forward([{"context": 1, "tokens": prompt, "positions": list(range(37)),
                                 "samplers": [{"at": 36, "type": "greedy", "max_tokens": 16}]}])
    assert len(reply["outputs"][0]["tokens"]) == 3 and reply["outputs"][0]["stop"] == "max_model_len"


def logprob_steps(harness: CoreHarness, prompt: list[int], made: list[int], sampler: dict[str, Any]) -> list[float]:
    """Each run token's log-probability from a `logprobs` sampler at that step: at the run's temperature, or
    at none for a greedy run or `logprob_mode` "raw" (a run without filters)."""
    raw = sampler["type"] == "greedy" or sampler.get("logprob_mode") == "raw"
    temperature = 1.0 if raw else sampler.get("temperature", 1.0)
    history, out = list(prompt), []
    for token in made:
        (reply,) = harness.forward([{"context": 5, "tokens": history, "positions": list(range(len(history))),
                                     "samplers": [{"at": len(history) - 1, "type": "logprobs", "token_ids": [token],
                                                   "temperature": temperature}]}])
        out.append(reply["outputs"][0]["logprobs"][0])
        history.append(token)
    return out


@pytest.mark.parametrize("sampler", [{"type": "greedy"}, {"type": "multinomial", "temperature": 0.7, "seed": 11},
                                     {"type": "top_k", "top_k": 5, "temperature": 0.7, "logprob_mode": "raw"}])
def test_return_logprobs_reports_each_emitted_token(reference, sampler) -> None:
    harness = reference[1]()
    prompt = [4, 8, 15]
    (reply,) = harness.forward([{"context": 1, "tokens": prompt, "positions": [0, 1, 2],
                                 "samplers": [{"at": 2, **sampler, "max_tokens": 6, "return_logprobs": True}]}])
    run = reply["outputs"][0]
    assert len(run["logprobs"]) == len(run["tokens"]) == 6
    assert run["logprobs"] == pytest.approx(logprob_steps(harness, prompt, run["tokens"], sampler), abs=1e-5)


@pytest.fixture
def double(tiny_model, monkeypatch):
    monkeypatch.setenv(TEST_DOUBLE_ENV, "1")
    with double_imported() as trt:
        from pie_driver_trtllm.engines.tensorrt_llm.startup import TensorRTLLMEngine

        config = trt_config(tiny_model, lookahead_tokens=4)
        yield CoreHarness(config, TensorRTLLMEngine.load(config, "cpu")), trt


def test_generate_mode_makes_a_greedy_run_in_one_generate_call(double) -> None:
    harness, trt = double
    trt.CALLS.clear()
    (reply,) = harness.forward([{"context": 1, "tokens": [3, 1, 4], "positions": [0, 1, 2],
                                 "samplers": [{"at": 2, "type": "greedy", "max_tokens": 16, "stop_token_ids": [500]}]}])
    (call,) = [c for c in trt.CALLS if c["kind"] == "generate"]
    (params,) = call["sampling_params"]
    assert (params.max_tokens, params.stop_token_ids, params.include_stop_str_in_output) == (16, [500], True)
    assert (params.ignore_eos, params.end_id) == (False, -1)
    assert len(reply["outputs"][0]["tokens"]) <= 16


def test_generate_mode_samples_other_runs_from_logits_one_call_per_token(double) -> None:
    harness, trt = double
    trt.CALLS.clear()
    harness.forward([{"context": 1, "tokens": [3, 1, 4], "positions": [0, 1, 2],
                      "samplers": [{"at": 2, "type": "top_k", "top_k": 9, "seed": 2**64 - 2, "max_tokens": 4}]},
                     {"context": 2, "tokens": [3, 1], "positions": [0, 1],
                      "samplers": [{"at": 1, "type": "greedy", "max_tokens": 4, "return_logprobs": True}]}])
    calls = [c for c in trt.CALLS if c["kind"] == "generate"]
    assert [len(c["sampling_params"]) for c in calls] == [2, 2, 2, 2]  # both runs advance together
    assert all(p.max_tokens == 1 and p.return_generation_logits for c in calls for p in c["sampling_params"])


@pytest.mark.parametrize("sampler", [{"type": "greedy"}, {"type": "multinomial", "temperature": 0.5, "seed": 4}])
def test_return_logprobs_in_generate_mode(double, sampler) -> None:
    harness, _ = double
    (reply,) = harness.forward([{"context": 1, "tokens": [3, 1, 4], "positions": [0, 1, 2],
                                 "samplers": [{"at": 2, **sampler, "max_tokens": 5, "return_logprobs": True}]}])
    run = reply["outputs"][0]
    assert len(run["logprobs"]) == len(run["tokens"]) == 5
    assert run["logprobs"] == pytest.approx(logprob_steps(harness, [3, 1, 4], run["tokens"], sampler), abs=1e-5)


@pytest.mark.parametrize("kind", [{"type": "greedy"}, {"type": "top_k", "top_k": 6, "seed": 3}])
def test_a_run_overwritten_later_in_its_forward_reads_its_own_prefix(reference, kind) -> None:
    first = {"context": 1, "tokens": [1, 2, 3], "positions": [0, 1, 2],
             "samplers": [{"at": 2, **kind, "max_tokens": 6}]}
    rewrite = {"context": 1, "tokens": [9], "positions": [1], "samplers": [{"at": 0, "type": "greedy"}]}
    together = reference[1]().forward([first, rewrite])
    apart = reference[1]()
    assert together == [*apart.forward([first]), *apart.forward([rewrite])]
    assert len(together[0]["outputs"][0]["tokens"]) == 6


@pytest.fixture(scope="module")
def hf_model(tiny_model):
    return AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()


@pytest.fixture(params=["batched", "eager", "trtllm-double-generate", "trtllm-double-pyexecutor"])
def fresh(request, tiny_model, hf_model, monkeypatch):
    """A maker of harnesses, each over an engine of its own: the reference engine's batched and eager paths,
    and the TensorRT-LLM engine on its test double in both execution modes."""
    if request.param.startswith("trtllm-double"):
        monkeypatch.setenv(TEST_DOUBLE_ENV, "1")
        with double_imported():
            from pie_driver_trtllm.engines.tensorrt_llm.startup import TensorRTLLMEngine

            config = trt_config(tiny_model, execution_mode=request.param.rsplit("-", 1)[1], lookahead_tokens=4)
            yield lambda: CoreHarness(config, TensorRTLLMEngine.load(config, "cpu"))
        return
    config = parse_config({"model": {"snapshot_dir": str(tiny_model)},
                           "driver": {"device": ["cpu"], "activation_dtype": "float32",
                                      "options": {"engine": "reference", "lookahead_tokens": 4}}})
    info = read_model_info(config)
    if request.param == "eager":
        yield lambda: CoreHarness(config, ReferenceEngine(hf_model, "cpu", info))
    else:
        yield lambda: CoreHarness(config, BatchedReferenceEngine(hf_model, "cpu", info, slots=3, version="test"))


def test_two_runs_after_one_prefix_each_equal_a_run_alone(fresh) -> None:
    def run(seed: int, greedy: bool = False) -> dict[str, Any]:
        kind = {"type": "greedy"} if greedy else {"type": "top_p", "top_p": 0.9, "seed": seed}
        return {"at": 2, **kind, "max_tokens": 7}

    prompt = {"context": 1, "tokens": [6, 2, 8], "positions": [0, 1, 2]}
    (both,) = fresh().forward([{**prompt, "samplers": [run(1), run(2), run(0, True), run(0, True)]}])
    alone = [fresh().forward([{**prompt, "samplers": [s]}])[0]["outputs"][0]
             for s in (run(1), run(2), run(0, True))]
    assert both["outputs"] == [*alone, alone[2]]


@pytest.mark.parametrize("kind", [{"type": "greedy"}, {"type": "greedy", "stop_token_ids": [7]},
                                  {"type": "multinomial", "temperature": 0.0, "seed": 5},
                                  {"type": "top_k", "top_k": 6, "seed": 3}])
def test_a_run_followed_in_its_forward_by_an_append_to_its_context_equals_two_forwards(fresh, kind) -> None:
    """The append reads past the run's prefix on the live history: the run still makes all its tokens."""
    first = {"context": 1, "tokens": [1, 15, 99], "positions": [0, 1, 2],
             "samplers": [{"at": 2, **kind, "max_tokens": 4}]}
    (made,) = fresh().forward([first])
    for token in (made["outputs"][0]["tokens"][0], 7):
        for then in ([], [{"at": 0, "type": "greedy"}], [{"at": 0, "type": "greedy", "max_tokens": 3}],
                     [{"at": 0, "type": "dist", "k": 2}]):
            append = {"context": 1, "tokens": [token], "positions": [3], "samplers": then}
            together = fresh().forward([first, append])
            apart = fresh()
            same(together, [*apart.forward([first]), *apart.forward([append])])
            assert together[0] == made


def test_a_run_after_one_fed_back_token_is_a_run(reference) -> None:
    harness = reference[1]()
    (first,) = harness.forward([{"context": 1, "tokens": [4, 4, 2], "positions": [0, 1, 2],
                                 "samplers": [{"at": 2, "type": "greedy", "max_tokens": 3}]}])
    kept = first["outputs"][0]["tokens"][0]
    (second,) = harness.forward([{"context": 1, "tokens": [kept], "positions": [3],
                                  "samplers": [{"at": 0, "type": "greedy", "max_tokens": 3}]}])
    assert second["outputs"][0]["tokens"][:2] == first["outputs"][0]["tokens"][1:]
    assert second["outputs"][0]["stop"] == "max_tokens"
