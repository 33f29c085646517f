"""Model facts every engine reports, read from a checkpoint's config.json (never guessed)."""

from __future__ import annotations

import json
from pathlib import Path

from pie_driver_trtllm.config import DriverConfig, StartupError
from pie_driver_trtllm.engines.base import ModelInfo

U32_POSITIONS = 1 << 32  # positions travel as u32: no longer history is addressable
_LENGTH_KEYS = ("max_position_embeddings", "seq_length", "n_positions", "max_sequence_length")


def read_model_info(config: DriverConfig) -> ModelInfo:
    path = Path(config.model.snapshot_dir) / "config.json"
    try:
        hf = json.loads(path.read_text())
    except FileNotFoundError:
        raise StartupError(f"model: {path} does not exist; model.snapshot_dir must be a Hugging Face "
                           "checkpoint directory (make one with `pie-driver-trtllm make-model DIR`)") from None
    except (OSError, ValueError) as exc:
        raise StartupError(f"model: cannot read {path}: {exc}") from None
    if not isinstance(hf, dict):
        raise StartupError(f"model: {path} is not a JSON object")
    text = hf.get("text_config") if isinstance(hf.get("text_config"), dict) else {}
    vocab = hf.get("vocab_size") or text.get("vocab_size")
    if not isinstance(vocab, int) or vocab <= 0:
        raise StartupError(f"model: {path} has no positive integer vocab_size")
    length = next((hf.get(k) or text.get(k) for k in _LENGTH_KEYS if hf.get(k) or text.get(k)), None)
    if not isinstance(length, int) or length <= 0:
        raise StartupError(f"model: {path} names no maximum length (one of {', '.join(_LENGTH_KEYS)})")
    length = min(length, U32_POSITIONS)
    for cap in (config.options.max_seq_len, config.options.max_history_tokens):
        if cap is not None:
            length = min(length, cap)
    architectures = hf.get("architectures") or [hf.get("model_type") or "unknown"]
    return ModelInfo(name=config.model.name, arch_name=str(architectures[0]), vocab_size=vocab,
                     max_model_len=length, eos_token_id=_first_id(hf.get("eos_token_id")),
                     pad_token_id=_first_id(hf.get("pad_token_id")))


def _first_id(value: object) -> int | None:
    if isinstance(value, list):
        value = value[0] if value else None
    return value if isinstance(value, int) and not isinstance(value, bool) else None
