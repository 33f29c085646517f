"""TEST-ONLY fault injection: wraps any engine and fails on demand, keyed by a trigger token.

Active only when the environment variable `PIE_DRIVER_FAULTS` is set (the reliability tests set it
for the driver subprocesses they start); never set it in production. Its value is a comma-separated
list of `name:value` pairs:

- `raise_on_token:T`: a step with a row whose last token is T raises RuntimeError (the whole batch).
- `oom_on_token:T`: such a step raises an out-of-memory error (torch's OutOfMemoryError when torch is
  importable, else MemoryError), so the core's split-in-halves retry can isolate the row.
- `hang_on_token:T`: such a step sleeps `hang_s` seconds first (default 5), then runs normally.
- `hang_s:S`: the length of that sleep.
- `load_delay_s:S`: a `load_weights` sleeps S seconds before it loads.
"""

from __future__ import annotations

import time

from pie_driver_trtllm.config import StartupError
from pie_driver_trtllm.engines.base import Engine, Row, RowResult, rl_ops, sleep_levels

ENV_VAR = "PIE_DRIVER_FAULTS"
_KEYS = ("raise_on_token", "oom_on_token", "hang_on_token", "hang_s", "load_delay_s")


def parse_faults(spec: str) -> dict[str, float]:
    faults: dict[str, float] = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        name, _, value = part.partition(":")
        try:
            if name not in _KEYS:
                raise ValueError
            faults[name] = float(value)
        except ValueError:
            raise StartupError(f"faults: {ENV_VAR} entry {part!r} is not one of {', '.join(_KEYS)} with a "
                               "number (this variable is for tests only)") from None
    return faults


def _out_of_memory(message: str) -> Exception:
    try:
        import torch

        return torch.cuda.OutOfMemoryError(message)
    except (ImportError, AttributeError):
        return MemoryError(message)


class FaultyEngine:
    """An Engine that behaves like `inner` except on the trigger tokens of `faults`."""

    def __init__(self, inner: Engine, faults: dict[str, float]) -> None:
        self.inner = inner
        self.faults = faults
        self.kind, self.version, self.execution_mode = inner.kind, inner.version, inner.execution_mode
        self.model, self.samplers = inner.model, inner.samplers
        for op in rl_ops(inner):
            setattr(self, op, getattr(inner, op))
        if "load_weights" in rl_ops(inner):
            self.load_weights = self._load_weights
        self.sleep_levels = sleep_levels(inner)
        if callable(getattr(inner, "stats", None)):
            self.stats = inner.stats  # type: ignore[attr-defined]

    def _load_weights(self, path: str) -> None:
        time.sleep(self.faults.get("load_delay_s", 0.0))
        self.inner.load_weights(path)  # type: ignore[attr-defined]

    def _triggered(self, name: str, rows: list[Row]) -> bool:
        token = self.faults.get(name)
        return token is not None and any(row.tokens[row.length - 1] == token for row in rows)

    def step(self, rows: list[Row]) -> list[RowResult]:
        if self._triggered("hang_on_token", rows):
            time.sleep(self.faults.get("hang_s", 5.0))
        if self._triggered("raise_on_token", rows):
            raise RuntimeError("injected fault: raise_on_token")
        if self._triggered("oom_on_token", rows):
            raise _out_of_memory("injected fault: oom_on_token")
        return self.inner.step(rows)

    def fork(self, src: int, dst: int, length: int) -> None:
        self.inner.fork(src, dst, length)

    def drop(self, contexts: list[int]) -> None:
        self.inner.drop(contexts)

    def close(self) -> None:
        self.inner.close()
