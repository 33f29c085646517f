"""TEST DOUBLE of TensorRT-LLM 1.2.1 private internals (`tensorrt_llm.bindings.executor`), not the real package.

The real module is C++ (nanobind). `SamplingConfig` and `OutputConfig` expose as attributes exactly the field
names `SamplingParams._get_sampling_config()` / `_get_output_config()` discover with `dir()` (trtllm-api.md 3.4);
`Request` stores the keyword arguments `BaseWorker._enqueue_request` passes (trtllm-api.md 5.4).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Any


@dataclass(slots=True, kw_only=True)
class SamplingConfig:
    # Field names of the C++ executor SamplingConfig binding as far as they match SamplingParams (trtllm-api.md
    # 3.1/3.4); the set is a guess from memory of the 1.2-era binding (`prompt_ignore_length` new in 1.2).
    beam_width: int = 1
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
    num_return_sequences: int | None = None
    min_p: float | None = None
    beam_width_array: list[int] | None = None

    def __post_init__(self) -> None:
        # The C++ constructor checks ranges too (messages differ from SamplingParams._validate).
        if self.beam_width < 1:
            raise ValueError(f"beam_width must be >= 1, got {self.beam_width}")
        if self.top_k is not None and self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if self.temperature is not None and self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_p is not None and not 0 <= self.top_p <= 1:
            raise ValueError(f"top_p must be in [0, 1], got {self.top_p}")


@dataclass(slots=True)
class AdditionalModelOutput:
    name: str
    gather_context: bool = False


@dataclass(slots=True, kw_only=True)
class OutputConfig:
    return_log_probs: bool = False
    return_context_logits: bool = False
    return_generation_logits: bool = False
    exclude_input_from_output: bool = False
    return_encoder_output: bool = False
    return_perf_metrics: bool = False
    additional_model_outputs: list[AdditionalModelOutput] | None = None


class RequestType(Enum):
    REQUEST_TYPE_CONTEXT_AND_GENERATION = 0
    REQUEST_TYPE_CONTEXT_ONLY = 1
    REQUEST_TYPE_GENERATION_ONLY = 2


class Request:
    """`tensorrt_llm.bindings.executor.Request` (C++ `ExecutorRequest`); keyword arguments become attributes."""

    def __init__(self, *, input_token_ids: list[int], max_tokens: int, streaming: bool = False,
                 sampling_config: SamplingConfig | None = None, output_config: OutputConfig | None = None,
                 end_id: int | None = None, pad_id: int | None = None, position_ids: Any = None,
                 bad_words: list[list[int]] | None = None, stop_words: list[list[int]] | None = None,
                 embedding_bias: Any = None, external_draft_tokens_config: Any = None,
                 prompt_tuning_config: Any = None, multimodal_input: Any = None, multimodal_embedding: Any = None,
                 mrope_config: Any = None, lora_config: Any = None, lookahead_config: Any = None,
                 kv_cache_retention_config: Any = None, logits_post_processor_name: str | None = None,
                 logits_post_processor: Any = None, encoder_input_token_ids: list[int] | None = None,
                 client_id: int | None = None, return_all_generated_tokens: bool = False, priority: float = 0.5,
                 type: RequestType = RequestType.REQUEST_TYPE_CONTEXT_AND_GENERATION,
                 context_phase_params: Any = None, encoder_input_features: Any = None,
                 encoder_output_length: int | None = None, cross_attention_mask: Any = None,
                 num_return_sequences: int = 1, eagle_config: Any = None, skip_cross_attn_blocks: Any = None,
                 guided_decoding_params: Any = None, language_adapter_uid: int | None = None,
                 allotted_time_ms: int | None = None, cache_salt_id: int | None = None,
                 disagg_request_id: int | None = None) -> None:
        if max_tokens is None or max_tokens < 0:
            raise ValueError(f"max_tokens must be >= 0, got {max_tokens}")
        if not input_token_ids:
            raise ValueError("input_token_ids must not be empty")
        self.input_token_ids = [int(t) for t in input_token_ids]
        self.max_tokens = int(max_tokens)
        self.streaming = streaming
        self.sampling_config = sampling_config if sampling_config is not None else SamplingConfig()
        self.output_config = output_config if output_config is not None else OutputConfig()
        self.end_id = end_id
        self.pad_id = pad_id
        self.position_ids = position_ids
        self.bad_words = bad_words
        self.stop_words = stop_words
        self.embedding_bias = embedding_bias
        self.external_draft_tokens_config = external_draft_tokens_config
        self.prompt_tuning_config = prompt_tuning_config
        self.multimodal_input = multimodal_input
        self.multimodal_embedding = multimodal_embedding
        self.mrope_config = mrope_config
        self.lora_config = lora_config
        self.lookahead_config = lookahead_config
        self.kv_cache_retention_config = kv_cache_retention_config
        self.logits_post_processor_name = logits_post_processor_name
        self.logits_post_processor = logits_post_processor
        self.encoder_input_token_ids = encoder_input_token_ids
        self.client_id = client_id
        self.return_all_generated_tokens = return_all_generated_tokens
        self.priority = priority
        self.request_type = type
        self.context_phase_params = context_phase_params
        self.encoder_input_features = encoder_input_features
        self.encoder_output_length = encoder_output_length
        self.cross_attention_mask = cross_attention_mask
        self.num_return_sequences = num_return_sequences
        self.eagle_config = eagle_config
        self.skip_cross_attn_blocks = skip_cross_attn_blocks
        self.guided_decoding_params = guided_decoding_params
        self.language_adapter_uid = language_adapter_uid
        self.allotted_time_ms = allotted_time_ms
        self.cache_salt_id = cache_salt_id
        self.disagg_request_id = disagg_request_id


__all__ = ["AdditionalModelOutput", "OutputConfig", "Request", "RequestType", "SamplingConfig"]
