"""The replica subprocesses behind the router: one per device, pinned to it, watched and restarted.

Each replica is this same driver started with `--replica N` on its own device (`CUDA_VISIBLE_DEVICES`
set before any CUDA import there), on a private ipc socket and its own share of the CPU cores. A monitor
thread notices a dead replica within a poll interval, hands its contexts to the router's `on_death`
and restarts it with backoff.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from pie_driver_trtllm.client import DriverClient, DriverFailed, DriverProcess, spawn
from pie_driver_trtllm.config import StartupError

MONITOR_INTERVAL_S = 0.1
BACKOFF_S = (1.0, 2.0, 4.0, 8.0, 16.0, 30.0)
STATS_TIMEOUT_S = 0.5


@dataclass
class Replica:
    index: int
    device: str
    process: DriverProcess | None = None
    work: DriverClient | None = None       # used by whichever thread runs state ops (one at a time)
    control: DriverClient | None = None    # used under the socket lock only
    alive: bool = False
    restarting: bool = False
    restarts: int = 0
    failures: int = 0
    next_start: float = 0.0
    contexts: set[int] = field(default_factory=set)
    stuck_since: float | None = None  # when its engine's overrunning call started, as the router learned it
    fenced_notes: int = 0             # replies seen saying its engine is fenced off (`engine_state`)
    # A socket belongs to one thread: a dead replica's clients wait here for their owner to close them.
    retired_work: list[DriverClient] = field(default_factory=list)
    retired_control: list[DriverClient] = field(default_factory=list)


class ReplicaPool:
    """The replicas of one router. `lock` guards every replica's state (the router uses it too)."""

    def __init__(self, config_path: str | Path, devices: list[str], private_dir: str,
                 on_death: Callable[[Replica], None]) -> None:
        self.config_path = str(Path(config_path).resolve())
        self.private_dir = private_dir
        self.replicas = [Replica(i, d) for i, d in enumerate(devices)]
        self.lock = threading.RLock()
        self._on_death = on_death
        self._stop = threading.Event()
        self._cpus = cpu_partition(len(devices))
        finished = [threading.Event() for _ in self.replicas]
        launched = 0
        try:  # a signal may land anywhere here, Thread.start's own wait included
            for replica, event in zip(self.replicas, finished, strict=True):
                threading.Thread(target=self._start, args=(replica, event), daemon=True).start()
                launched += 1
            for event in finished:
                event.wait()
        except BaseException:  # a signal during start-up: replicas still starting are killed, not left behind
            self.close()
            for event in finished[:launched + 1]:  # the one being launched when the signal came may run too
                event.wait(5)
            self.close()  # those that became ready meanwhile
            raise
        dead = [r for r in self.replicas if not r.alive]
        if dead:
            self.close()
            raise StartupError(f"replica {dead[0].index} on {dead[0].device} did not start; see its error above")
        self._monitor = threading.Thread(target=self._watch, name="replica-monitor", daemon=True)
        self._monitor.start()

    def _start(self, replica: Replica, finished: threading.Event | None = None) -> None:
        try:
            self._spawn(replica)
        finally:
            if finished is not None:
                finished.set()

    def _spawn(self, replica: Replica) -> None:
        env = {}
        if replica.device.startswith("cuda:"):
            env["CUDA_VISIBLE_DEVICES"] = replica.device.split(":", 1)[1]  # before any CUDA import there
        cpus = self._cpus[replica.index]
        if cpus and "OMP_NUM_THREADS" not in os.environ:
            env["OMP_NUM_THREADS"] = str(len(cpus))
        endpoint = f"ipc://{self.private_dir}/r{replica.index}.sock"
        try:
            # The descriptor itself, not a path to it: /dev/stderr cannot be opened when it is a socket.
            process = spawn(self.config_path, endpoint=endpoint, env=env, stderr_fd=_stderr_fd(),
                            extra_args=["--replica", str(replica.index)], cpus=cpus, abandon=self._stop)
        except (DriverFailed, OSError) as exc:
            with self.lock:
                replica.failures += 1
                replica.next_start = time.monotonic() + BACKOFF_S[min(replica.failures, len(BACKOFF_S)) - 1]
                replica.restarting = False
            if not self._stop.is_set():  # closing: its start was abandoned on purpose
                print(f"pie-driver-trtllm: replica {replica.index} ({replica.device}) failed to start: {exc}",
                      file=sys.stderr)
            return
        with self.lock:
            replica.process = process
            replica.work = process.client()
            replica.control = process.client(timeout_s=STATS_TIMEOUT_S)
            replica.alive, replica.restarting, replica.failures = True, False, 0

    def _watch(self) -> None:
        while not self._stop.wait(MONITOR_INTERVAL_S):
            for replica in self.replicas:
                if replica.alive and replica.process and replica.process.process.poll() is not None:
                    self.mark_dead(replica)
                with self.lock:
                    due = not replica.alive and not replica.restarting and time.monotonic() >= replica.next_start
                    if due:
                        replica.restarting = True
                        replica.restarts += 1
                if due and not self._stop.is_set():
                    threading.Thread(target=self._start, args=(replica,), daemon=True).start()

    def mark_dead(self, replica: Replica) -> None:
        with self.lock:
            if not replica.alive:
                return
            replica.alive = False
            replica.stuck_since = None  # its engine went with the process
            replica.failures += 1
            replica.next_start = time.monotonic() + BACKOFF_S[min(replica.failures, len(BACKOFF_S)) - 1]
            self._on_death(replica)
            replica.contexts.clear()
            replica.retired_work += [replica.work] if replica.work else []
            replica.retired_control += [replica.control] if replica.control else []
            replica.work = replica.control = None
        print(f"pie-driver-trtllm: replica {replica.index} ({replica.device}) died; restarting",
              file=sys.stderr)

    def close(self) -> None:
        self._stop.set()
        for replica in self.replicas:
            if replica.process is not None:
                replica.process.process.terminate()
        for replica in self.replicas:
            if replica.process is not None:
                replica.process.stop(timeout_s=10)
            for client in (replica.work, replica.control, *replica.retired_work, *replica.retired_control):
                if client is not None:
                    client.close()

    def close_retired(self, kind: str) -> None:
        with self.lock:
            for replica in self.replicas:
                retired = replica.retired_control if kind == "control" else replica.retired_work
                for client in retired:
                    client.close()
                retired.clear()


def _stderr_fd() -> int:
    """This process's standard error descriptor, which each replica inherits as its own."""
    try:
        return sys.stderr.fileno()
    except (AttributeError, ValueError, OSError):  # replaced by an object without a descriptor
        return 2


def cpu_partition(parts: int) -> list[set[int]]:
    """Split this process's CPUs into `parts` sets of whole physical cores (hyperthread siblings together).

    Replicas spend much of a step in single-threaded Python and kernel launches; two of them on sibling
    hyperthreads slow each other down. An empty set means "do not pin" (too few cores to split).
    """
    allowed = sorted(os.sched_getaffinity(0))
    cores: dict[str, list[int]] = {}
    for cpu in allowed:
        try:
            siblings = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology/thread_siblings_list").read_text().strip()
        except OSError:
            siblings = str(cpu)
        cores.setdefault(siblings, []).append(cpu)
    groups = list(cores.values())
    if len(groups) < parts:
        return [set() for _ in range(parts)]
    per = len(groups) // parts
    return [{cpu for group in groups[i * per:(i + 1) * per] for cpu in group} for i in range(parts)]
