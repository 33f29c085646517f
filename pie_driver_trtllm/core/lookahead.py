"""Greedy lookahead: keep the extra tokens of a multi-token greedy engine call, serve one per host step.

Greedy decoding is a pure function of the prefix, so a buffered token is served only when the history
from the buffer's anchor up to the asked position equals the tokens the buffer predicted there, and no
cut below the anchor has happened since it was filled. Anything else drops the buffer.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(slots=True)
class Prediction:
    anchor: int          # prefix length the first predicted token follows
    tokens: list[int]    # tokens[i] is the greedy token after a prefix of anchor + i tokens


class LookaheadBuffer:
    def __init__(self, size: int) -> None:
        self.size = size
        self._predictions: dict[int, Prediction] = {}
        self.hits = 0

    def __len__(self) -> int:
        return len(self._predictions)

    def take(self, context: int, history: list[int], prefix_len: int) -> int | None:
        """The buffered greedy token after `history[:prefix_len]`, or None (and the buffer is dropped)."""
        prediction = self._predictions.get(context)
        if prediction is None:
            return None
        offset = prefix_len - prediction.anchor
        if not 0 < offset < len(prediction.tokens) or \
                history[prediction.anchor:prefix_len] != prediction.tokens[:offset]:
            del self._predictions[context]
            return None
        if offset == len(prediction.tokens) - 1:
            del self._predictions[context]
        self.hits += 1
        return prediction.tokens[offset]

    def fill(self, context: int, anchor: int, tokens: list[int]) -> None:
        if len(tokens) > 1:
            self._predictions[context] = Prediction(anchor, list(tokens))
        else:
            self._predictions.pop(context, None)

    def cut(self, context: int, position: int) -> None:
        """The history of `context` was overwritten from `position` on."""
        prediction = self._predictions.get(context)
        if prediction is not None and position < prediction.anchor:
            del self._predictions[context]

    def drop(self, contexts: list[int] | tuple[int, ...]) -> None:
        for context in contexts:
            self._predictions.pop(context, None)

    def clear(self) -> None:
        """Forget every prediction (they came from weights that are no longer served)."""
        self._predictions.clear()
