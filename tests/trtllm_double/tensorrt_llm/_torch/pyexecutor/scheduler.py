"""TEST DOUBLE of TensorRT-LLM 1.2.1 private internals (`tensorrt_llm._torch.pyexecutor.scheduler`).

Not the real package. `ScheduledRequests(context_requests, generation_requests, paused_requests)` per
trtllm-api.md 5.3. The scheduler admits unfinished active requests up to `max_num_requests` and within the
token budget `max_num_tokens` of one iteration, requests already generating first (1 token each, like
GUARANTEED_NO_EVICT), then prompts in arrival order. Without chunked prefill a prompt whose remainder does
not fit the budget left waits (and one longer than the whole budget never runs: `LLM` refuses it on the
public path); with chunked prefill it gets the largest multiple of `chunk_unit` (the KV block size) that
fits, or its whole remainder when that fits.
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
    def __init__(self, max_num_requests: int, max_num_tokens: int | None = None, *, chunked_prefill: bool = False,
                 chunk_unit: int = 32) -> None:
        self.max_num_requests = max_num_requests
        self.max_num_tokens = max_num_tokens
        self.chunked_prefill = chunked_prefill
        self.chunk_unit = chunk_unit

    def schedule_request(self, active_requests: list[LlmRequest], inflight_request_ids: set[int]) -> SchedulerOutput:
        out = SchedulerOutput()
        live = [r for r in active_requests if not r.is_finished and r.py_request_id not in inflight_request_ids]
        generating = [r for r in live if r.is_generation_in_progress_state]
        new = [r for r in live if r.state == LlmRequestState.CONTEXT_INIT]
        budget = self.max_num_tokens if self.max_num_tokens is not None else float("inf")
        for req in generating + new:
            if len(out.context_requests) + len(out.generation_requests) >= self.max_num_requests:
                break
            if req.state != LlmRequestState.CONTEXT_INIT:
                if budget >= 1:
                    out.generation_requests.append(req)
                    budget -= 1
                continue
            remaining = req.context_remaining_length
            if remaining <= budget:
                chunk = remaining
            elif self.chunked_prefill and budget >= self.chunk_unit:
                chunk = int(budget // self.chunk_unit * self.chunk_unit)
            else:
                continue
            req.context_chunk_size = chunk
            out.context_requests.append(req)
            budget -= chunk
        out.num_fitting_requests = len(out.context_requests) + len(out.generation_requests)
        return out

    def __repr__(self) -> str:
        return f"SimpleScheduler(max_num_requests={self.max_num_requests})"




__all__ = ["RequestScheduler", "ScheduledRequests", "SchedulerOutput", "SimpleScheduler"]
