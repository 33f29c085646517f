"""The sampler as engines read it: validated at the edge, with absent parameters at their neutral value."""

from __future__ import annotations

from dataclasses import dataclass

TOKEN_SAMPLERS = ("greedy", "multinomial", "top_k", "top_p", "min_p", "top_k_top_p")
ALL_SAMPLERS = (*TOKEN_SAMPLERS, "dist", "logprobs")
# A token sampler's temperature below this is greedy: sampling there is argmax but for near-ties, and
# dividing by it would overflow the scores.
MIN_TEMPERATURE = 1e-5
# What a sampled token's log-probability means (`logprob_mode`): "raw", log-softmax of the logits;
# "processed", of the distribution the sampler drew from (temperature and filters applied).
LOGPROB_MODES = ("raw", "processed")


@dataclass(frozen=True, slots=True)
class Sampler:
    """One sampler, normalised: absent parameters hold their neutral value."""

    type: str
    at: int
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    seed: int | None = None
    k: int = 0
    token_ids: tuple[int, ...] = ()
    max_tokens: int = 0                 # 0: a one-token sampler answering {"token"}; n: a run of up to n tokens
    stop_token_ids: tuple[int, ...] = ()
    return_logprobs: bool = False
    return_logprob: bool = False        # a one-token sampler answers {"token", "logprob"}
    logprob_mode: str = "processed"     # "raw" or "processed": what return_logprob(s) report

    @property
    def makes_token(self) -> bool:
        return self.type in TOKEN_SAMPLERS

    @property
    def is_run(self) -> bool:
        """A protocol 1.1 token sampler: answers {"tokens", "stop"} (a run of one token included)."""
        return self.max_tokens > 0

    @property
    def is_greedy(self) -> bool:
        return self.type == "greedy" or (self.makes_token and self.temperature == 0.0)
