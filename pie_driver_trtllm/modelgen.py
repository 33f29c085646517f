"""Random-weight Llama checkpoints from a fixed seed, so demos, tests and benchmarks need no download."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

# Shapes: `tiny` for unit tests, `small` for the demo, `1b` matches TinyLlama-1.1B for GPU benchmarks.
SIZES: dict[str, dict[str, Any]] = {
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=512, max_position_embeddings=2048),
    "small": dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=8,
                  num_key_value_heads=4, vocab_size=4096, max_position_embeddings=4096),
    # head size 64 in bf16: what TensorRT-LLM's attention kernels serve (selftest)
    "selftest": dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, vocab_size=1024, max_position_embeddings=2048),
    "1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
               num_key_value_heads=4, vocab_size=32000, max_position_embeddings=2048),
}
# A wider init than Llama's 0.02 gives peaked next-token distributions, so greedy argmax margins are far
# above float rounding and the same prefix gives the same token however its KV was computed.
INIT_RANGE = 0.1


def make_model(directory: str | Path, size: str = "tiny", seed: int = 0, dtype: str = "float32",
               max_position_embeddings: int | None = None) -> Path:
    """Write a random-weight LlamaForCausalLM checkpoint to `directory` and return its path.

    `max_position_embeddings` overrides the size's context length (the history benchmark needs 8K+).
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    if size not in SIZES:
        raise ValueError(f"size {size!r} is not one of {', '.join(SIZES)}")
    out = Path(directory)
    marker = out / "pie-make-model.json"
    recipe: dict[str, Any] = {"size": size, "seed": seed, "dtype": dtype, "init_range": INIT_RANGE}
    shape = dict(SIZES[size])
    if max_position_embeddings is not None:
        recipe["max_position_embeddings"] = shape["max_position_embeddings"] = max_position_embeddings
    if marker.exists() and json.loads(marker.read_text()) == recipe:
        return out  # same recipe, same weights: nothing to do
    config = LlamaConfig(**shape, initializer_range=INIT_RANGE, bos_token_id=1, eos_token_id=2,
                         pad_token_id=0, tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(getattr(torch, dtype))
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    marker.write_text(json.dumps(recipe))
    return out


def parameter_count(size: str) -> int:
    c = SIZES[size]
    h, i, n, v = c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"], c["vocab_size"]
    kv = h // c["num_attention_heads"] * c["num_key_value_heads"]
    per_layer = 2 * h * h + 2 * h * kv + 3 * h * i + 2 * h
    return n * per_layer + 2 * v * h + h
