#!/usr/bin/env bash
# FP8 against bf16 on one GPU, in ONE device call: the FP8 GPU tests, fp8_gemms.py (each
# projection alone: bf16 / W8A8 / block-scaled, XLA's Triton GEMM off and on), roofline.py
# (Qwen3-32B shape, B=64 and 256, bf16 then FP8 weights in one process), then throughput.py windows
# (each run in its own process).
#   bash benchmarks/fp8_ab.sh
# Env: MODEL, PROMPTS, INPUT_LEN, OUTPUT_LEN, TIME_LIMIT, WARMUP, QUANTS, KVS, MAX_SEQS, MAX_TOKENS,
#      ROOF_KVS (space list: auto fp8), ROOF_QUANTS, SKIP_TESTS=1, SKIP_GEMMS=1, SKIP_ROOFLINE=1, SKIP_THROUGHPUT=1,
#      PROFILE="fp8:fp8 none:auto" (step_profile.py per weights:kv pair, B=PROFILE_BATCH, default 64),
#      PROFILE_XLA_FLAGS (XLA_FLAGS for the profiles: XLA runs op by op while a profiler is active
#        unless --xla_enable_command_buffers_during_profiling=true),
#      XLA_AB="--xla_gpu_enable_command_buffer=" (after the rooflines, roofline.py again with
#        these XLA_FLAGS, weights ROOF_QUANTS, KV XLA_AB_KV, default fp8),
#      NORM8=1 (norm_kernels.py at decode sizes: XLA's residual add + RMSNorm + per-token e4m3
#        quantization against the fused kernel's quantize=True (benchmarks/rms_norm_pallas.py,
#        checked against the reference first), and the bf16 norm beside them).
# Results land in $OUT: JSON + logs, tables last. A cold machine's first throughput run spends
# about 2 minutes precompiling: give the call room (the parent prints only when its runs end).
set -uo pipefail
source "$(dirname "$0")/gpu_setup.sh"
$now python3 -c "import jax, sidp_jax; print('jax', jax.__version__, jax.devices(), sidp_jax.__file__)"
if [ -z "${SKIP_TESTS:-}" ]; then
  (cd tests && timeout "${TEST_TIMEOUT:-200}" $now python3 -m pytest -q -m gpu -p no:cacheprovider test_gpu.py -k "fp8" 2>&1 \
    | tail -15 | tee "$OUT/pytest-gpu-fp8.log")
fi
if [ -z "${SKIP_GEMMS:-}" ]; then
  (cd benchmarks && timeout "${GEMM_TIMEOUT:-200}" $now python3 fp8_gemms.py --model "${MODEL:-qwen3-32b}" --tokens 64,256 \
    --out "$OUT/fp8-gemms.json" 2>&1 | tail -20 | tee "$OUT/fp8-gemms.log")
fi
roofline() {  # roofline NAME WEIGHTS KV [VAR=value ...]: roofline.py at B=64 and 256, context 1024
  local name=$1 quants=$2 kv=$3
  shift 3
  (cd benchmarks && env "$@" timeout "${ROOF_TIMEOUT:-300}" $now python3 roofline.py --model "${MODEL:-qwen3-32b}" \
    --batch 64,256 --context 1024,1024 --reps 10 --quantization "$quants" --kv-cache-dtype "$kv" \
    --out "$OUT/$name.json" 2>&1 | tail -14 | tee "$OUT/$name.log")
}
if [ -n "${NORM8:-}" ]; then   # the norm + activation quantization the FP8 step runs before qkv and gate_up
  (cd benchmarks && timeout "${NORM_TIMEOUT:-200}" $now python3 norm_kernels.py --tokens 64,256 --hidden 5120 \
    --modes add,add8 --chain 20 --out "$OUT/norm-kernels-fp8.json" 2>&1 | tail -26 | tee "$OUT/norm-kernels-fp8.log")
fi
for pair in ${PROFILE:-}; do   # kernel time per step by kind, one process per weights:kv pair
  (cd benchmarks && XLA_FLAGS="${PROFILE_XLA_FLAGS:-${XLA_FLAGS:-}}" timeout "${PROF_TIMEOUT:-200}" $now python3 step_profile.py --model "${MODEL:-qwen3-32b}" \
    --batch "${PROFILE_BATCH:-64}" --context 1024 --quantization "${pair%%:*}" --kv-cache-dtype "${pair##*:}" \
    --out "$OUT/step-profile-${pair%%:*}-kv-${pair##*:}.json" 2>&1 | tail -40 | tee "$OUT/step-profile-${pair%%:*}-kv-${pair##*:}.log")
done
if [ -z "${SKIP_ROOFLINE:-}" ]; then
  for kv in ${ROOF_KVS:-auto}; do   # one process per KV cache dtype, each with bf16 then FP8 weights
    roofline "roofline-fp8-kv-$kv" "${ROOF_QUANTS:-none,fp8}" "$kv"
  done
fi
if [ -n "${XLA_AB:-}" ]; then   # the same step under other XLA flags (e.g. no command buffers)
  roofline roofline-xla-ab "${ROOF_QUANTS:-none,fp8}" "${XLA_AB_KV:-fp8}" XLA_FLAGS="${XLA_FLAGS:-} $XLA_AB"
fi
if [ -z "${SKIP_THROUGHPUT:-}" ]; then
  timeout "${TP_TIMEOUT:-500}" $now python3 benchmarks/throughput.py --model "${MODEL:-qwen3-32b}" --mesh dp=1 --compare dp \
    --quantization "${QUANTS:-none,fp8}" --kv-cache-dtype "${KVS:-auto}" --num-prompts "${PROMPTS:-512}" \
    --input-len "${INPUT_LEN:-1024}" --output-len "${OUTPUT_LEN:-1024}" --max-num-seqs "${MAX_SEQS:-512}" \
    --max-num-batched-tokens "${MAX_TOKENS:-4096}" --gpu-memory-utilization 0.9 --time-limit "${TIME_LIMIT:-90}" \
    --warmup "${WARMUP:-30}" --out "$OUT/throughput-fp8.json" 2>&1 | grep -v "^{" | tail -12 | tee "$OUT/throughput-fp8.log"
fi
