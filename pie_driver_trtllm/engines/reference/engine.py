"""Reference engine: a Hugging Face causal LM run with PyTorch, on CPU or one CUDA device.

It is the ground truth the TensorRT-LLM engine must agree with. Each context keeps its KV cache between
steps, so a decode step only runs the tokens the cache does not already hold; a context that needs a
prefill starts from a copy of the longest prefix another context's cache holds (a fork's source, a
sibling sample), so n samples of one prompt compute the prompt once.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from pie_driver_trtllm.config import DriverConfig, StartupError
from pie_driver_trtllm.engines.base import ModelInfo, Row, RowResult, common_prefix
from pie_driver_trtllm.engines.model_facts import read_model_info
from pie_driver_trtllm.engines.reference.batched_llama import slot_bytes, supports
from pie_driver_trtllm.engines.reference.memory import EngineMemory
from pie_driver_trtllm.engines.reference.prefixes import best_donor
from pie_driver_trtllm.engines.reference.weights import apply
from pie_driver_trtllm.engines.runs import chained_in_engine, step_with_runs
from pie_driver_trtllm.engines.sampling import row_result
from pie_driver_trtllm.sampler import ALL_SAMPLERS

_DTYPES = {"bfloat16": "bfloat16", "bf16": "bfloat16", "float16": "float16", "fp16": "float16",
           "half": "float16", "float32": "float32", "fp32": "float32", "float": "float32"}


@dataclass
class _Resident:
    """A context's KV cache and the exact tokens it holds."""

    cache: Any
    tokens: list[int] = field(default_factory=list)


