"""The reference engine's batched path: every decode-ready context of a step in one forward.

Used for Llama-family checkpoints (see `batched_llama.supports`). A context owns a cache slot while it
is resident; the least recently used one gives its slot up when all are taken. Rows that need more
than one new token (first prefill, rollback, a fork's suffix) are prefilled together in one forward
over the slots they span (one at a time when that would waste most of the forward); all rows that
need exactly one new token run together, and greedy lookahead continues them together.

Shared prefixes (`prefixes.py`): a prefill first copies the longest prefix another slot holds, or waits
for a prefill of the same step that will hold it, so samples of one prompt compute it once.

Overlap (`run_ahead.py`): in a steady decode loop the step predicted to come next is launched before the
engine returns, and used only if the next step is exactly that prediction.
"""

from __future__ import annotations

import heapq
from collections import OrderedDict
from typing import Any

from pie_driver_trtllm.engines.base import ModelInfo, Row, RowResult, common_prefix
from pie_driver_trtllm.engines.reference.batched_llama import BatchedLlama
from pie_driver_trtllm.engines.reference.memory import EngineMemory
from pie_driver_trtllm.engines.reference.prefixes import best_donor, will_hold
from pie_driver_trtllm.engines.reference.run_ahead import RunAhead
from pie_driver_trtllm.engines.reference.step_rows import DecodeRows, PrefillRow, Slot
from pie_driver_trtllm.engines.reference.weights import apply
from pie_driver_trtllm.engines.runs import chained_in_engine, step_with_runs
from pie_driver_trtllm.engines.sampling import row_result, row_results
from pie_driver_trtllm.sampler import ALL_SAMPLERS


