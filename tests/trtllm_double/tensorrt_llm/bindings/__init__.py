"""TEST DOUBLE of TensorRT-LLM 1.2.1 private internals (`tensorrt_llm.bindings`), not the real package.

The real module is the C++ extension (nanobind). The double keeps only what the PyExecutor path touches:
the `executor` submodule (Request, SamplingConfig, OutputConfig) and the runtime `SamplingConfig` that
`LlmRequest` carries (list-valued fields built from an executor SamplingConfig; trtllm-api.md 5.4).
"""

from __future__ import annotations

from typing import Any

from . import executor

# executor field -> runtime field, where the names differ (guess from memory of the C++ runtime SamplingConfig:
# `randomSeed` is bound as `random_seed`, `minLength` as `min_length`).
_RUNTIME_NAMES = {"seed": "random_seed", "min_tokens": "min_length"}


class SamplingConfig:
    """`tensorrt_llm.bindings.SamplingConfig` (runtime): every optional field is a one-element list or None."""

    def __init__(self, executor_sampling_config: executor.SamplingConfig | None = None, beam_width: int = 1) -> None:
        self.beam_width = beam_width
        for name in executor.SamplingConfig.__slots__:
            if name in ("beam_width", "num_return_sequences", "beam_width_array"):
                continue
            setattr(self, _RUNTIME_NAMES.get(name, name), None)
        self.num_return_sequences: int | None = None
        self.beam_width_array: Any = None
        if executor_sampling_config is not None:
            cfg = executor_sampling_config
            self.beam_width = cfg.beam_width
            self.num_return_sequences = cfg.num_return_sequences
            self.beam_width_array = cfg.beam_width_array
            for name in executor.SamplingConfig.__slots__:
                if name in ("beam_width", "num_return_sequences", "beam_width_array"):
                    continue
                value = getattr(cfg, name)
                setattr(self, _RUNTIME_NAMES.get(name, name), None if value is None else [value])

    def __repr__(self) -> str:
        return f"SamplingConfig({vars(self)})"


__all__ = ["SamplingConfig", "executor"]
