"""n samples of one prompt share its KV: counted by the engine's `prompt_tokens_computed`, never by time.

Every scenario runs on both reference paths (the batched slot cache and the per-context transformers path)
and checks two things: the prompt is computed once however the samples reach their first step, and every
sample's outputs equal those of a context that computed the same history on its own.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from transformers import AutoModelForCausalLM
from trtllm_support import CoreHarness

from pie_driver_trtllm.config import parse_config
from pie_driver_trtllm.engines.model_facts import read_model_info
from pie_driver_trtllm.engines.reference.batched import BatchedReferenceEngine
from pie_driver_trtllm.engines.reference.engine import ReferenceEngine
from pie_driver_trtllm.wire.codec import Fork, Release

PROMPT = [(5 * i + 3) % 200 + 2 for i in range(24)]
L = len(PROMPT)


@pytest.fixture(scope="module")
def make(tiny_model):
    """make(path, slots=8, overlap=False): a fresh engine of that path in a core (lookahead off)."""
    config = parse_config({"model": {"snapshot_dir": str(tiny_model)},
                           "driver": {"device": ["cpu"], "activation_dtype": "float32",
                                      "options": {"engine": "reference", "lookahead_tokens": 1}}})
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    info = read_model_info(config)

    def build(path: str, slots: int = 8, overlap: bool = False) -> CoreHarness:
        engine = BatchedReferenceEngine(model, "cpu", info, slots=slots, version="test", overlap=overlap) \
            if path == "batched" else ReferenceEngine(model, "cpu", info)
        return CoreHarness(config, engine)

    return build


def computed(harness: CoreHarness) -> int:
    return harness.core.stats()["engine"]["prompt_tokens_computed"]


def sampler(seed: int) -> dict:
    return {"at": 0, "type": "multinomial", "temperature": 0.9, "seed": seed}


def first_step(contexts, length=L, token=PROMPT[-1], seed=0) -> list[dict]:
    """Each sample's first forward: the prompt's last token again (a no-op merge) with its own sampler."""
    return [{"context": c, "tokens": [token], "positions": [length - 1], "samplers": [sampler(seed + c)]}
            for c in contexts]


def decode(harness: CoreHarness, requests: list[dict], steps: int) -> dict[int, list[int]]:
    """Feed each context its token `steps` times (seeded samplers); every context's tokens."""
    made: dict[int, list[int]] = {r["context"]: [] for r in requests}
    for step in range(steps):
        results = harness.forward(requests)
        assert all(r["ok"] for r in results), results
        requests = [{"context": r["context"], "tokens": [out["outputs"][0]["token"]],
                     "positions": [r["positions"][-1] + 1], "samplers": [sampler(1000 * step + r["context"])]}
                    for r, out in zip(requests, results, strict=True)]
        for r, out in zip(requests, results, strict=True):
            made[r["context"]].append(out["outputs"][0]["token"])
    return made


def alone(make, path: str, history: list[int], first: dict, steps: int) -> list[int]:
    """What one context with this history makes on an engine of its own (nothing shared)."""
    harness = make(path)
    request = {**first, "tokens": history, "positions": list(range(len(history)))}
    request["samplers"] = [{**first["samplers"][0], "at": len(history) - 1}]
    return decode(harness, [request], steps)[first["context"]]


def prompt(harness: CoreHarness, context: int, computed_now: bool) -> None:
    """The prompt into `context`: with a sampler at its end (the engine computes it now), or as a plain
    prefill chunk (the driver only merges it; nothing is computed until a sampler asks)."""
    request = {"context": context, "tokens": PROMPT, "positions": list(range(L))}
    if computed_now:
        request["samplers"] = [{"at": L - 1, "type": "greedy"}]
    assert harness.forward([request])[0]["ok"]


PATHS = ["batched", "per_context"]


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("computed_now", [True, False], ids=["prompt_computed", "prompt_merged_only"])
def test_samples_forked_from_one_prompt_compute_it_once(make, path, computed_now):
    harness = make(path)
    prompt(harness, 0, computed_now)
    samples = range(1, 5)
    for c in samples:
        harness.core.fork(Fork(0, c, L))
    made = decode(harness, first_step(samples), 3)
    assert computed(harness) == L  # the prompt once; every sample's first token re-ran as a decode
    for c in samples:
        assert made[c] == alone(make, path, PROMPT, first_step([c])[0], 3)