class BatchedReferenceEngine:
    kind = "reference"
    execution_mode = "batched"
    samplers = frozenset(ALL_SAMPLERS)

    def __init__(self, model: Any, device: str, info: ModelInfo, slots: int, version: str,
                 compile: bool = True, overlap: bool | None = None) -> None:
        import torch

        self._torch = torch
        self.model = info
        self.version = version
        self.decoder = BatchedLlama(model, slots, info.max_model_len, device, graphs=True, compile=compile)
        self._slots: OrderedDict[int, Slot] = OrderedDict()
        self._free = list(range(slots))
        self.run_ahead = RunAhead(self.decoder, info.max_model_len - 1,
                                  launch=self.decoder.use_graphs if overlap is None else overlap)
        self.prompt_tokens_computed = 0  # tokens run in passes of several tokens of one context
        self._waiting: list[tuple[int, list[Row], list[int]]] | None = None  # rows waiting on a step's prefill
        self.memory = EngineMemory(self.decoder.model, device)

    def step(self, rows: list[Row]) -> list[RowResult]:
        self.memory.check_serving()
        contexts = len({row.context for row in rows})
        if contexts > self.decoder.slots:
            return self._step_in_rounds(rows)  # each round a step of its own, runs included
        return step_with_runs(self._step_once, rows, chained_in_engine)

    def _step_once(self, rows: list[Row]) -> list[RowResult]:
        contexts = len({row.context for row in rows})
        results: list[RowResult | None] = [None] * len(rows)
        decodes = DecodeRows()
        prefills: list[PrefillRow] = []
        waiting: list[tuple[int, list[Row], list[int]]] = []
        self._waiting = waiting
        if contexts == len(rows):
            self._prepare_single(rows, decodes, prefills, results)
        else:
            self._prepare_groups(rows, decodes, prefills, results)
        self._waiting = None
        if prefills:
            self._prefill(rows, prefills, decodes, results)
        if waiting:  # their prefixes are resident now: they copy them and run only the rest
            later: list[PrefillRow] = []
            for context, group, indexes in waiting:
                try:
                    self._prepare(context, group, indexes, decodes, later, results)
                except Exception as exc:  # one context's failure must not cost the others
                    self._fail([context], indexes, exc, results)
            if later:
                self._prefill(rows, later, decodes, results)
        if decodes.rows:
            try:
                self._decode(rows, decodes, results)
            except Exception as exc:
                self._fail(list({rows[i].context for i in decodes.rows}), decodes.rows, exc, results)
        return results  # type: ignore[return-value]

    def slot_index(self, context: int) -> int | None:
        """The cache slot holding `context` (None when it holds none); for benchmarks and tests."""
        slot = self._slots.get(context)
        return None if slot is None else slot.index

    @property
    def ahead_hits(self) -> int:
        return self.run_ahead.hits

    @property
    def ahead_launches(self) -> int:
        return self.run_ahead.launches

    def stats(self) -> dict[str, int]:
        """Counters the driver's `stats` op reports under `engine`."""
        return {"overlap_launches": self.ahead_launches, "overlap_hits": self.ahead_hits,
                "prompt_tokens_computed": self.prompt_tokens_computed}

    def load_weights(self, path: str) -> None:
        def swap(staged: dict[str, Any]) -> None:
            self._forget_all()  # no KV computed with the old weights is ever read again
            apply(self.decoder.model, staged)
            self.decoder.refill_fused()

        self.memory.load(path, swap)

    def sleep(self, level: int) -> None:
        self._forget_all()
        self.memory.sleep(level, self.decoder.free_cache, self.decoder.weights_to)

    def wake(self) -> None:
        self.memory.wake(self.decoder.new_cache, self.decoder.weights_to)

    def _forget_all(self) -> None:
        self.run_ahead.discard()  # a step run ahead is discarded with the caches it extended
        self.drop(list(self._slots))

    def fork(self, src: int, dst: int, length: int) -> None:
        self.drop([dst])
        source = self._slots.get(src)
        keep = min(length, len(source.tokens)) if source else 0
        if source is None or keep == 0:
            return  # nothing cached to copy: dst's first step shares whatever prefix is resident then
        target = self._slot(dst, protect=src)
        self._copy(source, target, 0, keep)
        target.tokens = source.tokens[:keep]

    def drop(self, contexts: list[int]) -> None:
        for context in contexts:
            slot = self._slots.pop(context, None)
            if slot is not None:
                heapq.heappush(self._free, slot.index)
                self.run_ahead.forget(slot.index)

    def close(self) -> None:
        self.drop(list(self._slots))

    # ------------------------------------------------------------------ internals

    def _fail(self, contexts: list[int], indexes: list[int], exc: Exception,
              results: list[RowResult | None]) -> None:
        self.drop(contexts)
        for index in indexes:
            results[index] = RowResult(error=f"{type(exc).__name__}: {exc}")

    def _step_in_rounds(self, rows: list[Row]) -> list[RowResult]:
        """More contexts than slots: a step's batched work runs at its end, so a context that lost its slot
        to a later one before then would read another context's cache. Rounds of at most as many contexts
        as there are slots, one after another, each a step of its own."""
        contexts = list(dict.fromkeys(row.context for row in rows))
        results: list[RowResult | None] = [None] * len(rows)
        for first in range(0, len(contexts), self.decoder.slots):
            chosen = set(contexts[first:first + self.decoder.slots])
            indexes = [i for i, row in enumerate(rows) if row.context in chosen]
            for index, result in zip(indexes, self.step([rows[i] for i in indexes]), strict=True):
                results[index] = result
        return results  # type: ignore[return-value]

    def _prepare_single(self, rows: list[Row], decodes: DecodeRows, prefills: list[PrefillRow],
                        results: list[RowResult | None]) -> None:
        """Every row has a context of its own. The common case, a context whose slot holds exactly its
        history but the last token, joins the batch with a few list operations; others take `_prepare`."""
        resident = self._slots
        add_row, add_slot = decodes.rows.append, decodes.slots.append
        add_token, add_position = decodes.tokens.append, decodes.positions.append
        for index, row in enumerate(rows):
            try:
                slot = resident.get(row.context)
                end = row.length
                if slot is not None and len(slot.tokens) == end - 1 and slot.tokens == row.tokens[:end - 1]:
                    resident.move_to_end(row.context)
                    token = row.tokens[end - 1]
                    slot.tokens.append(token)
                    add_row(index)
                    add_slot(slot)
                    add_token(token)
                    add_position(end - 1)
                else:
                    self._prepare(row.context, [row], [index], decodes, prefills, results)
            except Exception as exc:  # one context's failure must not cost the others
                self._fail([row.context], [index], exc, results)

    def _prepare_groups(self, rows: list[Row], decodes: DecodeRows, prefills: list[PrefillRow],
                        results: list[RowResult | None]) -> None:
        """Rows grouped by the token list they read. Several groups of one context share its slot, so all
        but the one holding the context's last row run now, in row order, and only that last one may join
        the step's batches: no deferred work then reads a slot that another group rewrote."""
        groups: dict[tuple[int, int], list[int]] = {}
        final: dict[int, tuple[int, int]] = {}
        for index, row in enumerate(rows):
            key = (row.context, id(row.tokens))
            groups.setdefault(key, []).append(index)
            final[row.context] = key
        now = [key for key in groups if final[key[0]] != key]
        for key in now + [key for key in groups if final[key[0]] == key]:
            indexes = groups[key]
            try:
                if final[key[0]] == key:
                    self._prepare(key[0], [rows[i] for i in indexes], indexes, decodes, prefills, results)
                else:
                    self._run_now(key[0], [rows[i] for i in indexes], indexes, decodes, results)
            except Exception as exc:  # one context's failure must not cost the others
                self._fail([key[0]], indexes, exc, results)

    def _run_now(self, context: int, rows: list[Row], indexes: list[int], decodes: DecodeRows,
                 results: list[RowResult | None]) -> None:
        """Rows of one token list, prefilled and answered at once (one token each: no lookahead)."""
        slot, keep, end = self._crop(context, rows, decodes)
        self._prefill_rows(slot, rows, indexes, keep, end, results)

    def _crop(self, context: int, rows: list[Row], decodes: DecodeRows) -> tuple[Slot, int, int]:
        """The context's slot, cut back to what it shares with the rows' tokens (at least one token is left
        to run); returns the slot, the tokens kept and the rows' end."""
        end = max(row.length for row in rows)
        first_needed = min(row.length for row in rows) - 1
        slot = self._slot(context)
        self.run_ahead.forget(slot.index)  # this context leaves the predicted loop: its cache may change below
        tokens = rows[0].tokens
        keep = min(common_prefix(slot.tokens, tokens, end), first_needed)
        del slot.tokens[keep:]
        donor, shared = best_donor(((s, s.tokens) for s in self._slots.values() if s is not slot), tokens, keep,
                                   first_needed, decodes.feeds) if first_needed - keep > 1 else (None, keep)
        if donor is not None:  # a prefill: it copies what another slot holds of it
            self._copy(donor, slot, keep, shared)
            slot.tokens.extend(tokens[keep:shared])
        return slot, shared, end

    def _copy(self, source: Slot, target: Slot, start: int, stop: int) -> None:
        """Positions [start, stop) of `source`'s keys and values into `target` (on the device, one copy a layer)."""
        for cache in self.decoder.cache:  # [slot, k|v, head, column, dim]
            cache[target.index, :, :, start:stop] = cache[source.index, :, :, start:stop]

    def _prefill_rows(self, slot: Slot, rows: list[Row], indexes: list[int], keep: int, end: int,
                      results: list[RowResult | None]) -> None:
        tokens = rows[0].tokens
        wanted = sorted({row.length - 1 - keep for row in rows})
        logits = self.decoder.prefill(slot.index, tokens[keep:end], keep, wanted)
        slot.tokens.extend(tokens[keep:end])
        if end - keep > 1:
            self.prompt_tokens_computed += end - keep
        by_length = {offset + keep + 1: logits[i] for i, offset in enumerate(wanted)}
        for index, row in zip(indexes, rows, strict=True):
            results[index] = row_result(by_length[row.length], row.sampler, row.seed)

    def _prepare(self, context: int, rows: list[Row], indexes: list[int], decodes: DecodeRows,
                 prefills: list[PrefillRow], results: list[RowResult | None]) -> None:
        tokens = rows[0].tokens
        slot, keep, end = self._crop(context, rows, decodes)
        if len(rows) == 1 and keep == end - 1:  # one new token: joins the step's batch
            slot.tokens.append(tokens[end - 1])
            decodes.add(indexes[0], slot, tokens[end - 1], end - 1)
            return
        if len(rows) == 1:  # several new tokens, one sampler: batched with others
            if self._waiting is not None and will_hold(((p.tokens, p.start + len(p.chunk)) for p in prefills),
                                                       tokens, keep, end - 1):
                self._waiting.append((context, rows, indexes))
                return
            prefills.append(PrefillRow(indexes[0], slot, tokens[keep:end], keep, tokens))
            return
        self._prefill_rows(slot, rows, indexes, keep, end, results)
        for index, row in zip(indexes, rows, strict=True):
            result = results[index]
            if row.steps > 1 and chained_in_engine(row) and row.length == end and result is not None \
                    and result.tokens:
                decodes.add(index, slot, -1, end - 1)  # continues as lookahead only

    def _prefill(self, rows: list[Row], prefills: list[PrefillRow], decodes: DecodeRows,
                 results: list[RowResult | None]) -> None:
        logits = None
        if len(prefills) > 1:
            try:
                logits = self.decoder.prefill_many([p.slot.index for p in prefills], [p.chunk for p in prefills],
                                                   [p.start for p in prefills])
            except Exception as exc:
                self._fail([rows[p.row].context for p in prefills], [p.row for p in prefills], exc, results)
                return
        for i, p in enumerate(prefills):
            row = rows[p.row]
            try:
                last = logits[i] if logits is not None else \
                    self.decoder.prefill(p.slot.index, p.chunk, p.start, [len(p.chunk) - 1])[0]
            except Exception as exc:  # one context's failure must not cost the others
                self._fail([row.context], [p.row], exc, results)
                continue
            p.slot.tokens.extend(p.chunk)
            if len(p.chunk) > 1:
                self.prompt_tokens_computed += len(p.chunk)
            results[p.row] = result = row_result(last, row.sampler, row.seed)
            end = p.start + len(p.chunk)
            if row.steps > 1 and chained_in_engine(row) and result.tokens:
                decodes.add(p.row, p.slot, -1, end - 1)  # continues as lookahead only
            elif result.tokens:
                decodes.prefilled.append((p.slot, result.tokens[0], end))  # its first decode step can be predicted

    def _decode(self, rows: list[Row], decodes: DecodeRows, results: list[RowResult | None]) -> None:
        fresh = [i for i, token in enumerate(decodes.tokens) if token >= 0]
        if fresh:
            if len(fresh) == len(decodes.tokens):
                indexes, slots, tokens, positions = decodes.rows, decodes.slots, decodes.tokens, decodes.positions
            else:
                indexes = [decodes.rows[i] for i in fresh]
                slots = [decodes.slots[i] for i in fresh]
                tokens = [decodes.tokens[i] for i in fresh]
                positions = [decodes.positions[i] for i in fresh]
            ahead = self.run_ahead.take(slots, tokens, positions)
            out = ahead.output if ahead is not None and ahead.output is not None else \
                self.decoder.run([slot.index for slot in slots], tokens, positions)
            greedy = out.tokens()
            sampled = []
            for i, index in enumerate(indexes):
                row = rows[index]
                if chained_in_engine(row):  # the common case, greedy without log-probabilities: no tensor work
                    results[index] = RowResult(tokens=[greedy[i]])
                else:
                    sampled.append(i)
            if sampled:  # the other rows' logits, their stochastic tokens drawn in one batch
                logits = out.for_slots([slots[i].index for i in sampled]).logits()
                picked = [rows[indexes[i]] for i in sampled]
                for i, result in zip(sampled, row_results(logits, [r.sampler for r in picked],
                                                          [r.seed for r in picked]), strict=True):
                    results[indexes[i]] = result
        # Lookahead: greedy rows that want more tokens continue together (on CUDA one queued chain of passes).
        active = [i for i, index in enumerate(decodes.rows)
                  if rows[index].steps > 1 and chained_in_engine(rows[index])
                  and results[index] and results[index].tokens]  # type: ignore[union-attr]
        if not active:
            if fresh and len(fresh) == len(decodes.rows):
                self.run_ahead.predict(slots, positions, [results[i] for i in indexes], decodes.prefilled,
                                       launch=ahead is not None)
            return
        self.run_ahead.discard()  # the passes below reuse the graphs whose buffers hold a step launched ahead
        made = [results[decodes.rows[i]].tokens for i in active]  # type: ignore[union-attr]
        groups: dict[int, list[int]] = {}  # rows wanting the same number of tokens continue together
        for k, i in enumerate(active):
            groups.setdefault(rows[decodes.rows[i]].steps, []).append(k)
        for want, members in groups.items():
            continuing = [decodes.slots[active[k]] for k in members]
            chain = self.decoder.run_chain([slot.index for slot in continuing], [made[k][-1] for k in members],
                                           [decodes.positions[active[k]] + 1 for k in members], want - 1)
            for column, (k, slot) in enumerate(zip(members, continuing, strict=True)):
                tokens_made = made[k]
                tokens_made.extend(step[column] for step in chain)  # type: ignore[union-attr]
                slot.tokens.extend(tokens_made[:-1])  # type: ignore[index]  # every token fed to the cache

    def _slot(self, context: int, protect: int | None = None) -> Slot:
        slot = self._slots.get(context)
        if slot is not None:
            self._slots.move_to_end(context)
            return slot
        if not self._free:  # all slots taken: the least recently used context gives its slot up
            victim = next(c for c in self._slots if c != protect)
            self.drop([victim])
        slot = self._slots[context] = Slot(heapq.heappop(self._free))
        return slot

