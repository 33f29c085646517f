"""TEST DOUBLE of TensorRT-LLM 1.2.1 (`tensorrt_llm.llmapi.llm_args`), not the real package.

Field names and defaults follow trtllm-api.md 1.3 (LLM kwargs) and 1.4 (KvCacheConfig), which were read from a
1.2-era llm_args.py. Types are loose (`Any`) for configs the double does not model.
"""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PositiveInt


class StrictBaseModel(BaseModel):
    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True)


class KvCacheConfig(StrictBaseModel):
    enable_block_reuse: bool = True
    max_tokens: int | None = None
    max_attention_window: list[int] | None = None
    sink_token_length: int | None = None
    free_gpu_memory_fraction: float | None = Field(default=0.9, ge=0.0, le=1.0)
    host_cache_size: int | None = None
    onboard_blocks: bool = True
    cross_kv_cache_fraction: float | None = None
    secondary_offload_min_priority: int | None = None
    event_buffer_max_size: int = 0
    attention_dp_events_gather_period_ms: int = 5
    enable_partial_reuse: bool = True
    copy_on_partial_reuse: bool = True
    use_uvm: bool = False
    max_gpu_total_bytes: int = 0
    dtype: str = "auto"
    mamba_ssm_cache_dtype: str = "auto"
    tokens_per_block: int = 32
    use_kv_cache_manager_v2: bool = False
    max_util_for_resume: float = 0.95


class CudaGraphConfig(StrictBaseModel):
    batch_sizes: list[int] | None = None
    max_batch_size: int = 0
    enable_padding: bool = False


class CapacitySchedulerPolicy(StrEnum):
    MAX_UTILIZATION = "MAX_UTILIZATION"
    GUARANTEED_NO_EVICT = "GUARANTEED_NO_EVICT"
    STATIC_BATCH = "STATIC_BATCH"


class SchedulerConfig(StrictBaseModel):
    capacity_scheduler_policy: CapacitySchedulerPolicy = CapacitySchedulerPolicy.GUARANTEED_NO_EVICT
    context_chunking_policy: Any = None
    dynamic_batch_config: Any = None


class TorchCompileConfig(StrictBaseModel):
    enable_fullgraph: bool = True
    enable_inductor: bool = False


class KvCacheRetentionConfig:
    """Accepted and recorded, not modelled."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.args, self.kwargs = args, kwargs


class TorchLlmArgs(StrictBaseModel):
    """The PyTorch-backend argument model; `model_fields` is the set `LLM(**kwargs)` is checked against."""

    model: str | Path
    tokenizer: Any = None
    tokenizer_mode: Literal["auto", "slow"] = "auto"
    custom_tokenizer: str | None = None
    skip_tokenizer_init: bool = False
    trust_remote_code: bool = False
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    context_parallel_size: int = 1
    gpus_per_node: int | None = None
    moe_cluster_parallel_size: int | None = None
    moe_tensor_parallel_size: int | None = None
    moe_expert_parallel_size: int | None = None
    enable_attention_dp: bool = False
    cp_config: dict | None = None
    load_format: Any = "auto"
    checkpoint_format: str | None = None
    checkpoint_loader: Any = None
    dtype: str = "auto"
    revision: str | None = None
    tokenizer_revision: str | None = None
    enable_lora: bool = False
    lora_config: Any = None
    kv_cache_config: KvCacheConfig = Field(default_factory=KvCacheConfig)
    enable_chunked_prefill: bool = False
    guided_decoding_backend: Literal["xgrammar", "llguidance"] | None = None
    batched_logits_processor: Any = None
    iter_stats_max_iterations: int | None = None
    request_stats_max_iterations: int | None = None
    peft_cache_config: Any = None
    scheduler_config: SchedulerConfig = Field(default_factory=SchedulerConfig)
    cache_transceiver_config: Any = None
    speculative_config: Any = None
    max_batch_size: int | None = 2048
    max_input_len: int | None = 1024
    max_seq_len: int | None = None
    max_beam_width: int | None = 1
    max_num_tokens: int | None = 8192
    gather_generation_logits: bool = False
    num_postprocess_workers: int = 0
    postprocess_tokenizer_dir: str | None = None
    reasoning_parser: str | None = None
    garbage_collection_gen0_threshold: int = 20000
    backend: Literal["pytorch"] = "pytorch"
    return_perf_metrics: bool = False
    orchestrator_type: Literal["rpc", "ray"] | None = None
    env_overrides: dict[str, str] | None = None
    # PyTorch-backend specific
    cuda_graph_config: CudaGraphConfig | None = Field(default_factory=CudaGraphConfig)
    attention_dp_config: Any = None
    disable_overlap_scheduler: bool = False
    moe_config: Any = None
    attn_backend: str = "TRTLLM"
    sampler_type: str = "auto"
    enable_iter_perf_stats: bool = False
    enable_iter_req_stats: bool = False
    print_iter_log: bool = False
    batch_wait_timeout_ms: float = 0
    batch_wait_timeout_iters: int = 0
    batch_wait_max_tokens_ratio: float = 0
    torch_compile_config: TorchCompileConfig | None = None
    enable_autotuner: bool = True
    enable_layerwise_nvtx_marker: bool = False
    enable_min_latency: bool = False
    stream_interval: PositiveInt = 1
    force_dynamic_quantization: bool = False
    allreduce_strategy: str | None = "AUTO"
    mm_encoder_only: bool = False
    ray_worker_extension_cls: str | None = None
    ray_placement_config: Any = None
    enable_sleep: bool = False
    max_stats_len: int = 1000
    kv_connector_config: Any = None
    quant_config: Any = None
    decoding_config: Any = None


# Fields of the TensorRT-engine args that TorchLlmArgs lacks (trtllm-api.md 1.2 names build_config,
# enable_build_cache, workspace, fast_build; the rest are from memory of TrtLlmArgs and are a guess).
TRT_ONLY_FIELDS = frozenset({"build_config", "enable_build_cache", "workspace", "fast_build", "embedding_parallel_mode",
                             "extended_runtime_perf_knob_config", "calib_config", "normalize_log_probs",
                             "enable_tqdm", "share_embedding_table", "auto_parallel", "auto_parallel_world_size",
                             "enable_prompt_adapter", "max_prompt_adapter_token"})