@pytest.mark.parametrize("path", PATHS)
def test_a_different_token_at_the_fork_point_costs_no_prefill(make, path):
    harness = make(path)
    prompt(harness, 0, True)
    harness.core.fork(Fork(0, 1, L))
    other = (PROMPT[-1] + 1) % 200
    made = decode(harness, first_step([1], token=other), 3)  # a rollback of the last prompt token
    assert computed(harness) == L
    assert made[1] == alone(make, path, [*PROMPT[:-1], other], first_step([1], token=other)[0], 3)


@pytest.mark.parametrize("path", PATHS)
def test_a_fork_of_a_fork_shares_the_prompt_and_the_samples_tokens(make, path):
    harness = make(path)
    prompt(harness, 0, True)
    harness.core.fork(Fork(0, 1, L))
    made = decode(harness, first_step([1]), 4)[1]
    harness.core.fork(Fork(1, 2, L + 2))  # the prompt and the first two sampled tokens
    history = [*PROMPT, *made[:2]]
    later = first_step([2], length=L + 2, token=history[-1], seed=50)
    again = decode(harness, later, 3)[2]
    assert computed(harness) == L
    assert again == alone(make, path, history, later[0], 3)


def test_a_fork_of_an_evicted_context_shares_once_its_samples_run(make):
    """Two slots: the prompt's context loses its slot before the fork, so the fork copies nothing; the
    samples' first step then computes the prompt once for all of them."""
    harness = make("batched", slots=3)
    prompt(harness, 0, True)
    for other in (10, 11, 12):  # three other contexts take the three slots
        assert harness.forward([{"context": other, "tokens": [other, 4, 5], "positions": [0, 1, 2],
                                 "samplers": [{"at": 2, "type": "greedy"}]}])[0]["ok"]
    assert harness.engine.slot_index(0) is None
    harness.core.release(Release((10, 11, 12)))
    for c in (1, 2, 3):
        harness.core.fork(Fork(0, c, L))
    before = computed(harness)
    made = decode(harness, first_step([1, 2, 3]), 3)
    assert computed(harness) - before == L
    for c in (1, 2, 3):
        assert made[c] == alone(make, "batched", PROMPT, first_step([c])[0], 3)


@pytest.mark.parametrize("path", PATHS)
def test_forks_of_two_prompts_first_stepped_beside_a_decode_loop(make, path):
    """Samples of two prompts (neither computed yet) take their first step in one forward with a context
    that is decoding: each prompt is computed once, and the decoding context is not disturbed."""
    harness = make(path)
    second = [t + 1 for t in PROMPT[:20]]
    harness.forward([{"context": 0, "tokens": PROMPT, "positions": list(range(L))},
                     {"context": 100, "tokens": second, "positions": list(range(20))}])
    loop = [{"context": 50, "tokens": [9, 8, 7], "positions": [0, 1, 2], "samplers": [{**sampler(50), "at": 2}]}]
    first = harness.forward(loop)[0]["outputs"][0]["token"]
    for c in (1, 2):
        harness.core.fork(Fork(0, c, L))
    for c in (101, 102):
        harness.core.fork(Fork(100, c, 20))
    before = computed(harness)
    requests = [{"context": 50, "tokens": [first], "positions": [3], "samplers": [sampler(51)]},
                *first_step([1, 2]), *first_step([101, 102], length=20, token=second[-1])]
    made = decode(harness, requests, 3)
    assert computed(harness) - before == L + 20
    assert made[50] == alone(make, path, [9, 8, 7, first], requests[0], 3)
    assert made[101] == alone(make, path, second, requests[3], 3)


