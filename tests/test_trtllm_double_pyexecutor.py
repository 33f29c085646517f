"""Tests for the PyExecutor part of the TensorRT-LLM 1.2.1 TEST DOUBLE in tests/trtllm_double (not the real package).

They drive the private objects exactly as the driver's experimental "pyexecutor" mode does (trtllm-api.md 5,
upstream-driver-contract.md 4.9): stop the worker thread, then call `_schedule`, `prepare_resources`,
`_forward_step`, `_sample_async`, `_update_request_states`, `_update_requests`, `_handle_responses` and
`update_resources` one iteration at a time.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from trtllm_support import double_imported

from pie_driver_trtllm.modelgen import make_model


@pytest.fixture(scope="module")
def trt() -> Iterator[ModuleType]:
    with double_imported() as module:
        yield module


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_model(tmp_path_factory.mktemp("trtllm_double_pyexec") / "tiny", "tiny")


def _make_llm(trt: ModuleType, model_dir: Path, monkeypatch: pytest.MonkeyPatch, max_batch_size: int = 4) -> Any:
    monkeypatch.setenv("TLLM_WORKER_USE_SINGLE_PROCESS", "1")
    return trt.LLM(str(model_dir), skip_tokenizer_init=True, max_batch_size=max_batch_size, max_seq_len=64)


def _stop_worker(pe: Any) -> None:
    """What the driver does before driving the loop by hand."""
    if pe.worker_thread.is_alive():
        pe.executor_request_queue.enqueue_shutdown_request()
        pe.worker_thread.join(10)
        assert not pe.worker_thread.is_alive()
    pe.worker_started = False
    pe.active_requests = []


@pytest.fixture
def llm(trt: ModuleType, model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    engine = _make_llm(trt, model_dir, monkeypatch, max_batch_size=4)
    _stop_worker(engine._executor.engine)
    trt.reset_calls()
    try:
        yield engine
    finally:
        engine.shutdown()


def new_request(trt: ModuleType, req_id: int, prompt: list[int], max_tokens: int, **sampling: Any) -> Any:
    from tensorrt_llm._torch.pyexecutor.llm_request import executor_request_to_llm_request
    from tensorrt_llm.bindings.executor import Request

    sp = trt.SamplingParams(end_id=-1, max_tokens=max_tokens, **sampling)
    req = Request(client_id=req_id, input_token_ids=prompt, max_tokens=max_tokens, streaming=False,
                  sampling_config=sp._get_sampling_config(), end_id=-1, pad_id=0,
                  output_config=sp._get_output_config(is_pytorch_backend=True), return_all_generated_tokens=False,
                  stop_words=[], cache_salt_id=None)
    return executor_request_to_llm_request(req_id, req, [], False)


def iterate(pe: Any, requests: list[Any]) -> list[Any]:
    """One driver iteration (upstream-driver-contract.md 4.9, "Drive loop"); returns the finished requests."""
    pe.active_requests = [r for r in requests if not r.is_finished]
    batch = pe._schedule()[0]
    if batch.batch_size == 0:
        return []
    pe.resource_manager.prepare_resources(batch)
    outputs = pe._forward_step(batch)
    assert outputs is not None, "forward failed"
    state = pe._sample_async(batch, outputs)
    assert state is not None, "sampling failed"
    if state.sampler_event is not None:
        state.sampler_event.synchronize()
    pe._update_request_states(batch)
    pe._update_requests(state, pe.resource_manager)
    finished = pe._handle_responses()
    pe.resource_manager.update_resources(batch, pe.model_engine.attn_metadata, pe.model_engine.kv_cache_dtype_byte_size)
    return finished


def generated(req: Any) -> list[int]:
    return req.get_tokens(0)[req.py_prompt_len:]


def hf_greedy(model_dir: Path, prompt: list[int], max_tokens: int) -> list[int]:
    """Reference: transformers full-recompute argmax loop (no EOS stop: the driver sends end_id=-1)."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32, local_files_only=True).eval()
    ids = list(prompt)
    with torch.inference_mode():
        for _ in range(max_tokens):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt):]


