"""TEST DOUBLE of TensorRT-LLM 1.2.1: the call log (no counterpart in the real package)."""

from __future__ import annotations

from typing import Any

# Each entry is a dict with "kind" ("LLM.__init__", "generate", "generate_async", "shutdown") and its arguments.
CALLS: list[dict[str, Any]] = []


def record(kind: str, **data: Any) -> dict[str, Any]:
    entry = {"kind": kind, **data}
    CALLS.append(entry)
    return entry


def reset_calls() -> None:
    CALLS.clear()
