"""Experimental: TensorRT-LLM's private PyExecutor driven in-process, so KV stays resident across steps.

TensorRT-LLM 1.2.1 has no public step API. At start-up this engine stops the executor's background
thread and then runs its private schedule / forward / sample / update methods itself, one iteration at a
time, for the requests of the current host step. Each host context keeps one greedy executor request
whose tokens equal the context's history; while they keep matching, a decode step costs one token.
Anything else (a rollback, a fork, a token other than the greedy one) recreates the request from the full
history. Samplers other than greedy are applied by the driver to the logits of the forward step (the
executor's default sampler ignores per-request seeds and `min_p`).

Private API: checked at load against `tensorrt_llm.__version__` and the attributes used below.
"""

from __future__ import annotations

import importlib
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import torch

from pie_driver_trtllm.config import DriverConfig, StartupError
from pie_driver_trtllm.engines.base import ModelInfo, Row, RowResult
from pie_driver_trtllm.engines.runs import chained_in_engine, step_with_runs
from pie_driver_trtllm.engines.sampling import row_result
from pie_driver_trtllm.engines.tensorrt_llm.generate import SamplingParamsBuilder
from pie_driver_trtllm.sampler import ALL_SAMPLERS

PINNED_VERSION = "1.2.1"
# Iterations in a row in which no scheduled request advanced (no prompt chunk, no token): the scheduler
# will not admit what is pending (token budget, KV blocks), and waiting changes nothing.
STALL_ITERATIONS = 3
EXECUTOR_ATTRIBUTES = ("model_engine", "resource_manager", "sampler", "scheduler", "active_requests",
                       "worker_thread", "executor_request_queue", "max_num_active_requests")
EXECUTOR_METHODS = ("_schedule", "_forward_step", "_sample_async", "_update_request_states", "_update_requests",
                    "_handle_responses", "_terminate_request")
PRIVATE_IMPORTS = (("tensorrt_llm.bindings.executor", "Request"),
                   ("tensorrt_llm._torch.pyexecutor.llm_request", "executor_request_to_llm_request"))


def check_private_api(trt: Any, config: DriverConfig) -> None:
    """Refuse, with the exact reason, a TensorRT-LLM this mode was not written against."""
    version = str(getattr(trt, "__version__", ""))
    if not version.startswith(PINNED_VERSION):
        raise StartupError(f"engine tensorrt_llm: execution_mode = \"pyexecutor\" drives private APIs of "
                           f"TensorRT-LLM {PINNED_VERSION}, but {version or 'an unknown version'} is installed; "
                           "use execution_mode = \"generate\"")
    backend = config.options.backend or config.options.llm_kwargs.get("backend")
    if backend not in (None, "pytorch"):
        raise StartupError(f"engine tensorrt_llm: execution_mode = \"pyexecutor\" needs the pytorch backend, "
                           f"not backend = {backend!r}")
    for module, name in PRIVATE_IMPORTS:
        try:
            getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError) as exc:
            raise StartupError(f"engine tensorrt_llm: pyexecutor mode needs {module}.{name}, which is missing "
                               f"({exc}); use execution_mode = \"generate\"") from None


@dataclass
class _Session:
    request: Any
    client_id: int


