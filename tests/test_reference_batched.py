"""The batched reference engine agrees with the per-context transformers path, op for op."""

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


@pytest.fixture(scope="module")
def engines(tiny_model):
    config = parse_config({"model": {"snapshot_dir": str(tiny_model)},
                           "driver": {"device": ["cpu"], "activation_dtype": "float32",
                                      "options": {"engine": "reference", "lookahead_tokens": 4}}})
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    info = read_model_info(config)
    loaded = ReferenceEngine.load(config, "cpu")
    assert isinstance(loaded, BatchedReferenceEngine)  # Llama checkpoints take the batched path

    def make():
        batched = BatchedReferenceEngine(model, "cpu", info, slots=3, version="test")  # 3 slots: evictions
        return CoreHarness(config, batched), CoreHarness(config, ReferenceEngine(model, "cpu", info))

    return make


OPS = st.lists(st.tuples(st.sampled_from(["decode", "rollback", "fork", "prefill", "dist"]),
                         st.integers(0, 5), st.integers(1, 400)), min_size=5, max_size=14)


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=OPS)
def test_batched_and_per_context_paths_agree(engines, ops):
    batched, plain = engines()
    histories: dict[int, list[int]] = {}
    for op, context, value in ops:
        history = histories.setdefault(context, [])
        if op == "fork" and history:
            dst = (context + 1) % 6
            for harness in (batched, plain):
                harness.core.fork(Fork(context, dst, len(history) // 2))
            histories[dst] = history[: len(history) // 2]
            continue
        if op == "rollback" and len(history) > 2:
            del history[len(history) // 2:]
        start = len(history)
        new = [value] if history and op in ("decode", "rollback") else [value, value % 7 + 1, 3]
        history.extend(new)
        sampler = {"at": len(new) - 1, "type": "dist", "k": 3} if op == "dist" else \
            {"at": len(new) - 1, "type": "greedy"}
        request = [{"context": context, "tokens": new, "positions": list(range(start, start + len(new))),
                    "samplers": [sampler]}]
        got, want = batched.forward(request)[0], plain.forward(request)[0]
        if op == "dist":
            assert got["outputs"][0]["dist"][0] == want["outputs"][0]["dist"][0]
            assert got["outputs"][0]["dist"][1] == pytest.approx(want["outputs"][0]["dist"][1], rel=1e-4)
        else:
            assert got == want
            history.append(got["outputs"][0]["token"])
            for harness in (batched, plain):  # keep both histories in step with the appended token
                harness.forward([{"context": context, "tokens": [history[-1]], "positions": [len(history) - 1]}])


class DecodeLoop:
    """Two harnesses fed the same forwards, every reply compared; then each context is fed the token it
    was given (with `sampler`), as a host's decode loop does. Contexts start with a 3-token prompt."""

    def __init__(self, batched, plain, contexts, sampler=None) -> None:
        self.batched, self.plain = batched, plain
        self.sampler = sampler or {"at": 0, "type": "greedy"}
        self.histories: dict[int, list[int]] = {}
        self.requests = [{"context": c, "tokens": [c + 2, c + 3, c + 4], "positions": [0, 1, 2],
                          "samplers": [{"at": 2, "type": "greedy"}]} for c in contexts]

    def step(self, requests=None) -> list[dict]:
        """One forward (`requests`, or the loop's next one); the replies, equal on both sides."""
        requests = self.requests if requests is None else requests
        got = self.batched.forward(requests)
        assert got == self.plain.forward(requests)
        self.requests = []
        for request, result in zip(requests, got, strict=True):
            history = self.histories.setdefault(request["context"], [])
            history[request["positions"][0]:] = request["tokens"]
            history.append(result["outputs"][0]["token"])
            self.requests.append({"context": request["context"], "tokens": [history[-1]],
                                  "positions": [len(history) - 1], "samplers": [dict(self.sampler)]})
        return got

    def run(self, steps: int) -> None:
        for _ in range(steps):
            assert all(result["ok"] for result in self.step())


def test_decode_steps_of_several_contexts_run_as_one_batch(engines, monkeypatch):
    batched, plain = engines()
    calls = []
    run = batched.engine.decoder.run
    monkeypatch.setattr(batched.engine.decoder, "run", lambda *a: calls.append(len(a[0])) or run(*a))
    DecodeLoop(batched, plain, range(3), {"at": 0, "type": "multinomial", "temperature": 0.0}).run(4)
    assert calls and calls[0] == 3  # the three contexts' decode rows went through one call


def test_prefills_of_several_contexts_run_as_one_forward(engines, monkeypatch):
    batched, plain = engines()
    calls = []
    prefill_many = batched.engine.decoder.prefill_many
    monkeypatch.setattr(batched.engine.decoder, "prefill_many",
                        lambda *a: calls.append(len(a[0])) or prefill_many(*a))
    # New contexts with prompts of different lengths, one asking for lookahead (greedy at the end)...
    first = [{"context": 1, "tokens": [5, 6, 7, 8, 9], "positions": list(range(5)),
              "samplers": [{"at": 4, "type": "greedy"}]},
             {"context": 2, "tokens": [11, 12], "positions": [0, 1], "samplers": [{"at": 1, "type": "greedy"}]},
             {"context": 3, "tokens": [4, 3, 2], "positions": [0, 1, 2],
              "samplers": [{"at": 2, "type": "dist", "k": 3}]}]
    got, want = batched.forward(first), plain.forward(first)
    assert [r["outputs"][0].get("token") for r in got] == [r["outputs"][0].get("token") for r in want]
    assert got[2]["outputs"][0]["dist"][0] == want[2]["outputs"][0]["dist"][0]
    # ...then chunks continuing two of them, and one rolled back into the middle of its history.
    second = [{"context": 1, "tokens": [20, 21, 22], "positions": [5, 6, 7], "samplers": [{"at": 2, "type": "greedy"}]},
              {"context": 2, "tokens": [30, 31, 32, 33], "positions": [1, 2, 3, 4],
               "samplers": [{"at": 3, "type": "greedy"}]}]
    assert batched.forward(second) == plain.forward(second)
    assert calls == [3, 2]


@pytest.fixture(scope="module")
def overlap_engines(tiny_model):
    """A batched engine that runs the predicted next decode step ahead (forced on, on CPU), and the plain
    per-context engine; lookahead off, so every greedy token is an engine step."""
    config = parse_config({"model": {"snapshot_dir": str(tiny_model)},
                           "driver": {"device": ["cpu"], "activation_dtype": "float32",
                                      "options": {"engine": "reference", "lookahead_tokens": 1}}})
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    info = read_model_info(config)

    def make():
        batched = BatchedReferenceEngine(model, "cpu", info, slots=4, version="test", overlap=True)
        return CoreHarness(config, batched), CoreHarness(config, ReferenceEngine(model, "cpu", info))

    return make


LOOP_MOVES = st.lists(st.lists(st.sampled_from(["follow", "follow", "follow", "other", "rollback", "skip",
                                                "sample", "release", "fork"]),
                               min_size=3, max_size=6), min_size=6, max_size=16)


@settings(deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(moves=LOOP_MOVES)
# Two forks make five contexts for four slots; a step that feeds all five once lost a slot mid-step.
@example(moves=[["follow", "follow", "fork"]] * 2 + [["skip"] * 3] + [["follow"] * 3] * 3)
def test_running_ahead_never_changes_a_result(overlap_engines, moves):
    """A decode loop of three contexts, perturbed at random: every reply equals the plain engine's, and
    the steps the loop predicted were served from the step run ahead."""
    batched, plain = overlap_engines()
    histories = {c: [c + 3, c + 4, c + 5] for c in range(3)}
    last = {}
    requests = [{"context": c, "tokens": list(h), "positions": [0, 1, 2], "samplers": [{"at": 2, "type": "greedy"}]}
                for c, h in histories.items()]
    for step_moves in [["follow"] * 3] * 3 + moves:
        got, want = batched.forward(requests), plain.forward(requests)
        assert got == want
        for request, result in zip(requests, got, strict=True):
            histories[request["context"]][request["positions"][0]:] = request["tokens"]
            last[request["context"]] = result["outputs"][0]["token"]
        requests = []
        for context, move in zip(list(histories), step_moves, strict=False):
            history = histories[context]
            if move == "skip":
                continue
            if move == "release":
                for harness in (batched, plain):
                    harness.core.release(Release((context,)))
                del histories[context]
                context = max(histories, default=0) + 10
                histories[context] = history = []
                tokens, start = [context % 50 + 1, 7], 0
            elif move == "fork":
                dst = max(histories) + 10
                for harness in (batched, plain):
                    harness.core.fork(Fork(context, dst, len(history)))
                histories[dst] = list(history)
                tokens, start, context = [last[context]], len(history), dst
            elif move == "rollback" and len(history) > 3:
                start = len(history) - 2
                tokens = [9, last[context]]
            else:
                start = len(history)
                tokens = [last[context] if move in ("follow", "sample") else (last[context] + 1) % 60]
            sampler = {"at": len(tokens) - 1, "type": "greedy"} if move != "sample" else \
                {"at": len(tokens) - 1, "type": "multinomial", "temperature": 0.7, "seed": 5}
            requests.append({"context": context, "tokens": tokens, "positions": list(range(start, start + len(tokens))),
                             "samplers": [sampler]})
        if not requests:
            requests = [{"context": c, "tokens": [last[c]], "positions": [len(h)],
                         "samplers": [{"at": 0, "type": "greedy"}]} for c, h in histories.items() if c in last]
    engine = batched.engine
    assert engine.ahead_hits <= engine.ahead_launches
    assert engine.ahead_launches >= 1  # the three unperturbed steps at the start launch one at least


def test_a_steady_decode_loop_is_served_from_the_step_run_ahead(overlap_engines, monkeypatch):
    batched, plain = overlap_engines()
    calls = []
    run = batched.engine.decoder.run
    monkeypatch.setattr(batched.engine.decoder, "run", lambda *a: calls.append(list(a[2])) or run(*a))
    loop = DecodeLoop(batched, plain, range(3))
    loop.run(8)
    histories, requests = loop.histories, loop.requests
    engine = batched.engine
    # Decode steps 1 and 2 run when asked (the second confirms the loop); steps 3..7 were run ahead, each
    # launched by the step before it, and step 7 launched one more.
    assert (engine.ahead_hits, engine.ahead_launches) == (5, 6)
    assert batched.core.stats()["engine"] == {"overlap_launches": 6, "overlap_hits": 5, "prompt_tokens_computed": 9}
    assert sorted(engine.slot_index(c) for c in histories) == [0, 1, 2] and engine.slot_index(99) is None
    assert len(calls) == 2 + 6
    assert calls[-1] == [len(h) - 1 for h in histories.values()]  # the last launch: each context's next position
    # A host that breaks the loop (another token for context 0) gets the right answer, computed afresh.
    requests[0]["tokens"] = [(requests[0]["tokens"][0] + 1) % 60]
    assert batched.forward(requests) == plain.forward(requests)
    assert engine.ahead_hits == 5


def test_a_step_without_decode_rows_still_voids_the_prediction(overlap_engines):
    """Context 0 is rolled back in a step of its own, then sent the token predicted before the rollback
    at the predicted position: its cache changed under the prediction, so the result is computed afresh."""
    batched, plain = overlap_engines()
    loop = DecodeLoop(batched, plain, range(2))
    loop.run(4)
    requests = loop.requests
    launched = batched.engine.ahead_launches
    assert launched >= 1
    history = loop.histories[0]
    rollback = [{"context": 0, "tokens": [9, 9], "positions": [len(history) - 2, len(history) - 1],
                 "samplers": [{"at": 1, "type": "greedy"}]}]
    assert batched.forward(rollback) == plain.forward(rollback)
    assert batched.forward(requests) == plain.forward(requests)  # context 0 sends the old predicted token
    assert batched.engine.ahead_launches == launched


def test_a_failing_launch_ahead_costs_nothing_but_the_guess(overlap_engines, monkeypatch):
    batched, plain = overlap_engines()
    run = batched.engine.decoder.run
    calls = []

    def failing_third(*args):
        calls.append(1)
        if len(calls) == 3:  # the launch at the end of the second decode step
            raise RuntimeError("CUDA out of memory (planted by the test)")
        return run(*args)

    monkeypatch.setattr(batched.engine.decoder, "run", failing_third)
    DecodeLoop(batched, plain, range(2)).run(5)
    assert len(calls) >= 3 and batched.engine.ahead_launches >= 1  # it launched again once the loop held


def test_a_context_joining_the_loop_keeps_it_served_ahead(overlap_engines):
    """A new context's prefill in the middle of a decode loop: the loop's rows still take the step run
    ahead, and the newcomer's first decode step is predicted with theirs."""
    batched, plain = overlap_engines()
    loop = DecodeLoop(batched, plain, range(2))
    loop.run(4)
    engine = batched.engine
    hits = engine.ahead_hits
    joining = {"context": 7, "tokens": [9, 8, 7], "positions": [0, 1, 2], "samplers": [{"at": 2, "type": "greedy"}]}
    loop.step([*loop.requests, joining])
    assert engine.ahead_hits == hits + 1  # the loop's two rows came from the step run ahead
    loop.step()
    assert engine.ahead_hits == hits + 2  # all three, the newcomer included
