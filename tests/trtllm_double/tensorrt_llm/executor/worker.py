"""TEST DOUBLE of TensorRT-LLM 1.2.1 private internals (`tensorrt_llm.executor.worker`), not the real package.

`GenerationExecutorWorker` is what `llm._executor` is when TP=1 and `TLLM_WORKER_USE_SINGLE_PROCESS=1`
(or `gather_generation_logits=True`) (trtllm-api.md 5.1): the PyExecutor lives in this process as `.engine`.
The double's `LLM.generate` keeps its own computation and does not submit through this worker.
"""

from __future__ import annotations

import logging
from typing import Any

logger = logging.getLogger("tensorrt_llm")


class GenerationExecutorWorker:
    def __init__(self, engine: Any) -> None:
        self.engine = engine
        self._results: dict[int, Any] = {}
        self._client_id_to_request_id: dict[int, int] = {}
        self._shutdown = False

    def is_shutdown(self) -> bool:
        return self._shutdown

    def shutdown(self) -> None:
        if self._shutdown:
            return
        self._shutdown = True
        engine = self.engine
        if engine.worker_thread is not None and engine.worker_thread.is_alive():
            engine.shutdown()
        else:  # stopped by the caller already (or never started): free what is left
            engine.resource_manager.shutdown()


__all__ = ["GenerationExecutorWorker"]
