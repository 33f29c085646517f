"""Turning one row of logits into what a sampler asks for (torch; shared by torch-based engines)."""

from __future__ import annotations

from typing import Any

import torch

from pie_driver_trtllm.engines.token_draws import draw_tokens, filtered_probs
from pie_driver_trtllm.sampler import Sampler


def sample_token(logits: torch.Tensor, sampler: Sampler, seed: int | None) -> int:
    """A token from a 1-D float32 logits row: argmax when greedy, else the seeded draw of `draw_tokens`."""
    if sampler.is_greedy:
        return int(torch.argmax(logits))
    token = draw_tokens(logits[None], [sampler], [seed])[0]
    if token is None:
        raise FloatingPointError("the logits row holds NaN or infinite values")
    return token


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


def sampled_logprob(logits: torch.Tensor, sampler: Sampler, token: int) -> float:
    """The log-probability of `token`, as `sampler.logprob_mode` defines it.

    "raw": log-softmax of the logits. "processed": log of the probability the sampler drew `token` with,
    softmax(logits / T) over the tokens its filters keep (those `filtered_probs` keeps), renormalised; a
    greedy sampler draws from no distribution of its own, so there it is "raw". Computed in float64 from
    the logits minus their largest, as a `logprobs` sampler is.
    """
    if sampler.logprob_mode == "raw" or sampler.is_greedy:
        value = torch.log_softmax(_scaled(logits, 1.0), dim=-1)[token]
    else:
        dropped = filtered_probs(logits[None], [sampler])[0] == 0.0
        value = torch.log_softmax(_scaled(logits, sampler.temperature).masked_fill(dropped, float("-inf")),
                                  dim=-1)[token]
    if bool(torch.isnan(value)):  # a NaN or +inf logit makes the whole row NaN
        raise FloatingPointError("the logits row holds NaN or infinite values")
    return float(value)


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
        if sampler.return_logprob or sampler.return_logprobs:
            return RowResult(tokens=[token], token_logprobs=[sampled_logprob(logits, sampler, token)])
        return RowResult(tokens=[token])
    except Exception as exc:
        if isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError":
            raise  # the engine splits the call and retries
        return RowResult(error=f"{type(exc).__name__}: {exc}")


def row_results(logits: torch.Tensor, samplers: list[Sampler], seeds: list[int | None]) -> list[Any]:
    """`row_result` for every row of float logits [rows, vocab], the stochastic tokens drawn in one batch."""
    from pie_driver_trtllm.engines.base import RowResult

    drawn = [i for i, s in enumerate(samplers) if s.makes_token and not s.is_greedy]
    if len(drawn) < 2:
        return [row_result(logits[i], s, seed) for i, (s, seed) in enumerate(zip(samplers, seeds, strict=True))]
    out: list[Any] = [None] * len(samplers)
    try:
        tokens = draw_tokens(logits[drawn], [samplers[i] for i in drawn], [seeds[i] for i in drawn])
    except Exception as exc:
        if isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError":
            raise
        tokens = [f"{type(exc).__name__}: {exc}"] * len(drawn)  # type: ignore[list-item]
    for i, token in zip(drawn, tokens, strict=True):
        sampler = samplers[i]
        if token is None or isinstance(token, str):
            out[i] = RowResult(error=token or "FloatingPointError: the logits row holds NaN or infinite values")
        elif sampler.return_logprob or sampler.return_logprobs:
            out[i] = RowResult(tokens=[token], token_logprobs=[sampled_logprob(logits[i], sampler, token)])
        else:
            out[i] = RowResult(tokens=[token])
    for i, sampler in enumerate(samplers):
        if out[i] is None:
            out[i] = row_result(logits[i], sampler, seeds[i])
    return out