class PyExecutorEngine:
    kind = "tensorrt_llm"
    execution_mode = "pyexecutor"
    samplers = frozenset(ALL_SAMPLERS)
    logprob_modes = ("raw", "processed")  # from the forward step's logits, as in generate mode

    def __init__(self, llm: Any, trt: Any, config: DriverConfig, info: ModelInfo, version: str) -> None:
        self.llm = llm
        self.model = info
        self.version = version
        self._trt = trt
        self._options = config.options
        self._params = SamplingParamsBuilder(info)
        self._executor = _extract_executor(llm)
        _stop_worker(self._executor, config.options.pyexecutor_worker_stop_timeout_s)
        self._request_cls = importlib.import_module("tensorrt_llm.bindings.executor").Request
        self._to_llm_request = importlib.import_module(
            "tensorrt_llm._torch.pyexecutor.llm_request").executor_request_to_llm_request
        self._salt_id = getattr(importlib.import_module("tensorrt_llm.inputs"), "get_cache_salt_id", None)
        self._sessions: OrderedDict[int, _Session] = OrderedDict()
        self._next_id = 1
        self.prompt_tokens_computed = 0
        self.capacity = self._capacity()
        args = getattr(llm, "args", None)
        self._max_num_tokens = getattr(args, "max_num_tokens", None)
        self._chunked = bool(getattr(args, "enable_chunked_prefill", False))

    # ------------------------------------------------------------------ the interface

    def step(self, rows: list[Row]) -> list[RowResult]:
        # A greedy run is its request running n iterations; any other run's later tokens take one iteration
        # per token (every run of the forward in it), each sampled here with its per-step seed.
        return step_with_runs(self._step_once, rows, chained_in_engine)

    def _step_once(self, rows: list[Row]) -> list[RowResult]:
        results: list[RowResult | None] = [self._refusal(row) for row in rows]
        runnable = [i for i, result in enumerate(results) if result is None]
        for wave in _waves([rows[i] for i in runnable], self.capacity):
            wave = [runnable[i] for i in wave]
            try:
                for index, result in self._run_wave([rows[i] for i in wave]).items():
                    results[wave[index]] = result
            except Exception as exc:  # the executor failed: its requests are in an unknown state
                for i in wave:
                    self._end_session(rows[i].context)
                    results[i] = RowResult(error=f"pyexecutor: {exc}")
        return results  # type: ignore[return-value]

    def _refusal(self, row: Row) -> RowResult | None:
        if self._chunked or not self._max_num_tokens or row.length <= self._max_num_tokens:
            return None
        if self._resident(row) is not None:
            return None  # only the new tokens run
        # The scheduler never admits a prompt over its token budget unless it may chunk it.
        return RowResult(error=f"a history of {row.length} tokens exceeds TensorRT-LLM's max_num_tokens "
                               f"({self._max_num_tokens}) and enable_chunked_prefill is off", code="OUT_OF_RANGE")

    def _resident(self, row: Row) -> _Session | None:
        """The context's request when its tokens are exactly the row's prompt and it can still generate."""
        session = self._sessions.get(row.context)
        if session is None or _finished(session.request) or session.request.get_tokens(0) != row.tokens[: row.length]:
            return None
        return session

    def stats(self) -> dict[str, int]:
        return {"prompt_tokens_computed": self.prompt_tokens_computed}

    def fork(self, src: int, dst: int, length: int) -> None:
        self._end_session(dst)  # dst's history was replaced; its next step recreates its request

    def drop(self, contexts: list[int]) -> None:
        for context in contexts:
            self._end_session(context)

    def close(self) -> None:
        # The worker thread is stopped, so the executor's own shutdown() would wait forever; free our
        # requests and leave the rest to process exit.
        for context in list(self._sessions):
            self._end_session(context)

    # ------------------------------------------------------------------ internals

    def _run_wave(self, rows: list[Row]) -> dict[int, RowResult]:
        requests = [self._session_for(row).request for row in rows]
        targets = [row.length + (row.steps if chained_in_engine(row) else 1) for row in rows]
        wanted = {id(request): i for i, (request, row) in enumerate(zip(requests, rows, strict=True))
                  if not chained_in_engine(row)}
        logits: dict[int, torch.Tensor] = {}
        pe = self._executor
        stalled = 0
        try:
            while True:
                pending = [r for r, t in zip(requests, targets, strict=True)
                           if len(r.get_tokens(0)) < t and not _finished(r)]
                if not pending:
                    break
                before = _progress(pending)
                pe.active_requests = pending
                self._iterate(wanted, logits)
                _raise_reported_error(pe, requests)
                stalled = stalled + 1 if _progress(pending) == before else 0
                if stalled >= STALL_ITERATIONS:
                    raise RuntimeError(f"the scheduler admitted none of {len(pending)} pending requests for "
                                       f"{stalled} iterations (max_num_tokens, KV cache blocks or sequence slots "
                                       "are exhausted)")
        finally:
            pe.active_requests = []
            _discard_responses(pe)
        out: dict[int, RowResult] = {}
        for index, (request, row) in enumerate(zip(requests, rows, strict=True)):
            if not chained_in_engine(row):
                if index not in logits:
                    raise RuntimeError(f"no logits for context {row.context}")
                out[index] = row_result(logits[index], row.sampler, row.seed)
                continue
            produced = request.get_tokens(0)[row.length:]
            if not produced:
                raise RuntimeError(f"no token for context {row.context} (request {request.state.name})")
            out[index] = RowResult(tokens=list(produced[: row.steps]))
        return out

    def _iterate(self, wanted: dict[int, int], logits: dict[int, torch.Tensor]) -> None:
        pe = self._executor
        batch = pe._schedule()[0]
        if batch.batch_size == 0:
            return
        order = list(batch.context_requests) + list(batch.generation_requests)
        lengths = {id(r): len(r.get_tokens(0)) for r in order if id(r) in wanted}
        pe.resource_manager.prepare_resources(batch)
        # Prefill progress, read after the KV manager placed any reused prefix: what this iteration computes.
        started = {id(r): int(r.context_current_position) for r in batch.context_requests}
        outputs = pe._forward_step(batch)
        if outputs is None:
            raise RuntimeError(_reported_error(pe, order) or "the forward step failed")
        # One logits row per scheduled request, context requests first; the sampler may work in place.
        rows = {id(r): outputs["logits"][i].float().clone() for i, r in enumerate(order) if id(r) in lengths}
        state = pe._sample_async(batch, outputs)
        if state is None:
            raise RuntimeError(_reported_error(pe, order) or "sampling failed")
        if state.sampler_event is not None:
            state.sampler_event.synchronize()
        pe._update_request_states(batch)
        self.prompt_tokens_computed += sum(int(r.context_current_position) - started[id(r)]
                                           for r in batch.context_requests)
        pe._update_requests(state, pe.resource_manager)
        for request in order:
            if id(request) in lengths and len(request.get_tokens(0)) > lengths[id(request)]:
                logits[wanted[id(request)]] = rows[id(request)]  # the position the row asked about
        pe._handle_responses()
        pe.resource_manager.update_resources(batch, pe.model_engine.attn_metadata,
                                             pe.model_engine.kv_cache_dtype_byte_size)

    def _session_for(self, row: Row) -> _Session:
        prompt = row.tokens[: row.length]
        session = self._resident(row)
        if session is not None:
            self._sessions.move_to_end(row.context)
            return session
        self._end_session(row.context)
        self._make_room(keep=row.context)
        room = self.model.max_model_len - len(prompt)
        if room < 1:
            raise RuntimeError(f"no room to generate: prompt of {len(prompt)} tokens, max_model_len "
                               f"{self.model.max_model_len}")
        params = self._trt.SamplingParams(**{**self._params.common, "max_tokens": 1, "temperature": 0.0})
        client_id = self._next_id
        self._next_id += 1
        salt = self._salt_id(str(row.context)) if self._salt_id and self._options.enable_cache_salt else None
        request = self._request_cls(
            client_id=client_id, input_token_ids=list(prompt),
            max_tokens=min(self._options.pyexecutor_max_tokens, room), streaming=False,
            sampling_config=params._get_sampling_config(), end_id=-1, pad_id=params.pad_id,
            output_config=params._get_output_config(is_pytorch_backend=True), return_all_generated_tokens=False,
            stop_words=[], cache_salt_id=salt)
        session = _Session(self._to_llm_request(client_id, request, [], False), client_id)
        self._sessions[row.context] = session
        return session

    def _make_room(self, keep: int) -> None:
        while len(self._sessions) >= self.capacity:
            oldest = next(c for c in self._sessions if c != keep)
            self._end_session(oldest)

    def _end_session(self, context: int) -> None:
        session = self._sessions.pop(context, None)
        if session is None or _finished(session.request):
            return  # finished requests were already terminated by _handle_responses
        try:
            self._executor._terminate_request(session.request)
        except Exception:
            self._executor.resource_manager.free_resources(session.request)

    def _capacity(self) -> int:
        """How many requests the executor holds at once, read from the objects that enforce it."""
        found = {"PyExecutor.max_num_active_requests": getattr(self._executor, "max_num_active_requests", None)}
        managers = getattr(self._executor.resource_manager, "resource_managers", {})
        for kind, manager in managers.items():
            if "SEQ_SLOT" in str(kind):
                found["SeqSlotManager.get_max_resource_count()"] = manager.get_max_resource_count()
        found["llm.args.max_batch_size"] = getattr(getattr(self.llm, "args", None), "max_batch_size", None)
        values = [int(v) for v in found.values() if isinstance(v, int) and v > 0]
        if not values:
            raise StartupError("engine tensorrt_llm: pyexecutor mode could not read the executor's capacity "
                               f"(none of {', '.join(found)}); use execution_mode = \"generate\"")
        return min(values)


