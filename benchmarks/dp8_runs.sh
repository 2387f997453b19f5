#!/usr/bin/env bash
# The 8-GPU runs of the dp=8 issue, in two device calls of under 10 minutes each, on nvidia-h200-x8:
#   bash benchmarks/dp8_runs.sh kv           # KV capacity: Qwen3-32B and Llama-3.1-70B, dp=8 and dp=4,tp=2
#   bash benchmarks/dp8_runs.sh throughput   # Qwen3-32B KV-bound throughput: dp / tp=8 / sidp at dp=8, sidp at dp=4,tp=2
# Results go to $OUT (default benchmarks/results/run-<date>); copy the JSON into benchmarks/results/
# as <date>-h200x8-*.json and add the tables to benchmarks/RESULTS.md.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results/run-$(date +%Y%m%d-%H%M)}
mkdir -p "$OUT"
export NCCL_NVLS_ENABLE=0 PYTHONUNBUFFERED=1
case "${1:-}" in
  kv)
    python3 benchmarks/kv_capacity.py --model qwen3-32b --mesh dp=8 --layouts dp,sidp,tp --util 0.9,0.6 \
        --out "$OUT/kv_capacity-qwen3-32b-dp8.json"
    python3 benchmarks/kv_capacity.py --model llama3.1-70b --mesh dp=8 --layouts dp,sidp,tp --util 0.9 \
        --out "$OUT/kv_capacity-llama3.1-70b-dp8.json"
    python3 benchmarks/kv_capacity.py --model qwen3-32b --mesh dp=4,tp=2 --layouts dp,sidp --util 0.9,0.6 \
        --out "$OUT/kv_capacity-qwen3-32b-dp4tp2.json"
    ;;
  throughput)
    common="--model qwen3-32b --input-len 1024 --output-len 2048 --num-prompts 1600 --max-num-seqs 256 \
        --max-num-batched-tokens 2048 --gpu-memory-utilization 0.6 --time-limit 75 --warmup 30"
    python3 benchmarks/throughput.py $common --mesh dp=8 --compare dp,tp,sidp --out "$OUT/throughput-dp8-0.6.json"
    python3 benchmarks/throughput.py $common --mesh dp=4,tp=2 --compare sidp --out "$OUT/throughput-dp4tp2-0.6.json"
    ;;
  *)
    echo "usage: $0 kv|throughput" >&2
    exit 2
    ;;
esac
