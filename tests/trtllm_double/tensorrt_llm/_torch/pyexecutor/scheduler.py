"""TEST DOUBLE of TensorRT-LLM 1.2.1 private internals (`tensorrt_llm._torch.pyexecutor.scheduler`).

Not the real package. `ScheduledRequests(context_requests, generation_requests, paused_requests)` per
trtllm-api.md 5.3. The scheduler admits every unfinished active request up to `max_num_requests`, requests
already generating first (like GUARANTEED_NO_EVICT), then new ones; a context is prefilled whole (no chunking,
no token budget).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .llm_request import LlmRequest, LlmRequestState


class ScheduledRequests:
    def __init__(self) -> None:
        self.context_requests: list[LlmRequest] = []
        self.generation_requests: list[LlmRequest] = []
        self.paused_requests: list[LlmRequest] = []

    @property
    def is_generation_only(self) -> bool:
        return not self.context_requests and all(not r.is_generation_only_request for r in self.generation_requests)

    @property
    def can_run_cuda_graph(self) -> bool:
        return False

    @property
    def batch_size(self) -> int:
        return len(self.context_requests) + len(self.generation_requests)

    def all_requests(self) -> list[LlmRequest]:
        return self.context_requests + self.generation_requests


@dataclass
class SchedulerOutput:
    context_requests: list[LlmRequest] = field(default_factory=list)
    generation_requests: list[LlmRequest] = field(default_factory=list)
    paused_requests: list[LlmRequest] = field(default_factory=list)
    fitting_disagg_gen_init_requests: list[LlmRequest] = field(default_factory=list)
    num_fitting_requests: int = 0


class RequestScheduler:
    def schedule_request(self, active_requests: list[LlmRequest], inflight_request_ids: set[int]) -> SchedulerOutput:
        raise NotImplementedError


class SimpleScheduler(RequestScheduler):
    def __init__(self, max_num_requests: int, max_num_tokens: int | None = None) -> None:
        self.max_num_requests = max_num_requests
        self.max_num_tokens = max_num_tokens

    def schedule_request(self, active_requests: list[LlmRequest], inflight_request_ids: set[int]) -> SchedulerOutput:
        out = SchedulerOutput()
        live = [r for r in active_requests if not r.is_finished and r.py_request_id not in inflight_request_ids]
        generating = [r for r in live if r.is_generation_in_progress_state]
        new = [r for r in live if r.state == LlmRequestState.CONTEXT_INIT]
        for req in generating + new:
            if len(out.context_requests) + len(out.generation_requests) >= self.max_num_requests:
                break
            (out.context_requests if req.state == LlmRequestState.CONTEXT_INIT
             else out.generation_requests).append(req)
        out.num_fitting_requests = len(out.context_requests) + len(out.generation_requests)
        return out

    def __repr__(self) -> str:
        return f"SimpleScheduler(max_num_requests={self.max_num_requests})"




__all__ = ["RequestScheduler", "ScheduledRequests", "SchedulerOutput", "SimpleScheduler"]
