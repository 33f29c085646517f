"""Runs on the reference engine on a CUDA GPU: graphs, the greedy chain and the step run ahead (skips on
CPU-only machines)."""

from __future__ import annotations

import pytest
import torch
from test_multitoken import request, sampler
from trtllm_support import CoreHarness

from pie_driver_trtllm.config import parse_config
from pie_driver_trtllm.engines.reference.engine import ReferenceEngine

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU; none is visible")]

CONTEXTS = (1, 2, 3)
PROMPT = [5, 6, 7, 8]


def decode(harness: CoreHarness, kind: str, run: int, total: int) -> dict[int, list[int]]:
    """Every context to `total` tokens, `run` per forward, all contexts in each forward (so the decode
    batch, and with it the kernels, is the same whatever `run` is); seeds per step as documented."""
    made: dict[int, list[int]] = {c: [] for c in CONTEXTS}
    while len(made[1]) < total:
        requests = []
        for c in CONTEXTS:
            tokens = [*PROMPT, c] if not made[c] else made[c][-run:]
            start = 0 if not made[c] else len(PROMPT) + 1 + len(made[c]) - len(tokens)
            extra = {"max_tokens": run} if run > 1 else {}
            requests.append(request(c, tokens, start, sampler(kind, 40 * c + len(made[c]), len(tokens) - 1, **extra)))
        for c, reply in zip(CONTEXTS, harness.forward(requests), strict=True):
            out = reply["outputs"][0]
            made[c] += out["tokens"] if "tokens" in out else [out["token"]]
    return made


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("kind", ["greedy", "top_k", "top_p"])
def test_runs_on_cuda_equal_one_token_forwards(tiny_model, dtype, kind):
    config = parse_config({"model": {"snapshot_dir": str(tiny_model)},
                           "driver": {"device": ["cuda:0"], "activation_dtype": dtype,
                                      "options": {"engine": "reference", "lookahead_tokens": 1}}})
    # One engine each: a shared one would still hold the first loop's KV, and the second loop's first
    # token would then come from a one-token decode over the cached prompt, not from the prefill the
    # first loop ran (other kernels, so in bfloat16 a near-tie may break the other way).
    runs, singles = (decode(CoreHarness(config, ReferenceEngine.load(config, "cuda:0")), kind, run, 32)
                     for run in (16, 1))
    assert runs == singles