def _extract_executor(llm: Any) -> Any:
    executor = getattr(getattr(llm, "_executor", None), "engine", None)
    if executor is None:
        raise StartupError("engine tensorrt_llm: pyexecutor mode found no in-process PyExecutor at "
                           "llm._executor.engine (TLLM_WORKER_USE_SINGLE_PROCESS=1 had no effect); use "
                           "execution_mode = \"generate\"")
    missing = [a for a in EXECUTOR_ATTRIBUTES + EXECUTOR_METHODS if not hasattr(executor, a)]
    if missing:
        raise StartupError(f"engine tensorrt_llm: the private PyExecutor lacks {', '.join(missing)}; use "
                           "execution_mode = \"generate\"")
    return executor


def _stop_worker(executor: Any, timeout_s: float) -> None:
    thread = executor.worker_thread
    if thread is not None and thread.is_alive():
        executor.executor_request_queue.enqueue_shutdown_request()
        thread.join(timeout_s)
        if thread.is_alive():
            raise StartupError(f"engine tensorrt_llm: the PyExecutor worker thread did not stop within "
                               f"{timeout_s} s (pyexecutor_worker_stop_timeout_s)")
    executor.worker_started = False
    executor.active_requests = []


def _discard_responses(executor: Any) -> None:
    # Nobody awaits the executor's responses in this mode; drop them so they do not pile up.
    responses = getattr(executor, "responses", None)
    if isinstance(responses, dict) and responses:
        condition = getattr(executor, "response_cv", None)
        if condition is not None:
            with condition:
                responses.clear()
        else:
            responses.clear()


