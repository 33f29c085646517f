"""TEST DOUBLE internals (no module of this name in the real package): KV block reuse and what it serves.

The real KV cache manager keeps full blocks in a radix tree keyed by token ids and the request's
`cache_salt_id` (trtllm-api.md 4); a request walks it and reuses every matching block, and nothing in that
index knows which weights computed a block. So after an in-place weight update without
`reset_prefix_cache()`, or after the KV cache's memory was released and mapped back, a matching prompt is
served KV that the current weights did not compute. The double keeps that hazard observable: each indexed
sequence remembers what computed its KV (the live weights, a frozen copy of the weights it was computed
with, or a zeroed model for contents lost to a release), and a request that reuses such a prefix computes
the prefix's KV with that model and only the rest with the live one.
"""

from __future__ import annotations

import copy
from typing import Any

import torch

LIVE = None  # the entry's KV was computed by the weights the model holds now


class BlockIndex:
    def __init__(self, tokens_per_block: int) -> None:
        self.tokens_per_block = tokens_per_block
        self.entries: list[tuple[int | None, list[int], Any]] = []  # (cache_salt_id, tokens, source)

    def match(self, salt_id: int | None, prompt: list[int]) -> tuple[int, Any]:
        """Block-granular reuse against earlier sequences with the same salt: (tokens reused, their source)."""
        best, source = 0, LIVE
        for seen_salt, tokens, origin in self.entries:
            if seen_salt != salt_id:
                continue
            common = 0
            for a, b in zip(tokens, prompt, strict=False):
                if a != b:
                    break
                common += 1
            if common > best:
                best, source = common, origin
        best = min(best, len(prompt) - 1)  # guess: the last prompt token is always recomputed
        reused = best // self.tokens_per_block * self.tokens_per_block
        return reused, (source if reused else LIVE)

    def add(self, salt_id: int | None, tokens: list[int], source: Any) -> None:
        self.entries.append((salt_id, tokens, source))

    def reset(self) -> None:
        """`reset_prefix_cache()`: nothing indexed is reused again."""
        self.entries.clear()

    def weights_changing(self, model: Any) -> None:
        """Called before the live weights change: what they computed keeps a frozen copy of them."""
        if any(origin is LIVE for _, _, origin in self.entries):
            frozen = copy.deepcopy(model)
            self.entries = [(s, t, frozen if origin is LIVE else origin) for s, t, origin in self.entries]

    def contents_lost(self, model: Any) -> None:
        """The KV cache's memory was released: the index stays, the contents are gone (zeros here)."""
        if self.entries:
            zeroed = copy.deepcopy(model)
            with torch.no_grad():
                for parameter in zeroed.parameters():
                    parameter.zero_()
            self.entries = [(s, t, zeroed) for s, t, _ in self.entries]


def logits_with_reuse(model: Any, ids: list[int], reused: int, source: Any) -> torch.Tensor:
    """Logits of every position of `ids`, the first `reused` positions' KV computed by `source`."""
    with torch.inference_mode():
        if source is LIVE or reused == 0:
            return model(torch.tensor([ids], dtype=torch.long)).logits[0].float()
        head = source(torch.tensor([ids[:reused]], dtype=torch.long), use_cache=True)
        tail = model(torch.tensor([ids[reused:]], dtype=torch.long), past_key_values=head.past_key_values)
        return torch.cat([head.logits[0], tail.logits[0]]).float()
