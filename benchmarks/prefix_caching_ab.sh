#!/usr/bin/env bash
# Prefix caching on and off on one GPU, in ONE device call (same machine, warm compilation cache
# after the first run): the few-shot, rollout and no-sharing workloads of benchmarks/RESULTS.md.
#   bash benchmarks/prefix_caching_ab.sh [fewshot rollouts random]
# Env: TIME_LIMIT, WARMUP (seconds per run), MODEL. Results land in $OUT, a table last.
set -uo pipefail
source "$(dirname "$0")/gpu_setup.sh"
common=(--model "${MODEL:-qwen3-32b}" --mesh dp=1 --compare dp --prefix-caching on,off --max-num-seqs 256
        --max-num-batched-tokens 2048 --gpu-memory-utilization 0.9 --max-model-len 2240 --time-limit "${TIME_LIMIT:-60}" --warmup "${WARMUP:-15}")
[ $# -gt 0 ] || set -- fewshot rollouts random
for w in "$@"; do
  case "$w" in
    fewshot)  args=(--workload fewshot --prefix-len 2048 --num-prompts 2000 --input-len 64 --output-len 128) ;;
    rollouts) args=(--num-prompts 256 --n 8 --input-len 512 --output-len 256) ;;
    random)   args=(--num-prompts 1000 --input-len 512 --output-len 256) ;;
    *) echo "unknown workload $w"; exit 2 ;;
  esac
  timeout "${RUN_TIMEOUT:-400}" $now python3 benchmarks/throughput.py "${common[@]}" "${args[@]}" \
    --out "$OUT/prefix-caching-$w.json" 2>&1 | grep -v "^{" | grep -v "^\[sidp_jax\]" | tail -3
done
