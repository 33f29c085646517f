"""The reference engine's batched path: every decode-ready context of a step in one forward.

Used for Llama-family checkpoints (see `batched_llama.supports`). A context owns a cache slot while it
is resident; the least recently used one gives its slot up when all are taken. Rows that need more
than one new token (first prefill, rollback, a fork's suffix) are prefilled one context at a time;
all rows that need exactly one new token run together, and greedy lookahead continues them together.
"""

from __future__ import annotations

import heapq
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

from ..protocol import ALL_SAMPLERS
from .base import ModelInfo, Row, RowResult, common_prefix
from .batched_llama import BatchedLlama
from .sampling import row_result


@dataclass
class _Slot:
    index: int
    tokens: list[int] = field(default_factory=list)  # exactly what the slot's cache holds


@dataclass
class _Decode:
    row: int
    slot: _Slot
    token: int
    position: int


class BatchedReferenceEngine:
    kind = "reference"
    execution_mode = "batched"
    samplers = frozenset(ALL_SAMPLERS)

    def __init__(self, model: Any, device: str, info: ModelInfo, slots: int, version: str) -> None:
        import torch

        self._torch = torch
        self.model = info
        self.version = version
        self.decoder = BatchedLlama(model, slots, info.max_model_len, device, graphs=True)
        self._slots: OrderedDict[int, _Slot] = OrderedDict()
        self._free = list(range(slots))

    def step(self, rows: list[Row]) -> list[RowResult]:
        results: list[RowResult | None] = [None] * len(rows)
        decodes: list[_Decode] = []
        groups: dict[tuple[int, int], list[int]] = {}
        for index, row in enumerate(rows):
            groups.setdefault((row.context, id(row.tokens)), []).append(index)
        for (context, _), indexes in groups.items():
            try:
                decodes += self._prepare(context, [rows[i] for i in indexes], indexes, results)
            except Exception as exc:  # one context's failure must not cost the others
                self.drop([context])
                for index in indexes:
                    results[index] = RowResult(error=f"{type(exc).__name__}: {exc}")
        if decodes:
            try:
                self._decode(rows, decodes, results)
            except Exception as exc:
                self.drop(list({rows[d.row].context for d in decodes}))
                for d in decodes:
                    results[d.row] = RowResult(error=f"{type(exc).__name__}: {exc}")
        return results  # type: ignore[return-value]

    def fork(self, src: int, dst: int, length: int) -> None:
        self.drop([dst])
        source = self._slots.get(src)
        keep = min(length, len(source.tokens)) if source else 0
        if source is None or keep == 0:
            return
        target = self._slot(dst, protect=src)
        for cache in (*self.decoder.k, *self.decoder.v):
            cache[target.index, :, :keep] = cache[source.index, :, :keep]
        target.tokens = source.tokens[:keep]

    def drop(self, contexts: list[int]) -> None:
        for context in contexts:
            slot = self._slots.pop(context, None)
            if slot is not None:
                heapq.heappush(self._free, slot.index)

    def close(self) -> None:
        self.drop(list(self._slots))

    # ------------------------------------------------------------------ internals

    def _prepare(self, context: int, rows: list[Row], indexes: list[int],
                 results: list[RowResult | None]) -> list[_Decode]:
        tokens = rows[0].tokens
        end = max(row.length for row in rows)
        first_needed = min(row.length for row in rows) - 1
        slot = self._slot(context)
        keep = min(common_prefix(slot.tokens, tokens, end), first_needed)
        del slot.tokens[keep:]
        if len(rows) == 1 and keep == end - 1:  # one new token: joins the step's batch
            slot.tokens.append(tokens[end - 1])
            return [_Decode(indexes[0], slot, tokens[end - 1], end - 1)]
        wanted = sorted({row.length - 1 - keep for row in rows})
        logits = self.decoder.prefill(slot.index, tokens[keep:end], keep, wanted)
        slot.tokens.extend(tokens[keep:end])
        by_length = {offset + keep + 1: logits[i] for i, offset in enumerate(wanted)}
        decodes = []
        for index, row in zip(indexes, rows, strict=True):
            results[index] = row_result(by_length[row.length], row.sampler, row.seed)
            if row.steps > 1 and row.length == end and results[index].tokens:
                decodes.append(_Decode(index, slot, -1, end - 1))  # continues as lookahead only
        return decodes

    def _decode(self, rows: list[Row], decodes: list[_Decode], results: list[RowResult | None]) -> None:
        torch = self._torch
        fresh = [d for d in decodes if d.token >= 0]
        if fresh:
            logits = self.decoder.decode([d.slot.index for d in fresh], [d.token for d in fresh],
                                         [d.position for d in fresh])
            greedy = torch.argmax(logits, dim=-1).tolist()
            for i, d in enumerate(fresh):
                row = rows[d.row]
                if row.sampler.is_greedy:  # the common case needs no per-row tensor work
                    results[d.row] = RowResult(tokens=[greedy[i]])
                else:
                    results[d.row] = row_result(logits[i], row.sampler, row.seed)
        # Lookahead: every greedy row that wants more tokens continues in one batch per token.
        active = [d for d in decodes if rows[d.row].steps > 1 and results[d.row] and results[d.row].tokens]
        while active:
            for d in active:
                d.token = results[d.row].tokens[-1]  # type: ignore[union-attr]
                d.position += 1
                d.slot.tokens.append(d.token)
            logits = self.decoder.decode([d.slot.index for d in active], [d.token for d in active],
                                         [d.position for d in active])
            for d, token in zip(active, torch.argmax(logits, dim=-1).tolist(), strict=True):
                results[d.row].tokens.append(token)  # type: ignore[union-attr]
            active = [d for d in active if len(results[d.row].tokens) < rows[d.row].steps]  # type: ignore

    def _slot(self, context: int, protect: int | None = None) -> _Slot:
        slot = self._slots.get(context)
        if slot is not None:
            self._slots.move_to_end(context)
            return slot
        if not self._free:  # all slots taken: the least recently used context gives its slot up
            victim = next(c for c in self._slots if c != protect)
            self.drop([victim])
        slot = self._slots[context] = _Slot(heapq.heappop(self._free))
        return slot

