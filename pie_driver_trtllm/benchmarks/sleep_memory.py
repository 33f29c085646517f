"""sleep_memory: what the reference engine still holds on the GPU asleep, and what holds it (CUDA only).

The engine in this process, sized as the `rl` workload sizes the driver (256 cache slots of 648 tokens),
runs a 256 x 512 prefill and 16 decode steps, then sleeps at level 2 and wakes. At each moment it reads
the process's device memory (total less free: run it on a GPU nothing else uses), what torch's allocator
has allocated and reserved, and the context's per-thread stack size. Asleep it lists the tensors still
allocated with the lines that made them (torch's allocation history). Beside it, a bare process that ran
one bf16 matmul and one attention call gives the floor a CUDA context with those kernels costs.

    python -m pie_driver_trtllm.benchmarks.sleep_memory [--out FILE]
"""

from __future__ import annotations

import argparse
import ctypes
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

from pie_driver_trtllm.benchmarks.common import Bench, Decode, core_forward, in_process_core, timed_steps
from pie_driver_trtllm.wire.messages import Sleep, Wake

SLOTS, PROMPT, NEW = 256, 512, 128
_FLOOR = """
import torch
a = torch.randn(256, 256, device="cuda", dtype=torch.bfloat16)
(a @ a).float().sum().item()
torch.nn.functional.scaled_dot_product_attention(a[None, None], a[None, None], a[None, None]).sum().item()
free, total = torch.cuda.mem_get_info()
print((total - free) / 2**20)
"""


def _stack_size() -> int:
    size = ctypes.c_size_t()
    ctypes.CDLL("libcuda.so.1").cuCtxGetLimit(ctypes.byref(size), 0)  # CU_LIMIT_STACK_SIZE
    return size.value


def moment(name: str) -> dict[str, Any]:
    torch.cuda.synchronize()
    free, total = torch.cuda.mem_get_info()
    row = {"moment": name, "process_mib": round((total - free) / 2**20, 1),
           "allocated_mib": round(torch.cuda.memory_allocated() / 2**20, 1),
           "reserved_mib": round(torch.cuda.memory_reserved() / 2**20, 1), "stack_bytes": _stack_size()}
    print(f"{name:40s} process {row['process_mib']:9.1f} MiB  allocated {row['allocated_mib']:9.1f}  "
          f"reserved {row['reserved_mib']:9.1f}  stack {row['stack_bytes']} B a thread", flush=True)
    return row


def live_tensors() -> list[dict[str, Any]]:
    """The tensors still allocated, largest first, each with the driver's lines that made it."""
    blocks = [block for segment in torch.cuda.memory._snapshot()["segments"] for block in segment["blocks"]
              if block["state"] == "active_allocated"]
    blocks.sort(key=lambda block: -block["size"])
    return [{"bytes": block["size"], "made_at": [f"{frame['filename'].rsplit('pie_driver_trtllm/', 1)[-1]}:"
                                                 f"{frame['line']}" for frame in block.get("frames", [])
                                                 if "pie_driver_trtllm" in frame["filename"]][:4]}
            for block in blocks]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", help="also write the results here as JSON")
    args = parser.parse_args()
    floor = float(subprocess.run([sys.executable, "-c", _FLOOR], capture_output=True, text=True,
                                 check=True).stdout)
    print(f"{'a bare context (one matmul, one attention)':40s} process {floor:9.1f} MiB", flush=True)
    torch.cuda.memory._record_memory_history(max_entries=100_000)
    work = Path(tempfile.mkdtemp(prefix="pie-sleep-"))
    bench = Bench(size="1b", device="cuda:0", dtype="bfloat16", out_dir=work, work_dir=work)
    model = bench.model()
    rows = [moment("CUDA initialised")]
    core = in_process_core(bench, model, lookahead_tokens=1, max_concurrent_requests=SLOTS,
                           max_batched_tokens=SLOTS * PROMPT, max_seq_len=PROMPT + NEW + 8)
    timed_steps(bench, Decode(list(range(SLOTS)), PROMPT, vocab=30000), core_forward(core), 1 + 16)
    rows.append(moment("after the prefill and decode steps"))
    core.sleep(Sleep(2))
    rows.append(moment("asleep at level 2"))
    live = live_tensors()
    torch.cuda.memory._record_memory_history(enabled=None)
    print(f"asleep, {len(live)} tensors still allocated ({sum(t['bytes'] for t in live)} bytes):", flush=True)
    for tensor in live[:10]:
        print(f"  {tensor['bytes']:>10} B  made at {' <- '.join(tensor['made_at'])}", flush=True)
    core.wake(Wake())
    rows.append(moment("awake again"))
    result = {"floor_mib": floor, "moments": rows, "live_asleep": live,
              "freed_share": 1 - rows[2]["process_mib"] / rows[1]["process_mib"]}
    print(f"sleep level 2 gave back {result['freed_share']:.1%} of what this process held", flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
