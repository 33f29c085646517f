"""The router's view of its replicas' weights and sleep: one version for all, or none served.

`load_weights`, `sleep` and `wake` go to every replica; the router answers ok only when all did. A load
that some replicas made and others did not would serve two versions at once, so forwards then fail with
WEIGHTS_UNAVAILABLE, naming the replicas that failed, until a load succeeds on all of them. A replica
restarted after a load comes back on its startup weights: it is given the last loaded ones before it
serves again.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import zmq

from pie_driver_trtllm.client import Reply
from pie_driver_trtllm.replicas.pool import Replica
from pie_driver_trtllm.wire.codec import LoadWeights, Sleep, Wake
from pie_driver_trtllm.wire.errors import DriverError, ErrorCode


@dataclass
class Outcome:
    """One replica's answer to a broadcast op; `reply` None: it is down or died meanwhile."""

    index: int
    device: str
    reply: Reply | None

    def failure(self) -> str | None:
        if self.reply is None:
            return f"replica {self.index} ({self.device}) is down"
        if self.reply.ok:
            return None
        error = self.reply.error
        return f"replica {self.index} ({self.device}): {error.code}: {error.message}"  # type: ignore[union-attr]


def send_to(replica: Replica, mark_dead: Callable[[Replica], None], op: str, fields: dict[str, Any]) -> int | None:
    """Send `op` to one replica without waiting: its request id, or None when it is down."""
    client = replica.work
    if not replica.alive or client is None:
        return None
    try:
        return client.send(op, **fields)
    except (TimeoutError, zmq.ZMQError):
        mark_dead(replica)
        return None


class FleetWeights:
    def __init__(self) -> None:
        self.rl_ops: list[str] = []     # what the replicas' engine offers (from their handshake)
        self.sleep_levels: list[int] = []
        self.version = 0
        self.unavailable: str | None = None  # why no weights are served (a load that not all replicas made)
        self.asleep = 0
        self.loaded: LoadWeights | None = None  # the last load every replica made
        self._started: dict[int, Any] = {}  # the process each replica's weights and sleep are set for

    def offered(self, caps: dict[str, Any]) -> None:
        self.rl_ops, self.sleep_levels = caps.get("rl_ops", []), caps.get("sleep_levels", [])

    def run(self, op: str, body: LoadWeights | Sleep | Wake,
            broadcast: Callable[..., list[Outcome]]) -> dict[str, Any]:
        """`op` on every replica; ok only when all did it."""
        if op not in self.rl_ops:
            raise DriverError(ErrorCode.UNSUPPORTED, f"{op} is not supported by this engine")
        if isinstance(body, Sleep) and body.level not in self.sleep_levels:
            raise DriverError(ErrorCode.UNSUPPORTED, f"sleep level {body.level} is not supported by this engine")
        if isinstance(body, LoadWeights):
            self.check_load()
            return self.loaded_by(body, broadcast(op, path=body.path, version=body.version))
        if isinstance(body, Sleep):
            return self.slept(body, broadcast(op, level=body.level))
        return self.woken(broadcast(op))

    def catch_up(self, replicas: list[Replica], call: Callable[..., Any]) -> None:
        """A replica restarted since its weights were set: give it the loaded weights and the sleep level
        before it serves, or serve no weights (never two versions at once). `call(replica, op, **fields)`
        raises DriverError when the op fails."""
        for replica in replicas:
            process = getattr(replica, "process", None)
            if not replica.alive or self._started.setdefault(replica.index, process) is process:
                continue
            self._started[replica.index] = process
            loaded = self.loaded
            try:
                if loaded is not None:
                    call(replica, "load_weights", path=loaded.path, version=loaded.version)
            except DriverError:
                self.unavailable = (f"replica {replica.index} ({replica.device}) restarted on its startup weights "
                                    f"and could not load version {self.version}")
            if self.asleep:
                with contextlib.suppress(DriverError):  # forwards are refused while asleep anyway
                    call(replica, "sleep", level=self.asleep)

    def refusal(self) -> DriverError | None:
        if self.asleep:
            return DriverError(ErrorCode.ASLEEP, f"the driver is asleep (level {self.asleep}); send wake first")
        if self.unavailable is not None:
            return DriverError(ErrorCode.WEIGHTS_UNAVAILABLE, f"no weights are served: {self.unavailable}; "
                               "load weights again")
        return None

    def check_load(self) -> None:
        if self.asleep == 2:
            raise DriverError(ErrorCode.ASLEEP, "the weights are in host memory (asleep at level 2); "
                              "wake first, or sleep at level 1, then load")

    def loaded_by(self, body: LoadWeights, outcomes: list[Outcome]) -> dict[str, Any]:
        failures = [(o, o.failure()) for o in outcomes if o.failure() is not None]
        if not failures:
            self.version, self.unavailable, self.loaded = body.version, None, body
            return {"weights_version": body.version}
        failed = [o.index for o, _ in failures]
        text = "; ".join(f for _, f in failures)  # type: ignore[misc]
        untouched = len(failures) == len(outcomes) and all(
            o.reply is not None and o.reply.error.details.get("serving_previous") is True  # type: ignore[union-attr]
            for o, _ in failures)
        if untouched and self.unavailable is None:  # every replica refused before changing anything
            raise DriverError(ErrorCode.WEIGHTS_LOAD_FAILED, f"load_weights failed on every replica: {text}",
                              serving_previous=True, replicas_failed=failed)
        self.unavailable = f"load_weights of version {body.version} failed on replicas {failed}"
        raise DriverError(ErrorCode.WEIGHTS_LOAD_FAILED, f"load_weights failed on some replicas, so no weights "
                          f"are served until a load succeeds on all: {text}", serving_previous=False,
                          replicas_failed=failed)

    def slept(self, body: Sleep, outcomes: list[Outcome]) -> dict[str, Any]:
        self.asleep = body.level  # even if some replica failed: forwards wait for a wake on all
        self._check_all("sleep", outcomes)
        return {"asleep": body.level}

    def woken(self, outcomes: list[Outcome]) -> dict[str, Any]:
        self._check_all("wake", outcomes)
        self.asleep = 0
        return {"asleep": 0}

    def health(self) -> dict[str, Any]:
        return {"weights_version": self.version, "weights": "serving" if self.unavailable is None else "unavailable",
                "asleep": self.asleep}

    @staticmethod
    def _check_all(op: str, outcomes: list[Outcome]) -> None:
        failures = [(o.index, o.failure()) for o in outcomes if o.failure() is not None]
        if failures:
            raise DriverError(ErrorCode.ENGINE_ERROR, f"{op} failed on some replicas: "
                              + "; ".join(f for _, f in failures),  # type: ignore[misc]
                              replicas_failed=[i for i, _ in failures])
