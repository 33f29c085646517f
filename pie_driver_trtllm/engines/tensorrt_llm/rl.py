"""`generate` mode with the RL operations: weights replaced in place, sleep and wake (`rl_ops = true`).

TensorRT-LLM 1.2 offers them only on its Ray orchestrator's GPU worker, through `LLM._collective_rpc`:
`sleep(tags)` / `wakeup(tags)` (with `enable_sleep=True`) release and map back the GPU memory allocated
under each memory tag, and the RLHF worker extension's `update_weights(handles)` loads tensors in place,
`update_weights(None)` finalising and resetting the prefix cache (TensorRT-LLM PR #8302, used so by verl).

Cached KV is never served across weights: the whole checkpoint is staged before the first
`update_weights` call, the finalising call resets the prefix cache, and every cache salt carries an epoch
that a load and a wake bump, so no block indexed before can match a later request.
"""

from __future__ import annotations

import contextlib
import importlib
from typing import Any

import torch

from pie_driver_trtllm.config import DriverConfig, StartupError
from pie_driver_trtllm.engines.base import ModelInfo, Row, RowResult, WeightsLoadError
from pie_driver_trtllm.engines.tensorrt_llm.generate import GenerateEngine
from pie_driver_trtllm.engines.tensorrt_llm.refit import CheckpointError, buckets, handles, manifest, stage

WORKER_EXTENSION = "tensorrt_llm.llmapi.rlhf_utils.WorkerExtension"
# Memory tags of 1.2's `ExecutorMemoryType`. Level 1 frees all but the weights (verl releases these same
# tags); level 2 adds the weights, which TensorRT-LLM keeps a host copy of and maps back on wakeup.
LEVEL_TAGS = {1: ("kv_cache", "sampler", "drafter", "guided_decoder", "spec_resource_manager", "model_extra",
                  "executor_extra"),
              2: ("kv_cache", "sampler", "drafter", "guided_decoder", "spec_resource_manager", "model_extra",
                  "executor_extra", "model", "draft_model")}


def rl_llm_arguments() -> dict[str, Any]:
    """What `LLM(...)` needs for the RL operations."""
    return {"orchestrator_type": "ray", "ray_worker_extension_cls": WORKER_EXTENSION, "enable_sleep": True}


class RLGenerateEngine(GenerateEngine):
    sleep_levels = (1, 2)

    def __init__(self, llm: Any, trt: Any, config: DriverConfig, info: ModelInfo, version: str) -> None:
        super().__init__(llm, trt, config, info, version)
        try:
            self._expected = manifest(config.model.snapshot_dir)  # what every later checkpoint must match
        except CheckpointError as exc:
            raise StartupError(f"engine tensorrt_llm: rl_ops needs a safetensors checkpoint: {exc}") from None
        self._device = "cuda:0" if torch.cuda.is_available() else "cpu"  # cpu: only ever the test double
        self.asleep = 0
        self.weights_unavailable: str | None = None  # why no weights are served (a swap failed part way)

    def step(self, rows: list[Row]) -> list[RowResult]:
        if self.asleep:
            return [RowResult(error=f"the engine is asleep (level {self.asleep}); send wake", code="ASLEEP")
                    for _ in rows]
        if self.weights_unavailable is not None:
            return [RowResult(error=self.weights_unavailable, code="WEIGHTS_UNAVAILABLE") for _ in rows]
        return super().step(rows)

    def load_weights(self, path: str) -> None:
        serving = self.weights_unavailable is None  # what a failure before the first update leaves served
        if self.asleep == 2:
            raise WeightsLoadError("the weights are released (asleep at level 2); send wake first", serving)
        try:
            tensors = stage(path, self._expected)
        except CheckpointError as exc:
            raise WeightsLoadError(str(exc), serving) from None
        try:
            # Asked here, not at start-up: the question opens a CUDA context in this process.
            uuid = importlib.import_module("tensorrt_llm._torch.utils").get_device_uuid(0)
        except Exception as exc:
            raise WeightsLoadError(f"cannot name this GPU for TensorRT-LLM ({type(exc).__name__}: {exc})",
                                   serving) from None
        try:
            for names in buckets(tensors):
                payload, device_tensors = handles(tensors, names, self._device)
                self.llm._collective_rpc("update_weights", ({uuid: payload},))
                del device_tensors  # the worker has copied them
            self.llm._collective_rpc("update_weights", (None,))  # post-load hooks, then reset the prefix cache
        except Exception as exc:
            self.weights_unavailable = (f"no weights are served: loading {path} failed part way "
                                        f"({type(exc).__name__}: {exc}); load a checkpoint to serve again")
            raise WeightsLoadError(self.weights_unavailable, serving_previous=False) from None
        self.weights_unavailable = None
        self.kv_epoch += 1

    def sleep(self, level: int) -> None:
        if level not in LEVEL_TAGS:
            raise ValueError(f"sleep level {level} is not 1 or 2")
        if level <= self.asleep:
            return
        tags = [t for t in LEVEL_TAGS[level] if t not in LEVEL_TAGS.get(self.asleep, ())]
        # Releasing the KV cache keeps its reuse index, so a block indexed now would serve lost KV after wake:
        # reset it where the worker extension offers that, and the salt epoch bumped by wake isolates the rest.
        with contextlib.suppress(AttributeError):  # an extension without it (not every 1.2-era rlhf_utils has one)
            self.llm._collective_rpc("reset_prefix_cache")
        previous, self.asleep = self.asleep, level  # nothing may run while the release is under way
        try:
            self.llm._collective_rpc("sleep", (tags,))
        except Exception:
            # The caller still counts this engine as awake (or at the previous level): map back whatever
            # part of the release happened, so that the engine is what the caller believes.
            with contextlib.suppress(Exception):
                self.llm._collective_rpc("wakeup", (tags,))
            self.asleep = previous
            raise

    def wake(self) -> None:
        if not self.asleep:
            return
        self.llm._collective_rpc("wakeup", (list(LEVEL_TAGS[self.asleep]),))
        self.asleep = 0
        self.kv_epoch += 1
