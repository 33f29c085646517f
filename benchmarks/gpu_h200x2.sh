#!/usr/bin/env bash
# The replica scaling runs in one go (a lent machine with two H200 GPUs): one replica against
# two on decode, prefill and mixed workloads (64 contexts; the warm-up covers a whole cycle of context
# lengths, so every attention window has been seen once), prefill with 512-token chunks, and decode with
# 256 contexts. JSON to $OUT.
set -uo pipefail
OUT=${OUT:-gpu-results}
mkdir -p "$OUT" /tmp/pie-models
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
nproc
python -m pie_driver_trtllm.benchmarks.replica_scaling --size 1b --dtype bfloat16 --devices cuda:0 cuda:1 --contexts 64 \
    --steps 16 --warmup 10 --workload decode prefill mixed --prefill-tokens 256 \
    --model-dir /tmp/pie-models/1b --out "$OUT/replica_scaling_64.json"
python -m pie_driver_trtllm.benchmarks.replica_scaling --size 1b --dtype bfloat16 --devices cuda:0 cuda:1 --contexts 32 \
    --steps 12 --warmup 6 --workload prefill --prefill-tokens 512 \
    --model-dir /tmp/pie-models/1b --out "$OUT/replica_scaling_prefill512.json"
python -m pie_driver_trtllm.benchmarks.replica_scaling --size 1b --dtype bfloat16 --devices cuda:0 cuda:1 --contexts 256 \
    --steps 16 --warmup 4 --workload decode --model-dir /tmp/pie-models/1b --out "$OUT/replica_scaling_256.json"
