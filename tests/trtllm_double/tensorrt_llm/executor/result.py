"""TEST DOUBLE of TensorRT-LLM 1.2.1 (`tensorrt_llm.executor.result`), not the real package.

Shapes per trtllm-api.md 2.3 and 2.5: `RequestOutput` (not constructible by users), `CompletionOutput` (slots
dataclass), `Logprob(logprob, rank)`. Results are computed lazily: each response the real executor would send is
one step of a generator, so `result()`, streaming iteration and `abort()` behave like the real future.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

TokenLogprobs = list[dict[int, "Logprob"]]


@dataclass(slots=True)
class Logprob:
    logprob: float
    rank: int | None = None


@dataclass(slots=True)
class CompletionOutput:
    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    cumulative_logprob: float | None = None
    logprobs: TokenLogprobs | list[float] = field(default_factory=list)
    prompt_logprobs: TokenLogprobs = field(default_factory=list)
    finish_reason: Literal["stop", "length", "timeout", "cancelled"] | None = None
    stop_reason: int | str | None = None
    generation_logits: Any = None
    additional_context_outputs: dict[str, Any] | None = None
    additional_generation_outputs: dict[str, Any] | None = None
    disaggregated_params: Any = None
    request_perf_metrics: Any = None
    _last_token_ids_len: int = field(default=0, repr=False)
    _last_logprobs_len: int = field(default=0, repr=False)
    _last_text_len: int = field(default=0, repr=False)

    @property
    def length(self) -> int:
        return len(self.token_ids)

    @property
    def token_ids_diff(self) -> list[int]:
        return self.token_ids[self._last_token_ids_len:]

    @property
    def logprobs_diff(self) -> TokenLogprobs | list[float]:
        return self.logprobs[self._last_logprobs_len:]

    @property
    def text_diff(self) -> str:
        return self.text[self._last_text_len:]


class GenerationResult:
    """The future returned by `generate_async`; `RequestOutput` is what users see."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        raise RuntimeError("RequestOutput can only be created by the LLM (test double: use LLM.generate_async).")

    @classmethod
    def _create(cls, *, request_id: int, prompt: str | None, prompt_token_ids: list[int], n: int,
                steps: Iterator[None], streaming: bool) -> RequestOutput:
        self = object.__new__(RequestOutput)
        self.request_id = request_id
        self.prompt = prompt
        self.prompt_token_ids = prompt_token_ids
        self.outputs = [CompletionOutput(index=i) for i in range(n)]
        self.finished = False
        self.context_logits = None
        self.cached_tokens = 0
        self.decoding_iter = 0
        self.streaming = streaming
        self.disaggregated_params = None
        self.metrics_dict = {}
        self._steps = steps
        self._aborted = False
        self._done_yielding = False
        self._error: BaseException | None = None
        try:
            asyncio.get_running_loop()
            self._has_loop = True
        except RuntimeError:
            self._has_loop = False
        return self

    # -- driving the (lazy) engine -------------------------------------------------------------------------
    def _mark_diffs(self) -> None:
        for out in self.outputs:
            out._last_token_ids_len = len(out.token_ids)
            out._last_logprobs_len = len(out.logprobs)
            out._last_text_len = len(out.text)

    def _advance(self) -> bool:
        """Run one response's worth of work; False once finished."""
        if self.finished:
            return False
        self._mark_diffs()
        try:
            if self.streaming:
                next(self._steps, None)
            else:
                for _ in self._steps:
                    pass
        except BaseException as e:  # a per-request error surfaces from result()
            self._error = e
            self.finished = True
            raise
        return True

    def result(self, timeout: float | None = None) -> RequestOutput:
        if self._error is not None:
            raise self._error
        while not self.finished:
            self._advance()
        return self  # type: ignore[return-value]

    async def aresult(self) -> RequestOutput:
        self._check_loop()
        return self.result()

    def __await__(self):  # type: ignore[no-untyped-def]
        return self.aresult().__await__()

    def _check_loop(self) -> None:
        if not self._has_loop:
            raise RuntimeError("The asyncio event loop was not present during initialization, so async operations "
                               "are not available.")

    def __iter__(self) -> GenerationResult:
        return self

    def __next__(self) -> RequestOutput:
        if self._done_yielding:
            raise StopIteration
        if self._error is not None:
            raise self._error
        self._advance()
        if self.finished:
            self._done_yielding = True
        return self  # type: ignore[return-value]

    def __aiter__(self) -> GenerationResult:
        self._check_loop()
        return self

    async def __anext__(self) -> RequestOutput:
        try:
            return self.__next__()
        except StopIteration:
            raise StopAsyncIteration from None

    def abort(self) -> None:
        if self.finished:
            return
        self._aborted = True
        self._mark_diffs()
        self._steps.close()
        for out in self.outputs:
            if out.finish_reason is None:
                out.finish_reason = "cancelled"
        self.finished = True

    def aborted(self) -> bool:
        return self._aborted

    def __repr__(self) -> str:
        return (f"RequestOutput(request_id={self.request_id}, prompt={self.prompt!r}, "
                f"prompt_token_ids={self.prompt_token_ids}, outputs={self.outputs}, finished={self.finished})")


class RequestOutput(GenerationResult):
    """The output of one request; built by the LLM, never by users (their `RequestOutput(...)` raises)."""

    request_id: int
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    cached_tokens: int
