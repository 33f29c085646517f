"""Samplers: their wire shape, their rules, and the normalised form the engines read.

A sampler map is checked once, at the edge, against the model's limits; identical maps are checked once
and remembered, since a host sends the same few samplers over and over.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Annotated, Any, TypeVar

import msgspec

from pie_driver_trtllm.sampler import ALL_SAMPLERS, LOGPROB_MODES, MIN_TEMPERATURE, TOKEN_SAMPLERS, Sampler
from pie_driver_trtllm.wire.errors import DriverError, ErrorCode, shown
from pie_driver_trtllm.wire.limits import MAX_STOP_TOKEN_IDS, Limits

T = TypeVar("T")
U32 = Annotated[int, msgspec.Meta(ge=0, le=2**32 - 1)]
U64 = Annotated[int, msgspec.Meta(ge=0)]  # msgpack cannot carry integers above 2**64 - 1
_PARAMETERS = {"top_k": ("top_k",), "top_p": ("top_p",), "min_p": ("min_p",),
               "top_k_top_p": ("top_k", "top_p"), "dist": ("k",), "logprobs": ("token_ids",)}


class WireSampler(msgspec.Struct, forbid_unknown_fields=True, frozen=True):  # hashable: see sampler_from_wire
    at: U32
    type: str
    temperature: float | None = None
    top_k: U32 | None = None
    top_p: float | None = None
    min_p: float | None = None
    seed: U64 | None = None
    k: U32 | None = None
    token_ids: tuple[U32, ...] | None = None
    max_tokens: U32 | None = None               # protocol 1.1: any of these three makes the sampler a run
    stop_token_ids: tuple[U32, ...] | None = None
    return_logprobs: bool | None = None
    return_logprob: bool | None = None          # protocol 1.1: a one-token sampler's token with its logprob
    logprob_mode: str | None = None


def frozen_maker(cls: type[T]) -> Callable[..., T]:
    """`make(*fields)`, equal to `cls(*fields)` for a frozen, slotted dataclass without `__post_init__`.

    The dataclass's own `__init__` sets each field through `object.__setattr__`; this one calls the slot
    descriptors directly, about twice as fast, which counts where the codec builds one object per request.
    Every field must be given, in declaration order.
    """
    names = [field.name for field in dataclasses.fields(cls)]
    assert getattr(cls, "__slots__", None) == tuple(names) and not hasattr(cls, "__post_init__"), cls
    assert not {"obj", "new", "cls"} & set(names), cls
    scope: dict[str, Any] = {"new": object.__new__, "cls": cls}
    scope.update((f"set_{name}", getattr(cls, name).__set__) for name in names)
    body = "".join(f"    set_{name}(obj, {name})\n" for name in names)
    exec(f"def make({', '.join(names)}):\n    obj = new(cls)\n{body}    return obj\n", scope)
    return scope["make"]


def sampler_from_wire(s: WireSampler, n_tokens: int, limits: Limits) -> Sampler:
    if s.at >= n_tokens:
        raise DriverError(ErrorCode.OUT_OF_RANGE, f"sampler at={s.at} is outside the request's {n_tokens} tokens")
    key = (s, limits)
    sampler = _SAMPLERS.get(key)
    if sampler is None:
        sampler = normalize_sampler(s, limits)
        if s.token_ids is None or len(s.token_ids) <= 64:  # the memo's memory stays small
            if len(_SAMPLERS) >= 4096:  # a host rarely uses many distinct samplers; bound the memo anyway
                _SAMPLERS.clear()
            _SAMPLERS[key] = sampler
    return sampler


_SAMPLERS: dict[tuple[WireSampler, Limits], Sampler] = {}


def normalize_sampler(s: WireSampler, limits: Limits) -> Sampler:
    """`s` checked against `limits` and normalised, not remembered; the caller checks `at` against its request."""
    if s.type not in ALL_SAMPLERS:
        raise DriverError(ErrorCode.BAD_REQUEST,
                          f"sampler type {shown(s.type)} is unknown; known: {', '.join(ALL_SAMPLERS)}")
    if s.type not in limits.samplers:
        raise DriverError(ErrorCode.UNSUPPORTED, f"sampler type {s.type!r} is not served by this engine")
    temperature = 1.0 if s.temperature is None else s.temperature
    if not math.isfinite(temperature) or temperature < 0:
        raise DriverError(ErrorCode.BAD_REQUEST, f"temperature {s.temperature} must be a finite number >= 0")
    if s.type == "greedy" or (s.type in TOKEN_SAMPLERS and temperature < MIN_TEMPERATURE):
        temperature = 0.0
    top_k = _need(s, "top_k", s.type in ("top_k", "top_k_top_p"))
    top_p = _need(s, "top_p", s.type in ("top_p", "top_k_top_p"))
    min_p = _need(s, "min_p", s.type == "min_p")
    k = _need(s, "k", s.type == "dist")
    token_ids = _need(s, "token_ids", s.type == "logprobs")
    if top_k is not None and top_k < 1:
        raise DriverError(ErrorCode.BAD_REQUEST, "top_k must be >= 1")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise DriverError(ErrorCode.BAD_REQUEST, f"top_p {top_p} must be in (0, 1]")
    if min_p is not None and not 0.0 <= min_p <= 1.0:
        raise DriverError(ErrorCode.BAD_REQUEST, f"min_p {min_p} must be in [0, 1]")
    if k is not None and not 1 <= k <= limits.vocab_size:
        raise DriverError(ErrorCode.OUT_OF_RANGE, f"dist k={k} must be in 1..{limits.vocab_size}")
    if token_ids is not None:
        if not 1 <= len(token_ids) <= limits.max_logprob_labels:
            raise DriverError(ErrorCode.OUT_OF_RANGE,
                              f"logprobs asks for {len(token_ids)} token_ids; allowed 1..{limits.max_logprob_labels}")
        if max(token_ids) >= limits.vocab_size:
            raise DriverError(ErrorCode.OUT_OF_RANGE,
                              f"logprobs token id {max(token_ids)} is not below vocab_size {limits.vocab_size}")
    if s.type not in TOKEN_SAMPLERS and s.temperature in (None, 0.0):
        temperature = 1.0  # dist and logprobs report softmax(logits / T) with T = 1 when T is 0 or absent
    max_tokens, stop_ids = _run_fields(s, limits)
    return_logprob, mode = _logprob_fields(s, max_tokens > 0)
    return _new_sampler(s.type, s.at, temperature, top_k or 0, 1.0 if top_p is None else top_p, min_p or 0.0, s.seed,
                        k or 0, tuple(token_ids or ()), max_tokens, stop_ids, bool(s.return_logprobs), return_logprob,
                        mode)


def _logprob_fields(s: WireSampler, is_run: bool) -> tuple[bool, str]:
    """`return_logprob` and the `logprob_mode` that applies (the default where no logprob is asked for)."""
    if s.return_logprob is None and s.logprob_mode is None:
        return False, "processed"
    if s.type not in TOKEN_SAMPLERS:
        raise DriverError(ErrorCode.BAD_REQUEST,
                          f"sampler type {s.type!r} makes no token: return_logprob and logprob_mode belong to "
                          "token samplers")
    if s.logprob_mode is not None and s.logprob_mode not in LOGPROB_MODES:
        raise DriverError(ErrorCode.BAD_REQUEST,
                          f"logprob_mode {shown(s.logprob_mode)} is unknown; known: {', '.join(LOGPROB_MODES)}")
    if s.return_logprob and is_run:
        raise DriverError(ErrorCode.BAD_REQUEST,
                          "return_logprob is for a one-token sampler; a run (max_tokens, stop_token_ids or "
                          "return_logprobs) reports its tokens' log-probabilities with return_logprobs")
    return_logprob = bool(s.return_logprob)
    wanted = return_logprob or bool(s.return_logprobs)
    return return_logprob, (s.logprob_mode or "processed") if wanted else "processed"


def _run_fields(s: WireSampler, limits: Limits) -> tuple[int, tuple[int, ...]]:
    """`max_tokens` (0 for a one-token sampler of protocol 1.0) and the stop ids of a run."""
    if s.max_tokens is None and s.stop_token_ids is None and s.return_logprobs is None:
        return 0, ()
    if s.type not in TOKEN_SAMPLERS:
        raise DriverError(ErrorCode.BAD_REQUEST,
                          f"sampler type {s.type!r} makes no token: max_tokens, stop_token_ids and return_logprobs "
                          "belong to token samplers")
    max_tokens = 1 if s.max_tokens is None else s.max_tokens
    if not 1 <= max_tokens <= limits.max_sampler_tokens:
        raise DriverError(ErrorCode.OUT_OF_RANGE,
                          f"max_tokens {max_tokens} must be in 1..{limits.max_sampler_tokens} (max_sampler_tokens)")
    stop_ids = tuple(s.stop_token_ids or ())
    if len(stop_ids) > MAX_STOP_TOKEN_IDS:
        raise DriverError(ErrorCode.OUT_OF_RANGE,
                          f"{len(stop_ids)} stop_token_ids; at most {MAX_STOP_TOKEN_IDS} are allowed")
    if stop_ids and max(stop_ids) >= limits.vocab_size:
        raise DriverError(ErrorCode.OUT_OF_RANGE,
                          f"stop token id {max(stop_ids)} is not below vocab_size {limits.vocab_size}")
    return max_tokens, stop_ids


_new_sampler = frozen_maker(Sampler)


def _need(s: WireSampler, name: str, required: bool) -> Any:
    value = getattr(s, name)
    if required and value is None:
        raise DriverError(ErrorCode.BAD_REQUEST, f"sampler type {s.type!r} needs '{name}'")
    return value if required else None


def wire_map(s: Sampler) -> dict[str, Any]:
    """The sampler map that decodes back to `s` (used to forward validated requests to a replica)."""
    wire: dict[str, Any] = {"at": s.at, "type": s.type, "temperature": s.temperature}
    for name in _PARAMETERS.get(s.type, ()):
        value = getattr(s, name)
        wire[name] = list(value) if name == "token_ids" else value
    if s.seed is not None:
        wire["seed"] = s.seed
    if s.is_run:
        wire.update(max_tokens=s.max_tokens, stop_token_ids=list(s.stop_token_ids), return_logprobs=s.return_logprobs)
    if s.return_logprob:
        wire["return_logprob"] = True
    if s.logprob_mode != "processed":
        wire["logprob_mode"] = s.logprob_mode
    return wire