def _finished(request: Any) -> bool:
    return "GENERATION_COMPLETE" in request.state.name


def _progress(requests: list[Any]) -> int:
    """Grows whenever a prompt chunk or a token of one of these requests was processed."""
    return sum(len(r.get_tokens(0)) + int(r.context_current_position) for r in requests)


def _reported_error(executor: Any, requests: list[Any]) -> str | None:
    """The message `PyExecutor._handle_errors` left for one of these requests, if any."""
    ids = {r.py_request_id for r in requests}
    for request_id, responses in list(getattr(executor, "responses", {}).items()):
        for response in responses if request_id in ids else ():
            message = getattr(response, "error_msg", None)
            if message:
                return str(message)
    return None


def _raise_reported_error(executor: Any, requests: list[Any]) -> None:
    message = _reported_error(executor, requests)
    if message:
        raise RuntimeError(message)


def _waves(rows: list[Row], capacity: int) -> list[list[int]]:
    """Split rows so that a context appears at most once per wave and a wave fits the executor."""
    waves: list[list[int]] = []
    seen: list[set[int]] = []
    for index, row in enumerate(rows):
        for wave, contexts in zip(waves, seen, strict=True):
            if row.context not in contexts and len(wave) < capacity:
                wave.append(index)
                contexts.add(row.context)
                break
        else:
            waves.append([index])
            seen.append({row.context})
    return waves
