"""A safetensors checkpoint staged whole in host memory before any live weight changes, and its transfer.

TensorRT-LLM's `update_weights` loads each call's tensors in place, so a call that fails part way leaves
old and new weights mixed (TensorRT-LLM issue #16642). Everything that can fail without touching the
engine is therefore done first: every file read and parsed, every name, shape and dtype compared with the
checkpoint the engine started from. Only then do the tensors travel, bucket by bucket, as the
`(rebuild, args)` handles of `torch.multiprocessing.reductions.reduce_tensor` (CUDA IPC handles on a GPU),
keyed by the device's UUID as `WorkerExtension.update_weights` expects.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import torch

BUCKET_BYTES = 1 << 30  # tensors sent per update_weights call (verl buckets its refits the same way)


class CheckpointError(Exception):
    """The directory is not a readable checkpoint of the serving model's architecture."""


def manifest(directory: str | Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Every tensor of a safetensors directory: name -> (dtype, shape), read from the file headers only."""
    files = sorted(Path(directory).glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{directory} holds no *.safetensors file")
    found: dict[str, tuple[str, tuple[int, ...]]] = {}
    for path in files:
        for name, (dtype, shape) in _header(path).items():
            if name in found:
                raise CheckpointError(f"{name} is in more than one file of {directory}")
            found[name] = (dtype, shape)
    return found


def _header(path: Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    try:
        with path.open("rb") as handle:
            raw = handle.read(8)
            if len(raw) != 8:
                raise CheckpointError(f"{path.name} is too short to be a safetensors file")
            (size,) = struct.unpack("<Q", raw)
            if size > 100_000_000:
                raise CheckpointError(f"{path.name} has an implausible header size ({size} bytes)")
            header = json.loads(handle.read(size))
        end = 8 + size + max((int(t["data_offsets"][1]) for k, t in header.items() if k != "__metadata__"),
                             default=0)
        if path.stat().st_size < end:
            raise CheckpointError(f"{path.name} is truncated: {path.stat().st_size} bytes, its header "
                                  f"describes {end}")
        return {k: (str(t["dtype"]), tuple(int(d) for d in t["shape"])) for k, t in header.items()
                if k != "__metadata__"}
    except OSError as exc:
        raise CheckpointError(f"cannot read {path}: {exc.strerror or exc}") from None
    except (ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{path.name} has no valid safetensors header ({exc})") from None


def stage(directory: str | Path, expected: dict[str, tuple[str, tuple[int, ...]]]) -> dict[str, torch.Tensor]:
    """Read the whole checkpoint into host memory, or raise CheckpointError naming the first problem."""
    found = manifest(directory)
    missing, extra = sorted(expected.keys() - found.keys()), sorted(found.keys() - expected.keys())
    if missing or extra:
        raise CheckpointError(f"{directory} does not match the serving model: missing {missing[:5]}, "
                              f"unknown {extra[:5]}")
    for name, (dtype, shape) in found.items():
        if (dtype, shape) != expected[name]:
            raise CheckpointError(f"{name} is {dtype} {list(shape)}, the serving model has "
                                  f"{expected[name][0]} {list(expected[name][1])}")
    from safetensors.torch import load_file

    tensors: dict[str, torch.Tensor] = {}
    for path in sorted(Path(directory).glob("*.safetensors")):
        try:
            tensors.update(load_file(str(path)))
        except Exception as exc:  # a damaged body behind a whole header
            raise CheckpointError(f"{path.name} cannot be read: {type(exc).__name__}: {exc}") from None
    return tensors


def buckets(tensors: dict[str, torch.Tensor], limit: int = BUCKET_BYTES) -> list[list[str]]:
    """Names grouped so that each group's bytes stay within `limit` (a larger tensor travels alone)."""
    groups: list[list[str]] = [[]]
    size = 0
    for name, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if groups[-1] and size + nbytes > limit:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += nbytes
    return [g for g in groups if g]


def handles(tensors: dict[str, torch.Tensor], names: list[str], device: str) -> tuple[list[Any], list[Any]]:
    """`(name, (rebuild, args))` for these tensors on `device`, and the device tensors (keep them alive until
    the receiver has loaded them)."""
    from torch.multiprocessing.reductions import reduce_tensor

    moved = [tensors[name].to(device) for name in names]
    return [(name, reduce_tensor(t)) for name, t in zip(names, moved, strict=True)], moved
