"""What the reference engines share for weight refits and sleep: the state (awake, asleep at a level,
weights unavailable after a failed swap) and the order of the steps; each engine says how its own KV
cache and weights are freed, moved and rebuilt."""

from __future__ import annotations

import gc
from collections.abc import Callable
from typing import Any

import torch

from pie_driver_trtllm.engines.base import WeightsLoadError
from pie_driver_trtllm.engines.reference.local_memory import LocalMemory
from pie_driver_trtllm.engines.reference.weights import stage


class EngineMemory:
    def __init__(self, model: Any, device: str) -> None:
        self.model = model
        self.device = torch.device(device)
        self.asleep = 0
        self.broken = False  # a swap failed part way: the weights are a mix until a load succeeds
        self.local = LocalMemory()

    def check_serving(self) -> None:
        """Raise unless a step may run (the core refuses such forwards before they get here)."""
        if self.asleep:
            raise RuntimeError(f"the engine is asleep (level {self.asleep}); wake it first")
        if self.broken:
            raise RuntimeError("the engine serves no weights: the last load_weights failed part way")

    def load(self, path: str, swap: Callable[[dict[str, Any]], None]) -> None:
        """Stage everything from `path`, then `swap` it in. A failure before the swap leaves everything
        as it was; one during it leaves the engine refusing steps until a load succeeds."""
        if self.asleep == 2:
            raise WeightsLoadError("the weights are in host memory (asleep at level 2); wake first")
        staged = stage(self.model, path, pinned=self.device.type == "cuda")
        try:
            swap(staged)
        except Exception as exc:
            self.broken = True
            raise WeightsLoadError(f"load_weights failed while copying the new weights in: "
                                   f"{type(exc).__name__}: {exc}", serving_previous=False) from None
        self.broken = False

    def sleep(self, level: int, free_cache: Callable[[], None], weights_to: Callable[[Any], None]) -> None:
        if level not in (1, 2):
            raise ValueError(f"sleep level {level} is not 1 or 2")
        if self.asleep == 0:
            free_cache()
        if self.device.type == "cuda":  # on CPU the weights are in host memory already
            if level == 2 and self.asleep < 2:
                weights_to("cpu")
            elif level == 1 and self.asleep == 2:
                weights_to(self.device)
        self.asleep = level
        self._release()

    def wake(self, new_cache: Callable[[], None], weights_to: Callable[[Any], None]) -> None:
        if self.asleep == 0:
            return
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # binds the device's context to this thread, which may be new
            self.local.restore()  # first: if the device is short of memory, nothing has moved yet
        if self.asleep == 2 and self.device.type == "cuda":
            weights_to(self.device)
        new_cache()
        self.asleep = 0

    def _release(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            gc.collect()  # tensors held only by reference cycles (graphs, compiled code) go now, not later
            clear_workspaces = getattr(torch._C, "_cuda_clearCublasWorkspaces", None)
            if clear_workspaces is not None:  # cuBLAS keeps a workspace per handle and stream otherwise
                clear_workspaces()
            torch.cuda.empty_cache()
            self.local.shrink()
