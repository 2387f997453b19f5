#!/usr/bin/env bash
# One GPU call that checks and times the kernels: the GPU tests, mixed-step attention, the fused
# RMSNorm experiment (norm_kernels.py checks it against the reference, then times it), and the
# decode-step roofline. Results land in $OUT (default: benchmarks/results/run-<date>).
#   bash benchmarks/gpu_kernels.sh            # on a GPU host with the project installed
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results/run-$(date +%Y%m%d-%H%M)}
mkdir -p "$OUT"
export NCCL_NVLS_ENABLE=0 PYTHONUNBUFFERED=1
stamp=$(date +%Y-%m-%d)
python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_paged_prefill_pallas.py \
    tests/test_paged_decode_pallas.py tests/test_gpu.py 2>&1 | tail -15 | tee "$OUT/gpu-tests.txt"
python3 benchmarks/mixed_attention.py --sweep --out "$OUT/$stamp-mixed-attention.json" 2>&1 | tail -40
python3 benchmarks/norm_kernels.py --out "$OUT/$stamp-norm-kernels.json" 2>&1 | tail -25
python3 benchmarks/roofline.py --model qwen3-32b --batch 128,256,256 --context 1024,512,256 \
    --out "$OUT/$stamp-roofline.json" 2>&1 | tail -12
