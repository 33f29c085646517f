"""TEST DOUBLE of TensorRT-LLM 1.2.1 (`tensorrt_llm.executor.ray_gpu_worker`, `ray_executor`), not the real package.

With `orchestrator_type="ray"` the real `LLM._executor` is a `RayExecutor` whose `collective_rpc(method, args,
kwargs, non_block, unique_reply_rank)` calls `RayWorkerWrapper.call_worker_method` on every GPU worker and
returns their results as a list; `LLM._collective_rpc` is the only caller ("Currently, this is only supported
for RayExecutor", `llmapi/llm.py` at 4c05a748). The worker class is `RayGPUWorker`, extended with the class
named by `ray_worker_extension_cls` (`_inject_worker_extension` refuses a name the worker already defines).
`RayGPUWorker.sleep(tags)` / `wakeup(tags)` refuse unless `enable_sleep`, check the tags, then release or
materialize them (`executor/ray_gpu_worker.py`). The double runs one worker in this process and starts no Ray.
"""

from __future__ import annotations

import importlib
import logging
from typing import Any

from .._calls import record
from .._torch.virtual_memory import materialize_with_tag, release_with_tag, verify_sleep_wakeup_tags

logger = logging.getLogger("tensorrt_llm")


class _ModelEngine:
    def __init__(self, model: Any) -> None:
        self.model = model


class RayEngine:
    """What the worker calls `self.engine`: the PyExecutor, reduced to what the RL calls touch."""

    def __init__(self, llm: Any) -> None:
        self._llm = llm
        self.model_engine = _ModelEngine(llm._model)

    def reset_prefix_cache(self) -> None:
        record("PyExecutor.reset_prefix_cache")
        self._llm._index.reset()


class RayGPUWorker:
    def __init__(self, device_id: int, engine: RayEngine, llm_args: Any) -> None:
        self.device_id = device_id
        self.engine = engine
        self.llm_args = llm_args

    def sleep(self, sleep_tags: list[str]) -> None:
        if not self.llm_args.enable_sleep:
            raise ValueError("Sleep feature is not enabled, please set enable_sleep=True in the LLM arguments.")
        tags = verify_sleep_wakeup_tags(sleep_tags)
        if "kv_cache" in tags:  # released with its contents; the reuse index is left as it was
            self.engine._llm._index.contents_lost(self.engine._llm._model)
        release_with_tag(*tags)

    def wakeup(self, wakeup_tags: list[str]) -> None:
        if not self.llm_args.enable_sleep:
            raise ValueError("Sleep feature is not enabled, please set enable_sleep=True in the LLM arguments.")
        materialize_with_tag(*verify_sleep_wakeup_tags(wakeup_tags))


def _resolve(qualname: str) -> Any:
    module_name, obj_name = qualname.rsplit(".", 1)
    return getattr(importlib.import_module(module_name), obj_name)


def inject_worker_extension(worker_class: type, extension_cls_name: str | None) -> type:
    if not extension_cls_name:
        return worker_class
    try:
        extension_cls = _resolve(extension_cls_name)
    except (ImportError, AttributeError, ValueError) as e:
        raise RuntimeError(f"Failed to load worker extension '{extension_cls_name}'") from e
    for attr in dir(extension_cls):
        if not attr.startswith("__") and hasattr(worker_class, attr):
            raise ValueError(f"Worker class {worker_class.__name__} already defines '{attr}', which conflicts "
                             f"with extension {extension_cls.__name__}.")
    return type(f"{worker_class.__name__}With{extension_cls.__name__}", (worker_class, extension_cls),
                {"__module__": worker_class.__module__})


class RayExecutor:
    def __init__(self, llm: Any) -> None:
        worker_cls = inject_worker_extension(RayGPUWorker, llm.args.ray_worker_extension_cls)
        self.workers = [worker_cls(device_id=0, engine=RayEngine(llm), llm_args=llm.args)]
        self._shutdown = False

    def collective_rpc(self, method: str, args: tuple[Any, ...] = (), kwargs: dict | None = None,
                       non_block: bool = False, unique_reply_rank: int | None = None) -> list[Any]:
        record("collective_rpc", method=method, args=args, kwargs=kwargs)
        results = []
        for worker in self.workers:
            call = getattr(worker, method, None)
            if call is None:
                raise AttributeError(f"The RayGPUWorker has no method called '{method}'.")
            if not callable(call):
                raise AttributeError(f"'{method}' is not a callable method of RayGPUWorker.")
            results.append(call(*args, **(kwargs or {})))
        return results if unique_reply_rank is None else results[unique_reply_rank]

    def is_shutdown(self) -> bool:
        return self._shutdown

    def shutdown(self) -> None:
        self._shutdown = True


__all__ = ["RayExecutor", "RayGPUWorker"]
