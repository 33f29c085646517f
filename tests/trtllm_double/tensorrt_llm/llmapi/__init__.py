"""TEST DOUBLE of TensorRT-LLM 1.2.1 (`tensorrt_llm.llmapi`), not the real package."""

from ..executor.result import CompletionOutput, Logprob, RequestOutput
from ..executor.utils import RequestError
from ..sampling_params import GuidedDecodingParams, SamplingParams
from .llm import LLM
from .llm_args import (
    CapacitySchedulerPolicy,
    CudaGraphConfig,
    KvCacheConfig,
    KvCacheRetentionConfig,
    SchedulerConfig,
    TorchCompileConfig,
    TorchLlmArgs,
)

__all__ = ["LLM", "CapacitySchedulerPolicy", "CompletionOutput", "CudaGraphConfig", "GuidedDecodingParams",
           "KvCacheConfig", "KvCacheRetentionConfig", "Logprob", "RequestError", "RequestOutput", "SamplingParams",
           "SchedulerConfig", "TorchCompileConfig", "TorchLlmArgs"]