class ReferenceEngine:
    kind = "reference"
    execution_mode = "eager"
    samplers = frozenset(ALL_SAMPLERS)

    def __init__(self, model: Any, device: str, info: ModelInfo) -> None:
        import torch

        self.version = _version()
        self._torch = torch
        self._model = model
        self._device = device
        self.model = info
        self._resident: dict[int, _Resident] = {}
        self.prompt_tokens_computed = 0  # tokens run in passes of several tokens of one context
        self.memory = EngineMemory(model, device)

    @classmethod
    def load(cls, config: DriverConfig, device: str) -> ReferenceEngine:
        """The batched engine for Llama-family checkpoints that fit a slot cache, else this one."""
        info = read_model_info(config)
        try:
            import torch
            from transformers import AutoModelForCausalLM
            from transformers.utils import logging as transformers_logging
        except ImportError as exc:
            raise StartupError(f"reference engine: {exc}; install it with "
                               "`pip install 'pie-driver-trtllm[reference]'`") from None
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise StartupError(f"reference engine: device {device!r} asked for, but torch sees no CUDA GPU; "
                               "use device = [\"cpu\"] or run on a GPU machine")
        dtype_name = config.driver.activation_dtype
        if dtype_name == "auto":
            dtype_name = "bfloat16" if device.startswith("cuda") else "float32"
        dtype = getattr(torch, _DTYPES[dtype_name])
        transformers_logging.disable_progress_bar()  # a driver's stderr is the host's: no bars on every start
        try:
            model = AutoModelForCausalLM.from_pretrained(
                config.model.snapshot_dir, dtype=dtype, local_files_only=True,
                trust_remote_code=config.options.trust_remote_code)
        except Exception as exc:
            raise StartupError(f"reference engine: cannot load {config.model.snapshot_dir}: "
                               f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
        model.to(device).eval()
        slots = _slot_count(model, info, device, config.options.max_concurrent_requests)
        if slots:
            from pie_driver_trtllm.engines.reference.batched import BatchedReferenceEngine

            return BatchedReferenceEngine(model, device, info, slots, _version(),
                                          compile=config.options.reference_compile,
                                          overlap=None if config.options.reference_overlap else False)  # type: ignore[return-value]
        return cls(model, device, info)

    # ------------------------------------------------------------------ the interface

    def step(self, rows: list[Row]) -> list[RowResult]:
        self.memory.check_serving()
        return step_with_runs(self._step_once, rows, chained_in_engine)

    def _step_once(self, rows: list[Row]) -> list[RowResult]:
        results: list[RowResult | None] = [None] * len(rows)
        groups: dict[tuple[int, int], list[int]] = {}
        for index, row in enumerate(rows):
            groups.setdefault((row.context, id(row.tokens)), []).append(index)
        with self._torch.inference_mode():
            for (context, _), indexes in groups.items():
                try:
                    for index, result in zip(indexes, self._run(context, [rows[i] for i in indexes]), strict=True):
                        results[index] = result
                except Exception as exc:  # one context's failure must not cost the others
                    self._resident.pop(context, None)
                    for index in indexes:
                        results[index] = RowResult(error=f"{type(exc).__name__}: {exc}")
        return results  # type: ignore[return-value]

    def fork(self, src: int, dst: int, length: int) -> None:
        self._resident.pop(dst, None)
        source = self._resident.get(src)
        if source is None or length == 0:
            return
        self._resident[dst] = _copy(source, min(length, len(source.tokens)))

    def drop(self, contexts: list[int]) -> None:
        for context in contexts:
            self._resident.pop(context, None)

    def close(self) -> None:
        self._resident.clear()

    def stats(self) -> dict[str, int]:
        """Counters the driver's `stats` op reports under `engine`."""
        return {"prompt_tokens_computed": self.prompt_tokens_computed}

    def load_weights(self, path: str) -> None:
        def swap(staged: dict[str, Any]) -> None:
            self._resident.clear()  # no KV computed with the old weights is ever read again
            apply(self._model, staged)

        self.memory.load(path, swap)

    def sleep(self, level: int) -> None:
        self._resident.clear()
        self.memory.sleep(level, lambda: None, self._model.to)

    def wake(self) -> None:
        self.memory.wake(lambda: None, self._model.to)

    # ------------------------------------------------------------------ internals

    def _run(self, context: int, rows: list[Row]) -> list[RowResult]:
        torch = self._torch
        tokens = rows[0].tokens
        end = max(row.length for row in rows)
        first_needed = min(row.length for row in rows) - 1
        resident = self._resident.get(context)
        keep = min(common_prefix(resident.tokens, tokens, end), first_needed) if resident else 0
        donor, shared = best_donor(((r, r.tokens) for c, r in self._resident.items() if c != context), tokens, keep,
                                   first_needed)
        if donor is not None:
            resident = self._resident[context] = _copy(donor, shared)
            keep = shared
        elif resident is None or keep == 0:
            resident = self._resident[context] = _Resident(self._new_cache())
        else:
            _crop(resident.cache, len(resident.tokens), keep)
            del resident.tokens[keep:]
        wanted = sorted({row.length - 1 - keep for row in rows})
        logits = self._forward(resident, tokens[keep:end], wanted)
        if end - keep > 1:
            self.prompt_tokens_computed += end - keep
        row_logits = {offset + keep + 1: logits[i] for i, offset in enumerate(wanted)}

        results = []
        for row in rows:
            current = row_logits[row.length]
            result = row_result(current, row.sampler, row.seed)
            if row.steps > 1 and chained_in_engine(row) and row.length == end and result.tokens:
                for _ in range(row.steps - 1):
                    current = self._forward(resident, result.tokens[-1:], [0])[0]
                    result.tokens.append(int(torch.argmax(current)))
            results.append(result)
        return results

    def _forward(self, resident: _Resident, new_tokens: list[int], wanted: list[int]) -> Any:
        """Run `new_tokens` on top of the cache; float32 logits at the `wanted` offsets of `new_tokens`."""
        torch = self._torch
        ids = torch.tensor([new_tokens], dtype=torch.long, device=self._device)
        keep = torch.tensor(wanted, dtype=torch.long, device=self._device)
        out = self._model(input_ids=ids, past_key_values=resident.cache, use_cache=True, logits_to_keep=keep)
        resident.tokens.extend(new_tokens)
        return out.logits[0].float()

    def _new_cache(self) -> Any:
        from transformers import DynamicCache

        return DynamicCache(config=self._model.config)


def _copy(source: _Resident, keep: int) -> _Resident:
    """A context of its own holding `source`'s first `keep` tokens."""
    import copy

    cache = copy.deepcopy(source.cache)
    _crop(cache, len(source.tokens), keep)
    return _Resident(cache, source.tokens[:keep])


def _crop(cache: Any, length: int, keep: int) -> None:
    # Newer transformers only accept "remove this many tokens" (a negative value), older ones accept both.
    if keep < length:
        cache.crop(keep - length)



def _version() -> str:
    import torch
    import transformers

    return f"torch {torch.__version__}, transformers {transformers.__version__}"


def _slot_count(model: Any, info: ModelInfo, device: str, wanted: int) -> int:
    """Cache slots for the batched path: as many contexts as requested that fit; 0 means unsupported."""
    if not supports(model):
        return 0
    import torch

    per_slot = slot_bytes(model, info.max_model_len)
    budget = int(torch.cuda.mem_get_info()[0] * 0.5) if device.startswith("cuda") else kv_budget_cpu()
    return max(0, min(wanted, 256, budget // per_slot))


def kv_budget_cpu() -> int:
    """The most KV cache to reserve on CPU: a quarter of the memory available now (1 GiB when unknown).

    The cache is allocated up front (slots x max_model_len), so the configured limits size it; this
    only keeps large limits from taking the machine's memory."""
    available = available_memory()
    return available // 4 if available else 1 << 30


def available_memory() -> int | None:
    """Bytes the kernel could hand out now without swapping (page cache included), None when unknown."""
    try:
        with open("/proc/meminfo", encoding="ascii") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return None
