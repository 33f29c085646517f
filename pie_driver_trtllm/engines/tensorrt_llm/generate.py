"""TensorRT-LLM through its public `LLM.generate` API: one batched generate call per forward.

TensorRT-LLM owns the KV cache; each step replays the context's full token history and relies on the
KV block reuse of TensorRT-LLM (keyed per context lineage by `cache_salt`) to skip the shared prefix.
"""

from __future__ import annotations

import math
from typing import Any

from pie_driver_trtllm.config import DriverConfig
from pie_driver_trtllm.engines.base import ModelInfo, Row, RowResult
from pie_driver_trtllm.sampler import TOKEN_SAMPLERS, Sampler


class SamplingParamsBuilder:
    """Maps a protocol sampler onto TensorRT-LLM 1.2 `SamplingParams` keyword arguments."""

    def __init__(self, info: ModelInfo) -> None:
        end = info.eos_token_id if info.eos_token_id is not None else -1
        pad = info.pad_token_id if info.pad_token_id is not None else (end if end >= 0 else 0)
        # ignore_eos: stopping is the host's decision; end_id is still required without a tokenizer.
        self.common = {"end_id": end, "pad_id": pad, "detokenize": False, "ignore_eos": True}

    def kwargs(self, sampler: Sampler, steps: int, seed: int | None) -> dict[str, Any]:
        if sampler.type == "dist":
            return {**self.common, "max_tokens": 1, "temperature": 0.0, "logprobs": sampler.k}
        if sampler.is_greedy:
            return {**self.common, "max_tokens": steps, "temperature": 0.0}
        kwargs: dict[str, Any] = {**self.common, "max_tokens": 1, "temperature": sampler.temperature,
                                  "seed": seed}
        if sampler.type in ("top_k", "top_k_top_p"):
            kwargs["top_k"] = sampler.top_k
        if sampler.type in ("top_p", "top_k_top_p"):
            kwargs["top_p"] = sampler.top_p
        if sampler.type == "min_p":
            kwargs["min_p"] = sampler.min_p
        return kwargs


class GenerateEngine:
    kind = "tensorrt_llm"
    execution_mode = "generate"
    samplers = frozenset((*TOKEN_SAMPLERS, "dist"))

    def __init__(self, llm: Any, trt: Any, config: DriverConfig, info: ModelInfo, version: str) -> None:
        self.llm = llm
        self.model = info
        self.version = version
        self._sampling_params = trt.SamplingParams
        self._params = SamplingParamsBuilder(info)
        self._salted = config.options.enable_cache_salt
        self._salt: dict[int, str] = {}  # a fork inherits its source's salt, so it reuses the shared prefix

    def step(self, rows: list[Row]) -> list[RowResult]:
        results: list[RowResult | None] = [None] * len(rows)
        work = []
        for index, row in enumerate(rows):
            if row.sampler.type == "dist" and row.sampler.temperature != 1.0:
                results[index] = RowResult(
                    error="dist at a temperature other than 1 is not served by LLM.generate's logprobs",
                    code="UNSUPPORTED")
            else:
                work.append(index)
        if work:
            prompts = [rows[i].tokens[: rows[i].length] for i in work]
            params = [self._sampling_params(**self._params.kwargs(rows[i].sampler, rows[i].steps, rows[i].seed))
                      for i in work]
            salts = [self._salt.setdefault(rows[i].context, str(rows[i].context)) for i in work]
            for i, output in zip(work, self._generate(prompts, params, salts), strict=True):
                results[i] = output if isinstance(output, RowResult) else _read(rows[i].sampler, output)
        return results  # type: ignore[return-value]

    def _generate(self, prompts: list[list[int]], params: list[Any], salts: list[str]) -> list[Any]:
        try:
            outputs = self.llm.generate(prompts, sampling_params=params, use_tqdm=False,
                                        cache_salt=salts if self._salted else None)
        except Exception:
            if len(prompts) == 1:
                raise
            # One bad request must fail alone: replay the batch one request at a time to find it.
            return [self._one(p, sp, s) for p, sp, s in zip(prompts, params, salts, strict=True)]
        if len(outputs) != len(prompts):
            raise RuntimeError(f"LLM.generate returned {len(outputs)} outputs for {len(prompts)} prompts")
        return outputs

    def _one(self, prompt: list[int], params: Any, salt: str) -> Any:
        try:
            return self.llm.generate([prompt], sampling_params=[params], use_tqdm=False,
                                     cache_salt=[salt] if self._salted else None)[0]
        except Exception as exc:
            return RowResult(error=f"{type(exc).__name__}: {exc}")

    def fork(self, src: int, dst: int, length: int) -> None:
        self._salt[dst] = self._salt.get(src, str(src))

    def drop(self, contexts: list[int]) -> None:
        for context in contexts:
            self._salt.pop(context, None)

    def close(self) -> None:
        self.llm.shutdown()


def _read(sampler: Sampler, output: Any) -> RowResult:
    completion = output.outputs[0]
    if sampler.type == "dist":
        top = completion.logprobs[0]  # {token id: Logprob} for the first generated position
        ranked = sorted(top.items(), key=lambda item: -item[1].logprob)[: sampler.k]
        return RowResult(dist=([int(t) for t, _ in ranked], [math.exp(lp.logprob) for _, lp in ranked]))
    tokens = list(completion.token_ids)
    if not tokens:
        return RowResult(error=f"LLM.generate returned no tokens (finish_reason {completion.finish_reason})")
    return RowResult(tokens=tokens)
