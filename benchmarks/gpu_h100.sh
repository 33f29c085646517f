#!/usr/bin/env bash
# Every single-GPU measurement in one go (one lent H100): the engine step, the driver benchmarks and
# the GPU tests of the reference engine. Results land in $OUT (default ./gpu-results).
set -uo pipefail
OUT=${OUT:-gpu-results}
RESULTS=$(mktemp -d)/bench
mkdir -p "$OUT" "$RESULTS" /tmp/pie-models
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
python -m pie_driver_trtllm.benchmarks.engine_step --size 1b --dtype bfloat16 --device cuda:0 --batches 1 16 64 \
    --model-dir /tmp/pie-models/1b --out "$RESULTS/engine_step.json"
python -m pie_driver_trtllm.benchmarks -w transport -w codec -w lookahead -w overhead -w history -w multitoken \
    --size 1b --device cuda:0 --dtype bfloat16 --out "$RESULTS" --plot "$OUT/bench-overhead-gpu.png"
python -m pytest -q -p no:cacheprovider tests/test_reference_gpu.py 2>&1 | tail -3
tar -czf "$OUT/bench.tar.gz" -C "$(dirname "$RESULTS")" bench
