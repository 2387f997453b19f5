#!/usr/bin/env bash
# Qwen3-MoE on one GPU, in ONE device call: the expert GEMM against its floors (moe_gemm.py), the
# decode step against its roofline (roofline.py), then a whole job with the Qwen3 default sampling
# run to completion (throughput.py --sampling default).
#   bash benchmarks/moe_one_gpu.sh               # all three, Qwen3-30B-A3B shape, random weights
# Env: SKIP_GEMM=1, SKIP_ROOFLINE=1, SKIP_JOB=1, PROMPTS (1000), INPUT_LEN (128), OUTPUT_LEN (1024),
#      JOB_TIMEOUT (s). Results land in $OUT (the device tool's folder), and a table last.
set -uo pipefail
source "$(dirname "$0")/gpu_setup.sh"
$now python3 -c "import jax; print('jax', jax.__version__, jax.devices())"
if [ -z "${SKIP_GEMM:-}" ]; then
  timeout 150 $now python3 benchmarks/moe_gemm.py --models qwen3-30b-a3b,qwen3-235b-a22b --tokens 64,256,2048,8192 \
    --reps 10 --out "$OUT/moe-gemm.json" 2>&1 | grep -v "^wrote"
fi
if [ -z "${SKIP_ROOFLINE:-}" ]; then
  timeout 200 $now python3 benchmarks/roofline.py --model qwen3-30b-a3b --batch 64,256 --context 1024,1024 --reps 10 \
    --out "$OUT/moe-roofline-a3b.json" 2>&1 | grep -A4 "^| weights"
fi
if [ -z "${SKIP_JOB:-}" ]; then
  timeout "${JOB_TIMEOUT:-400}" $now python3 benchmarks/throughput.py --model qwen3-30b-a3b --mesh dp=1 --compare dp \
    --num-prompts "${PROMPTS:-1000}" --input-len "${INPUT_LEN:-128}" --output-len "${OUTPUT_LEN:-1024}" \
    --max-num-seqs 512 --max-num-batched-tokens 8192 --gpu-memory-utilization 0.9 --sampling default \
    --time-limit 380 --warmup 30 --out "$OUT/moe-throughput-a3b.json" 2>&1 | grep -v "^{" | tail -4
fi