def test_forks_while_a_step_is_run_ahead(make):
    """A decode loop served from steps launched ahead; a fork of one of its contexts, copied while the
    source's next step is already launched, joins the loop without a prefill, the loop is served ahead
    again, and every output equals the plain engine's."""
    harness, plain = make("batched", overlap=True), make("per_context")
    requests = [{"context": c, "tokens": [*PROMPT[:10], c], "positions": list(range(11)),
                 "samplers": [{"at": 10, "type": "greedy"}]} for c in (0, 1)]
    for _ in range(4):
        got = harness.forward(requests)
        assert got == plain.forward(requests)
        requests = [{"context": r["context"], "tokens": [g["outputs"][0]["token"]],
                     "positions": [r["positions"][-1] + 1], "samplers": [{"at": 0, "type": "greedy"}]}
                    for r, g in zip(requests, got, strict=True)]
    assert harness.engine.ahead_launches >= 1
    length = requests[0]["positions"][0]
    before, hits = computed(harness), harness.engine.ahead_hits
    for harness_ in (harness, plain):
        harness_.core.fork(Fork(0, 7, length))
    requests.append({**requests[0], "context": 7})
    for _ in range(4):
        got = harness.forward(requests)
        assert got == plain.forward(requests)
        requests = [{**r, "tokens": [g["outputs"][0]["token"]], "positions": [r["positions"][0] + 1]}
                    for r, g in zip(requests, got, strict=True)]
    assert computed(harness) == before
    assert harness.engine.ahead_hits > hits


# Moves on a family of contexts that share prefixes: fork (at any length), a fresh context sent a prefix
# of another's history, a rollback, a step that feeds every context one token.
MOVES = st.lists(st.tuples(st.sampled_from(["fork", "fresh", "rollback", "step"]), st.integers(0, 7),
                           st.integers(0, 40)), min_size=4, max_size=10)


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(moves=MOVES)
@example(moves=[("fresh", 0, 30), ("fresh", 1, 30), ("step", 0, 0), ("fork", 1, 10), ("step", 0, 0)])
def test_shared_prefixes_never_change_an_output(make, moves):
    """The batched path with three slots (evictions) against the per-context path: the same outputs."""
    sides = (make("batched", slots=3), make("per_context"))
    histories: dict[int, list[int]] = {0: list(PROMPT)}
    for side in sides:
        side.forward([{"context": 0, "tokens": PROMPT, "positions": list(range(L))}])
    for move, pick, value in moves:
        source = sorted(histories)[pick % len(histories)]
        history = histories[source]
        if move == "fork" or move == "fresh":
            new = max(histories) + 1
            length = max(1, value % (len(history) + 1))
            if move == "fork":
                for side in sides:
                    side.core.fork(Fork(source, new, length))
            else:
                for side in sides:
                    side.forward([{"context": new, "tokens": history[:length], "positions": list(range(length))}])
            histories[new] = history[:length]
            continue
        if move == "rollback" and len(history) > 2:
            cut = value % (len(history) - 1) + 1
            del history[cut:]
            history.append((value + 11) % 200 + 1)
        requests = [{"context": c, "tokens": h[-1:], "positions": [len(h) - 1],
                     "samplers": [{"at": 0, "type": "dist", "k": 4}, {"at": 0, "type": "greedy"}]}
                    for c, h in histories.items()]
        got, want = (side.forward(requests) for side in sides)
        for g, w, h in zip(got, want, histories.values(), strict=True):
            assert g["ok"] and w["ok"]
            assert g["outputs"][1] == w["outputs"][1]
            assert g["outputs"][0]["dist"][0] == w["outputs"][0]["dist"][0]
            assert g["outputs"][0]["dist"][1] == pytest.approx(w["outputs"][0]["dist"][1], rel=1e-4)
            h.append(g["outputs"][1]["token"])
        for side in sides:  # the sampled tokens enter the histories
            side.forward([{"context": c, "tokens": h[-1:], "positions": [len(h) - 1]} for c, h in histories.items()])


@pytest.mark.parametrize("path", PATHS)
def test_a_new_context_sent_a_resident_prompt_copies_it(make, path):
    """No fork at all: a context whose history starts with what another one holds copies that prefix."""
    harness = make(path)
    prompt(harness, 0, True)
    request = {"context": 1, "tokens": [*PROMPT, 7], "positions": list(range(L + 1)), "samplers": [sampler(3)]}
    request["samplers"][0]["at"] = L
    made = decode(harness, [request], 2)[1]
    assert computed(harness) == L  # the prompt once; 7 runs as a one-token step
    assert made == alone(make, path, [*PROMPT, 7], request, 2)
