#!/usr/bin/env bash
# Every single-GPU measurement in one go (one lent H100): the driver's overhead next to the in-process
# engine (this tree, and optionally an earlier tree measured by the same harness), the null-engine driver
# cost, the bare transport, the multi-token and RL rollout workloads and the GPU tests of the reference engine.
# Results land in $OUT. This tree's overhead is measured with the host on the ZeroMQ socket and on the stream
# socket; BUSY_POLL_US also measures the stream socket with that `busy_poll_us` for the driver.
#   OUT=gpu-results BEFORE=path/to/earlier/tree BUSY_POLL_US=2000 bash benchmarks/gpu_h100.sh [overhead|tests|all]
#   OUT=gpu-results bash benchmarks/gpu_h100.sh transport   # overlap off only: ZeroMQ, the stream socket, step ops
set -uo pipefail
OUT=${OUT:-gpu-results}
PART=${1:-all}
WORK=/tmp/pie-bench
mkdir -p "$OUT" "$WORK"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"

overhead() {  # $1: tree, $2: label, $3: driver options as JSON. The harness is this tree's, so both trees are
  local tree=$1 label=$2 options=${3:-"{}"}  # timed the same way.
  if [ "$tree" != "." ]; then cp pie_driver_trtllm/benchmarks/{overhead,common}.py "$tree/pie_driver_trtllm/benchmarks/"; fi
  (cd "$tree" && PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} python - "$OUT" "$label" "$WORK" "$options" <<'PY'
import json, sys
from pathlib import Path
from pie_driver_trtllm.benchmarks import overhead
from pie_driver_trtllm.benchmarks.common import Bench
out, label, work = Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3])
(work / label).mkdir(parents=True, exist_ok=True)
bench = Bench(size="1b", device="cuda:0", dtype="bfloat16", out_dir=work / label, work_dir=work)
options = json.loads(sys.argv[4])
if "overlaps" in options:  # only this tree's harness takes it
    options["overlaps"] = tuple(options["overlaps"])
result = overhead.run(bench, **options) if options else overhead.run(bench)
(out / f"overhead-{label}.json").write_text(json.dumps(result, indent=1))
PY
  )
}

if [ "$PART" = transport ]; then  # overlap off only: the ZeroMQ socket, the stream socket, the bare floors
  OUT=$(cd "$OUT" && pwd)
  overhead . zeromq-off '{"overlaps": [false]}'
  overhead . stream-off '{"overlaps": [false], "stream_socket": true}'
  overhead . stream-step-off '{"overlaps": [false], "stream_socket": true, "host_op": "step"}'  # steps as columns
  overhead . stream-step-rehearse-off \
      '{"overlaps": [false], "stream_socket": true, "host_op": "step", "rehearse_steps": true}'
  overhead . "stream-off-busy-poll-${BUSY_POLL_US:-2000}" \
      "{\"overlaps\": [false], \"stream_socket\": true, \"busy_poll_us\": ${BUSY_POLL_US:-2000}}"
  python -m pie_driver_trtllm.benchmarks.socket_floor --out "$OUT/socket-floor.json" || true
  python -m pie_driver_trtllm.benchmarks -w driver_cost --out "$OUT/driver_cost" --repeat 1 || true
fi
if [ "$PART" = overhead ] || [ "$PART" = all ]; then
  OUT=$(cd "$OUT" && pwd)
  overhead . after
  overhead . after-stream '{"stream_socket": true}'  # the host on the driver's stream socket
  if [ -n "${BUSY_POLL_US:-}" ]; then
    overhead . "after-stream-busy-poll-$BUSY_POLL_US" "{\"stream_socket\": true, \"busy_poll_us\": $BUSY_POLL_US}"
  fi
  if [ -n "${BEFORE:-}" ]; then overhead "$BEFORE" before; fi
  python -m pie_driver_trtllm.benchmarks.socket_floor --out "$OUT/socket-floor.json" || true
  python -m pie_driver_trtllm.benchmarks -w driver_cost --out "$OUT/driver_cost" --repeat 1 || true
fi
if [ "$PART" = tests ] || [ "$PART" = all ]; then
  python -m pytest -q -p no:cacheprovider --tb=short tests/test_reference_gpu.py tests/test_runs_gpu.py 2>&1 | tail -60
  if python -c "import pie_driver_trtllm.benchmarks.multitoken" 2>/dev/null; then
    python -m pie_driver_trtllm.benchmarks -w multitoken --size 1b --device cuda:0 --dtype bfloat16 \
        --out "$OUT/multitoken" --repeat 1 || true
  fi
  python -m pie_driver_trtllm.benchmarks.sleep_memory --out "$OUT/sleep-memory.json" 2>&1 | grep -v Warning || true
  if python -c "import pie_driver_trtllm.benchmarks.rl" 2>/dev/null; then
    python -m pie_driver_trtllm.benchmarks -w rl --size 1b --device cuda:0 --dtype bfloat16 \
        --out "$OUT/rl" --repeat 1 || true  # three alternating pairs of rollouts within the one run
  fi
fi
