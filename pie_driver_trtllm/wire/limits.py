"""The limits every request is checked against at the edge: model facts and advertised caps."""

from __future__ import annotations

from dataclasses import dataclass

from pie_driver_trtllm.sampler import ALL_SAMPLERS, Sampler

MAX_SAMPLER_TOKENS = 64   # most tokens one sampler's run may ask for (`max_tokens`)
MAX_STOP_TOKEN_IDS = 64   # most `stop_token_ids` of one sampler


@dataclass(frozen=True, slots=True)
class Limits:
    """What the edge checks requests against (model facts and advertised caps)."""

    vocab_size: int
    max_model_len: int
    max_forward_requests: int
    max_forward_tokens: int
    max_logprob_labels: int
    max_frame_bytes: int
    samplers: frozenset[str] = frozenset(ALL_SAMPLERS)
    max_sampler_tokens: int = MAX_SAMPLER_TOKENS
    # Output bounds of one forward: samplers of every kind, `dist` samplers, `logprobs` samplers, and the
    # values they return (the sum of `k` and of the `token_ids` counts, plus one per `return_logprob`).
    # They bound the reply's size.
    max_sampler_rows: int = 8192
    max_prob_rows: int = 8192
    max_logit_rows: int = 8192
    max_output_elements: int = 1 << 20


# The sampler types without their msgpack header, so that any string encoding of them is counted (other
# strings holding them, such as `return_logprobs`, only make the bound more cautious).
_DIST, _LOGPROBS = b"dist", b"logprobs"
_RETURN_LOGPROB = b"return_logprob"  # without its header: found in any string encoding (and in `return_logprobs`)


def outputs_may_exceed_caps(frame: bytes, limits: Limits) -> bool:
    """Whether a frame's `dist` / `logprobs` samplers or sampled-token log-probabilities could exceed their
    caps, so that the exact count is needed. The frame names the type once per such sampler at least, and
    each returns at most `vocab_size` or `max_logprob_labels` values; a `return_logprob` sampler names
    that key and returns one value. This bound is three scans of the frame in C."""
    dists, logprobs = frame.count(_DIST), frame.count(_LOGPROBS)
    return (dists > limits.max_prob_rows or logprobs > limits.max_logit_rows
            or dists * limits.vocab_size + logprobs * limits.max_logprob_labels + frame.count(_RETURN_LOGPROB)
            > limits.max_output_elements)


def output_problem(sampler_lists: list[tuple[Sampler, ...]], limits: Limits) -> str | None:
    """What a forward with these samplers would exceed of the output caps, or None."""
    prob_rows = logit_rows = elements = 0
    for samplers in sampler_lists:
        for s in samplers:
            if s.type == "dist":
                prob_rows += 1
                elements += s.k
            elif s.type == "logprobs":
                logit_rows += 1
                elements += len(s.token_ids)
            elif s.return_logprob:
                elements += 1
    if prob_rows > limits.max_prob_rows:
        return f"forward has {prob_rows} dist samplers; max_prob_rows is {limits.max_prob_rows}"
    if logit_rows > limits.max_logit_rows:
        return f"forward has {logit_rows} logprobs samplers; max_logit_rows is {limits.max_logit_rows}"
    if elements > limits.max_output_elements:
        return (f"forward asks for {elements} output values (dist k, logprobs token_ids, one per "
                "return_logprob); "
                f"max_output_elements is {limits.max_output_elements}")
    return None
