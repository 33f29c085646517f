"""TEST DOUBLE of TensorRT-LLM 1.2.1 private internals (`...pyexecutor.executor_request_queue`).

Not the real package. Method names per trtllm-api.md 5.2 (`enqueue_requests`, `enqueue_request`,
`enqueue_cancel_request`, `enqueue_shutdown_request`, `fetch_new_requests(active_requests)`,
`get_canceled_req_ids()`); request ids start at `max_batch_size` like the older PyExecutor queue.
"""

from __future__ import annotations

import queue
import threading
from dataclasses import dataclass
from typing import Any

from ..._calls import record
from .llm_request import LlmRequest, executor_request_to_llm_request

SHUTDOWN_REQUEST_ID = -1
CANCEL_REQUEST_ID = -2


@dataclass
class RequestQueueItem:
    id: int
    request: Any = None
    query: Any = None
    cancel_id: int | None = None

    @property
    def is_shutdown_request(self) -> bool:
        return self.id == SHUTDOWN_REQUEST_ID

    @property
    def is_canceled_request(self) -> bool:
        return self.id == CANCEL_REQUEST_ID


class ExecutorRequestQueue:
    def __init__(self, max_batch_size: int, poll_timeout_s: float = 0.05) -> None:
        self.request_queue: queue.Queue[RequestQueueItem] = queue.Queue()
        self.enqueue_lock = threading.Lock()
        self.next_request_id = max_batch_size
        self.active = True
        self.is_shutdown = False
        self.canceled_req_ids: list[int] = []
        self.poll_timeout_s = poll_timeout_s

    def _get_request_id(self) -> int:
        req_id = self.next_request_id
        self.next_request_id += 1
        return req_id

    def enqueue_requests(self, requests: list[Any]) -> list[int]:
        with self.enqueue_lock:
            ids = []
            for request in requests:
                req_id = self._get_request_id()
                self.request_queue.put(RequestQueueItem(req_id, request))
                ids.append(req_id)
            return ids

    def enqueue_request(self, request: Any, query: Any = None) -> int:
        with self.enqueue_lock:
            req_id = self._get_request_id()
            self.request_queue.put(RequestQueueItem(req_id, request, query))
            return req_id

    def enqueue_cancel_request(self, req_id: int) -> None:
        with self.enqueue_lock:
            self.request_queue.put(RequestQueueItem(CANCEL_REQUEST_ID, cancel_id=req_id))

    def enqueue_shutdown_request(self) -> None:
        record("enqueue_shutdown_request")
        with self.enqueue_lock:
            self.request_queue.put(RequestQueueItem(SHUTDOWN_REQUEST_ID))
            self.active = False

    def can_enqueue_request(self) -> bool:
        with self.enqueue_lock:
            return self.active

    def get_canceled_req_ids(self) -> list[int]:
        return list(self.canceled_req_ids)

    def clear_canceled_req_ids(self) -> None:
        self.canceled_req_ids.clear()

    def fetch_new_requests(self, active_requests: list[LlmRequest]) -> list[LlmRequest]:
        """Drain the queue; block (poll_timeout_s at a time) while nothing is active and no shutdown was seen."""
        items: list[RequestQueueItem] = []
        if not active_requests and not self.is_shutdown:
            try:
                items.append(self.request_queue.get(timeout=self.poll_timeout_s))
            except queue.Empty:
                return []
        while True:
            try:
                items.append(self.request_queue.get_nowait())
            except queue.Empty:
                break
        new: list[LlmRequest] = []
        for item in items:
            if item.is_shutdown_request:
                self.is_shutdown = True
            elif item.is_canceled_request:
                self.canceled_req_ids.append(int(item.cancel_id))  # type: ignore[arg-type]
            else:
                new.append(executor_request_to_llm_request(item.id, item.request, [], False))
        return new


__all__ = ["CANCEL_REQUEST_ID", "SHUTDOWN_REQUEST_ID", "ExecutorRequestQueue", "RequestQueueItem"]
