#!/usr/bin/env bash
# Host overlap A/B on one GPU, in ONE device call: pytest -m gpu, then throughput.py with
# async_scheduling on and off (same call, same machine, warm compilation cache for the second).
#   bash benchmarks/host_overlap_ab.sh            # Qwen3-32B shape, dp=1, 256 seqs, 256 in / 1024 out
# Env: PROMPTS, INPUT_LEN, OUTPUT_LEN, MAX_SEQS, TIME_LIMIT, WARMUP, SKIP_TESTS=1.
# Results land in $OUT (the device tool's folder): JSON + logs, and a table last.
set -uo pipefail
source "$(dirname "$0")/gpu_setup.sh"
$now python3 -c "import jax, sidp_jax; print('jax', jax.__version__, jax.devices(), sidp_jax.__file__)"
if [ -z "${SKIP_TESTS:-}" ]; then
  (cd tests && timeout "${TEST_TIMEOUT:-170}" $now python3 -m pytest -q -m gpu -p no:cacheprovider . 2>&1 | tail -25 | tee "$OUT/pytest-gpu.log")
fi
timeout "${TP_TIMEOUT:-420}" $now python3 benchmarks/throughput.py --model qwen3-32b --mesh dp=1 --compare dp \
  --scheduling sync,async --num-prompts "${PROMPTS:-1024}" --input-len "${INPUT_LEN:-256}" --output-len "${OUTPUT_LEN:-1024}" \
  --max-num-seqs "${MAX_SEQS:-256}" --max-num-batched-tokens 2048 --gpu-memory-utilization 0.9 \
  --time-limit "${TIME_LIMIT:-100}" --warmup "${WARMUP:-30}" --out "$OUT/throughput-overlap-ab.json" 2>&1 \
  | grep -v "^{" | tail -8
