"""TensorRT-LLM through its public `LLM.generate` API: one batched generate call per forward.

TensorRT-LLM owns the KV cache; each step replays the context's full token history and relies on the
KV block reuse of TensorRT-LLM (keyed per context lineage by `cache_salt`) to skip the shared prefix.

Greedy rows take TensorRT-LLM's own argmax tokens. Every other sampler is applied here, by the reference
engine's sampling code, to the logits TensorRT-LLM returns (`return_generation_logits`): its default
sampler in 1.2.x ignores per-request seeds and `min_p`, so drawing there would not be what the protocol
promises.
"""

from __future__ import annotations

import sys
import threading
from typing import Any

from pie_driver_trtllm.config import DriverConfig
from pie_driver_trtllm.engines.base import ModelInfo, Row, RowResult
from pie_driver_trtllm.engines.runs import chained_in_engine, step_with_runs
from pie_driver_trtllm.engines.sampling import row_result
from pie_driver_trtllm.sampler import ALL_SAMPLERS, Sampler

# `LLM.shutdown()` sometimes never returns (TensorRT-LLM's own tests carry a FIXME for it); the driver's
# exit must not wait on it longer than this.
SHUTDOWN_TIMEOUT_S = 10.0


def bounded_shutdown(llm: Any, timeout_s: float = SHUTDOWN_TIMEOUT_S) -> bool:
    """Call `llm.shutdown()` on a daemon thread; False when it did not return in time."""
    thread = threading.Thread(target=llm.shutdown, name="trtllm-shutdown", daemon=True)
    thread.start()
    thread.join(timeout_s)
    if thread.is_alive():
        print(f"engine tensorrt_llm: LLM.shutdown() did not return within {timeout_s} s; exiting without it",
              file=sys.stderr, flush=True)
        return False
    return True


class SamplingParamsBuilder:
    """Maps a protocol sampler onto TensorRT-LLM 1.2 `SamplingParams` keyword arguments."""

    def __init__(self, info: ModelInfo) -> None:
        end = info.eos_token_id if info.eos_token_id is not None else -1
        pad = info.pad_token_id if info.pad_token_id is not None else (end if end >= 0 else 0)
        # ignore_eos: stopping is the host's decision; end_id is still required without a tokenizer.
        self.common = {"end_id": end, "pad_id": pad, "detokenize": False, "ignore_eos": True}

    def kwargs(self, sampler: Sampler, steps: int) -> dict[str, Any]:
        if sampler.is_greedy and not (sampler.return_logprobs or sampler.return_logprob):  # `steps` tokens, one request
            return {**self.common, "max_tokens": steps, "temperature": 0.0, **stop_kwargs(sampler)}
        # One position's logits; the driver samples from them (see the module docstring).
        return {**self.common, "max_tokens": 1, "temperature": 0.0, "return_generation_logits": True}


def stop_kwargs(sampler: Sampler) -> dict[str, Any]:
    """A greedy run's stop ids. TensorRT-LLM drops stop words when `ignore_eos` is set, so such a run keeps
    it off and sets `end_id` to -1 (no end token) instead; the stop token stays in the output."""
    if not sampler.stop_token_ids:
        return {}
    return {"stop_token_ids": list(sampler.stop_token_ids), "include_stop_str_in_output": True,
            "ignore_eos": False, "end_id": -1}


class GenerateEngine:
    kind = "tensorrt_llm"
    execution_mode = "generate"
    samplers = frozenset(ALL_SAMPLERS)
    logprob_modes = ("raw", "processed")  # both exact: the driver reads TensorRT-LLM's logits, never its logprobs

    def __init__(self, llm: Any, trt: Any, config: DriverConfig, info: ModelInfo, version: str) -> None:
        self.llm = llm
        self.model = info
        self.version = version
        self._sampling_params = trt.SamplingParams
        self._params = SamplingParamsBuilder(info)
        self._salted = config.options.enable_cache_salt
        self._salt: dict[int, str] = {}  # a fork inherits its source's salt, so it reuses the shared prefix
        self.kv_epoch = 0  # bumped whenever cached KV must never be reused again (new weights, a wake)
        self.prompt_tokens_computed = 0

    def step(self, rows: list[Row]) -> list[RowResult]:
        # A greedy run is one request of max_tokens; any other run's later tokens take one generate call per
        # token (every run of the forward in it), each sampled here with its per-step seed.
        return step_with_runs(self._step_once, rows, chained_in_engine)

    def _step_once(self, rows: list[Row]) -> list[RowResult]:
        if not rows:
            return []
        prompts = [row.tokens[: row.length] for row in rows]
        params = [self._sampling_params(**self._params.kwargs(row.sampler, row.steps)) for row in rows]
        salts = [self._salt_of(row.context) for row in rows]
        outputs = self._generate(prompts, params, salts)
        for prompt, output in zip(prompts, outputs, strict=True):
            if not isinstance(output, RowResult):  # the prompt tokens TensorRT-LLM did not find in its cache
                self.prompt_tokens_computed += len(prompt) - int(getattr(output, "cached_tokens", 0) or 0)
        return [output if isinstance(output, RowResult) else _read(row, output)
                for row, output in zip(rows, outputs, strict=True)]

    def _salt_of(self, context: int) -> str | None:
        """The fork family, and the KV epoch once there is one; without per-context salts, the epoch alone."""
        family = self._salt.setdefault(context, str(context)) if self._salted else ""
        if self.kv_epoch == 0:
            return family or None
        return f"{family}@{self.kv_epoch}"

    def stats(self) -> dict[str, int]:
        return {"prompt_tokens_computed": self.prompt_tokens_computed}

    def _generate(self, prompts: list[list[int]], params: list[Any], salts: list[str | None]) -> list[Any]:
        try:
            outputs = self.llm.generate(prompts, sampling_params=params, use_tqdm=False,
                                        cache_salt=salts if any(salts) else None)
        except Exception:
            if len(prompts) == 1:
                raise
            # One bad request must fail alone: replay the batch one request at a time to find it.
            return [self._one(p, sp, s) for p, sp, s in zip(prompts, params, salts, strict=True)]
        if len(outputs) != len(prompts):
            raise RuntimeError(f"LLM.generate returned {len(outputs)} outputs for {len(prompts)} prompts")
        return outputs

    def _one(self, prompt: list[int], params: Any, salt: str | None) -> Any:
        try:
            return self.llm.generate([prompt], sampling_params=[params], use_tqdm=False,
                                     cache_salt=[salt] if salt else None)[0]
        except Exception as exc:
            return RowResult(error=f"{type(exc).__name__}: {exc}")

    def fork(self, src: int, dst: int, length: int) -> None:
        self._salt[dst] = self._salt.setdefault(src, str(src))

    def drop(self, contexts: list[int]) -> None:
        for context in contexts:
            self._salt.pop(context, None)

    def close(self) -> None:
        bounded_shutdown(self.llm)


def _read(row: Row, output: Any) -> RowResult:
    completion = output.outputs[0]
    if not chained_in_engine(row):
        logits = getattr(completion, "generation_logits", None)
        if logits is None or len(logits) < 1:
            return RowResult(error="LLM.generate returned no generation logits")
        return row_result(logits[0].float(), row.sampler, row.seed)
    tokens = list(completion.token_ids)
    if not tokens:
        return RowResult(error=f"LLM.generate returned no tokens (finish_reason {completion.finish_reason})")
    return RowResult(tokens=tokens)
