"""The batched reference engine agrees with the per-context transformers path, op for op."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers import AutoModelForCausalLM
from trtllm_support import CoreHarness

from pie_driver_trtllm.config import parse_config
from pie_driver_trtllm.engines.model_facts import read_model_info
from pie_driver_trtllm.engines.reference import ReferenceEngine
from pie_driver_trtllm.engines.reference_batched import BatchedReferenceEngine
from pie_driver_trtllm.protocol import Fork


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


def test_decode_steps_of_several_contexts_run_as_one_batch(engines, monkeypatch):
    batched, plain = engines()
    calls = []
    run = batched.engine.decoder.run
    monkeypatch.setattr(batched.engine.decoder, "run", lambda *a: calls.append(len(a[0])) or run(*a))
    histories = {c: [c + 2, c + 3, c + 4] for c in range(3)}
    requests = [{"context": c, "tokens": h, "positions": [0, 1, 2], "samplers": [{"at": 2, "type": "greedy"}]}
                for c, h in histories.items()]
    for _ in range(4):
        got = batched.forward(requests)
        assert got == plain.forward(requests)
        requests = []
        for (c, h), result in zip(histories.items(), got, strict=True):
            h.append(result["outputs"][0]["token"])
            requests.append({"context": c, "tokens": [h[-1]], "positions": [len(h) - 1],
                             "samplers": [{"at": 0, "type": "multinomial", "temperature": 0.0}]})
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
