"""Error codes of protocol v1 and the exceptions that carry them to the protocol edge."""

from __future__ import annotations

import re
from enum import StrEnum
from typing import Any

MAX_MESSAGE_CHARS = 400  # an error message never grows with the input it describes
_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")


class ErrorCode(StrEnum):
    BAD_FRAME = "BAD_FRAME"
    BAD_REQUEST = "BAD_REQUEST"
    UNKNOWN_OP = "UNKNOWN_OP"
    VERSION = "VERSION"
    UNSUPPORTED = "UNSUPPORTED"
    OUT_OF_RANGE = "OUT_OF_RANGE"
    HISTORY_GAP = "HISTORY_GAP"
    UNKNOWN_CONTEXT = "UNKNOWN_CONTEXT"
    CAPACITY = "CAPACITY"
    ENGINE_ERROR = "ENGINE_ERROR"
    REPLICA_LOST = "REPLICA_LOST"
    SHUTTING_DOWN = "SHUTTING_DOWN"
    WEIGHTS_LOAD_FAILED = "WEIGHTS_LOAD_FAILED"
    WEIGHTS_UNAVAILABLE = "WEIGHTS_UNAVAILABLE"
    ASLEEP = "ASLEEP"


class DriverError(Exception):
    """An error that becomes one `{"code", "message", ...}` map on the wire."""

    def __init__(self, code: ErrorCode, message: str, **details: Any) -> None:
        message = bounded(message)
        super().__init__(message)
        self.code = code
        self.message = message
        self.details = details

    def to_wire(self) -> dict[str, Any]:
        return {"code": self.code.value, "message": bounded(self.message), **self.details}


def bounded(text: str) -> str:
    """`text` cut to `MAX_MESSAGE_CHARS`, without heap addresses (they tell a peer about the process)."""
    if len(text) > MAX_MESSAGE_CHARS:
        text = text[:MAX_MESSAGE_CHARS - len(_CUT)] + _CUT
    return _ADDRESS.sub("", text)


_CUT = "... (shortened)"


def shown(value: Any, limit: int = 40) -> str:
    """A peer's value as an error message names it: its repr when plain and short, else cut or its type."""
    if value is None or isinstance(value, bool | int | float | str | bytes):
        text = repr(value)
        return text if len(text) <= limit else f"{text[:limit]}{_CUT}"
    return f"a value of type {type(value).__name__}"


class HistoryGap(DriverError):
    def __init__(self, context: int, position: int, known_length: int) -> None:
        super().__init__(
            ErrorCode.HISTORY_GAP,
            f"context {context}: position {position} is past the history's end; resend from {known_length}",
            known_length=known_length,
        )
