"""The batched engine's overlap: the decode step predicted to come next, launched before the reply.

In a steady decode loop the host feeds every context the token it was just given, so when a step's rows
repeat the previous step's prediction, the engine launches the predicted next step before returning (on
CUDA the GPU runs it while the reply travels and the host prepares its next forward). The next step uses
that result only if each of its decode rows is exactly a predicted (slot, token, position); anything else
discards it. A discarded step wrote keys and values only past what the slot is known to hold, so nothing
reads them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pie_driver_trtllm.engines.base import RowResult
from pie_driver_trtllm.engines.reference.batched_llama import BatchedLlama, DecodeOutput


@dataclass
class Prediction:
    """The decode step predicted to come next: each row fed its own result at the next position."""

    expect: dict[int, tuple[Any, int, int]]  # slot index -> (slot, token, position)
    output: DecodeOutput | None = None       # launched already; None: only predicted


class RunAhead:
    """The current prediction of one engine, and how often one was launched and used."""

    def __init__(self, decoder: BatchedLlama, last_position: int, launch: bool) -> None:
        self.decoder = decoder
        self.last_position = last_position
        self.launch = launch  # pays only where a step is asynchronous (CUDA); on CPU it would run inline
        self.pending: Prediction | None = None
        self.hits = 0
        self.launches = 0

    def discard(self) -> None:
        """Forget the prediction (the caches or graph buffers it relies on are about to change)."""
        self.pending = None

    def forget(self, slot_index: int) -> None:
        """A slot was given up: no prediction for it stands."""
        if self.pending is not None:
            self.pending.expect.pop(slot_index, None)

    def take(self, slots: list[Any], tokens: list[int], positions: list[int]) -> Prediction | None:
        """The last prediction, if every row of this step is one of its (slot, token, position), else None."""
        ahead, self.pending = self.pending, None
        if ahead is None:
            return None
        expect = ahead.expect
        for slot, token, position in zip(slots, tokens, positions, strict=True):
            predicted = expect.get(slot.index)
            if predicted is None or predicted[0] is not slot or predicted[1] != token or predicted[2] != position:
                return None
        if ahead.output is not None:
            self.hits += 1
            ahead.output = ahead.output.for_slots([slot.index for slot in slots])
        return ahead

    def predict(self, slots: list[Any], positions: list[int], results: list[RowResult | None],
                prefilled: list[tuple[Any, int, int]], launch: bool) -> None:
        """Record the step that follows if the host feeds each row its result (the contexts prefilled in
        this step included); launch it when this step's decode rows were predicted (a decode loop)."""
        last = self.last_position
        expect = {slot.index: (slot, result.tokens[0], position + 1)  # type: ignore[union-attr,index]
                  for slot, position, result in zip(slots, positions, results, strict=True)
                  if result is not None and result.tokens and position < last}
        expect.update((slot.index, (slot, token, position)) for slot, token, position in prefilled
                      if position <= last)
        if not expect:
            return
        ahead = self.pending = Prediction(expect)
        if launch and self.launch:
            indexes, fed = list(expect), list(expect.values())
            try:
                ahead.output = self.decoder.run(indexes, [f[1] for f in fed], [f[2] for f in fed])
            except Exception:  # only a guess failed (out of memory, say): this step's results stand
                self.pending = None
                return
            self.launches += 1
