"""A token sampler's own log-probability (`return_logprob`, `logprob_mode`): at the edge, through the
router's one pass, in the core, and on the reference engine against `logprobs` and `dist` samplers of the
same step."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

import msgpack
import msgspec
import pytest
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st
from test_protocol_fastpath import check_paths_agree
from trtllm_support import CoreHarness

from pie_driver_trtllm.client import logprob_sampler
from pie_driver_trtllm.config import parse_config
from pie_driver_trtllm.engines.model_facts import read_model_info
from pie_driver_trtllm.engines.reference.engine import ReferenceEngine
from pie_driver_trtllm.modelgen import make_model
from pie_driver_trtllm.replicas.splice import decode_spliced, encode_share
from pie_driver_trtllm.wire.codec import FrameRejected, Limits, decode_frame, encode_forward
from pie_driver_trtllm.wire.errors import DriverError, ErrorCode
from pie_driver_trtllm.wire.limits import outputs_may_exceed_caps

LIMITS = Limits(vocab_size=100, max_model_len=64, max_forward_requests=4, max_forward_tokens=16,
                max_logprob_labels=8, max_frame_bytes=4096)


def frame(*samplers: dict[str, Any], tokens: tuple[int, ...] = (5, 6)) -> bytes:
    request = {"context": 1, "tokens": list(tokens), "positions": list(range(len(tokens))), "samplers": list(samplers)}
    return msgpack.packb({"v": 1, "id": 3, "op": "forward", "requests": [request]})


def item(*samplers: dict[str, Any]) -> Any:
    return decode_frame(frame(*samplers), LIMITS).body.items[0]  # type: ignore[union-attr]


# ---------------------------------------------------------------- at the edge


def test_the_fields_are_normalised_and_a_one_token_sampler_stays_one() -> None:
    plain, raw, processed, moot, run = item(
        {"at": 1, "type": "greedy"},
        {"at": 1, "type": "top_k", "top_k": 3, "return_logprob": True, "logprob_mode": "raw"},
        {"at": 1, "type": "multinomial", "return_logprob": True},
        {"at": 1, "type": "top_p", "top_p": 0.5, "logprob_mode": "raw"},
        {"at": 1, "type": "top_p", "top_p": 0.5, "max_tokens": 3, "return_logprobs": True,
         "logprob_mode": "raw"}).samplers
    assert (plain.return_logprob, plain.logprob_mode) == (False, "processed")
    assert (raw.return_logprob, raw.logprob_mode, raw.is_run) == (True, "raw", False)
    assert (processed.return_logprob, processed.logprob_mode, processed.is_run) == (True, "processed", False)
    assert moot == item({"at": 1, "type": "top_p", "top_p": 0.5}).samplers[0]  # no log-probability asked for
    assert (run.return_logprobs, run.return_logprob, run.logprob_mode) == (True, False, "raw")


@pytest.mark.parametrize(("sampler", "words"), [
    ({"at": 1, "type": "dist", "k": 2, "return_logprob": True}, "makes no token"),
    ({"at": 1, "type": "logprobs", "token_ids": [1], "return_logprob": False}, "makes no token"),
    ({"at": 1, "type": "logprobs", "token_ids": [1], "logprob_mode": "raw"}, "makes no token"),
    ({"at": 1, "type": "greedy", "return_logprob": True, "logprob_mode": "softmax"}, "'softmax' is unknown"),
    ({"at": 1, "type": "top_k", "top_k": 2, "logprob_mode": "RAW"}, "'RAW' is unknown"),
    ({"at": 1, "type": "greedy", "logprob_mode": 1}, "str"),
    ({"at": 1, "type": "greedy", "return_logprob": 1}, "bool"),
    ({"at": 1, "type": "greedy", "return_logprob": True, "max_tokens": 2}, "return_logprobs"),
    ({"at": 1, "type": "top_p", "top_p": 0.5, "return_logprob": True, "return_logprobs": True}, "return_logprobs"),
])
def test_bad_logprob_fields_fail_their_request_alone(sampler: dict[str, Any], words: str) -> None:
    failed = item(sampler)
    assert isinstance(failed, DriverError) and failed.code == ErrorCode.BAD_REQUEST and words in failed.message
    check_paths_agree(frame(sampler), LIMITS)
    check_paths_agree(frame(sampler, tokens=(5,)), LIMITS)


LOGPROB_FIELDS = st.fixed_dictionaries(
    {"at": st.integers(0, 2), "type": st.sampled_from(["greedy", "top_k", "multinomial", "dist", "logprobs"])},
    optional={"top_k": st.just(3), "k": st.just(3), "token_ids": st.just([1, 2]), "max_tokens": st.integers(0, 3),
              "return_logprobs": st.sampled_from([True, False]),
              "return_logprob": st.sampled_from([True, False, 1, None]),
              "logprob_mode": st.sampled_from(["raw", "processed", "", "RAW", 0, None])})


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(LOGPROB_FIELDS, max_size=3), st.booleans())
@example([{"at": 0, "type": "greedy", "return_logprob": True, "logprob_mode": "raw"}], True)
def test_fast_and_general_paths_agree_on_logprob_fields(samplers: list[dict[str, Any]], short: bool) -> None:
    check_paths_agree(frame(*samplers, tokens=(5,) if short else (5, 6, 7)), LIMITS)


def test_logprob_fields_cross_to_a_replica_unchanged() -> None:
    samplers = [{"at": 1, "type": "top_k", "top_k": 3, "seed": 4, "return_logprob": True, "logprob_mode": "raw"},
                {"at": 0, "type": "greedy", "return_logprob": True},
                {"at": 1, "type": "min_p", "min_p": 0.1, "max_tokens": 3, "return_logprobs": True,
                 "logprob_mode": "raw"}]
    original = item(*samplers)
    # the router's general path re-encodes validated requests
    assert decode_frame(encode_forward(3, [original]), LIMITS).body.items == [original]  # type: ignore[union-attr]
    # its one pass hands the host's sampler bytes on as written
    taken = decode_spliced(frame(*samplers), LIMITS)
    assert taken is not None
    share = msgspec.msgpack.decode(encode_share(5, taken.body.requests))  # type: ignore[union-attr]
    assert share["requests"][0]["samplers"] == samplers
    assert decode_frame(encode_share(5, taken.body.requests), LIMITS).body.items == [original]  # type: ignore


def test_each_return_logprob_counts_as_one_output_value() -> None:
    def forward(n: int, *others: dict[str, Any]) -> bytes:
        return frame(*[{"at": 1, "type": "greedy", "return_logprob": True}] * n, *others)

    limits = dataclasses.replace(LIMITS, max_output_elements=3)
    assert check_paths_agree(forward(3), limits) is not None  # the fast path takes it
    assert outputs_may_exceed_caps(forward(4), limits) and decode_spliced(forward(4), limits) is None
    dist = {"at": 1, "type": "dist", "k": 2}
    assert decode_frame(forward(1, dist), limits)
    for over, values in ((forward(4), 4), (forward(2, dist), 4)):
        with pytest.raises(FrameRejected) as refused:
            decode_frame(over, limits)
        assert refused.value.error.code == ErrorCode.CAPACITY
        assert f"{values} output values" in refused.value.error.message
    # a sampler that asks for no log-probability costs none
    unasked = frame(*[{"at": 1, "type": "greedy", "return_logprob": False}] * 8)
    assert decode_frame(unasked, limits).body.items[0].samplers[0].return_logprob is False  # type: ignore


# ---------------------------------------------------------------- on the reference engine


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[int, Path]:
    """Two tiny random-weight checkpoints."""
    root = tmp_path_factory.mktemp("logprob_models")
    return {seed: make_model(root / f"tiny{seed}", "tiny", seed=seed) for seed in (0, 1)}


def config_of(model: Path, lookahead: int = 4) -> Any:
    return parse_config({"model": {"snapshot_dir": str(model)},
                         "driver": {"device": ["cpu"], "activation_dtype": "float32",
                                    "options": {"engine": "reference", "lookahead_tokens": lookahead}}})


@pytest.fixture(scope="module")
def engines(models: dict[int, Path]) -> dict[tuple[int, str], tuple[Any, Any]]:
    """(config, engine) per checkpoint and reference path: batched (a Llama slot cache) and eager."""
    import torch
    from transformers import AutoModelForCausalLM

    out = {}
    for seed, model in models.items():
        config = config_of(model)
        batched = ReferenceEngine.load(config, "cpu")
        assert batched.execution_mode == "batched"
        loaded = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32, local_files_only=True).eval()
        out[seed, "batched"] = config, batched
        out[seed, "eager"] = config, ReferenceEngine(loaded, "cpu", read_model_info(config))
    return out


def harness_of(engines: dict, seed: int = 0, path: str = "batched") -> CoreHarness:
    config, engine = engines[seed, path]
    engine.close()  # a fresh cache: each harness starts with no context
    return CoreHarness(config, engine)


def one(harness: CoreHarness, context: int, tokens: list[int], sampler: dict[str, Any], start: int = 0) -> Any:
    (reply,) = harness.forward([{"context": context, "tokens": tokens,
                                 "positions": list(range(start, start + len(tokens))),
                                 "samplers": [{"at": len(tokens) - 1, **sampler}]}])
    assert reply["ok"], reply
    return reply["outputs"][0]


def processed_from_dist(probs: dict[int, float], sampler: dict[str, Any], token: int) -> float | None:
    """log p(token) renormalised over the tokens the sampler's filters keep, from the full distribution at
    its temperature; None when a filter's threshold lies within rounding of a probability (the engine,
    deciding in float32, may keep that token or not)."""
    kept = dict(probs)
    if "top_k" in sampler and sampler["top_k"] < len(kept):
        ordered = sorted(kept.values(), reverse=True)
        kth, next_one = ordered[sampler["top_k"] - 1], ordered[sampler["top_k"]]
        if kth - next_one <= 1e-5 * kth:
            return None
        kept = {t: p for t, p in kept.items() if p >= kth}
    if sampler.get("top_p", 1.0) < 1.0:
        total = sum(kept.values())
        cumulative, chosen = 0.0, {}
        for t, p in sorted(kept.items(), key=lambda tp: -tp[1]):
            if abs(cumulative - sampler["top_p"]) <= 1e-5:
                return None
            if cumulative < sampler["top_p"]:
                chosen[t] = p
            cumulative += p / total
        dropped = [p for t, p in kept.items() if t not in chosen]
        if dropped and max(dropped) >= min(chosen.values()) * (1 - 1e-5):
            return None  # tied across the cut: which of them the engine keeps is its sort's choice
        kept = chosen
    if sampler.get("min_p", 0.0) > 0.0:
        floor = sampler["min_p"] * max(kept.values())
        if any(abs(p - floor) <= 1e-5 * floor for p in kept.values()):
            return None
        kept = {t: p for t, p in kept.items() if p >= floor}
    assert token in kept, (token, sorted(kept))
    return math.log(probs[token] / sum(kept.values()))


FILTERED = st.one_of(
    st.fixed_dictionaries({"type": st.just("top_k"), "top_k": st.integers(1, 60)}),
    st.fixed_dictionaries({"type": st.just("top_p"), "top_p": st.floats(0.05, 1.0)}),
    st.fixed_dictionaries({"type": st.just("min_p"), "min_p": st.floats(0.0, 0.6)}),
    st.fixed_dictionaries({"type": st.just("top_k_top_p"), "top_k": st.integers(1, 60),
                           "top_p": st.floats(0.05, 1.0)}))
SAMPLERS = st.one_of(st.just({"type": "greedy"}), st.just({"type": "multinomial"}), FILTERED)


@settings(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(sampler=SAMPLERS, temperature=st.sampled_from([None, 0.0, 0.3, 0.8, 1.0, 1.7]),
       seed=st.integers(0, 2**64 - 1), prompt=st.lists(st.integers(0, 511), min_size=1, max_size=10),
       model=st.sampled_from([0, 1]), path=st.sampled_from(["batched", "eager"]))
@example(sampler={"type": "top_k", "top_k": 1}, temperature=0.8, seed=0, prompt=[7], model=0, path="batched")
@example(sampler={"type": "greedy"}, temperature=None, seed=0, prompt=[3, 4], model=1, path="eager")
@example(sampler={"type": "top_p", "top_p": 0.05}, temperature=None, seed=0, prompt=[0], model=0, path="batched")
def test_a_sampled_tokens_logprob_is_of_the_distribution_it_was_drawn_from(
        engines, sampler: dict[str, Any], temperature: float | None, seed: int, prompt: list[int], model: int,
        path: str) -> None:
    harness = harness_of(engines, model, path)
    token_sampler = {**sampler, "seed": seed, **({} if temperature is None else {"temperature": temperature})}
    effective = 1.0 if temperature is None else temperature
    greedy = sampler["type"] == "greedy" or effective == 0.0
    (reply,) = harness.forward([{"context": 1, "tokens": prompt, "positions": list(range(len(prompt))), "samplers": [
        {"at": len(prompt) - 1, **s} for s in (
            token_sampler, {**token_sampler, "return_logprob": True, "logprob_mode": "raw"},
            {**token_sampler, "return_logprob": True},
            {"type": "dist", "k": 512, "temperature": 1.0 if greedy else effective})]}])
    plain, raw, processed, dist = reply["outputs"]
    # the same seed draws the same token with and without return_logprob
    assert plain.keys() == {"token"} and raw.keys() == processed.keys() == {"token", "logprob"}
    token = plain["token"]
    assert raw["token"] == processed["token"] == token
    # raw: a logprobs sampler of that token with no temperature
    (expected_raw,) = one(harness, 2, prompt, {"type": "logprobs", "token_ids": [token]})["logprobs"]
    assert raw["logprob"] == pytest.approx(expected_raw, abs=1e-5)
    if greedy:  # no distribution of its own: processed is raw
        assert processed["logprob"] == raw["logprob"]
        return
    if sampler["type"] == "multinomial":  # no filters: a logprobs sampler at the sampler's temperature
        (expected,) = one(harness, 3, prompt, {"type": "logprobs", "token_ids": [token],
                                               "temperature": effective})["logprobs"]
    else:
        expected = processed_from_dist(dict(zip(*dist["dist"], strict=True)), sampler, token)
        assume(expected is not None)
    assert processed["logprob"] == pytest.approx(expected, abs=1e-5)


def step_outputs(harness: CoreHarness, fed: list[int], start: int, samplers: list[dict[str, Any]]) -> list[Any]:
    """One forward feeding `fed` to contexts 1, 2, ... at `start`, each with its sampler after the last token."""
    replies = harness.forward([{"context": context, "tokens": fed, "positions": list(range(start, start + len(fed))),
                                "samplers": [{"at": len(fed) - 1, **sampler}]}
                               for context, sampler in enumerate(samplers, 1)])
    assert all(reply["ok"] for reply in replies), replies
    return [reply["outputs"][0] for reply in replies]


@pytest.mark.parametrize("path", ["batched", "eager"])
@pytest.mark.parametrize("sampler", [{"type": "greedy"}, {"type": "multinomial", "temperature": 0.6},
                                     {"type": "top_k", "top_k": 5, "temperature": 1.3}])
def test_decode_steps_with_return_logprob(engines, path: str, sampler: dict[str, Any]) -> None:
    """A decode loop of two contexts (one new token each per step, one decode batch), one in each mode:
    each step's log-probability is that of a `logprobs` sampler at that prefix, and the same seeds give
    the tokens of a loop without return_logprob."""
    harness, plain_harness, check = (harness_of(engines, 0, path), CoreHarness(*engines[0, path]),
                                     CoreHarness(*engines[0, path]))
    history = [11, 12, 13]
    modes = {1: "raw", 2: "processed"}  # context: mode
    for step in range(6):
        fed = history if step == 0 else history[-1:]
        start = 0 if step == 0 else len(history) - 1
        seeded = {**sampler, "seed": 100 + step}
        outs = step_outputs(harness, fed, start, [{**seeded, "return_logprob": True, "logprob_mode": mode}
                                                  for mode in modes.values()])
        plain = step_outputs(plain_harness, fed, start, [seeded, seeded])
        assert [out["token"] for out in outs] == [out["token"] for out in plain]
        for out, mode in zip(outs, modes.values(), strict=True):
            temperature = 1.0 if mode == "raw" or sampler["type"] == "greedy" else sampler["temperature"]
            if sampler["type"] == "top_k" and mode == "processed":
                dist = one(check, 9, history, {"type": "dist", "k": 512, "temperature": temperature})["dist"]
                expected = processed_from_dist(dict(zip(*dist, strict=True)), sampler, out["token"])
            else:
                (expected,) = one(check, 9, history, {"type": "logprobs", "token_ids": [out["token"]],
                                                      "temperature": temperature})["logprobs"]
            assert expected is not None and out["logprob"] == pytest.approx(expected, abs=1e-5)
        assert outs[0]["token"] == outs[1]["token"]  # one seed, one token, whatever the mode
        history.append(outs[0]["token"])


def test_a_greedy_return_logprob_is_the_engines_not_the_lookahead_buffers(engines) -> None:
    harness = harness_of(engines)  # lookahead_tokens 4
    prompt = [3, 9, 27]
    first = one(harness, 1, prompt, {"type": "greedy"})["token"]
    predicted = harness.core.lookahead._predictions[1].tokens
    assert predicted[0] == first and len(predicted) == 4
    hits = harness.core.lookahead.hits
    second = one(harness, 1, [first], {"type": "greedy", "return_logprob": True}, start=3)
    assert second["token"] == predicted[1] and harness.core.lookahead.hits == hits  # asked of the engine
    (expected,) = one(CoreHarness(*engines[0, "batched"]), 7, [*prompt, first],
                      {"type": "logprobs", "token_ids": [predicted[1]]})["logprobs"]
    assert second["logprob"] == pytest.approx(expected, abs=1e-5)
    # the buffer still serves the plain greedy step after it
    assert one(harness, 1, [second["token"]], {"type": "greedy"}, start=4) == {"token": predicted[2]}
    assert harness.core.lookahead.hits == hits + 1


def test_a_decode_step_with_return_logprob_answers_as_the_general_path(engines) -> None:
    step = [{"context": 1, "tokens": [7], "positions": [3],
             "samplers": [{"at": 0, "type": "greedy", "return_logprob": True}]},
            {"context": 2, "tokens": [8], "positions": [3], "samplers": [{"at": 0, "type": "top_p", "top_p": 0.9,
                                                                         "seed": 3, "return_logprob": True}]}]
    replies = []
    for fast_decode in (True, False):
        harness = harness_of(engines)
        harness.core.fast_decode = fast_decode
        harness.forward([{"context": c, "tokens": [c, 5, 6], "positions": [0, 1, 2]} for c in (1, 2)])
        replies.append(harness.forward(step))
    assert replies[0] == replies[1]
    assert all(reply["outputs"][0].keys() == {"token", "logprob"} for reply in replies[0])


@pytest.mark.parametrize("mode", ["raw", "processed"])
def test_a_runs_return_logprobs_honours_logprob_mode(engines, mode: str) -> None:
    harness, check = harness_of(engines), CoreHarness(*engines[0, "batched"])
    sampler = {"type": "top_k_top_p", "top_k": 12, "top_p": 0.8, "temperature": 0.9, "seed": 5}
    prompt = [2, 4, 6]
    run = one(harness, 1, prompt, {**sampler, "max_tokens": 5, "return_logprobs": True, "logprob_mode": mode})
    assert len(run["logprobs"]) == len(run["tokens"]) == 5
    history = list(prompt)
    for token, logprob in zip(run["tokens"], run["logprobs"], strict=True):
        if mode == "raw":
            (expected,) = one(check, 9, history, {"type": "logprobs", "token_ids": [token]})["logprobs"]
        else:
            dist = one(check, 9, history, {"type": "dist", "k": 512, "temperature": 0.9})["dist"]
            expected = processed_from_dist(dict(zip(*dist, strict=True)), sampler, token)
        assert expected is not None and logprob == pytest.approx(expected, abs=1e-5)
        history.append(token)


# ---------------------------------------------------------------- through driver subprocesses


@pytest.mark.slow
def test_a_replica_pair_carries_logprob_fields_to_its_replicas(start_driver) -> None:
    """The router's one pass hands the fields on as written: a pair answers as one driver does (the
    client's helpers build the samplers)."""

    def answers(client: Any) -> tuple[list[Any], list[Any]]:
        requests = [{"context": c, "tokens": [3 + c, 9, 40 + c], "positions": [0, 1, 2],
                     "samplers": [logprob_sampler(2, {"type": "top_k", "top_k": 7, "seed": c}, mode),
                                  logprob_sampler(2, {"type": "greedy"})]}
                    for c, mode in enumerate(["raw", "processed", None, "raw"])]
        replies = client.forward(requests)
        step = [{"context": c, "tokens": [reply["outputs"][1]["token"]], "positions": [3],  # a decode step
                 "samplers": [logprob_sampler(0, {"type": "greedy"})]} for c, reply in enumerate(replies)]
        replies += client.forward(step)
        runs = [client.generate(10 + c, [4, c, 8], {"type": "min_p", "min_p": 0.05, "seed": c}, 6, max_tokens=3,
                                return_logprobs=True, logprob_mode=mode)
                for c, mode in enumerate(["raw", "processed"])]
        return replies, [(g.tokens, g.logprobs) for g in runs]

    pair = answers(start_driver(driver={"device": ["cpu", "cpu"]}).client())
    single = answers(start_driver().client())
    for got, want in zip(pair[0], single[0], strict=True):
        assert [o["token"] for o in got["outputs"]] == [o["token"] for o in want["outputs"]]
        assert [o["logprob"] for o in got["outputs"]] == pytest.approx([o["logprob"] for o in want["outputs"]],
                                                                        abs=1e-5)
    for (tokens, logprobs), (want_tokens, want_logprobs) in zip(pair[1], single[1], strict=True):
        assert tokens == want_tokens and logprobs == pytest.approx(want_logprobs, abs=1e-5)
    raw, processed = single[1]
    assert len(raw[1]) == len(processed[1]) == 6
