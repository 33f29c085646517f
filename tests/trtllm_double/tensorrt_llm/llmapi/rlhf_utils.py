"""TEST DOUBLE of TensorRT-LLM 1.2.1 (`tensorrt_llm.llmapi.rlhf_utils`), not the real package.

`WorkerExtension.update_weights(ipc_handles)` as in TensorRT-LLM PR #8302: `ipc_handles` maps a device UUID
to a list of `(name, (rebuild, args))`; each tensor is rebuilt with `args[6]` set to the worker's device (a
CUDA IPC handle's device slot) and loaded in place, partial loading allowed. `update_weights(None)`
finalises: post-load hooks, then `engine.reset_prefix_cache()`. Later copies add a `reset_prefix_cache`
worker method; it is left out here because the 1.2 release was not seen to have it. A failure part way
leaves the tensors already copied in place (TensorRT-LLM issue #16642: a failed partial refit serves mixed
weights).

Double only: the tensors copy into a transformers model by its parameter names; an unknown name or a
shape the parameter does not have raises. CPU tensors (no GPU here) come as `reduce_tensor` makes them for
CPU, and are rebuilt without touching a device slot. `PIE_TRTLLM_DOUBLE_FAIL_UPDATE_AFTER=N` makes a call
fail after N of its tensors were copied.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from .._calls import record
from .._torch.utils import get_device_uuid


class WorkerExtension:
    engine: Any
    device_id: int

    def update_weights(self, ipc_handles: dict | None = None) -> None:
        model = self.engine.model_engine.model
        if not hasattr(model, "first_pre_reload_weights"):
            model.first_pre_reload_weights = True
        if ipc_handles is not None:
            device_uuid = get_device_uuid(self.device_id)
            if device_uuid not in ipc_handles:
                raise ValueError(f"Device UUID {device_uuid} not found in ipc_handles")
            weights = {}
            for name, (func, args) in ipc_handles[device_uuid]:
                list_args = list(args)
                if getattr(func, "__name__", "") == "rebuild_cuda_tensor":
                    list_args[6] = self.device_id
                weights[name] = func(*list_args)
            record("update_weights", names=sorted(weights))
            self._load(model, weights)
        else:
            record("update_weights", names=None)
            self.engine.reset_prefix_cache()
            delattr(model, "first_pre_reload_weights")

    def _load(self, model: Any, weights: dict[str, torch.Tensor]) -> None:
        fail_after = os.environ.get("PIE_TRTLLM_DOUBLE_FAIL_UPDATE_AFTER")
        parameters = dict(model.named_parameters())
        self.engine._llm._index.weights_changing(model)
        with torch.no_grad():
            for copied, (name, tensor) in enumerate(weights.items()):
                if fail_after is not None and copied >= int(fail_after):
                    raise RuntimeError(f"test double: update_weights failed after {copied} tensors")
                target = parameters.get(name)
                if target is None:
                    raise KeyError(f"test double: the model has no weight {name!r}")
                if tuple(target.shape) != tuple(tensor.shape):
                    raise ValueError(f"test double: {name} has shape {tuple(target.shape)}, not "
                                     f"{tuple(tensor.shape)}")
                target.copy_(tensor.to(target.dtype))


__all__ = ["WorkerExtension"]
