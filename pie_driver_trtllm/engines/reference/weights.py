"""New weights from a directory of safetensors files, checked whole against the live model before any live
tensor changes, then copied into the live parameters in place.

Every tensor must name a parameter of the served model, with its exact shape and a floating dtype; every
parameter must be covered. Headers are read first and every tensor's byte range is checked against its
file's size, so a truncated or inconsistent file is refused before any tensor data is read. What a load
can allocate is bounded by the served model's own sizes: a tensor of any other shape is refused from its
header. The format (an 8-byte little-endian header length, a JSON header of name -> dtype, shape and
byte offsets, then the data) is documented at https://huggingface.co/docs/safetensors.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch

from pie_driver_trtllm.engines.base import WeightsLoadError

# The floating dtypes a checkpoint may carry; each is converted to the served dtype on the copy.
_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
MAX_HEADER_BYTES = 100 << 20  # the safetensors format's own bound on a header
MAX_FILES = 4096              # a directory of more *.safetensors files is not a checkpoint


def stage(model: Any, path: str, pinned: bool = False) -> dict[str, torch.Tensor]:
    """Every parameter of `model` read from the safetensors files in `path`, on the host, keyed by
    parameter name, in the file's dtype (`pinned`: in page-locked memory, for a fast copy to a GPU).
    Raises WeightsLoadError (the previous weights untouched) naming the first problem."""
    directory = Path(path)
    if not directory.exists():
        raise WeightsLoadError(f"load_weights: {path!r} does not exist")
    if not directory.is_dir():
        raise WeightsLoadError(f"load_weights: {path!r} is not a directory")
    try:
        files = sorted(f for f in directory.iterdir() if f.name.endswith(".safetensors") and f.is_file())
    except OSError as exc:
        raise WeightsLoadError(f"load_weights: cannot list {path!r}: {exc.strerror or exc}") from None
    if not files:
        raise WeightsLoadError(f"load_weights: {path!r} holds no *.safetensors file")
    if len(files) > MAX_FILES:
        raise WeightsLoadError(f"load_weights: {path!r} holds {len(files)} safetensors files; at most {MAX_FILES}")
    live = dict(model.named_parameters(remove_duplicate=False))  # tied weights answer to each name
    plan: dict[str, tuple[Path, int, int, torch.dtype, tuple[int, ...]]] = {}
    for file in files:
        for name, entry in _tensors(file).items():
            plan[name] = _checked(file, name, entry, live, plan)
    covered = {id(live[name]) for name in plan}
    missing = [name for name, parameter in model.named_parameters() if id(parameter) not in covered]
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise WeightsLoadError(f"load_weights: {path!r} lacks {', '.join(map(repr, missing[:3]))}{more}")
    staged: dict[str, torch.Tensor] = {}
    try:
        for file in files:
            with open(file, "rb") as handle:
                for name, (source, start, end, dtype, shape) in plan.items():
                    if source == file:
                        staged[name] = _read(handle, file, start, end, dtype, shape, pinned)
    except OSError as exc:
        raise WeightsLoadError(f"load_weights: cannot read {file.name}: {exc.strerror or exc}") from None
    return staged


def apply(model: Any, staged: dict[str, torch.Tensor]) -> None:
    """Copy staged tensors into the live parameters, in place (their addresses stay, so CUDA graphs
    captured on them stay valid). A failure part way leaves a mix: the caller must stop serving."""
    live = dict(model.named_parameters(remove_duplicate=False))
    with torch.no_grad():
        for name, tensor in staged.items():
            live[name].data.copy_(tensor, non_blocking=tensor.is_pinned())
    if any(t.is_pinned() for t in staged.values()):
        torch.cuda.synchronize()  # the pinned sources must outlive their copies


def _tensors(file: Path) -> dict[str, dict[str, Any]]:
    """The header of one safetensors file, every tensor's byte range checked against the file's size;
    offsets made absolute."""
    try:
        size = file.stat().st_size
        with open(file, "rb") as handle:
            head = handle.read(8)
            length = int.from_bytes(head, "little") if len(head) == 8 else -1
            if length < 2 or length > MAX_HEADER_BYTES or 8 + length > size:
                raise WeightsLoadError(f"load_weights: {file.name} is not a safetensors file "
                                       "(its header length does not fit the file)")
            header = json.loads(handle.read(length))
    except OSError as exc:
        raise WeightsLoadError(f"load_weights: cannot read {file.name}: {exc.strerror or exc}") from None
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise WeightsLoadError(f"load_weights: {file.name} has a header that is not JSON") from None
    if not isinstance(header, dict):
        raise WeightsLoadError(f"load_weights: {file.name} has a header that is not a JSON object")
    header.pop("__metadata__", None)
    data = 8 + length
    for name, entry in header.items():
        offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)
                and 0 <= offsets[0] <= offsets[1]):
            raise WeightsLoadError(f"load_weights: {file.name}: tensor {name[:100]!r} has no valid data_offsets")
        if data + offsets[1] > size:
            raise WeightsLoadError(f"load_weights: {file.name} is truncated: tensor {name[:100]!r} ends at byte "
                                   f"{data + offsets[1]} of a {size}-byte file")
        entry["start"], entry["end"] = data + offsets[0], data + offsets[1]
    return header


def _checked(file: Path, name: str, entry: dict[str, Any], live: dict[str, torch.nn.Parameter],
             plan: dict[str, Any]) -> tuple[Path, int, int, torch.dtype, tuple[int, ...]]:
    where = f"load_weights: {file.name}: tensor {name[:100]!r}"
    if name not in live:
        raise WeightsLoadError(f"{where} is not a parameter of the served model")
    if name in plan:
        raise WeightsLoadError(f"{where} is also in {plan[name][0].name}")
    dtype = _DTYPES.get(entry.get("dtype"))  # type: ignore[arg-type]
    if dtype is None:
        raise WeightsLoadError(f"{where} has dtype {str(entry.get('dtype'))[:20]!r}; expected one of "
                               f"{', '.join(_DTYPES)}")
    shape = entry.get("shape")
    expected = tuple(live[name].shape)
    if not isinstance(shape, list) or tuple(shape) != expected:
        raise WeightsLoadError(f"{where} has shape {str(shape)[:60]}; the served model's is {list(expected)}")
    nbytes = math.prod(expected) * dtype.itemsize
    if entry["end"] - entry["start"] != nbytes:
        raise WeightsLoadError(f"{where} spans {entry['end'] - entry['start']} bytes; its shape and dtype "
                               f"take {nbytes}")
    return file, entry["start"], entry["end"], dtype, expected


def _read(handle: Any, file: Path, start: int, end: int, dtype: torch.dtype, shape: tuple[int, ...],
          pinned: bool) -> torch.Tensor:
    buffer = torch.empty(end - start, dtype=torch.uint8, pin_memory=pinned)
    handle.seek(start)
    view = memoryview(buffer.numpy())
    done = 0
    while done < len(view):
        got = handle.readinto(view[done:])
        if not got:
            raise WeightsLoadError(f"load_weights: {file.name} is truncated (it shrank while being read)")
        done += got
    return buffer.view(dtype).view(shape) if shape else buffer.view(dtype).view(())
