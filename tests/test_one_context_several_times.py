"""A forward that names one context several times answers exactly as the same entries sent in consecutive
forwards would, and as a plain Hugging Face forward over each sampler's prefix does: on the reference
engine's batched and per-context paths and on the TensorRT-LLM engine over its test double."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from transformers import AutoModelForCausalLM
from trtllm_support import DOUBLE_DIR, CoreHarness, trt_config

from pie_driver_trtllm.config import parse_config
from pie_driver_trtllm.engines.model_facts import read_model_info
from pie_driver_trtllm.engines.reference.batched import BatchedReferenceEngine
from pie_driver_trtllm.engines.reference.engine import ReferenceEngine
from pie_driver_trtllm.engines.tensorrt_llm.startup import TEST_DOUBLE_ENV, TensorRTLLMEngine
from pie_driver_trtllm.wire.codec import Fork

ENGINES = ["batched", "batched-overlap", "per-context", "trtllm-double-generate", "trtllm-double-pyexecutor"]


@pytest.fixture(scope="module")
def model(tiny_model):
    return AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()


def reference_config(tiny_model, lookahead: int):
    return parse_config({"model": {"snapshot_dir": str(tiny_model)},
                         "driver": {"device": ["cpu"], "activation_dtype": "float32",
                                    "options": {"engine": "reference", "lookahead_tokens": lookahead}}})


@pytest.fixture
def make(request, tiny_model, model, monkeypatch) -> Iterator[Callable[[], CoreHarness]]:
    """Fresh harnesses of one engine kind (lookahead on), each with its own state."""
    kind = request.param
    if kind.startswith("trtllm-double"):
        for name in [m for m in sys.modules if m == "tensorrt_llm" or m.startswith("tensorrt_llm.")]:
            monkeypatch.delitem(sys.modules, name)
        monkeypatch.syspath_prepend(str(DOUBLE_DIR))
        monkeypatch.setenv(TEST_DOUBLE_ENV, "1")
        config = trt_config(tiny_model, execution_mode=kind.rsplit("-", 1)[1], lookahead_tokens=4)
        yield lambda: CoreHarness(config, TensorRTLLMEngine.load(config, "cpu"))
        for name in [m for m in sys.modules if m == "tensorrt_llm" or m.startswith("tensorrt_llm.")]:
            del sys.modules[name]
        return
    config = reference_config(tiny_model, 4)
    info = read_model_info(config)
    if kind == "per-context":
        yield lambda: CoreHarness(config, ReferenceEngine(model, "cpu", info))
    else:  # three slots, so that slots are reused; the overlap forced on, as on CUDA
        yield lambda: CoreHarness(config, BatchedReferenceEngine(model, "cpu", info, slots=3, version="test",
                                                                  overlap=kind == "batched-overlap"))


def served(harness: CoreHarness, requests: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The requests with the samplers this engine does not serve left out."""
    kinds = harness.engine.samplers
    return [{**r, "samplers": [s for s in r.get("samplers", []) if s["type"] in kinds]} for r in requests]


def same(got: list[dict[str, Any]], want: list[dict[str, Any]]) -> None:
    """Equal replies: tokens and top-k ids exactly, probabilities and log-probabilities to float32 rounding."""
    assert [r["ok"] for r in got] == [r["ok"] for r in want], (got, want)
    for g, w in zip(got, want, strict=True):
        if not g["ok"]:
            assert g == w
            continue
        assert len(g["outputs"]) == len(w["outputs"])
        for a, b in zip(g["outputs"], w["outputs"], strict=True):
            if "dist" in b:
                assert a["dist"][0] == b["dist"][0], (got, want)
                assert a["dist"][1] == pytest.approx(b["dist"][1], rel=1e-4)
            elif "logprobs" in b:
                assert {**a, "logprobs": None} == {**b, "logprobs": None}, (got, want)
                assert a["logprobs"] == pytest.approx(b["logprobs"], abs=1e-4)
            else:
                assert a == b, (got, want)


def prefixes(requests: list[dict[str, Any]], histories: dict[int, list[int]]) -> list[list[list[int]]]:
    """What each sampler reads (contiguous entries): its context's first positions[at] + 1 tokens."""
    out = []
    for r in requests:
        history = histories.setdefault(r["context"], [])
        start = r["positions"][0]
        history[start:] = r["tokens"]
        out.append([history[: start + s["at"] + 1] for s in r.get("samplers", [])])
    return out


