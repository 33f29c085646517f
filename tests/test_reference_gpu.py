"""The reference engine on a CUDA GPU (runs on the lent GPU machines; skips on CPU-only machines)."""

from __future__ import annotations

import pytest
import torch

from pie_driver_trtllm.config import parse_config
from pie_driver_trtllm.engines.base import Row
from pie_driver_trtllm.engines.reference import ReferenceEngine
from pie_driver_trtllm.protocol import Sampler

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU; none is visible")]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_greedy_on_cuda_matches_cpu_float32(tiny_model, dtype):
    def engine(device: str, activation_dtype: str) -> ReferenceEngine:
        config = parse_config({"model": {"snapshot_dir": str(tiny_model)},
                               "driver": {"device": [device], "activation_dtype": activation_dtype,
                                          "options": {"engine": "reference"}}})
        return ReferenceEngine.load(config, device)

    gpu, cpu = engine("cuda:0", dtype), engine("cpu", "float32")
    greedy = Sampler(type="greedy", at=0, temperature=0.0)
    history = [5, 6, 7, 8]
    for _ in range(24):
        token_gpu = gpu.step([Row(1, history, len(history), greedy)])[0].tokens[0]
        token_cpu = cpu.step([Row(1, history, len(history), greedy)])[0].tokens[0]
        if dtype == "float32":
            assert token_gpu == token_cpu
        history.append(token_cpu)  # both continue from the same history, so a bf16 flip cannot compound
    burst = gpu.step([Row(2, history[:4], 4, greedy, steps=16)])[0].tokens
    if dtype == "float32":
        assert burst == history[4:20]
    assert len(burst) == 16
