"""Stochastic tokens for many rows at once: one batched filter and one inverse-CDF draw per step.

Every stochastic token sampler goes through `draw_tokens`, whether its engine hands it one row or a whole
decode step, so a row's token never depends on which other rows shared its step. A row's draw is fixed by
its seed: the seed gives one uniform number (splitmix64, so seeding costs no generator), and the token is
the first whose cumulative probability reaches it, over the vocabulary in id order.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import torch

from pie_driver_trtllm.sampler import Sampler

_MASK64 = (1 << 64) - 1
_SMALLEST_BAR = float(torch.finfo(torch.float32).tiny)  # below any top token's probability (>= 1 / vocab)
_unseeded = random.Random()


def seed_uniform(seed: int | None) -> float:
    """A uniform number in (0, 1] fixed by `seed` (53 bits); a fresh one when `seed` is None."""
    z = (_unseeded.getrandbits(64) if seed is None else seed + 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (((z ^ (z >> 31)) >> 11) + 1) / float(1 << 53)


def filtered_probs(logits: torch.Tensor, samplers: Sequence[Sampler]) -> torch.Tensor:
    """Each row's sampling distribution, float32 [rows, vocab]: softmax(logits / T) over the tokens that
    its top_k, top_p and min_p keep, renormalised. Rows are token samplers with a temperature above 0."""
    vocab = logits.shape[1]
    device = logits.device

    def column(values: list[float]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.float32).to(device, non_blocking=True)[:, None]

    logits = logits.float()
    scores = logits / column([s.temperature for s in samplers])
    # top_k and top_p rank tokens by their logits: dividing by a huge temperature can round distinct
    # scores to one value in float32 (to 0 past 3.4e38), and the rank must not change with it.
    ks = [s.top_k if 0 < s.top_k < vocab else 0 for s in samplers]
    if any(ks):
        top = torch.topk(logits, max(ks), dim=1).values
        kth = top.gather(1, torch.tensor([max(k, 1) - 1 for k in ks]).to(device, non_blocking=True)[:, None])
        kth = kth.masked_fill(column([0.0 if k else 1.0 for k in ks]).bool(), float("-inf"))
        scores = scores.masked_fill(logits < kth, float("-inf"))
    if any(s.top_p < 1.0 for s in samplers):
        order = torch.sort(logits, dim=1, descending=True, stable=True).indices  # ties in id order
        probs = torch.softmax(scores.gather(1, order), dim=1)
        # A token goes when the tokens above it already hold top_p; the top one always stays. Rows
        # without top_p get an infinite bar. A top_p below float32's smallest normal would round to 0
        # and drop the top token too; raised to it, the bar still keeps the top token alone, as top_p does.
        bars = column([max(s.top_p, _SMALLEST_BAR) if s.top_p < 1.0 else float("inf") for s in samplers])
        drop = torch.zeros_like(probs, dtype=torch.bool).scatter(1, order, probs.cumsum(dim=1) - probs >= bars)
        scores = scores.masked_fill(drop, float("-inf"))
    if any(s.min_p > 0.0 for s in samplers):
        probs = torch.softmax(scores, dim=1)
        floor = column([s.min_p for s in samplers]) * probs.max(dim=1, keepdim=True).values
        scores = scores.masked_fill(probs < floor, float("-inf"))
    return torch.softmax(scores, dim=1)


def draw_tokens(logits: torch.Tensor, samplers: Sequence[Sampler], seeds: Sequence[int | None]) -> list[int | None]:
    """One token per row of float logits [rows, vocab] (stochastic token samplers only); None for a row
    whose logits hold NaN or infinite values, which fails that row alone. One device-to-host read."""
    probs = filtered_probs(logits, samplers)
    finite = torch.isfinite(probs).all(dim=1)
    cdf = torch.nan_to_num(probs.double(), nan=0.0).cumsum(dim=1)
    uniforms = torch.tensor([seed_uniform(seed) for seed in seeds], dtype=torch.float64)
    targets = uniforms.to(logits.device, non_blocking=True)[:, None] * cdf[:, -1:]
    picked = torch.searchsorted(cdf, targets).clamp_(max=logits.shape[1] - 1)[:, 0]
    tokens, ok = torch.stack((picked, finite.long())).tolist()
    return [token if good else None for token, good in zip(tokens, ok, strict=True)]
