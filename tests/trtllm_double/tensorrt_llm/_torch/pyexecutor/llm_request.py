"""TEST DOUBLE of TensorRT-LLM 1.2.1 private internals (`tensorrt_llm._torch.pyexecutor.llm_request`).

Not the real package. The real `LlmRequest` subclasses the C++ `bindings.internal.batch_manager.LlmRequest`;
this one is pure Python with the attributes and methods of trtllm-api.md 5.4 that the PyExecutor path uses.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from ..._calls import record
from ...bindings import SamplingConfig
from ...bindings import executor as tllm_executor


class LlmRequestState(Enum):
    # Member names per trtllm-api.md 5.4; the numeric values are a guess (the C++ enum's are not documented there).
    UNKNOWN = 0
    ENCODER_INIT = 1
    CONTEXT_INIT = 2
    GENERATION_IN_PROGRESS = 3
    GENERATION_TO_COMPLETE = 4
    GENERATION_COMPLETE = 5
    DISAGG_GENERATION_INIT = 6
    DISAGG_CONTEXT_TRANS_IN_PROGRESS = 7
    DISAGG_CONTEXT_COMPLETE = 8
    DISAGG_GENERATION_TRANS_IN_PROGRESS = 9
    DISAGG_GENERATION_TRANS_COMPLETE = 10
    DISAGG_CONTEXT_INIT_AND_TRANS = 11


class FinishReason(Enum):
    NOT_FINISHED = 0
    END_ID = 1
    STOP_WORDS = 2
    LENGTH = 3
    TIMED_OUT = 4
    CANCELLED = 5


@dataclass
class LlmResult:
    """What `create_response` carries (a small subset of the real LlmResult)."""

    request_id: int
    is_final: bool
    output_token_ids: list[list[int]]
    finish_reasons: list[FinishReason]
    decoding_iter: int
    sequence_index: int = 0
    cached_tokens: int = 0
    log_probs: Any = None
    cum_log_probs: Any = None
    context_logits: Any = None
    generation_logits: Any = None


@dataclass
class LlmResponse:
    request_id: int
    error_msg: str | None = None
    result: LlmResult | None = None
    client_id: int | None = None

    def has_error(self) -> bool:
        return self.error_msg is not None


@dataclass
class PyResult:
    log_probs: list[Any] = field(default_factory=list)


class LlmRequest:
    """One sequence (beam width 1) with the prompt, the generated tokens and its state."""

    def __init__(self, *, request_id: int, max_new_tokens: int, input_tokens: list[int],
                 sampling_config: SamplingConfig, is_streaming: bool = False, end_id: int | None = None,
                 pad_id: int | None = None, client_id: int | None = None, return_log_probs: bool = False,
                 return_context_logits: bool = False, return_generation_logits: bool = False,
                 exclude_input_from_output: bool = False, stop_words_list: list[list[int]] | None = None,
                 bad_words_list: list[list[int]] | None = None, cache_salt_id: int | None = None,
                 priority: float = 0.5, arrival_time: float | None = None, **kwargs: Any) -> None:
        if sampling_config.beam_width != 1:
            raise ValueError("the TensorRT-LLM test double supports beam_width == 1 only")
        self.request_id = request_id
        self.py_request_id = request_id
        self.client_id = client_id
        self.py_client_id = client_id
        self.max_new_tokens = max_new_tokens
        self.py_max_new_tokens = max_new_tokens
        self._tokens = [int(t) for t in input_tokens]
        self.prompt_len = len(self._tokens)
        self.py_prompt_len = self.prompt_len
        self.orig_prompt_len = self.prompt_len
        self.py_orig_prompt_len = self.prompt_len
        self.sampling_config = sampling_config
        self.is_streaming = is_streaming
        self.streaming = is_streaming
        self.end_id = end_id
        self.py_end_id = end_id
        self.pad_id = pad_id
        self.stop_words_list = stop_words_list
        self.py_stop_words_list = stop_words_list
        self.bad_words_list = bad_words_list
        self.cache_salt_id = cache_salt_id
        self.priority = priority
        self.py_arrival_time = arrival_time if arrival_time is not None else time.time()
        self.py_return_log_probs = return_log_probs
        self.return_context_logits = return_context_logits
        self.return_generation_logits = return_generation_logits
        self.exclude_input_from_output = exclude_input_from_output
        self.py_num_logprobs = kwargs.pop("num_logprobs", None)
        self.py_extra_kwargs = kwargs
        self.state = LlmRequestState.CONTEXT_INIT
        self.finish_reasons = [FinishReason.NOT_FINISHED]
        self.context_current_position = 0
        self._context_chunk_size: int | None = None
        self.seq_slot: int | None = None
        self.py_seq_slot: int | None = None
        self.py_batch_idx: int | None = None
        self.py_decoding_iter = 0
        self.py_draft_tokens: list[int] = []
        self.py_result = PyResult()
        self.cached_tokens = 0
        self._last_response_len = self.prompt_len

    # -- tokens --------------------------------------------------------------------------------------------
    def get_tokens(self, beam: int | None = None) -> list[int]:
        if beam not in (None, 0):
            raise IndexError(f"beam {beam} out of range (beam width 1)")
        return list(self._tokens)

    def get_num_tokens(self, beam: int = 0) -> int:
        return len(self._tokens)

    def get_last_tokens(self, beam: int = 0) -> int:
        return self._tokens[-1]

    def add_new_token(self, token: int, beam: int = 0) -> None:
        self._tokens.append(int(token))

    @property
    def max_beam_num_tokens(self) -> int:
        return len(self._tokens)

    @property
    def num_generated_tokens(self) -> int:
        return len(self._tokens) - self.prompt_len

    # -- context progress ---------------------------------------------------------------------------------
    @property
    def context_remaining_length(self) -> int:
        return self.prompt_len - self.context_current_position

    @property
    def context_chunk_size(self) -> int:
        """Set by the scheduler (the whole remainder unless it chunks)."""
        return self._context_chunk_size if self._context_chunk_size is not None else self.context_remaining_length

    @context_chunk_size.setter
    def context_chunk_size(self, size: int) -> None:
        self._context_chunk_size = size

    def move_to_next_context_chunk(self) -> None:
        self.context_current_position = min(self.prompt_len, self.context_current_position + self.context_chunk_size)
        self._context_chunk_size = None

    @property
    def is_first_context_chunk(self) -> bool:
        return self.context_current_position == 0

    @property
    def is_last_context_chunk(self) -> bool:
        return self.context_current_position + self.context_chunk_size >= self.prompt_len

    # -- state ----------------------------------------------------------------------------------------------
    @property
    def is_context_init_state(self) -> bool:
        return self.state == LlmRequestState.CONTEXT_INIT

    @property
    def is_generation_in_progress_state(self) -> bool:
        return self.state in (LlmRequestState.GENERATION_IN_PROGRESS, LlmRequestState.GENERATION_TO_COMPLETE)

    @property
    def is_generation_complete_state(self) -> bool:
        return self.state == LlmRequestState.GENERATION_COMPLETE

    @property
    def is_finished(self) -> bool:
        return self.state == LlmRequestState.GENERATION_COMPLETE

    @property
    def is_generation_only_request(self) -> bool:
        return False

    def finish_by_reason(self, reason: FinishReason) -> None:
        self.finish_reasons = [reason]
        self.state = LlmRequestState.GENERATION_COMPLETE

    def finish_by(self, reason: FinishReason, beam: int) -> None:
        self.finish_by_reason(reason)

    # -- responses ------------------------------------------------------------------------------------------
    def create_response(self, use_fast_logits: bool = False, mpi_world_rank: int = 0) -> LlmResponse | None:
        """A non-streaming response only when finished; a streaming one when new tokens exist."""
        new = self._tokens[self._last_response_len:]
        if not self.is_finished and (not self.is_streaming or not new):
            return None
        self._last_response_len = len(self._tokens)
        output = self._tokens[self.prompt_len:] if not self.is_streaming else new
        result = LlmResult(request_id=self.request_id, is_final=self.is_finished, output_token_ids=[output],
                           finish_reasons=list(self.finish_reasons), decoding_iter=self.py_decoding_iter,
                           cached_tokens=self.cached_tokens)
        return LlmResponse(request_id=self.request_id, result=result, client_id=self.client_id)

    def __repr__(self) -> str:
        return (f"LlmRequest(request_id={self.request_id}, state={self.state.name}, prompt_len={self.prompt_len}, "
                f"generated={self.num_generated_tokens}, max_new_tokens={self.max_new_tokens})")


def executor_request_to_llm_request(req_id: int, executor_request: tllm_executor.Request,
                                    child_req_ids: list[int], exclude_last_generation_logits: bool,
                                    input_token_ids: list[int] | None = None,
                                    position_ids: list[int] | None = None) -> LlmRequest:
    if child_req_ids:
        raise ValueError("the TensorRT-LLM test double does not model child requests (n > 1)")
    tokens = list(input_token_ids if input_token_ids is not None else executor_request.input_token_ids)
    record("executor_request_to_llm_request", request_id=req_id, client_id=executor_request.client_id,
           prompt_len=len(tokens), max_tokens=executor_request.max_tokens,
           cache_salt_id=executor_request.cache_salt_id)
    output_config = executor_request.output_config
    return LlmRequest(
        request_id=req_id, max_new_tokens=executor_request.max_tokens, input_tokens=tokens,
        sampling_config=SamplingConfig(executor_request.sampling_config), is_streaming=executor_request.streaming,
        end_id=executor_request.end_id, pad_id=executor_request.pad_id, client_id=executor_request.client_id,
        return_log_probs=output_config.return_log_probs, return_context_logits=output_config.return_context_logits,
        return_generation_logits=output_config.return_generation_logits,
        exclude_input_from_output=output_config.exclude_input_from_output,
        stop_words_list=executor_request.stop_words, bad_words_list=executor_request.bad_words,
        cache_salt_id=executor_request.cache_salt_id, priority=executor_request.priority,
        exclude_last_generation_logits=exclude_last_generation_logits, position_ids=position_ids,
        num_logprobs=getattr(executor_request, "py_num_logprobs", None),
        arrival_time=getattr(executor_request, "py_arrival_time", None))


__all__ = ["FinishReason", "LlmRequest", "LlmRequestState", "LlmResponse", "LlmResult",
           "executor_request_to_llm_request"]
