"""TEST DOUBLE of TensorRT-LLM 1.2.1 (`tensorrt_llm.sampling_params`), not the real package.

Fields, defaults and validation follow trtllm-api.md 3.1-3.3 (read from 1.2.0rc2 sampling_params.py) and the
1.2/1.3-era `_validate` text found with the code search (same messages). `_get_sampling_config` and
`_get_output_config` follow the 1.2-era source found with the code search (fields discovered with `dir()` on the
TEST DOUBLE of the private `tensorrt_llm.bindings.executor` classes).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Any

from .bindings import executor as tllme

logger = logging.getLogger("tensorrt_llm")


@dataclass(slots=True, kw_only=True)
class GuidedDecodingParams:
    json: str | dict | None = None
    regex: str | None = None
    grammar: str | None = None
    json_object: bool = False
    structural_tag: str | None = None

    def _validate(self) -> None:
        num_guides = sum(bool(x) for x in (self.json, self.regex, self.grammar, self.json_object,
                                           self.structural_tag))
        if num_guides > 1:
            raise ValueError(f"Only one guide can be used for a request, but got {num_guides}.")


@dataclass(slots=True, kw_only=True)
class SamplingParams:
    end_id: int | None = None
    pad_id: int | None = None
    max_tokens: int = 32
    bad: str | list[str] | None = None
    bad_token_ids: list[int] | None = None
    _bad_word_ids: list[list[int]] | None = field(default=None, init=False, repr=False)
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool = False
    _stop_word_ids: list[list[int]] | None = field(default=None, init=False, repr=False)
    embedding_bias: Any = None
    logits_processor: Any = None
    apply_batched_logits_processor: bool = False
    n: int = 1
    best_of: int | None = None
    use_beam_search: bool = False
    top_k: int | None = None
    top_p: float | None = None
    top_p_min: float | None = None
    top_p_reset_ids: int | None = None
    top_p_decay: float | None = None
    seed: int | None = None
    temperature: float | None = None
    min_tokens: int | None = None
    beam_search_diversity_rate: float | None = None
    repetition_penalty: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    prompt_ignore_length: int | None = None
    length_penalty: float | None = None
    early_stopping: int | None = None
    no_repeat_ngram_size: int | None = None
    min_p: float | None = None
    beam_width_array: list[int] | None = None
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    return_context_logits: bool = False
    return_generation_logits: bool = False
    exclude_input_from_output: bool = True
    return_encoder_output: bool = False
    return_perf_metrics: bool = False
    additional_model_outputs: list[str] | None = None
    _context_logits_auto_enabled: bool = field(default=False, init=False, repr=False)
    _generation_logits_auto_enabled: bool = field(default=False, init=False, repr=False)
    _return_log_probs: bool = field(default=False, init=False, repr=False)
    lookahead_config: Any = None
    guided_decoding: GuidedDecodingParams | None = None
    ignore_eos: bool = False
    detokenize: bool = True
    add_special_tokens: bool = True
    truncate_prompt_tokens: int | None = None
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    _stream_interval: int | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.pad_id is None:
            self.pad_id = self.end_id
        self.best_of = self.best_of or self.n
        if self.embedding_bias is not None:
            import torch

            if isinstance(self.embedding_bias, torch.Tensor):
                self.embedding_bias = self.embedding_bias.detach().clone()
            else:
                self.embedding_bias = torch.tensor(self.embedding_bias, dtype=torch.float32)
        self._validate()

    def _validate(self) -> None:
        if self.top_p is not None and (self.top_p < 0 or self.top_p > 1):
            raise ValueError(f"require 0 <= top_p <= 1, got top_p={self.top_p}")
        if self.top_k is not None and self.top_k < 0:
            raise ValueError(f"require top_k >= 0, got top_k={self.top_k}")
        if self.temperature is not None and self.temperature < 0:
            raise ValueError(f"require temperature >= 0, got temperature={self.temperature}")
        if self.best_of is not None and self.best_of < self.n:
            raise ValueError(f"best_of ({self.best_of}) cannot be less than n ({self.n})")
        if (self.best_of is not None and self.best_of > 1 and self._greedy_decoding
                and not os.environ.get("TLLM_ALLOW_N_GREEDY_DECODING", None)):
            raise ValueError(
                f"Greedy decoding in the LLM API does not allow multiple returns. Please set to best_of=1, "
                f"got best_of={self.best_of}. Please set to best_of=1 or set an environment variable "
                f"TLLM_ALLOW_N_GREEDY_DECODING=1 to allow best_of > 1 under the greedy decoding.")
        if self.truncate_prompt_tokens is not None and self.truncate_prompt_tokens < 1:
            raise ValueError(f"truncate_prompt_tokens must be >= 1, got {self.truncate_prompt_tokens}")
        if self.guided_decoding is not None:
            self.guided_decoding._validate()
        # logprobs=True means top-1
        self.logprobs = self.logprobs and int(self.logprobs)
        self.prompt_logprobs = self.prompt_logprobs and int(self.prompt_logprobs)

    @staticmethod
    def params_imply_greedy_decoding(*, temperature: float | None, top_p: float | None,
                                     top_k: int | None) -> bool:
        return ((temperature is None and top_p is None and top_k is None)
                or top_k == 1 or top_p == 0.0 or temperature == 0)

    @property
    def _greedy_decoding(self) -> bool:
        return not self.use_beam_search and self.params_imply_greedy_decoding(
            temperature=self.temperature, top_p=self.top_p, top_k=self.top_k)

    def _setup(self, tokenizer: Any, hf_model_config: Any = None, generation_config: Any = None,
               add_special_tokens: bool = False) -> SamplingParams:
        if self.end_id is None:
            self.end_id = tokenizer.eos_token_id
            self.pad_id = tokenizer.pad_token_id
            if self.pad_id is None:
                self.pad_id = self.end_id
        if self.bad is not None:
            strs = [self.bad] if isinstance(self.bad, str) else self.bad
            self._bad_word_ids = [tokenizer.encode(s, add_special_tokens=add_special_tokens) for s in strs]
        if self.stop is not None:
            strs = [self.stop] if isinstance(self.stop, str) else self.stop
            self._stop_word_ids = [tokenizer.encode(s, add_special_tokens=add_special_tokens) for s in strs]
        return self

    def _get_stop_words(self) -> list[list[int]]:
        words = [[i] for i in self.stop_token_ids] if self.stop_token_ids else []
        if self.stop is None:
            return words
        if self._stop_word_ids is None:
            raise RuntimeError(f"{self.__class__.__name__}.stop ({self.stop}) is not processed by tokenizer, "
                               "please call the setup method.")
        return words + self._stop_word_ids

    def _get_stop_reasons_and_words(self) -> list[tuple[int | str, list[int]]]:
        reasons: list[int | str] = list(self.stop_token_ids or [])
        if self.stop is not None:
            reasons.extend([self.stop] if isinstance(self.stop, str) else self.stop)
        return list(zip(reasons, self._get_stop_words(), strict=False))

    def _get_sampling_config(self) -> tllme.SamplingConfig:
        # Beam search: n -> num_return_sequences, best_of -> beam_width; sampling: beam_width = 1,
        # best_of -> num_return_sequences (trtllm-api.md 3.4).
        fields = {f for f in dir(tllme.SamplingConfig) if not f.startswith("__")}
        unmatched_params = ["num_return_sequences", "beam_width", "n", "best_of", "use_beam_search"]
        llmapi_to_rt_param_map = {f: getattr(self, f) for f in fields if f not in unmatched_params}
        if self.use_beam_search:
            llmapi_to_rt_param_map["num_return_sequences"] = self.n
            llmapi_to_rt_param_map["beam_width"] = self.best_of
        else:
            llmapi_to_rt_param_map["num_return_sequences"] = self.best_of
            llmapi_to_rt_param_map["beam_width"] = 1
        return tllme.SamplingConfig(**llmapi_to_rt_param_map)

    def _get_output_config(self, is_pytorch_backend: bool = False) -> tllme.OutputConfig:
        sampling_param_fields = set(dir(SamplingParams))
        fields = [f for f in dir(tllme.OutputConfig) if not f.startswith("__") and f in sampling_param_fields]
        config_kwargs = {f: getattr(self, f) for f in fields}
        if is_pytorch_backend:
            config_kwargs["return_log_probs"] = bool(self.logprobs)
            if self.prompt_logprobs and not self.return_context_logits:
                logger.info("Since prompt_logprobs is requested but return_context_logits is False, internally "
                            "enabling context logits for prompt logprobs computation.")
                config_kwargs["return_context_logits"] = True
        else:
            config_kwargs["return_log_probs"] = self._return_log_probs
        if config_kwargs.get("additional_model_outputs") is not None:
            config_kwargs["additional_model_outputs"] = [
                tllme.AdditionalModelOutput(name=name, gather_context=False)
                for name in config_kwargs["additional_model_outputs"]]
        return tllme.OutputConfig(**config_kwargs)
