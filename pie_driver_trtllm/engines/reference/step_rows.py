"""What one step of the batched reference engine gathers before it runs: each resident context's cache
slot, the rows that need one new token (decoded together) and the rows that need several (prefilled
together)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Slot:
    index: int
    tokens: list[int] = field(default_factory=list)  # exactly what the slot's cache holds


@dataclass
class DecodeRows:
    """A step's rows that need one new token each: parallel lists, in row order."""

    rows: list[int] = field(default_factory=list)      # index into the step's rows
    slots: list[Slot] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)    # the new token, or -1: continues as lookahead only
    positions: list[int] = field(default_factory=list)
    prefilled: list[tuple[Slot, int, int]] = field(default_factory=list)  # (slot, its token, next position)

    def add(self, row: int, slot: Slot, token: int, position: int) -> None:
        self.rows.append(row)
        self.slots.append(slot)
        self.tokens.append(token)
        self.positions.append(position)

    def feeds(self, slot: Slot) -> bool:
        """Whether this step's decode computes the last token `slot` holds (not in its cache yet)."""
        return any(s is slot and t >= 0 for s, t in zip(self.slots, self.tokens, strict=True))


@dataclass
class PrefillRow:
    """A row whose context needs several new tokens: prefilled with the step's other such rows."""

    row: int
    slot: Slot
    chunk: list[int]
    start: int
    tokens: list[int]  # the row's whole token list (read only): a later row of the step may share its prefix
