"""TEST DOUBLE of TensorRT-LLM 1.2.1 (`tensorrt_llm.llmapi.llm.LLM`), not the real package.

Public behaviour per trtllm-api.md 1.2, 1.5, 2.1-2.4, 4 and 8. Tokens are REAL outputs of the Hugging Face
checkpoint at `model` (transformers, float32, CPU, full recompute each step). Greedy follows
`SamplingParams.params_imply_greedy_decoding`; otherwise tokens are drawn as 1.2.x's default sampler
(`sampler_type="auto"` -> TorchSampler) draws them: from ONE generator per LLM seeded 42, after temperature /
top-k / top-p only; `seed` and `min_p` are accepted and ignored (per-request seeds arrived in TensorRT-LLM
PR #17172, `min_p` in PR #16590, both after 1.2.1). Sampled ids match the real package only in distribution.
With TLLM_WORKER_USE_SINGLE_PROCESS=1, `_executor` is the TEST DOUBLE of the private in-process worker whose
`.engine` is a PyExecutor double (tensorrt_llm/_torch/pyexecutor); `generate` still uses the computation here.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import socket
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from .._calls import record
from ..executor.result import CompletionOutput, GenerationResult, Logprob, RequestOutput
from ..executor.utils import RequestError
from ..inputs.data import get_cache_salt_id, prompt_inputs
from ..sampling_params import SamplingParams
from ._block_reuse import LIVE, BlockIndex, logits_with_reuse
from .llm_args import TRT_ONLY_FIELDS, TorchLlmArgs

logger = logging.getLogger("tensorrt_llm")


class _Executor:
    """Stands in for GenerationExecutorProxy: the real executor runs in an MPI worker process."""

    def __init__(self, session: Any) -> None:
        self.mpi_session = session
        self._shutdown = False

    def is_shutdown(self) -> bool:
        return self._shutdown

    def shutdown(self) -> None:
        self._shutdown = True


def _item_at(maybe_batched: Any, pos: int) -> Any:
    return maybe_batched[pos] if isinstance(maybe_batched, list) else maybe_batched


class LLM:
    """`tensorrt_llm.LLM` (the PyTorch backend in 1.x)."""

    calls: list[dict[str, Any]]  # alias of tensorrt_llm.CALLS, set below

    def __init__(self, model: str | Path, tokenizer: Any = None, tokenizer_mode: str = "auto",
                 skip_tokenizer_init: bool = False, trust_remote_code: bool = False, tensor_parallel_size: int = 1,
                 dtype: str = "auto", revision: str | None = None, tokenizer_revision: str | None = None,
                 **kwargs: Any) -> None:
        self._executor: Any = None
        record("LLM.__init__", model=model, tokenizer=tokenizer, tokenizer_mode=tokenizer_mode,
               skip_tokenizer_init=skip_tokenizer_init, trust_remote_code=trust_remote_code,
               tensor_parallel_size=tensor_parallel_size, dtype=dtype, revision=revision,
               tokenizer_revision=tokenizer_revision, kwargs=dict(kwargs))
        backend = kwargs.pop("backend", "pytorch")
        trt_only = [key for key in kwargs if key in TRT_ONLY_FIELDS]
        if trt_only:
            raise ValueError(
                f"The following arguments are specific to TensorRT backend and cannot be used with PyTorch "
                f"backend: {trt_only}.\nPlease use 'from tensorrt_llm._tensorrt_engine import LLM' instead to use "
                f"the TensorRT backend.")
        valid_keys = set(TorchLlmArgs.model_fields) | {"_mpi_session", "backend"}
        for key in kwargs:
            if key not in valid_keys:
                raise ValueError(f"{self.__class__.__name__} got invalid argument: {key}")
        kwargs.pop("_mpi_session", None)
        try:
            self.args = TorchLlmArgs(model=model, tokenizer=tokenizer, tokenizer_mode=tokenizer_mode,
                                     skip_tokenizer_init=skip_tokenizer_init, trust_remote_code=trust_remote_code,
                                     tensor_parallel_size=tensor_parallel_size, dtype=dtype, revision=revision,
                                     tokenizer_revision=tokenizer_revision, backend=backend, **kwargs)
        except Exception as e:
            logger.error(f"Failed to parse the arguments for the LLM constructor: {e}")
            raise
        if self.args.max_batch_size is None:
            self.args.max_batch_size = 2048
        if tensor_parallel_size != 1:
            raise ValueError("The TensorRT-LLM test double runs on one CPU process: tensor_parallel_size must be 1")

        import torch
        from transformers import AutoModelForCausalLM

        self._torch = torch
        self._model = AutoModelForCausalLM.from_pretrained(str(model), dtype=torch.float32,
                                                           local_files_only=True, revision=revision)
        self._model.eval()
        self._hf_config = self._model.config
        if self.args.max_seq_len is None:
            self.args.max_seq_len = int(getattr(self._hf_config, "max_position_embeddings", 2048))
        self.max_seq_len = self.args.max_seq_len
        self.tokenizer = None if skip_tokenizer_init else self._load_tokenizer(tokenizer, model)
        self.llm_id = f"{socket.gethostname()}-{os.getpid()}-{int(time.time() * 1000)}"
        self._next_client_id = 1
        self._index = BlockIndex(self.args.kv_cache_config.tokens_per_block)  # block reuse (cached_tokens)
        if self.args.sampler_type not in ("auto", "TorchSampler"):
            raise NotImplementedError(f"the TensorRT-LLM test double models only TorchSampler, not sampler_type="
                                      f"{self.args.sampler_type!r}")
        self._generator = torch.Generator().manual_seed(42)  # TorchSampler's one global generator
        self._executor = self._create_executor()

    def _create_executor(self) -> Any:
        """trtllm-api.md 5.1: TP=1 with TLLM_WORKER_USE_SINGLE_PROCESS=1 (or gather_generation_logits) gets an
        in-process GenerationExecutorWorker whose `.engine` is the PyExecutor; otherwise the executor runs in
        an MPI worker, which first imports the main module again (mpi_session.py), and this process only holds
        a proxy (no `.engine`). The real package reads the variable
        once per process (@cache); the double reads it at each construction."""
        if self.args.orchestrator_type == "ray":  # executor/ray_gpu_worker.py: one in-process worker here
            from ..executor.ray_gpu_worker import RayExecutor

            return RayExecutor(self)
        single = os.environ.get("TLLM_WORKER_USE_SINGLE_PROCESS", "0") == "1"
        if self.args.tensor_parallel_size == 1 and (single or self.args.gather_generation_logits):
            from .._torch.pyexecutor.py_executor_creator import create_py_executor
            from ..executor.worker import GenerationExecutorWorker

            logger.warning("Using single process worker for TP1, this may hurt streaming generation performance.")
            return GenerationExecutorWorker(create_py_executor(self.args, str(self.args.model), self.tokenizer,
                                                               _model=self._model))
        from .._torch.pyexecutor.resource_manager import check_free_gpu_memory_fraction
        from .mpi_session import MpiPoolSession

        session = MpiPoolSession(n_workers=1)
        check_free_gpu_memory_fraction(self.args.kv_cache_config)  # in the worker, when it builds its executor
        return _Executor(session)

    def _load_tokenizer(self, tokenizer: Any, model: str | Path) -> Any:
        if tokenizer is not None and not isinstance(tokenizer, str | Path):
            return tokenizer
        from transformers import AutoTokenizer

        source = str(tokenizer if tokenizer is not None else model)
        try:
            return AutoTokenizer.from_pretrained(source, local_files_only=True, use_fast=self.args.tokenizer_mode
                                                 != "slow", trust_remote_code=self.args.trust_remote_code)
        except Exception as e:  # the double's guess: warn and go on without a tokenizer
            logger.warning(f"Failed to load hf tokenizer from {source}, encounter error: {e}")
            return None

    # -- lifetime ---------------------------------------------------------------------------------------------
    def shutdown(self) -> None:
        # Double-only fault: the real shutdown() sometimes never returns (its own test_llm.py carries a FIXME
        # for a hang in LLM shutdown); PIE_TRTLLM_DOUBLE_SHUTDOWN_HANG_S makes this one block that long.
        hang_s = float(os.environ.get("PIE_TRTLLM_DOUBLE_SHUTDOWN_HANG_S", "0") or 0)
        if hang_s > 0 and self._executor is not None and not self._executor.is_shutdown():
            record("shutdown-hang", seconds=hang_s)
            time.sleep(hang_s)
        if self._executor is not None and not self._executor.is_shutdown():
            record("shutdown", llm_id=getattr(self, "llm_id", None))
            self._executor.shutdown()

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> bool:
        self.shutdown()
        return False

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.shutdown()

    def __getstate__(self) -> Any:
        raise RuntimeError("LLM object can not be pickled.")

    def _collective_rpc(self, method: str, args: tuple[Any, ...] = (), kwargs: dict | None = None,
                        non_block: bool = False, unique_reply_rank: int | None = None) -> list[Any]:
        if hasattr(self._executor, "collective_rpc"):
            return self._executor.collective_rpc(method, args, kwargs, non_block, unique_reply_rank)
        raise ValueError(f"Executor type {type(self._executor)} does not support collective RPC.")

    def get_stats(self, timeout: float | None = 2) -> list[dict[str, Any]]:
        return []

    async def get_stats_async(self, timeout: float | None = 2) -> list[dict[str, Any]]:
        return []

    def get_kv_cache_events(self, timeout: float | None = 2) -> list[dict[str, Any]]:
        return []

    # -- generation -------------------------------------------------------------------------------------------
    def generate(self, inputs: Any, sampling_params: SamplingParams | list[SamplingParams] | None = None,
                 use_tqdm: bool = True, lora_request: Any = None, prompt_adapter_request: Any = None,
                 kv_cache_retention_config: Any = None, disaggregated_params: Any = None,
                 scheduling_params: Any = None, cache_salt: str | Sequence[str] | None = None,
                 ) -> RequestOutput | list[RequestOutput]:
        record("generate", inputs=copy.deepcopy(inputs), sampling_params=sampling_params,
               sampling_params_at_call=copy.deepcopy(sampling_params), cache_salt=cache_salt,
               lora_request=lora_request, kv_cache_retention_config=kv_cache_retention_config,
               scheduling_params=scheduling_params)
        unbatched = not isinstance(inputs, list)
        if not unbatched and isinstance(inputs[0], int):
            unbatched = True
        if unbatched:
            inputs = [inputs]
        futures = [
            self.generate_async(request_inputs, sampling_params=_item_at(sampling_params, i),
                                lora_request=_item_at(lora_request, i),
                                prompt_adapter_request=_item_at(prompt_adapter_request, i),
                                kv_cache_retention_config=_item_at(kv_cache_retention_config, i),
                                disaggregated_params=_item_at(disaggregated_params, i),
                                scheduling_params=_item_at(scheduling_params, i),
                                cache_salt=_item_at(cache_salt, i), streaming=False)
            for i, request_inputs in enumerate(inputs)
        ]
        for future in futures:
            future.result()
        return futures[0] if unbatched else futures

    def generate_async(self, inputs: Any, sampling_params: SamplingParams | None = None, lora_request: Any = None,
                       prompt_adapter_request: Any = None, streaming: bool = False,
                       kv_cache_retention_config: Any = None, disaggregated_params: Any = None,
                       _postproc_params: Any = None, scheduling_params: Any = None,
                       cache_salt: str | None = None) -> RequestOutput:
        record("generate_async", inputs=copy.deepcopy(inputs), sampling_params=sampling_params,
               sampling_params_at_call=copy.deepcopy(sampling_params), streaming=streaming, cache_salt=cache_salt,
               lora_request=lora_request, kv_cache_retention_config=kv_cache_retention_config,
               scheduling_params=scheduling_params)
        if self._executor is None or self._executor.is_shutdown():
            raise RuntimeError("LLM is shutting down")
        from .._torch.virtual_memory import released_tags

        if released_tags():  # the real engine would run on unmapped memory; the double refuses instead
            raise RuntimeError(f"test double: generate while the memory tagged {sorted(released_tags())} is "
                               "released")
        prompt_dict = prompt_inputs(inputs)
        prompt: str | None = None
        if prompt_dict.get("prompt_token_ids") is not None:
            prompt_token_ids = list(prompt_dict["prompt_token_ids"])  # type: ignore[typeddict-item]
        else:
            prompt = prompt_dict["prompt"]  # type: ignore[typeddict-item]
            if self.tokenizer is None:
                raise ValueError("The test double needs a tokenizer for text prompts (skip_tokenizer_init=True?)")
            add_special = sampling_params.add_special_tokens if sampling_params is not None else True
            prompt_token_ids = self.tokenizer.encode(prompt, add_special_tokens=add_special)
        query_token_ids = prompt_dict.get("query_token_ids")
        sampling_params = self._prepare_sampling_params(sampling_params)
        self._check_arguments(len(prompt_token_ids), len(query_token_ids) if query_token_ids else 0)

        client_id = self._next_client_id
        self._next_client_id += 1
        try:  # the worker's enqueue: errors here become RequestError (trtllm-api.md 2.4 item 5)
            max_tokens = self._deduce_max_tokens(sampling_params, len(prompt_token_ids),
                                                 len(query_token_ids) if query_token_ids else 0)
            if sampling_params.use_beam_search:
                raise ValueError("beam search is not implemented by the TensorRT-LLM test double")
            stop_words = [] if sampling_params.ignore_eos else sampling_params._get_stop_reasons_and_words()
        except Exception as e:
            raise RequestError(str(e)) from e

        salt_id = get_cache_salt_id(cache_salt) if cache_salt is not None else None
        result = GenerationResult._create(request_id=client_id, prompt=prompt, prompt_token_ids=prompt_token_ids,
                                          n=sampling_params.n, steps=iter(()), streaming=streaming)
        reused, source = self._index.match(salt_id, prompt_token_ids) if self.args.kv_cache_config.enable_block_reuse \
            else (0, LIVE)
        result.cached_tokens = reused
        result._steps = self._run(result, sampling_params, max_tokens, stop_words, salt_id, (reused, source))
        return result

    def _prepare_sampling_params(self, sampling_params: SamplingParams | None) -> SamplingParams:
        if sampling_params is None:
            sampling_params = SamplingParams()
        if not isinstance(sampling_params, SamplingParams):
            raise TypeError(f"The sampling_params must be type SamplingParams or None, but got "
                            f"{type(sampling_params)}")
        if sampling_params.end_id is None:
            if self.tokenizer is None:
                raise ValueError("tokenizer is required to reset end_id if it is None, or you can explicitly "
                                 "specify the end_id for sampling_params")
            sampling_params._setup(self.tokenizer, self._hf_config, None)
        elif sampling_params.stop is not None and self.tokenizer is not None:
            sampling_params._setup(self.tokenizer, self._hf_config, None)
        sampling_params._stream_interval = self.args.stream_interval
        sampling_params.return_perf_metrics = self.args.return_perf_metrics or sampling_params.return_perf_metrics
        return sampling_params

    def _check_arguments(self, prompt_len: int, query_len: int) -> None:
        cp_size = self.args.context_parallel_size or 1
        if not self.args.enable_chunked_prefill and prompt_len / cp_size + query_len > self.args.max_num_tokens:
            raise RequestError(f"The sum of prompt length ({prompt_len / cp_size}), query length ({query_len}) "
                               f"should not exceed max_num_tokens ({self.args.max_num_tokens})")

    def _deduce_max_tokens(self, sp: SamplingParams, prompt_len: int, query_len: int) -> int:
        max_tokens = sp.max_tokens
        default_max_tokens = self.max_seq_len - prompt_len - query_len
        if default_max_tokens <= 0:
            raise ValueError(f"`default_max_tokens` ({default_max_tokens}) must be greater than 0, "
                             f"`default_max_tokens` ({default_max_tokens}) = max_seq_len ({self.max_seq_len})"
                             f" - `splited_prompt_len` ({prompt_len}) - `query_token_len` ({query_len})")
        if max_tokens is None:
            return default_max_tokens
        if max_tokens > default_max_tokens:
            logger.warning(f"User-specified `max_tokens` ({max_tokens}) is greater than deduced "
                           f"`default_max_tokens` ({default_max_tokens}), using default_max_tokens instead.")
            return default_max_tokens
        if max_tokens <= 0:
            raise ValueError(f"`max_tokens` ({max_tokens}) must be greater than 0")
        return max_tokens

    # -- the engine --------------------------------------------------------------------------------------------
    def _logits(self, ids: list[int], reuse: tuple[int, Any] = (0, LIVE)) -> Any:
        return logits_with_reuse(self._model, ids, *reuse)

    def _choose(self, logits: Any, sp: SamplingParams, generator: Any) -> int:
        torch = self._torch
        if sp._greedy_decoding:
            return int(torch.argmax(logits))
        temperature = sp.temperature or 1.0
        scores = logits / temperature
        if sp.top_k is not None and 0 < sp.top_k < scores.numel():
            kth = torch.topk(scores, sp.top_k).values[-1]
            scores = scores.masked_fill(scores < kth, float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        if sp.top_p is not None and sp.top_p < 1.0:
            sorted_probs, order = torch.sort(probs, descending=True)
            before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs
            drop = before >= sp.top_p
            probs = probs.clone()
            probs[order[drop]] = 0.0
        probs = probs / probs.sum()  # no min_p: TorchSampler in 1.2.x does not read it
        return int(torch.multinomial(probs, 1, generator=generator))

    def _run(self, result: RequestOutput, sp: SamplingParams, max_tokens: int,
             stop_words: list[tuple[int | str, list[int]]], salt_id: int | None,
             reuse: tuple[int, Any] = (0, LIVE)) -> Iterator[None]:
        """One yield per generated step across all sequences (one streamed response per iteration)."""
        torch = self._torch
        prompt = result.prompt_token_ids
        generator = self._generator
        end_id = None if sp.ignore_eos or sp.end_id is None or sp.end_id < 0 else sp.end_id
        best_of = sp.best_of or sp.n
        seqs = [CompletionOutput(index=i) for i in range(best_of)]
        result.outputs = seqs[:sp.n]
        want_logprobs = bool(sp.logprobs)
        gen_logits: list[list[Any]] = [[] for _ in seqs]
        if want_logprobs:
            for seq in seqs:
                seq.cumulative_logprob = 0.0
        live = list(range(best_of))
        step = 0
        while live:
            for i in list(live):
                seq = seqs[i]
                all_logits = self._logits(prompt + seq.token_ids, reuse)
                if step == 0 and i == 0 and sp.return_context_logits:
                    result.context_logits = all_logits[: len(prompt)].clone()
                logits = all_logits[-1]
                if sp.embedding_bias is not None:
                    logits = logits + sp.embedding_bias
                token = self._choose(logits, sp, generator)
                if sp.return_generation_logits:
                    gen_logits[i].append(logits.clone())
                if end_id is not None and token == end_id and (sp.min_tokens or 0) <= len(seq.token_ids):
                    seq.finish_reason = "stop"
                    live.remove(i)
                    continue
                hit = next((reason for reason, word in stop_words if word == [token]), None)
                if hit is None or sp.include_stop_str_in_output:
                    seq.token_ids.append(token)
                    if want_logprobs:
                        entry = self._top_logprobs(logits, token, sp.logprobs)
                        seq.logprobs.append(entry)  # type: ignore[arg-type]
                        seq.cumulative_logprob += entry[token].logprob  # type: ignore[operator]
                if hit is not None:
                    seq.finish_reason, seq.stop_reason = "stop", hit
                    live.remove(i)
                elif len(seq.token_ids) >= max_tokens:
                    seq.finish_reason = "length"
                    live.remove(i)
                if self.tokenizer is not None and sp.detokenize:
                    seq.text = self.tokenizer.decode(seq.token_ids, skip_special_tokens=sp.skip_special_tokens)
            step += 1
            result.decoding_iter = step
            if live:
                yield None
        for i, seq in enumerate(seqs):
            if sp.return_generation_logits and gen_logits[i]:
                seq.generation_logits = torch.stack(gen_logits[i])
        if best_of > sp.n and want_logprobs:
            seqs = sorted(seqs, key=lambda s: s.cumulative_logprob or 0.0, reverse=True)
        outputs = seqs[:sp.n]
        for new_index, (old, new) in enumerate(zip(result.outputs, outputs, strict=True)):
            new._last_token_ids_len = old._last_token_ids_len
            new._last_logprobs_len = old._last_logprobs_len
            new._last_text_len = old._last_text_len
            new.index = new_index
        result.outputs = outputs
        for seq in seqs:
            self._index.add(salt_id, list(prompt) + seq.token_ids, reuse[1])
        result.finished = True
        yield None

    def _top_logprobs(self, logits: Any, token: int, k: int | None) -> dict[int, Logprob]:
        """Top-k raw log-softmax values, ranked from 1, plus the chosen token when it is not among them."""
        torch = self._torch
        logprobs = torch.log_softmax(logits.float(), dim=-1)
        top = torch.topk(logprobs, int(k or 1))
        entry = {int(t): Logprob(logprob=float(v), rank=r + 1)
                 for r, (v, t) in enumerate(zip(top.values, top.indices, strict=True))}
        if token not in entry:
            rank = int((logprobs > logprobs[token]).sum()) + 1
            entry[token] = Logprob(logprob=float(logprobs[token]), rank=rank)
        return entry


def _bind_calls() -> None:
    from .._calls import CALLS

    LLM.calls = CALLS


_bind_calls()
