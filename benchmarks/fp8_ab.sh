#!/usr/bin/env bash
# FP8 against bf16 on one GPU, in ONE device call: the FP8 GPU tests, roofline.py (Qwen3-32B
# shape, B=64 and 256, bf16 then FP8 weights in one process), then throughput.py windows with
# bf16, FP8 weights, and FP8 weights + FP8 KV cache (each in its own process, same machine).
#   bash benchmarks/fp8_ab.sh
# Env: MODEL, PROMPTS, INPUT_LEN, OUTPUT_LEN, TIME_LIMIT, WARMUP, SKIP_TESTS=1, SKIP_ROOFLINE=1,
#      SKIP_THROUGHPUT=1, MAX_SEQS, MAX_TOKENS. Results land in $OUT: JSON + logs, tables last.
set -uo pipefail
source "$(dirname "$0")/gpu_setup.sh"
$now python3 -c "import jax, sidp_jax; print('jax', jax.__version__, jax.devices(), sidp_jax.__file__)"
if [ -z "${SKIP_TESTS:-}" ]; then
  (cd tests && timeout "${TEST_TIMEOUT:-200}" $now python3 -m pytest -q -m gpu -p no:cacheprovider test_gpu.py -k "fp8" 2>&1 \
    | tail -15 | tee "$OUT/pytest-gpu-fp8.log")
fi
if [ -z "${SKIP_ROOFLINE:-}" ]; then
  (cd benchmarks && timeout "${ROOF_TIMEOUT:-300}" $now python3 roofline.py --model "${MODEL:-qwen3-32b}" --batch 64,256 \
    --context 1024,1024 --reps 10 --quantization none,fp8 --out "$OUT/roofline-fp8.json" 2>&1 | tail -14 | tee "$OUT/roofline-fp8.log")
fi
if [ -z "${SKIP_THROUGHPUT:-}" ]; then
  timeout "${TP_TIMEOUT:-500}" $now python3 benchmarks/throughput.py --model "${MODEL:-qwen3-32b}" --mesh dp=1 --compare dp \
    --quantization "${QUANTS:-none,fp8}" --kv-cache-dtype "${KVS:-auto}" --num-prompts "${PROMPTS:-512}" \
    --input-len "${INPUT_LEN:-1024}" --output-len "${OUTPUT_LEN:-1024}" --max-num-seqs "${MAX_SEQS:-512}" \
    --max-num-batched-tokens "${MAX_TOKENS:-4096}" --gpu-memory-utilization 0.9 --time-limit "${TIME_LIMIT:-90}" \
    --warmup "${WARMUP:-30}" --out "$OUT/throughput-fp8.json" 2>&1 | grep -v "^{" | tail -12 | tee "$OUT/throughput-fp8.log"
fi
