"""Which replica holds each context: context affinity, and contexts lost with a replica that died.

A context is placed on the live replica holding the fewest contexts when first seen and stays there; a
fork moves its destination to the source's replica. Contexts of a replica that dies are lost: they fail
with REPLICA_LOST until the host replays them from position 0. Callers hold the replica pool's lock.
"""

from __future__ import annotations

from collections.abc import Iterable

from pie_driver_trtllm.replicas.pool import Replica
from pie_driver_trtllm.wire.codec import ForwardItem
from pie_driver_trtllm.wire.errors import DriverError, ErrorCode


class Placement:
    def __init__(self) -> None:
        self.owner: dict[int, int] = {}  # context -> replica index
        self.lost: set[int] = set()
        self.moves = 0  # counts every change of `owner`

    def lose(self, replica: Replica) -> None:
        """A replica died: its contexts must be replayed from position 0."""
        for context in replica.contexts:
            self.owner.pop(context, None)
            self.lost.add(context)
        self.moves += 1

    def place(self, item: ForwardItem, replicas: list[Replica]) -> Replica:
        """The replica of `item`'s context, placing it (or a lost one replayed from position 0) if needed."""
        if item.context in self.lost:
            if not item.positions or item.positions[0] != 0:
                raise DriverError(ErrorCode.REPLICA_LOST, f"context {item.context} lived on a replica that "
                                  "died; replay it from position 0")
            self.lost.discard(item.context)
        owner = self.owner.get(item.context)
        if owner is not None:
            return replicas[owner]
        alive = [r for r in replicas if r.alive]
        if not alive:
            raise DriverError(ErrorCode.REPLICA_LOST, "no replica is alive; retry shortly")
        replica = min(alive, key=lambda r: (len(r.contexts), r.index))
        self.assign(item.context, replica)
        return replica

    def owner_of(self, context: int, replicas: list[Replica]) -> Replica:
        """The live replica holding `context`, or the error that says why there is none."""
        if context in self.lost:
            raise DriverError(ErrorCode.REPLICA_LOST, f"context {context} lived on a replica that died")
        owner = self.owner.get(context)
        if owner is None or not replicas[owner].alive:
            raise DriverError(ErrorCode.UNKNOWN_CONTEXT, f"context {context} is not known")
        return replicas[owner]

    def assign(self, context: int, replica: Replica) -> None:
        self.lost.discard(context)
        self.owner[context] = replica.index
        self.moves += 1
        replica.contexts.add(context)

    def by_owner(self, contexts: Iterable[int]) -> dict[int, list[int]]:
        """The held contexts grouped by replica index; lost ones are forgotten (nothing holds them)."""
        groups: dict[int, list[int]] = {}
        for context in contexts:
            self.lost.discard(context)
            owner = self.owner.get(context)
            if owner is not None:
                groups.setdefault(owner, []).append(context)
        return groups

    def forget(self, context: int, replicas: list[Replica]) -> None:
        owner = self.owner.pop(context, None)
        self.moves += 1
        if owner is not None:
            replicas[owner].contexts.discard(context)
