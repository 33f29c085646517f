"""pie_driver_trtllm.benchmarks.replica_scaling: every workload runs on two CPU replicas and counts its tokens right."""

from __future__ import annotations

from pathlib import Path

import pytest

from pie_driver_trtllm.benchmarks import replica_scaling as bench
from pie_driver_trtllm.modelgen import make_model


def test_split_respects_both_caps() -> None:
    limits = bench.Limits(vocab_size=512, max_model_len=128, max_requests=3, max_tokens=100)
    requests = [{"tokens": [1] * n} for n in (40, 40, 40, 1, 1, 1, 1, 100, 1)]
    batches = list(bench.split(requests, limits))
    assert [r for b in batches for r in b] == requests
    assert all(len(b) <= 3 and sum(len(r["tokens"]) for r in b) <= 100 for b in batches)
    assert [len(b) for b in batches] == [2, 3, 2, 1, 1]


def test_mixed_rotates_prefill_over_every_context() -> None:
    work = bench.Workload("mixed", contexts=8, prompt_len=4, steps=4, warmup=0, prefill_fraction=0.25)
    chosen = [work.prefilling(step) for step in range(4)]
    assert all(len(c) == 2 for c in chosen) and set().union(*chosen) == set(range(8))
    assert bench.Workload("decode", 8, 4, 1, 0).prefilling(0) == set()


@pytest.mark.slow
def test_every_workload_runs_on_two_replicas(tmp_path: Path) -> None:
    # A 128-position model and a 100-token forward cap: steps are split into several forwards and
    # contexts pass max_model_len (16 + 48 * 2 = 112, the next chunk would reach 160) and restart.
    model = make_model(tmp_path / "model", "tiny", seed=0, max_position_embeddings=128)
    config = bench.write_config(tmp_path, model, ["cpu", "cpu"], "float32", max_batched_tokens=100)
    contexts, steps, chunk = 6, 4, 48
    workloads = [bench.Workload(name, contexts, prompt_len=16, steps=steps, warmup=1, prefill_tokens=chunk,
                                prefill_fraction=0.5) for name in bench.WORKLOADS]
    results = bench.run(config, workloads)
    assert list(results) == list(bench.WORKLOADS)
    prefilled = {"decode": 0, "prefill": contexts, "mixed": 3}
    for name, result in results.items():
        assert result["tokens_per_s"] > 0 and result["step_ms"] > 0
        assert result["sampled_tokens"] == contexts * steps
        assert result["prompt_tokens"] == prefilled[name] * steps * chunk
        assert result["tokens"] == result["prompt_tokens"] + result["sampled_tokens"]
        # The driver merged exactly what was counted: prefill chunks, plus one fed-back token per decode.
        decoded = (contexts - prefilled[name]) * steps
        assert result["driver_tokens_in"] == result["prompt_tokens"] + decoded
