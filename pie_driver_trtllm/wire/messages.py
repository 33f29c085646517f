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
class Forward:
    items: list[ForwardItem | DriverError]  # a bad request fails alone, so it stays in its slot


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
