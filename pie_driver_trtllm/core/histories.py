"""Per-context replayable token histories: merge, rollback, gap, fork, truncate, release, LRU bound."""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from pie_driver_trtllm.wire.errors import DriverError, ErrorCode, HistoryGap


@dataclass(slots=True)
class MergeResult:
    """What one merge did: where it cut (None when nothing was overwritten) and what it evicted."""

    cut_at: int | None
    evicted: list[int]
    snapshots: dict[int, list[int]]  # token index -> prefix, only for out-of-order requests


class ContextStore:
    """Token histories keyed by context id, bounded by `max_contexts` and by `max_tokens` over all of them
    (the least recently used goes first)."""

    def __init__(self, max_contexts: int, max_tokens: int | None = None) -> None:
        self.max_contexts = max_contexts
        self.max_tokens = max_tokens
        self.tokens = 0  # held over all histories
        self._histories: OrderedDict[int, list[int]] = OrderedDict()
        self.evictions = 0

    def __len__(self) -> int:
        return len(self._histories)

    def __contains__(self, context: int) -> bool:
        return context in self._histories

    def get(self, context: int) -> list[int]:
        """The live history list (callers must not mutate it)."""
        try:
            return self._histories[context]
        except KeyError:
            raise DriverError(ErrorCode.UNKNOWN_CONTEXT, f"context {context} is not known") from None

    def length(self, context: int) -> int:
        history = self._histories.get(context)
        return 0 if history is None else len(history)

    def merge(self, context: int, tokens: list[int], positions: list[int],
              snapshot_at: frozenset[int] = frozenset()) -> MergeResult:
        """Merge (token, position) pairs in order. On HISTORY_GAP the history is left unchanged.

        `snapshot_at` names token indexes whose prefix must be captured right after they merge; it is
        only needed when the request is not one contiguous run, since otherwise later tokens never
        touch an earlier prefix.
        """
        history = self._histories.get(context)
        known = 0 if history is None else len(history)
        if not tokens:
            return MergeResult(None, [], {})
        start = positions[0]
        if start > known:
            raise HistoryGap(context, start, known)
        if positions[-1] - start == len(tokens) - 1 and positions == list(range(start, start + len(tokens))):
            result = self._merge_run(context, history, tokens, start)
        else:
            result = self._merge_scattered(context, history, tokens, positions, snapshot_at)
        self._histories.move_to_end(context)
        result.evicted = self._evict_over_bound(keep=context)
        return result

    def append(self, context: int, token: int, position: int) -> bool:
        """The common decode step, one token right at the history's end: appended, True. Anything else
        (new context, overwrite, gap): False, and nothing changes; `merge` handles it."""
        history = self._histories.get(context)
        if history is None or position != len(history) or (self.max_tokens is not None
                                                            and self.tokens >= self.max_tokens):
            return False
        history.append(token)
        self.tokens += 1
        self._histories.move_to_end(context)
        return True

    def _merge_run(self, context: int, history: list[int] | None, tokens: list[int], start: int) -> MergeResult:
        if history is None:
            history = self._histories[context] = []
        before = len(history)
        overlap = min(len(history) - start, len(tokens))
        first_diff = next((i for i in range(overlap) if history[start + i] != tokens[i]), overlap)
        cut_at = None
        if first_diff < overlap:
            cut_at = start + first_diff
            del history[cut_at:]
        history.extend(tokens[first_diff:])  # empty when every token was already there
        self.tokens += len(history) - before
        return MergeResult(cut_at, [], {})

    def _merge_scattered(self, context: int, history: list[int] | None, tokens: list[int],
                         positions: list[int], snapshot_at: frozenset[int]) -> MergeResult:
        work = list(history or ())
        cut_at: int | None = None
        snapshots: dict[int, list[int]] = {}
        for index, (token, position) in enumerate(zip(tokens, positions, strict=True)):
            if position > len(work):
                raise HistoryGap(context, position, len(history or ()))
            if position == len(work):
                work.append(token)
            elif work[position] != token:
                cut_at = position if cut_at is None else min(cut_at, position)
                del work[position:]
                work.append(token)
            if index in snapshot_at:
                snapshots[index] = work[: position + 1]
        self._histories[context] = work
        self.tokens += len(work) - len(history or ())
        # A prefix that is the whole history after all reads the live one: it is at the end (runs need that).
        return MergeResult(cut_at, [], {index: prefix for index, prefix in snapshots.items() if prefix != work})

    def _evict_over_bound(self, keep: int) -> list[int]:
        evicted = []
        while len(self._histories) > self.max_contexts or (self.max_tokens is not None
                                                           and self.tokens > self.max_tokens):
            oldest = next(iter(self._histories))
            if oldest == keep:  # the kept context is the most recent: alone over the token bound
                break
            self.tokens -= len(self._histories.pop(oldest))
            evicted.append(oldest)
        self.evictions += len(evicted)
        return evicted

    def fork(self, src: int, dst: int, length: int | None) -> list[int]:
        """Give `dst` a copy of `src`'s first `length` tokens. Returns evicted contexts."""
        source = self.get(src)
        if length is not None and length > len(source):
            raise DriverError(ErrorCode.OUT_OF_RANGE,
                              f"fork length {length} is beyond context {src}'s {len(source)} tokens")
        copy = source[: len(source) if length is None else length]
        self.tokens += len(copy) - len(self._histories.get(dst, ()))
        self._histories[dst] = copy
        self._histories.move_to_end(src)
        self._histories.move_to_end(dst)
        return self._evict_over_bound(keep=dst)

    def truncate(self, context: int, length: int) -> None:
        history = self.get(context)
        if length > len(history):
            raise DriverError(ErrorCode.OUT_OF_RANGE,
                              f"truncate length {length} is beyond context {context}'s {len(history)} tokens")
        self.tokens -= len(history) - length
        del history[length:]
        self._histories.move_to_end(context)

    def release(self, contexts: tuple[int, ...] | list[int]) -> list[int]:
        """Forget these contexts; returns the ones that existed."""
        released = []
        for context in dict.fromkeys(contexts):
            history = self._histories.pop(context, None)
            if history is not None:
                self.tokens -= len(history)
                released.append(context)
        return released
