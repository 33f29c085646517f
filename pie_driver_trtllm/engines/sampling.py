"""Turning one row of logits into what a sampler asks for (torch; shared by torch-based engines)."""

from __future__ import annotations

from typing import Any

import torch

from pie_driver_trtllm.sampler import Sampler


def sample_token(logits: torch.Tensor, sampler: Sampler, seed: int | None) -> int:
    """A token from a 1-D float32 logits row: argmax when greedy, else seeded filtered sampling."""
    if sampler.is_greedy:
        return int(torch.argmax(logits))
    scores = logits / sampler.temperature
    if sampler.top_k and sampler.top_k < scores.numel():
        kth = torch.topk(scores, sampler.top_k).values[-1]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if sampler.top_p < 1.0:
        ordered, order = torch.sort(scores, descending=True)
        cumulative = torch.softmax(ordered, dim=-1).cumsum(dim=-1)
        drop_sorted = cumulative - torch.softmax(ordered, dim=-1) >= sampler.top_p  # keeps at least the top one
        scores = scores.masked_fill(torch.zeros_like(drop_sorted).scatter(0, order, drop_sorted), float("-inf"))
    if sampler.min_p > 0.0:
        probs = torch.softmax(scores, dim=-1)
        scores = scores.masked_fill(probs < sampler.min_p * probs.max(), float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    if not bool(torch.isfinite(probs).all()):  # checked here: on CUDA, multinomial would assert on the device
        raise FloatingPointError("the logits row holds NaN or infinite values")
    generator = torch.Generator(device=logits.device)
    generator.manual_seed(seed if seed is not None else int(torch.seed()))
    return int(torch.multinomial(probs, 1, generator=generator))


def top_k_dist(logits: torch.Tensor, sampler: Sampler) -> tuple[list[int], list[float]]:
    probs = torch.softmax(_scaled(logits, sampler.temperature), dim=-1)
    top = torch.topk(probs, sampler.k)
    values = top.values
    if not bool(torch.isfinite(values).all()):
        raise FloatingPointError("the logits row holds NaN or infinite values")
    return top.indices.tolist(), values.tolist()


def token_logprobs(logits: torch.Tensor, sampler: Sampler) -> list[float]:
    logprobs = torch.log_softmax(_scaled(logits, sampler.temperature), dim=-1)
    picked = logprobs[torch.tensor(sampler.token_ids, device=logits.device)]
    if bool(torch.isnan(picked).any()):  # a NaN or +inf logit makes the whole row NaN
        raise FloatingPointError("the logits row holds NaN or infinite values")
    return picked.tolist()


def _scaled(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """(logits - max) / T in float64: no temperature above 0 overflows it, so the softmax never turns to NaN
    (at a tiny T the values that are not the largest fall to -inf, and the largest keeps probability 1)."""
    wide = logits.double()
    return (wide - wide.max()) / temperature


def emitted_logprob(logits: torch.Tensor, sampler: Sampler, token: int) -> float:
    """log p(token) under softmax(logits / T), T the sampler's temperature (1 for greedy), before filtering."""
    temperature = sampler.temperature if sampler.temperature > 0 else 1.0
    return float(torch.log_softmax(logits.float() / temperature, dim=-1)[token])


def row_result(logits: torch.Tensor, sampler: Sampler, seed: int | None) -> Any:
    """The RowResult for one sampler from its logits row; a failure is this row's alone."""
    from pie_driver_trtllm.engines.base import RowResult

    try:
        if sampler.type == "dist":
            ids, probs = top_k_dist(logits, sampler)
            return RowResult(dist=(ids, probs))
        if sampler.type == "logprobs":
            return RowResult(logprobs=token_logprobs(logits, sampler))
        token = sample_token(logits, sampler, seed)
        if sampler.return_logprobs:
            return RowResult(tokens=[token], token_logprobs=[emitted_logprob(logits, sampler, token)])
        return RowResult(tokens=[token])
    except Exception as exc:
        if isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError":
            raise  # the engine splits the call and retries
        return RowResult(error=f"{type(exc).__name__}: {exc}")
