#!/usr/bin/env bash
# Sampling at greedy's speed, in ONE device call: the sampler's tests on the GPU, the sampler alone
# per mix (benchmarks/sampler.py), then whole jobs per sampling mix on one engine, greedy first as
# the same-call baseline (benchmarks/throughput.py --sampling).
#   bash benchmarks/sampling_ab.sh        # Qwen3-8B shape, dp=1, 1024 prompts x 512 in / 256 out, 256 seqs
# Env: MODEL, PROMPTS, INPUT_LEN, OUTPUT_LEN, MAX_SEQS, MIXES, MICRO_ROWS, SKIP_MICRO=1, SKIP_TESTS=1,
#      TAG (suffix of the result files), TP_TIMEOUT.
# Results land in $OUT (the device tool's folder): JSON + logs, and a table last.
set -uo pipefail
source "$(dirname "$0")/gpu_setup.sh"
TAG="${TAG:-${MODEL:-qwen3-8b}}"
$now python3 -c "import jax, sidp_jax; print('jax', jax.__version__, jax.devices(), sidp_jax.__file__)"
if [ -z "${SKIP_TESTS:-}" ]; then
  (cd tests && timeout 120 $now python3 -m pytest -q -p no:cacheprovider test_sampler.py 2>&1 | tail -5 | tee "$OUT/pytest-sampler-gpu.log")
fi
if [ -z "${SKIP_MICRO:-}" ]; then
  (cd benchmarks && timeout 150 $now python3 sampler.py --rows "${MICRO_ROWS:-64,256}" --reps 20 \
    --out "$OUT/sampler.json" 2>&1 | grep -v "^{" | tail -24)
fi
timeout "${TP_TIMEOUT:-420}" $now python3 benchmarks/throughput.py --model "${MODEL:-qwen3-8b}" --mesh dp=1 --compare dp \
  --num-prompts "${PROMPTS:-1024}" --input-len "${INPUT_LEN:-512}" --output-len "${OUTPUT_LEN:-256}" \
  --max-num-seqs "${MAX_SEQS:-256}" --max-num-batched-tokens 2048 --gpu-memory-utilization 0.9 \
  --time-limit "${TIME_LIMIT:-200}" --warmup 0 \
  --sampling "${MIXES:-greedy,default,temperature_1,top_p_0.9,top_k_50,min_p_0.05,logprobs_5,penalties,logit_bias,mixed}" \
  --out "$OUT/throughput-sampling-$TAG.json" 2>&1 | grep -v "^{" | grep -v "^Total num" | tail -14