def check_plain_forward(model, requests, replies, histories) -> None:
    """Every output against a plain Hugging Face forward over its sampler's prefix."""
    for request, reply, reads in zip(requests, replies, prefixes(requests, histories), strict=True):
        for sampler, output, prefix in zip(request["samplers"], reply["outputs"], reads, strict=True):
            with torch.no_grad():
                logits = model(torch.tensor([prefix])).logits[0, -1].float()
            if sampler["type"] == "greedy":
                assert output["token"] == int(logits.argmax()), (prefix, output)
            else:
                top = torch.softmax(logits, -1).topk(sampler["k"])
                assert output["dist"][0] == top.indices.tolist(), (prefix, output)
                assert output["dist"][1] == pytest.approx(top.values.tolist(), rel=1e-4)


GREEDY_AND_DIST = [{"at": 0, "type": "dist", "k": 1}, {"at": 0, "type": "greedy"}]
PROMPT = [{"context": 4, "tokens": [5, 6, 7, 8, 9], "positions": [0, 1, 2, 3, 4],
           "samplers": [{"at": 4, "type": "greedy"}]}]
CASES = {
    # A prompt and its own samplers, then a rewrite lower in the same context.
    "prompt-then-rewrite": ([], [
        {"context": 1116, "tokens": [1, 15, 99, 200, 7, 34], "positions": [0, 1, 2, 3, 4, 5],
         "samplers": [{"at": 5, "type": "dist", "k": 1}, {"at": 5, "type": "greedy"}]},
        {"context": 1116, "tokens": [300], "positions": [2], "samplers": GREEDY_AND_DIST}]),
    # A decode step, then a rewrite lower in the same context.
    "decode-then-rewrite": (PROMPT, [
        {"context": 4, "tokens": [11], "positions": [5], "samplers": GREEDY_AND_DIST},
        {"context": 4, "tokens": [12, 13], "positions": [2, 3], "samplers": [{"at": 1, "type": "greedy"}]}]),
    # Top-k distributions on both sides of a rollback, with another context in between.
    "dist-around-rollback": (PROMPT, [
        {"context": 4, "tokens": [20, 21], "positions": [5, 6],
         "samplers": [{"at": 0, "type": "dist", "k": 4}, {"at": 1, "type": "dist", "k": 4}]},
        {"context": 9, "tokens": [3, 2], "positions": [0, 1], "samplers": [{"at": 1, "type": "dist", "k": 4}]},
        {"context": 4, "tokens": [22], "positions": [1], "samplers": [{"at": 0, "type": "dist", "k": 4}]},
        {"context": 4, "tokens": [23, 24], "positions": [2, 3], "samplers": [{"at": 1, "type": "greedy"}]}]),
    # Three rewrites, each lower than the last, every one answered by a greedy sampler at its end.
    "descending-rewrites": (PROMPT, [
        {"context": 4, "tokens": [30], "positions": [5], "samplers": [{"at": 0, "type": "greedy"}]},
        {"context": 4, "tokens": [31, 32], "positions": [3, 4], "samplers": [{"at": 1, "type": "greedy"}]},
        {"context": 4, "tokens": [33], "positions": [1], "samplers": [{"at": 0, "type": "greedy"}]}]),
}


@pytest.mark.parametrize("make", ENGINES, indirect=True)
@pytest.mark.parametrize("case", list(CASES))
def test_one_forward_answers_as_consecutive_forwards(make, model, case):
    setup, requests = CASES[case]
    together, apart = make(), make()
    requests = served(together, requests)
    histories: dict[int, list[int]] = {}
    for harness in (together, apart):
        if setup:
            assert all(r["ok"] for r in harness.forward(served(harness, setup)))
    if setup:
        prefixes(setup, histories)
    got = together.forward(requests)
    want = [apart.forward([request])[0] for request in requests]
    same(got, want)
    check_plain_forward(model, requests, got, histories)


# ---------------------------------------------------------------------------------------------- property

# Runs (protocol 1.1): greedy ones, which engines chain themselves, and ones sampled a token at a time.
RUNS = {"greedy-run": {"type": "greedy", "max_tokens": 4},
        "stop-run": {"type": "greedy", "max_tokens": 5, "stop_token_ids": [16, 43]},
        "zero-temperature-run": {"type": "multinomial", "temperature": 0.0, "seed": 2, "max_tokens": 3},
        "seeded-run": {"type": "top_k", "top_k": 5, "temperature": 0.8, "seed": 11, "max_tokens": 3,
                       "stop_token_ids": [16]},
        "logprobs-run": {"type": "greedy", "max_tokens": 3, "return_logprobs": True}}
# One forward: entries (context, move, size, sampler kind, token seed); a fork may come before it.
ENTRY = st.tuples(st.integers(0, 2), st.sampled_from(["follow", "follow", "extend", "rollback"]),
                  st.integers(1, 3), st.sampled_from(["greedy", "greedy", "dist", "seeded", "none", *RUNS]),
                  st.integers(0, 499))
