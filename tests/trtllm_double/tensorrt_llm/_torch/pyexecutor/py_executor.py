"""TEST DOUBLE of TensorRT-LLM 1.2.1 private internals (`tensorrt_llm._torch.pyexecutor.py_executor`).

Not the real package. `PyExecutor` per trtllm-api.md 5.2/5.3: a daemon `worker_thread` started at construction
runs the non-overlap `_executor_loop` (fetch from `executor_request_queue`, `_schedule`, `prepare_resources`,
`_forward_step`, `_sample_async`, `_update_request_states`, `_update_requests`, `_handle_responses`,
`update_resources`) and exits when it sees `enqueue_shutdown_request()` with nothing active. A caller that has
stopped the thread may call those private methods itself, in the same order, one iteration at a time.
"""

from __future__ import annotations

import datetime
import logging
import threading
import traceback
from typing import Any

from ..._calls import record
from .executor_request_queue import ExecutorRequestQueue
from .llm_request import LlmRequest, LlmRequestState, LlmResponse
from .model_engine import PyTorchModelEngine
from .resource_manager import ResourceManager
from .sampler import Sampler, SampleState
from .scheduler import RequestScheduler, ScheduledRequests

logger = logging.getLogger("tensorrt_llm")


class PyExecutor:
    def __init__(self, resource_manager: ResourceManager, scheduler: RequestScheduler,
                 model_engine: PyTorchModelEngine, sampler: Sampler, dist: Any,
                 drafter: Any = None, disable_overlap_scheduler: bool = False, max_input_len: int = 2048,
                 max_batch_size: int = 8, max_beam_width: int = 1, max_draft_len: int = 0,
                 max_total_draft_tokens: int = 0, kv_cache_transceiver: Any = None, guided_decoder: Any = None,
                 garbage_collection_gen0_threshold: int | None = None, start_worker: bool = True,
                 kv_connector_manager: Any = None, max_seq_len: int | None = None,
                 peft_cache_config: Any = None) -> None:
        self.resource_manager = resource_manager
        self.scheduler = scheduler
        self.model_engine = model_engine
        self.sampler = sampler
        self.dist = dist
        self.drafter = drafter
        # The real constructor keeps the request cap only here (py_executor.py, 1.1/1.2-era:
        # `self.max_num_active_requests = model_engine.get_max_num_sequences()`); it has no max_num_sequences.
        self.max_num_active_requests = model_engine.get_max_num_sequences()
        self.max_batch_size = max_batch_size
        self.max_input_len = max_input_len
        self.max_beam_width = max_beam_width
        self.max_draft_len = max_draft_len
        self.max_seq_len = max_seq_len
        # The double always runs the non-overlap loop (trtllm-api.md 5.3), whatever this flag says.
        self.disable_overlap_scheduler = disable_overlap_scheduler
        self.active_requests: list[LlmRequest] = []
        self.previous_batch: Any = None
        self.inflight_req_ids: set[int] = set()
        self.responses: dict[int, list[LlmResponse]] = {}
        self.response_lock = threading.Lock()
        self.response_cv = threading.Condition(self.response_lock)
        self.executor_request_queue = ExecutorRequestQueue(max_batch_size)
        self.is_shutdown = False
        self.shutdown_event = threading.Event()
        self.worker_lock = threading.Lock()
        self.worker_started = False
        self.worker_thread: threading.Thread | None = None
        self.iter_counter = 0
        self.event_loop = self._executor_loop
        if start_worker:
            self.start_worker()

    # -- the worker thread ---------------------------------------------------------------------------------
    def start_worker(self) -> None:
        with self.worker_lock:
            if not self.worker_started:
                self.worker_thread = threading.Thread(target=self._event_loop_wrapper, daemon=True,
                                                      name="pyexecutor-worker")
                self.worker_thread.start()
                self.worker_started = True

    def _event_loop_wrapper(self) -> None:
        try:
            self.event_loop()
        except Exception as e:  # the real wrapper logs and re-raises
            logger.error(f"Error in event loop: {e}")
            logger.error(traceback.format_exc())
            raise
        finally:
            self._executor_loop_cleanup()

    def _executor_loop_cleanup(self) -> None:
        with self.response_cv:
            self.is_shutdown = True
            self.response_cv.notify_all()
        self.shutdown_event.set()

    @property
    def should_stop_processing(self) -> bool:
        return self.executor_request_queue.is_shutdown and len(self.active_requests) == 0

    def _fetch_and_activate_new_requests(self) -> list[LlmRequest]:
        new = self.executor_request_queue.fetch_new_requests(self.active_requests)
        for req in new:
            self._validate_request(req)
        self.active_requests.extend(new)
        return new

    def _validate_request(self, request: LlmRequest) -> None:
        vocab = int(self.model_engine.model.config.vocab_size)
        bad = [t for t in request.get_tokens(0) if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"Token ID out of range: {bad[:5]} (vocab size {vocab})")

    def _prepare_and_schedule_batch(self) -> tuple[ScheduledRequests | None, Any]:
        self._fetch_and_activate_new_requests()
        if self.should_stop_processing:
            return None, None
        for req_id in self.executor_request_queue.get_canceled_req_ids():
            self._handle_canceled_request(req_id)
        self.executor_request_queue.clear_canceled_req_ids()
        scheduled_batch, _, _ = self._schedule()
        return scheduled_batch, None

    def _handle_canceled_request(self, req_id: int) -> None:
        for req in list(self.active_requests):
            if req.py_request_id == req_id:
                from .llm_request import FinishReason

                req.finish_by_reason(FinishReason.CANCELLED)

    def _executor_loop(self) -> None:
        while True:
            scheduled_batch, _ = self._prepare_and_schedule_batch()
            if scheduled_batch is None:
                break
            if scheduled_batch.batch_size > 0:
                self._run_iteration(scheduled_batch)
            else:
                self._handle_responses()  # cancelled requests still get their final response

    def _run_iteration(self, scheduled_batch: ScheduledRequests) -> None:
        self.resource_manager.prepare_resources(scheduled_batch)
        batch_outputs = self._forward_step(scheduled_batch)
        if batch_outputs is None:
            return
        sample_state = self._sample_async(scheduled_batch, batch_outputs)
        if sample_state is None:
            return
        if sample_state.sampler_event is not None:
            sample_state.sampler_event.synchronize()
        self._update_request_states(scheduled_batch)
        self._update_requests(sample_state, self.resource_manager)
        self._handle_responses()
        self.resource_manager.update_resources(scheduled_batch, self.model_engine.attn_metadata,
                                               self.model_engine.kv_cache_dtype_byte_size)

    # -- one iteration, piece by piece ---------------------------------------------------------------------
    def _schedule(self) -> tuple[ScheduledRequests, list[LlmRequest], int]:
        out = self.scheduler.schedule_request(self.active_requests, self.inflight_req_ids)
        scheduled = ScheduledRequests()
        scheduled.context_requests = out.context_requests
        scheduled.generation_requests = out.generation_requests
        scheduled.paused_requests = out.paused_requests
        return scheduled, out.fitting_disagg_gen_init_requests, out.num_fitting_requests

    def _forward_step(self, scheduled_requests: ScheduledRequests, new_tensors_device: Any = None) -> Any:
        try:
            outputs = self.model_engine.forward(scheduled_requests, self.resource_manager, new_tensors_device)
            self.iter_counter += 1
            return outputs
        except Exception as e:
            traceback.print_exc()
            self._handle_errors(f"Encountered an error in forward function: {e!r}")
            return None

    def _sample_async(self, scheduled_batch: ScheduledRequests, batch_outputs: dict[str, Any]) -> SampleState | None:
        try:
            num_context_logits_prefix_sum = list(range(len(scheduled_batch.context_requests) + 1))
            return self.sampler.sample_async(scheduled_batch, batch_outputs, num_context_logits_prefix_sum,
                                             self.resource_manager)
        except Exception as e:
            traceback.print_exc()
            self._handle_errors(f"Encountered an error in sampling: {e!r}")
            return None

    def _update_request_states(self, scheduled_requests: ScheduledRequests) -> None:
        for request in scheduled_requests.context_requests:
            request.move_to_next_context_chunk()
            if request.context_remaining_length == 0:
                request.state = LlmRequestState.GENERATION_IN_PROGRESS

    def _update_requests(self, sample_state: SampleState, resource_manager: Any = None) -> None:
        try:
            self.sampler.update_requests(sample_state, resource_manager)
        except Exception as e:
            traceback.print_exc()
            self._handle_errors(f"Encountered an error in sample update: {e!r}")

    def _enqueue_responses(self, responses: list[tuple[int, LlmResponse]]) -> None:
        with self.response_cv:
            for req_id, resp in responses:
                self.responses.setdefault(req_id, []).append(resp)
            self.response_cv.notify_all()

    def _handle_responses(self) -> list[LlmRequest]:
        new_responses: list[tuple[int, LlmResponse]] = []
        new_active: list[LlmRequest] = []
        to_terminate: list[LlmRequest] = []
        for request in self.active_requests:
            response = request.create_response(False, 0)
            if response is not None:
                new_responses.append((request.py_request_id, response))
            if request.is_finished:
                to_terminate.append(request)
            else:
                new_active.append(request)
        self.active_requests.clear()
        self.active_requests.extend(new_active)
        self._enqueue_responses(new_responses)
        for request in to_terminate:
            self._terminate_request(request)
        return to_terminate

    def _terminate_request(self, request: LlmRequest) -> None:
        record("PyExecutor._terminate_request", request_id=request.py_request_id)
        self._do_terminate_request(request)
        if request in self.active_requests:
            self.active_requests.remove(request)

    def _do_terminate_request(self, request: LlmRequest) -> None:
        self.resource_manager.free_resources(request)

    def _handle_errors(self, error_msg: str | None = None, *, requests: list[LlmRequest] | None = None) -> None:
        error_msg = error_msg or "error"
        failed = list(self.active_requests) if requests is None else list(requests)
        responses = []
        for request in failed:
            request.state = LlmRequestState.GENERATION_COMPLETE
            responses.append((request.py_request_id,
                              LlmResponse(request.py_request_id, error_msg, client_id=request.py_client_id)))
        self._enqueue_responses(responses)
        for request in failed:
            self._terminate_request(request)

    # -- public-ish API -----------------------------------------------------------------------------------
    def enqueue_requests(self, requests: list[Any], result_wait_queue: Any = None) -> list[int]:
        return self.executor_request_queue.enqueue_requests(requests)

    def enqueue_request(self, request: Any, query: Any = None, result_wait_queue: Any = None) -> int:
        return self.executor_request_queue.enqueue_request(request, query)

    def cancel_request(self, id: int) -> None:
        self.executor_request_queue.enqueue_cancel_request(id)

    def can_enqueue_requests(self) -> bool:
        return self.executor_request_queue.can_enqueue_request()

    def await_responses(self, id: int | list[int] | None = None,
                        timeout: datetime.timedelta | None = None) -> Any:
        timeout_s = timeout.total_seconds() if timeout is not None else None
        with self.response_cv:
            if id is None:
                self.response_cv.wait_for(lambda: bool(self.responses) or self.is_shutdown, timeout_s)
                out = [r for rs in self.responses.values() for r in rs]
                self.responses.clear()
                return out
            ids = [id] if isinstance(id, int) else list(id)
            results = []
            for one in ids:
                self.response_cv.wait_for(lambda one=one: one in self.responses or self.is_shutdown, timeout_s)
                results.append(self.responses.pop(one, []))
            return results[0] if isinstance(id, int) else results

    def shutdown(self) -> None:
        self.executor_request_queue.enqueue_shutdown_request()
        if self.worker_thread is None:
            # The real one waits on shutdown_event forever here (trtllm-api.md 5.3): fail loudly instead.
            raise RuntimeError("test double: PyExecutor.shutdown() without a started worker thread would hang "
                               "(the real one waits on shutdown_event)")
        if not self.shutdown_event.wait(timeout=60):
            raise RuntimeError("test double: PyExecutor.shutdown() timed out waiting for the worker loop")
        self.worker_thread.join()
        self.resource_manager.shutdown()

    def wait_shutdown(self) -> None:
        self.shutdown_event.wait()

    def set_gather_responses(self, gather_all_responses: bool) -> None:
        self.gather_all_responses = gather_all_responses

    def get_latest_iteration_stats(self) -> list[Any]:
        return []

    def get_latest_kv_cache_events(self) -> list[Any]:
        return []


__all__ = ["PyExecutor"]
