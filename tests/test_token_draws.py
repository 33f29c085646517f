"""Stochastic tokens drawn for many rows at once: the same as one row at a time, from the right distribution."""

from __future__ import annotations

import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from pie_driver_trtllm.engines.sampling import row_results, sample_token
from pie_driver_trtllm.engines.token_draws import draw_tokens, filtered_probs, seed_uniform
from pie_driver_trtllm.sampler import MIN_TEMPERATURE, Sampler

VOCAB = 50


def sampler_strategy() -> st.SearchStrategy[Sampler]:
    return st.builds(
        lambda kind, t, k, p, m: Sampler(kind, 0, temperature=t, top_k=k if "top_k" in kind else 0,
                                         top_p=p if "top_p" in kind else 1.0, min_p=m if kind == "min_p" else 0.0),
        st.sampled_from(["multinomial", "top_k", "top_p", "min_p", "top_k_top_p"]),
        st.one_of(st.floats(0.05, 3.0), st.floats(MIN_TEMPERATURE, 1e30)), st.integers(1, VOCAB + 5),
        st.one_of(st.floats(0.01, 0.99), st.floats(0.0, 1.0, exclude_min=True)),  # all the edge accepts
        st.floats(0.0, 1.0))


def plain_filter(logits: torch.Tensor, sampler: Sampler) -> torch.Tensor:
    """The filters written out for one row, token by token, as the protocol states them."""
    scores, ranks = (logits / sampler.temperature).tolist(), logits.tolist()  # tokens rank by their logits
    keep = set(range(len(scores)))
    if 0 < sampler.top_k < len(scores):
        kth = sorted(ranks, reverse=True)[sampler.top_k - 1]
        keep = {i for i in keep if ranks[i] >= kth}
    if sampler.top_p < 1.0:
        probs = torch.softmax(torch.tensor([scores[i] if i in keep else float("-inf") for i in range(len(scores))]), 0)
        order = sorted(keep, key=lambda i: -ranks[i])
        above, kept = 0.0, set()
        for i in order:
            if above < sampler.top_p:
                kept.add(i)
            above += float(probs[i])
        keep = kept
    if sampler.min_p > 0.0:
        probs = torch.softmax(torch.tensor([scores[i] if i in keep else float("-inf") for i in range(len(scores))]), 0)
        keep = {i for i in keep if float(probs[i]) >= sampler.min_p * float(probs.max())}
    return torch.softmax(torch.tensor([scores[i] if i in keep else float("-inf") for i in range(len(scores))]), 0)


@settings(deadline=None)
@given(st.lists(st.tuples(sampler_strategy(), st.integers(0, 2**64 - 1)), min_size=1, max_size=8),
       st.integers(0, 2**31))
@example([(Sampler("top_p", 0, temperature=1.0, top_p=0.5), 0), (Sampler("top_k", 0, top_k=1), 3)], 0)
@example([(Sampler("top_p", 0, top_p=7.245421963755456e-207), 5),  # 0 in float32: kept the top token too
          (Sampler("top_k_top_p", 0, top_k=3, top_p=5e-324), 1)], 0)
@example([(Sampler("top_k", 0, temperature=1e30, top_k=1), 2),  # scores round to one value in float32
          (Sampler("top_k_top_p", 0, temperature=1e39, top_k=7, top_p=0.5), 4)], 0)
def test_a_batch_draws_what_each_row_draws_alone(rows, logits_seed):
    logits = torch.randn(len(rows), VOCAB, generator=torch.Generator().manual_seed(logits_seed)) * 3
    samplers, seeds = [s for s, _ in rows], [seed for _, seed in rows]
    together = draw_tokens(logits, samplers, seeds)
    alone = [sample_token(logits[i], samplers[i], seeds[i]) for i in range(len(rows))]
    assert together == alone
    probs = filtered_probs(logits, samplers)
    for i, (sampler, token) in enumerate(zip(samplers, together, strict=True)):
        assert float(probs[i, token]) > 0.0  # never a filtered-out token
        torch.testing.assert_close(probs[i], plain_filter(logits[i], sampler), atol=1e-5, rtol=1e-4)


def test_draws_follow_the_distribution():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0, -8.0]])
    sampler = Sampler("multinomial", 0, temperature=1.0)
    expected = torch.softmax(logits[0], 0)
    draws = 20_000
    counts = torch.bincount(torch.tensor(draw_tokens(logits.expand(draws, -1), [sampler] * draws, range(draws))),
                            minlength=5).double() / draws
    # Fixed seeds: the counts are the same on every run; within 4 standard errors of the probabilities.
    assert torch.all((counts - expected).abs() <= 4 * (expected * (1 - expected) / draws).sqrt() + 1e-9), counts


def test_a_seed_fixes_its_uniform_and_none_is_fresh():
    assert seed_uniform(7) == seed_uniform(7) != seed_uniform(8)
    assert all(0.0 < seed_uniform(s) <= 1.0 for s in (0, 1, 2**64 - 1))
    assert len({seed_uniform(None) for _ in range(20)}) == 20


def test_a_bad_row_fails_alone_in_a_batch():
    logits = torch.randn(3, VOCAB)
    logits[1, 4] = float("nan")
    sampler = Sampler("top_p", 0, top_p=0.9)
    results = row_results(logits, [sampler, sampler, Sampler("greedy", 0)], [1, 2, None])
    assert results[0].tokens and results[2].tokens == [int(torch.argmax(logits[2]))]
    assert results[1].error is not None and "NaN" in results[1].error


def test_ties_at_the_kth_logit_all_stay_and_top_p_takes_ties_in_id_order():
    logits = torch.tensor([[1.0, 3.0, 3.0, 0.0, 3.0]])
    kept = {name: set(torch.nonzero(filtered_probs(logits, [sampler])[0]).flatten().tolist())
            for name, sampler in {"top_k": Sampler("top_k", 0, top_k=1),
                                  "top_p": Sampler("top_p", 0, top_p=0.1),
                                  "top_p_two": Sampler("top_p", 0, top_p=0.4)}.items()}
    assert kept == {"top_k": {1, 2, 4}, "top_p": {1}, "top_p_two": {1, 2}}


def test_a_seed_draws_the_first_token_whose_cumulative_probability_reaches_its_splitmix64_uniform():
    """The rule protocol.md states, written out on its own: u = (top 53 bits of splitmix64(seed) + 1) / 2^53."""
    mask = (1 << 64) - 1

    def uniform(seed: int) -> float:
        z = (seed + 0x9E3779B97F4A7C15) & mask
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
        return (((z ^ (z >> 31)) >> 11) + 1) / 2.0**53

    logits = torch.tensor([[0.3, -1.2, 2.0, 0.0, 1.1, -0.4]])
    probs = torch.softmax(logits[0].double(), 0).tolist()
    sampler = Sampler("multinomial", 0, temperature=1.0)
    for seed in [0, 1, 2, 41, 2**32, 2**63 + 5, 2**64 - 1, *range(100, 160)]:
        u, total, expected = uniform(seed), 0.0, len(probs) - 1
        for token, p in enumerate(probs):
            total += p
            if total >= u:
                expected = token
                break
        assert draw_tokens(logits, [sampler], [seed]) == [expected], seed
