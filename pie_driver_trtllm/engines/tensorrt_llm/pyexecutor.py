"""Experimental: TensorRT-LLM's private PyExecutor driven in-process, so KV stays resident across steps.

TensorRT-LLM 1.2.1 has no public step API. At start-up this engine stops the executor's background
thread and then runs its private schedule / forward / sample / update methods itself, one iteration at a
time, for the requests of the current host step. Each host context keeps one executor request whose
tokens equal the context's history; while they keep matching, a decode step costs one token. Anything
else (a rollback, a fork, a sampler change, a seeded sampler) recreates the request from the full history.

Private API: checked at load against `tensorrt_llm.__version__` and the attributes used below.
"""

from __future__ import annotations

import importlib
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from pie_driver_trtllm.config import DriverConfig, StartupError
from pie_driver_trtllm.engines.base import ModelInfo, Row, RowResult
from pie_driver_trtllm.engines.tensorrt_llm.generate import SamplingParamsBuilder
from pie_driver_trtllm.sampler import TOKEN_SAMPLERS, Sampler

PINNED_VERSION = "1.2.1"
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
    key: tuple[Any, ...]
    client_id: int


class PyExecutorEngine:
    kind = "tensorrt_llm"
    execution_mode = "pyexecutor"
    samplers = frozenset(TOKEN_SAMPLERS)

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
        self.capacity = self._capacity()

    # ------------------------------------------------------------------ the interface

    def step(self, rows: list[Row]) -> list[RowResult]:
        results: list[RowResult | None] = [None] * len(rows)
        for wave in _waves(rows, self.capacity):
            try:
                for index, tokens in self._run_wave([rows[i] for i in wave]).items():
                    results[wave[index]] = RowResult(tokens=tokens)
            except Exception as exc:  # the executor failed: its requests are in an unknown state
                for i in wave:
                    self._end_session(rows[i].context)
                    results[i] = RowResult(error=f"pyexecutor: {type(exc).__name__}: {exc}")
        return results  # type: ignore[return-value]

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

    def _run_wave(self, rows: list[Row]) -> dict[int, list[int]]:
        requests = [self._session_for(row).request for row in rows]
        targets = [row.length + row.steps for row in rows]
        pe = self._executor
        limit = max(row.steps for row in rows) + 8  # a prompt is prefilled in one iteration, then 1 token each
        try:
            for _ in range(limit):
                pending = [r for r, t in zip(requests, targets, strict=True) if len(r.get_tokens(0)) < t]
                if not pending:
                    break
                pe.active_requests = pending
                self._iterate()
        finally:
            pe.active_requests = []
            _discard_responses(pe)
        out = {}
        for index, (request, row) in enumerate(zip(requests, rows, strict=True)):
            produced = request.get_tokens(0)[row.length:]
            if not produced:
                raise RuntimeError(f"no token for context {row.context} after {limit} iterations")
            out[index] = list(produced[: row.steps])
        return out

    def _iterate(self) -> None:
        pe = self._executor
        batch = pe._schedule()[0]
        if batch.batch_size == 0:
            return
        pe.resource_manager.prepare_resources(batch)
        outputs = pe._forward_step(batch)
        if outputs is None:
            raise RuntimeError("forward step failed")
        state = pe._sample_async(batch, outputs)
        if state is None:
            raise RuntimeError("sampling failed")
        if state.sampler_event is not None:
            state.sampler_event.synchronize()
        pe._update_request_states(batch)
        pe._update_requests(state, pe.resource_manager)
        pe._handle_responses()
        pe.resource_manager.update_resources(batch, pe.model_engine.attn_metadata,
                                             pe.model_engine.kv_cache_dtype_byte_size)

    def _session_for(self, row: Row) -> _Session:
        key = _sampler_key(row.sampler)
        prompt = row.tokens[: row.length]
        session = self._sessions.get(row.context)
        reusable = (session is not None and session.key == key and row.sampler.seed is None
                    and "GENERATION_COMPLETE" not in session.request.state.name
                    and session.request.get_tokens(0) == prompt)
        if reusable:
            self._sessions.move_to_end(row.context)
            return session  # type: ignore[return-value]
        self._end_session(row.context)
        self._make_room(keep=row.context)
        room = self.model.max_model_len - len(prompt)
        if room < 1:
            raise RuntimeError(f"no room to generate: prompt of {len(prompt)} tokens, max_model_len "
                               f"{self.model.max_model_len}")
        params = self._trt.SamplingParams(**self._params.kwargs(row.sampler, row.steps, row.seed))
        client_id = self._next_id
        self._next_id += 1
        salt = self._salt_id(str(row.context)) if self._salt_id and self._options.enable_cache_salt else None
        request = self._request_cls(
            client_id=client_id, input_token_ids=list(prompt),
            max_tokens=min(self._options.pyexecutor_max_tokens, room), streaming=False,
            sampling_config=params._get_sampling_config(), end_id=-1, pad_id=params.pad_id,
            output_config=params._get_output_config(is_pytorch_backend=True), return_all_generated_tokens=False,
            stop_words=[], cache_salt_id=salt)
        session = _Session(self._to_llm_request(client_id, request, [], False), key, client_id)
        self._sessions[row.context] = session
        return session

    def _make_room(self, keep: int) -> None:
        while len(self._sessions) >= self.capacity:
            oldest = next(c for c in self._sessions if c != keep)
            self._end_session(oldest)

    def _end_session(self, context: int) -> None:
        session = self._sessions.pop(context, None)
        if session is None or "GENERATION_COMPLETE" in session.request.state.name:
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


def _sampler_key(sampler: Sampler) -> tuple[Any, ...]:
    if sampler.is_greedy:
        return ("greedy",)
    return (sampler.type, sampler.temperature, sampler.top_k, sampler.top_p, sampler.min_p, sampler.seed)


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