def forward_calls(trt: ModuleType) -> list[dict[str, Any]]:
    return [c for c in trt.CALLS if c["kind"] == "PyExecutor._forward_step"]


def kv_manager(pe: Any) -> Any:
    from tensorrt_llm._torch.pyexecutor.resource_manager import ResourceManagerType

    return pe.resource_manager.resource_managers[ResourceManagerType.KV_CACHE_MANAGER]


def test_executor_layout(trt: ModuleType, model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from tensorrt_llm._torch.pyexecutor.py_executor import PyExecutor
    from tensorrt_llm._torch.pyexecutor.resource_manager import ResourceManagerType
    from tensorrt_llm.executor.worker import GenerationExecutorWorker

    llm = _make_llm(trt, model_dir, monkeypatch, max_batch_size=3)
    try:
        assert isinstance(llm._executor, GenerationExecutorWorker)
        pe = llm._executor.engine
        assert isinstance(pe, PyExecutor)
        for name in ("model_engine", "resource_manager", "sampler", "scheduler", "active_requests",
                     "worker_thread", "executor_request_queue"):
            assert hasattr(pe, name), name
        assert hasattr(pe.model_engine, "attn_metadata") and pe.model_engine.kv_cache_dtype_byte_size == 4
        assert isinstance(pe.worker_thread, threading.Thread) and pe.worker_thread.is_alive() and pe.worker_started
        assert pe.max_num_active_requests == 3 and not hasattr(pe, "max_num_sequences")
        managers = pe.resource_manager.resource_managers
        assert list(managers)[-1] == ResourceManagerType.KV_CACHE_MANAGER
        seq_slots = managers[ResourceManagerType.SEQ_SLOT_MANAGER]
        assert seq_slots.get_max_resource_count() == seq_slots.slot_manager.max_num_requests == 3
        assert not hasattr(seq_slots, "max_num_sequences")
        # the public path still works with the in-process worker
        out = llm.generate([5, 17, 42], trt.SamplingParams(end_id=-1, max_tokens=3))
        assert len(out.outputs[0].token_ids) == 3
    finally:
        llm.shutdown()
    assert not pe.worker_thread.is_alive()


def test_default_executor_has_no_engine(trt: ModuleType, model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TLLM_WORKER_USE_SINGLE_PROCESS", raising=False)
    with trt.LLM(str(model_dir), skip_tokenizer_init=True, max_seq_len=64) as llm:
        assert not hasattr(llm._executor, "engine")
        assert len(llm.generate([5, 17, 42], trt.SamplingParams(end_id=-1, max_tokens=2)).outputs[0].token_ids) == 2


def test_worker_thread_stops_on_shutdown_request(trt: ModuleType, model_dir: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    llm = _make_llm(trt, model_dir, monkeypatch)
    pe = llm._executor.engine
    try:
        assert pe.worker_thread.is_alive()
        trt.reset_calls()
        pe.executor_request_queue.enqueue_shutdown_request()
        pe.worker_thread.join(10)
        assert not pe.worker_thread.is_alive()
        assert pe.shutdown_event.is_set()
        assert [c["kind"] for c in trt.CALLS] == ["enqueue_shutdown_request"]
        pe.worker_started = False
        pe.active_requests = []
    finally:
        llm.shutdown()  # must not hang once the thread is gone


def test_worker_thread_serves_enqueued_requests(trt: ModuleType, model_dir: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    import datetime

    from tensorrt_llm.bindings.executor import Request

    llm = _make_llm(trt, model_dir, monkeypatch)
    pe = llm._executor.engine
    try:
        sp = trt.SamplingParams(end_id=-1, max_tokens=4)
        req_id = pe.enqueue_request(Request(client_id=7, input_token_ids=[5, 17, 42], max_tokens=4,
                                            sampling_config=sp._get_sampling_config(), end_id=-1, pad_id=0,
                                            output_config=sp._get_output_config(is_pytorch_backend=True)))
        responses = pe.await_responses(req_id, timeout=datetime.timedelta(seconds=30))
        assert responses and responses[-1].result.is_final
        assert responses[-1].result.output_token_ids[0] == hf_greedy(model_dir, [5, 17, 42], 4)
    finally:
        llm.shutdown()


def test_greedy_matches_full_recompute_and_decode_runs_one_token(trt: ModuleType, llm: Any,
                                                                 model_dir: Path) -> None:
    pe = llm._executor.engine
    prompt = [5, 17, 42, 99, 3]
    req = new_request(trt, 1, prompt, 8)
    created = [c for c in trt.CALLS if c["kind"] == "executor_request_to_llm_request"]
    assert created == [{"kind": "executor_request_to_llm_request", "request_id": 1, "client_id": 1,
                        "prompt_len": 5, "max_tokens": 8, "cache_salt_id": None}]
    assert req.state.name == "CONTEXT_INIT" and req.py_max_new_tokens == req.max_new_tokens == 8
    assert req.py_request_id == 1 and req.py_client_id == 1 and req.prompt_len == req.py_prompt_len == 5
    states = []
    for _ in range(8):
        finished = iterate(pe, [req])
        states.append(req.state.name)
    assert states == ["GENERATION_IN_PROGRESS"] * 7 + ["GENERATION_COMPLETE"]
    assert req.is_finished and finished == [req]
    assert generated(req) == hf_greedy(model_dir, prompt, 8)
    assert req.get_tokens(0) == prompt + generated(req)
    steps = forward_calls(trt)
    assert [s["new_tokens"] for s in steps] == [{1: 5}] + [{1: 1}] * 7
    # finished -> terminated -> KV freed
    assert not kv_manager(pe).has_cache(1)
    assert [c["request_id"] for c in trt.CALLS if c["kind"] == "PyExecutor._terminate_request"] == [1]


def test_two_requests_in_one_batch(trt: ModuleType, llm: Any, model_dir: Path) -> None:
    pe = llm._executor.engine
    a, b = new_request(trt, 1, [5, 17, 42], 4), new_request(trt, 2, [9, 8, 7, 6, 5, 4], 4)
    iterate(pe, [a])  # a starts alone; b joins at the next iteration
    batch_sizes = []
    for _ in range(4):
        pe.active_requests = [r for r in (a, b) if not r.is_finished]
        batch_sizes.append(pe._schedule()[0].batch_size)
        iterate(pe, [a, b])
    assert batch_sizes == [2, 2, 2, 1]
    steps = forward_calls(trt)
    assert steps[1]["new_tokens"] == {1: 1, 2: 6}  # one generation + one context request in the same step
    assert steps[2]["new_tokens"] == {1: 1, 2: 1}
    assert generated(a) == hf_greedy(model_dir, [5, 17, 42], 4)
    assert generated(b) == hf_greedy(model_dir, [9, 8, 7, 6, 5, 4], 4)


def test_idle_request_keeps_kv_and_continues(trt: ModuleType, llm: Any, model_dir: Path) -> None:
    pe = llm._executor.engine
    prompt_a, prompt_b = [11, 12, 13, 14], [21, 22, 23]
    a, b = new_request(trt, 1, prompt_a, 6), new_request(trt, 2, prompt_b, 6)
    iterate(pe, [a])
    iterate(pe, [a])
    held = kv_manager(pe).num_tokens(1)
    assert held == len(prompt_a) + 1  # the newest token is not in the cache yet
    for _ in range(3):  # a idles (not in active_requests) while b runs
        iterate(pe, [b])
    assert pe.active_requests == [b] and kv_manager(pe).num_tokens(1) == held
    trt.reset_calls()
    for _ in range(4):
        iterate(pe, [a, b])
    assert a.is_finished and b.is_finished
    assert forward_calls(trt)[0]["new_tokens"] == {1: 1, 2: 1}  # a resumes with one token, no re-prefill
    assert generated(a) == hf_greedy(model_dir, prompt_a, 6)
    assert generated(b) == hf_greedy(model_dir, prompt_b, 6)


def test_terminate_frees_and_capacity_is_enforced(trt: ModuleType, model_dir: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    from tensorrt_llm._torch.pyexecutor.resource_manager import ResourceManagerType

    llm = _make_llm(trt, model_dir, monkeypatch, max_batch_size=2)
    pe = llm._executor.engine
    _stop_worker(pe)
    trt.reset_calls()
    slots = pe.resource_manager.resource_managers[ResourceManagerType.SEQ_SLOT_MANAGER]
    try:
        a, b, c = (new_request(trt, i, [30 + i, 40 + i], 5) for i in (1, 2, 3))
        iterate(pe, [a])
        iterate(pe, [b])  # a idles but keeps its slot and KV
        assert slots.num_used_slots == 2
        pe.active_requests = [c]
        batch = pe._schedule()[0]
        with pytest.raises(RuntimeError, match="slot"):
            pe.resource_manager.prepare_resources(batch)
        assert not kv_manager(pe).has_cache(3) and c.py_seq_slot is None  # nothing half-allocated
        pe.active_requests = [a, b]
        pe._terminate_request(a)
        assert a not in pe.active_requests and not kv_manager(pe).has_cache(1) and slots.num_used_slots == 1
        assert a.py_seq_slot is None
        iterate(pe, [c])  # now it fits
        assert kv_manager(pe).has_cache(3) and len(generated(c)) == 1
        terminated = [x["request_id"] for x in trt.CALLS if x["kind"] == "PyExecutor._terminate_request"]
        assert terminated == [1]
        # a terminated request cannot continue from its (freed) KV: the driver recreates it from the history
        pe._terminate_request(b)  # b was not in active_requests: terminating still frees its slot and KV
        assert not kv_manager(pe).has_cache(2) and slots.num_used_slots == 1
        a2 = new_request(trt, 4, a.get_tokens(0), 2)
        iterate(pe, [a2])
        assert forward_calls(trt)[-1]["new_tokens"] == {4: 3}  # full re-prefill of the history
    finally:
        llm.shutdown()
    assert not kv_manager(pe).caches


def test_default_sampler_ignores_the_request_seed(trt: ModuleType, llm: Any) -> None:
    pe = llm._executor.engine
    next_id = iter(range(1, 100))

    def run(seed: int | None) -> list[int]:
        req = new_request(trt, next(next_id), [3, 4, 5], 8, temperature=2.0, seed=seed)
        while not req.is_finished:
            iterate(pe, [req])
        return generated(req)

    assert len({tuple(run(11)) for _ in range(3)}) > 1  # one global generator: the same seed draws anew
    greedy = new_request(trt, 99, [3, 4, 5], 3, temperature=0.0, seed=5)
    from tensorrt_llm._torch.pyexecutor.sampler import resolve_sampling_strategy

    assert resolve_sampling_strategy(greedy)[0] == "greedy"
    assert resolve_sampling_strategy(new_request(trt, 98, [3], 1, temperature=0.7, top_k=1))[0] == "greedy"


def test_sampling_and_output_config(trt: ModuleType) -> None:
    from tensorrt_llm.bindings.executor import OutputConfig, SamplingConfig

    sp = trt.SamplingParams(end_id=-1, temperature=0.5, top_k=7, top_p=0.9, min_p=0.05, seed=3, logprobs=2)
    cfg = sp._get_sampling_config()
    assert isinstance(cfg, SamplingConfig)
    assert (cfg.beam_width, cfg.num_return_sequences, cfg.temperature, cfg.top_k, cfg.top_p, cfg.min_p, cfg.seed) \
        == (1, 1, 0.5, 7, 0.9, 0.05, 3)
    out = sp._get_output_config(is_pytorch_backend=True)
    assert isinstance(out, OutputConfig) and out.return_log_probs is True and out.exclude_input_from_output is True
