#!/usr/bin/env bash
# SiDP for experts on several GPUs, one device call per comparison (needs a multi-GPU kind; none has
# been lent yet). What benchmarks/moe_step_model.py predicts, measured:
#   D=2 bash benchmarks/moe_multi_gpu.sh capacity     KV tokens per GPU, dp / tp / sidp (kv_capacity.py)
#   D=2 bash benchmarks/moe_multi_gpu.sh throughput   1000 prompts 1024 in / 1024 out, Qwen3 default sampling,
#                                                     dp, tp and sidp (auto) to completion (throughput.py)
#   D=8 MODEL=qwen3-235b-a22b bash benchmarks/moe_multi_gpu.sh throughput   (235B fits only from D=8)
# Env: D (GPUs), MODEL (default qwen3-30b-a3b), PROMPTS, INPUT_LEN, OUTPUT_LEN, TIME_LIMIT.
# Results land in $OUT (the device tool's folder), JSON per comparison, and a table last.
set -uo pipefail
source "$(dirname "$0")/gpu_setup.sh"
what="${1:-throughput}"
D="${D:-2}"
MODEL="${MODEL:-qwen3-30b-a3b}"
$now python3 -c "import jax; print('jax', jax.__version__, jax.devices())"
case "$what" in
  capacity)
    $now python3 benchmarks/kv_capacity.py --model "$MODEL" --mesh "dp=$D" --layouts dp,tp,sidp,sidp/cas \
      --util 0.9 --out "$OUT/moe-kv-capacity-$MODEL-dp$D.json" 2>&1 | tail -12 ;;
  throughput)
    $now python3 benchmarks/throughput.py --model "$MODEL" --mesh "dp=$D" --compare dp,tp,sidp \
      --num-prompts "${PROMPTS:-1000}" --input-len "${INPUT_LEN:-1024}" --output-len "${OUTPUT_LEN:-1024}" \
      --max-num-seqs 512 --max-num-batched-tokens 8192 --gpu-memory-utilization 0.9 --sampling default \
      --time-limit "${TIME_LIMIT:-480}" --warmup 60 --out "$OUT/moe-throughput-$MODEL-dp$D.json" 2>&1 \
      | grep -v "^{" | tail -8 ;;
  *) echo "usage: D=N bash benchmarks/moe_multi_gpu.sh capacity|throughput"; exit 2 ;;
esac
