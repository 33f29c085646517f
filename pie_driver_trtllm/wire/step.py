"""The `step` op (protocol 1.2): a decode step written as columns.

A step stands for the forward whose request i feeds `tokens[i]` at `positions[i]` to `contexts[i]` with
the step's one `sampler` (or none). It comes as three lists of integers, which msgspec decodes and checks
in C, so no object is built per request until something asks for the requests. Its values are checked
as a whole: one out of range fails the step. What depends on a context's state fails its entry alone,
as in the forward.
"""

from __future__ import annotations

import functools
from typing import Annotated, Any

import msgspec

from pie_driver_trtllm.sampler import Sampler
from pie_driver_trtllm.wire.errors import DriverError, ErrorCode
from pie_driver_trtllm.wire.fast_forward import known_sampler_list
from pie_driver_trtllm.wire.limits import Limits, output_problem
from pie_driver_trtllm.wire.messages import Forward, FrameRejected, Request, StepColumns
from pie_driver_trtllm.wire.samplers import U32, U64, WireSampler, sampler_from_wire

_sampler_decoder = msgspec.msgpack.Decoder(WireSampler)


def decode_step(frame: bytes | memoryview, limits: Limits, request_id: int) -> Request:
    """A `step` frame, whose envelope is known good, as the forward it stands for. Raises FrameRejected."""
    try:
        wire = _step_decoder(limits.max_forward_requests).decode(frame)
    except msgspec.ValidationError as exc:
        if "of length <=" in str(exc):
            raise _refused(request_id, ErrorCode.CAPACITY, f"step has more than {limits.max_forward_requests} "
                           f"entries; max_forward_requests is {limits.max_forward_requests}") from None
        raise _refused(request_id, ErrorCode.BAD_REQUEST, f"step: {exc}") from None
    contexts, tokens, positions = wire.contexts, wire.tokens, wire.positions
    n = len(contexts)
    if len(tokens) != n or len(positions) != n:
        raise _refused(request_id, ErrorCode.BAD_REQUEST, f"step: {n} contexts, {len(tokens)} tokens and "
                       f"{len(positions)} positions; they must pair up")
    if n > limits.max_forward_tokens:
        raise _refused(request_id, ErrorCode.CAPACITY, f"step carries {n} tokens; max_forward_tokens is "
                       f"{limits.max_forward_tokens}")
    if n and max(tokens) >= limits.vocab_size:
        index = next(i for i, t in enumerate(tokens) if t >= limits.vocab_size)
        raise _refused(request_id, ErrorCode.OUT_OF_RANGE, f"step: tokens[{index}] = {tokens[index]} is not "
                       f"below vocab_size {limits.vocab_size}")
    if n and max(positions) >= limits.max_model_len:
        index = next(i for i, p in enumerate(positions) if p >= limits.max_model_len)
        raise _refused(request_id, ErrorCode.OUT_OF_RANGE, f"step: positions[{index}] = {positions[index]} is "
                       f"not below max_model_len {limits.max_model_len}")
    sampler = _sampler(wire.sampler, limits, request_id) if wire.sampler else None
    if sampler is not None and n:
        if n > limits.max_sampler_rows:
            raise _refused(request_id, ErrorCode.CAPACITY, f"step carries {n} samplers; max_sampler_rows is "
                           f"{limits.max_sampler_rows}")
        if sampler.type in ("dist", "logprobs") or sampler.return_logprob:
            problem = output_problem([(sampler,)] * n, limits)
            if problem:
                raise _refused(request_id, ErrorCode.CAPACITY, f"step: {problem}")
    return Request(request_id, "forward", Forward(columns=StepColumns(contexts, tokens, positions, sampler)))


def _sampler(raw: msgspec.Raw, limits: Limits, request_id: int) -> Sampler:
    """The step's sampler: a forward's one-sampler list, checked once per distinct map (remembered by its
    bytes, as the forward's fast path remembers its lists); a bad one named as a forward names it."""
    data = bytes(raw)
    known = known_sampler_list(b"\x91" + data, limits)  # the map as a list of one
    if known is not None and known[1] < 1:
        return known[0][0]
    try:
        return sampler_from_wire(_sampler_decoder.decode(data), 1, limits)
    except msgspec.ValidationError as exc:
        raise _refused(request_id, ErrorCode.BAD_REQUEST, f"step: sampler: {exc}") from None
    except DriverError as exc:
        raise _refused(request_id, exc.code, f"step: sampler: {exc.message}") from None


def _refused(request_id: int, code: ErrorCode, message: str) -> FrameRejected:
    return FrameRejected(request_id, DriverError(code, message))


@functools.lru_cache(maxsize=8)
def _step_decoder(max_entries: int) -> msgspec.msgpack.Decoder:
    """A step frame's decoder; each column is refused past `max_entries` before its entries are read."""
    def column(kind: Any) -> Any:
        return Annotated[list[kind], msgspec.Meta(max_length=max_entries)]

    step = msgspec.defstruct("WireStep", [
        ("v", Any), ("id", Any), ("op", Any), ("contexts", column(U64)), ("tokens", column(U32)),
        ("positions", column(U32)), ("sampler", msgspec.Raw, msgspec.Raw())],
        forbid_unknown_fields=True, gc=False)
    return msgspec.msgpack.Decoder(step)
