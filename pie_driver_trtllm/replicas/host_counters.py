"""What the host sent to the router and received from it, counted at the router.

A replica sees parts of the host's forwards (a request cut in two, a share of the entries), so the
top level of `stats` cannot be the replicas' sum for `requests` and `errors`.
"""

from __future__ import annotations

import threading
from collections import Counter
from typing import Any

import msgspec

from pie_driver_trtllm.replicas.splice import FAILED_MARK


class HostCounters:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.requests = 0
        self.errors: Counter[str] = Counter()
        self.outputs_not_returned = 0  # outputs of parts whose request failed in another part

    def add_requests(self, count: int) -> None:
        with self._lock:
            self.requests += count

    def add_error(self, code: str) -> None:
        with self._lock:
            self.errors[str(code)] += 1

    def add_outputs_not_returned(self, count: int) -> None:
        with self._lock:
            self.outputs_not_returned += count

    def add_failures(self, results: list[dict[str, Any] | msgspec.Raw]) -> None:
        """Count each failed result, whoever built it (a replica's only when its bytes can hold a failure)."""
        codes: Counter[str] = Counter()
        for result in results:
            if isinstance(result, msgspec.Raw):
                if FAILED_MARK not in bytes(result):
                    continue
                result = msgspec.msgpack.decode(result)
            if not result.get("ok"):
                codes[result["error"]["code"]] += 1
        if codes:
            with self._lock:
                self.errors.update(codes)

    def snapshot(self) -> tuple[int, dict[str, int], int]:
        """(requests, errors, outputs not returned), read together."""
        with self._lock:
            return self.requests, dict(self.errors), self.outputs_not_returned
