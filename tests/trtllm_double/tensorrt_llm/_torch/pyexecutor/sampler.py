"""TEST DOUBLE of TensorRT-LLM 1.2.1 private internals (`tensorrt_llm._torch.pyexecutor.sampler`).

Not the real package. `SampleState` / `SampleStateTensors` and the `Sampler` methods per trtllm-api.md 5.5.
`TorchSampler` picks one token per scheduled request from the last-position logits: greedy when
`SamplingParams.params_imply_greedy_decoding` says so (beam width 1), else temperature (None -> 1.0), top-k
and top-p, drawn from the sampler's ONE generator seeded 42 (`TorchSampler.get_generator`, `_global_seed = 42`
in 1.2-era sampler.py). Like 1.2.x it ignores the request's seed and `min_p`. Sampled ids match the real
package only in distribution.
`new_tokens` is shaped like the real one: [1 (+draft), max_num_sequences, beam width], indexed by seq slot.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ...sampling_params import SamplingParams
from .llm_request import FinishReason, LlmRequest, LlmRequestState


@dataclass
class SampleStateTensors:
    new_tokens: Any
    log_probs: Any = None


class SamplerEvent:
    """Stands in for the torch.cuda.Event the real sampler records (CPU: already complete)."""

    def __init__(self) -> None:
        self.synchronized = 0

    def synchronize(self) -> None:
        self.synchronized += 1

    def query(self) -> bool:
        return True


@dataclass
class SampleState:
    scheduled_requests: Any
    device: SampleStateTensors | None = None
    host: SampleStateTensors | None = None
    sampler_event: SamplerEvent | None = None


def _first(values: list[Any] | None) -> Any:
    return values[0] if values else None


def resolve_sampling_strategy(request: LlmRequest) -> tuple[str, dict[str, Any]]:
    """("greedy", {}) or ("sample", {temperature, top_k, top_p}) from the request's sampling config."""
    cfg = request.sampling_config
    temperature, top_k, top_p = _first(cfg.temperature), _first(cfg.top_k), _first(cfg.top_p)
    if cfg.beam_width <= 1 and SamplingParams.params_imply_greedy_decoding(temperature=temperature, top_p=top_p,
                                                                           top_k=top_k):
        return "greedy", {}
    return "sample", {"temperature": temperature or 1.0, "top_k": top_k, "top_p": top_p}


def sample_token(logits: Any, strategy: str, params: dict[str, Any], generator: Any) -> int:
    """The same arithmetic as the double's `LLM.generate` path."""
    import torch

    if strategy == "greedy":
        return int(torch.argmax(logits))
    scores = logits / params["temperature"]
    top_k, top_p = params["top_k"], params["top_p"]
    if top_k is not None and 0 < top_k < scores.numel():
        kth = torch.topk(scores, top_k).values[-1]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    if top_p is not None and top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs
        probs = probs.clone()
        probs[order[before >= top_p]] = 0.0
    probs = probs / probs.sum()
    return int(torch.multinomial(probs, 1, generator=generator))


class Sampler:
    def setup_sampler_step(self, scheduled_requests: Any) -> None:
        pass

    def get_cache_indirection(self) -> Any:
        return None

    def sample_async(self, scheduled_requests: Any, model_outputs: dict[str, Any],
                     num_context_logits_prefix_sum: list[int], resource_manager: Any = None) -> SampleState:
        raise NotImplementedError

    def update_requests(self, state: SampleState, resource_manager: Any = None) -> None:
        raise NotImplementedError

    @staticmethod
    def beam_width(scheduled_requests: Any) -> int:
        for req in scheduled_requests:
            return req.sampling_config.beam_width
        return 0

    def is_generation_model(self) -> bool:
        return True


class TorchSampler(Sampler):
    def __init__(self, max_seq_len: int, max_num_sequences: int, max_beam_width: int = 1) -> None:
        self.max_seq_len = max_seq_len
        self.max_num_sequences = max_num_sequences
        self.max_beam_width = max_beam_width
        self._global_seed = 42
        self._generator: Any = None

    def get_generator(self, device: Any = None) -> Any:
        import torch

        if self._generator is None:
            self._generator = torch.Generator().manual_seed(self._global_seed)
        return self._generator

    def sample_async(self, scheduled_requests: Any, model_outputs: dict[str, Any],
                     num_context_logits_prefix_sum: list[int], resource_manager: Any = None) -> SampleState:
        import torch

        logits = model_outputs["logits"]
        requests = scheduled_requests.all_requests()
        if logits.shape[0] != len(requests):
            raise RuntimeError(f"sampler: {logits.shape[0]} logit rows for {len(requests)} requests")
        new_tokens = torch.zeros((1, self.max_num_sequences, self.max_beam_width), dtype=torch.int32)
        for row, req in enumerate(requests):
            if req.py_seq_slot is None:
                raise RuntimeError(f"sampler: request {req.py_request_id} has no seq slot (prepare_resources?)")
            strategy, params = resolve_sampling_strategy(req)
            new_tokens[0, req.py_seq_slot, 0] = sample_token(logits[row].float(), strategy, params,
                                                            self.get_generator())
        tensors = SampleStateTensors(new_tokens=new_tokens)
        return SampleState(scheduled_requests=scheduled_requests, device=tensors, host=tensors,
                           sampler_event=SamplerEvent())

    def update_requests(self, state: SampleState, resource_manager: Any = None) -> None:
        assert state.host is not None
        new_tokens = state.host.new_tokens
        for req in state.scheduled_requests.all_requests():
            if req.is_finished or req.context_remaining_length != 0:
                continue
            token = int(new_tokens[0, req.py_seq_slot, 0])
            req.add_new_token(token, 0)
            req.py_decoding_iter += 1
            self._handle_stop_criteria(req, token)

    def _handle_stop_criteria(self, req: LlmRequest, token: int) -> None:
        if req.py_end_id is not None and req.py_end_id >= 0 and token == req.py_end_id:
            req.finish_by_reason(FinishReason.END_ID)
        elif req.num_generated_tokens >= req.py_max_new_tokens or req.get_num_tokens(0) >= self.max_seq_len:
            req.finish_by_reason(FinishReason.LENGTH)
        elif req.py_stop_words_list and any(req.get_tokens(0)[-len(w):] == list(w)
                                             for w in req.py_stop_words_list if w):
            req.finish_by_reason(FinishReason.STOP_WORDS)
        if req.is_finished:
            req.state = LlmRequestState.GENERATION_COMPLETE


__all__ = ["SampleState", "SampleStateTensors", "Sampler", "SamplerEvent", "TorchSampler",
           "resolve_sampling_strategy", "sample_token"]