FORK = st.none() | st.tuples(st.integers(0, 2), st.integers(0, 2), st.integers(0, 3))
FORWARDS = st.lists(st.tuples(FORK, st.lists(ENTRY, min_size=1, max_size=3)), min_size=2, max_size=4)


@pytest.fixture(scope="module")
def engine_pairs(tiny_model, model):
    """Per engine path, a maker of fresh (forwarded together, forwarded apart) harness pairs."""
    config = reference_config(tiny_model, 4)
    info = read_model_info(config)
    batched = lambda: CoreHarness(config, BatchedReferenceEngine(model, "cpu", info, slots=3,  # noqa: E731
                                                                 version="test", overlap=True))
    plain = lambda: CoreHarness(config, ReferenceEngine(model, "cpu", info))  # noqa: E731
    return {"batched-overlap": lambda: (batched(), batched(), plain()),
            "per-context": lambda: (plain(), plain(), None)}


def sampler_for(kind: str, at: int) -> list[dict[str, Any]]:
    if kind in RUNS:
        return [{"at": at, **RUNS[kind]}]
    return {"greedy": [{"at": at, "type": "greedy"}], "dist": [{"at": at, "type": "dist", "k": 3}],
            "seeded": [{"at": at, "type": "multinomial", "temperature": 0.8, "seed": 11}], "none": []}[kind]


def merge(history: list[int], start: int, tokens: list[int]) -> None:
    """The protocol's merge (§6): a token equal to the one at its position changes nothing, another one
    cuts the history there."""
    for position, token in enumerate(tokens, start):
        if position < len(history) and history[position] == token:
            continue
        del history[position:]
        history.append(token)


@pytest.mark.parametrize("path", ["batched-overlap", "per-context"])
@settings(deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(forwards=FORWARDS)
@example(forwards=[(None, [(0, "extend", 3, "greedy", 1), (0, "rollback", 2, "greedy", 2)]),
                   (None, [(0, "follow", 1, "greedy", 0), (0, "rollback", 1, "dist", 3)])])
@example(forwards=[(None, [(0, "follow", 1, "greedy", 0)]),  # a run, then an append to its context
                   (None, [(0, "follow", 1, "greedy", 0), (0, "follow", 1, "greedy-run", 0),
                           (0, "follow", 1, "greedy", 0)])])
def test_a_context_named_several_times_answers_as_consecutive_forwards(engine_pairs, path, forwards):
    """Random forwards naming contexts several times, with rollbacks, forks and lookahead between them:
    the replies equal those of sending each entry in a forward of its own, and the plain engine's."""
    together, apart, plain = engine_pairs[path]()
    histories: dict[int, list[int]] = {}
    last: dict[int, list[int]] = {}
    for fork, entries in forwards:
        if fork is not None and histories.get(fork[0]):
            src, dst, cut = fork
            length = max(0, len(histories[src]) - cut)
            for harness in (together, apart, plain):
                if harness is not None:
                    harness.core.fork(Fork(src, dst, length))
            histories[dst] = histories[src][:length]
            last.pop(dst, None)
        requests, refused = [], []
        for context, move, size, kind, seed in entries:
            history = histories.setdefault(context, [])
            back = size if move == "rollback" and len(history) > 1 else -1
            start = max(0, len(history) - 1 - back) if back >= 0 else len(history)
            if move == "follow" and context in last and start == len(history):
                tokens = last[context][:size]  # a run's tokens fed back, as many as the host keeps
            else:
                tokens = [(seed + 37 * i) % 500 + 1 for i in range(size if history else size + 1)]
            merge(history, start, tokens)
            # A rollback to the tokens already there cuts nothing: a run not at the end is BAD_REQUEST.
            refused.append(kind in RUNS and start + len(tokens) < len(history))
            requests.append({"context": context, "tokens": tokens, "positions": list(range(start, start + len(tokens))),
                             "samplers": sampler_for(kind, len(tokens) - 1)})
        got = together.forward(requests)
        same(got, [apart.forward([request])[0] for request in requests])
        if plain is not None:
            same(got, plain.forward(requests))
        for request, reply, bad in zip(requests, got, refused, strict=True):
            assert reply["ok"] is not bad, reply
            last.pop(request["context"], None)
            outputs = reply.get("outputs")
            if outputs and "token" in outputs[-1]:
                last[request["context"]] = [outputs[-1]["token"]]
            elif outputs and "tokens" in outputs[-1]:
                last[request["context"]] = outputs[-1]["tokens"]
