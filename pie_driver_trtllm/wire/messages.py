"""What a validated request is: the objects inner code receives from the codec, and the limits the
codec checks frames against."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import msgspec

from pie_driver_trtllm.sampler import Sampler
from pie_driver_trtllm.wire.errors import DriverError


class ForwardItem(msgspec.Struct, frozen=True):
    """One request of a forward. A struct rather than a dataclass: the codec builds one per request of
    every forward, and a struct is built in C, several times faster."""

    context: int
    tokens: list[int]
    positions: list[int]
    samplers: tuple[Sampler, ...]


forward_item_unchecked = ForwardItem  # what the fast path calls: the constructor checks nothing anyway


@dataclass(frozen=True, slots=True)
class Fork:
    src: int
    dst: int
    length: int | None


@dataclass(frozen=True, slots=True)
class Truncate:
    context: int
    length: int


@dataclass(frozen=True, slots=True)
class Release:
    contexts: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class LoadWeights:
    path: str
    version: int


@dataclass(frozen=True, slots=True)
class Sleep:
    level: int


@dataclass(frozen=True, slots=True)
class Wake:
    pass


@dataclass(frozen=True, slots=True)
class StepColumns:
    """A `step` op: the forward whose request i is `contexts[i]` fed `tokens[i]` at `positions[i]`, each
    with the one `sampler` (or none), kept as the columns it came in."""

    contexts: list[int]
    tokens: list[int]
    positions: list[int]
    sampler: Sampler | None

    def items(self) -> list[ForwardItem | DriverError]:
        samplers = (self.sampler,) if self.sampler is not None else ()
        return [ForwardItem(context, [token], [position], samplers)
                for context, token, position in zip(self.contexts, self.tokens, self.positions, strict=True)]


class Forward:
    """A forward's requests. One that came as columns (a `step`) keeps them and makes its requests only
    when something asks for them: the decode step's fast path reads the columns instead."""

    __slots__ = ("_items", "columns")

    def __init__(self, items: list[ForwardItem | DriverError] | None = None,
                 columns: StepColumns | None = None) -> None:
        self._items = items  # a bad request fails alone, so it stays in its slot
        self.columns = columns

    @property
    def items(self) -> list[ForwardItem | DriverError]:
        if self._items is None:
            self._items = self.columns.items() if self.columns is not None else []
        return self._items

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Forward) and self.items == other.items

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"Forward({self.columns!r})" if self._items is None else f"Forward({self._items!r})"


@dataclass(frozen=True, slots=True)
class Request:
    id: int
    op: str
    body: Forward | Fork | Truncate | Release | LoadWeights | Sleep | Wake | None = None


class FrameRejected(Exception):
    """A frame that gets an error reply before reaching the driver core."""

    def __init__(self, request_id: int | None, error: DriverError) -> None:
        super().__init__(error.message)
        self.request_id = request_id
        self.error = error


def is_uint(value: Any, bits: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < (1 << bits)
