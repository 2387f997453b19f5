#!/usr/bin/env bash
# One GPU's before/after of the engine step, in ONE device call, on the same machine:
#   bash benchmarks/step_before_after.sh roofline     roofline.py (before, after) + pytest -m gpu
#   bash benchmarks/step_before_after.sh throughput   throughput.py --mesh dp=1 (before, after), cold and warm cache
# BEFORE: a source tree of the earlier version (e.g. `git archive <commit> | tar -x -C .before`,
# carried with the call). Each version is installed into its own --target dir and run by PYTHONPATH.
# Results land in $OUT (the device tool's folder), one JSON per run, and a table last.
set -uo pipefail
what="${1:-roofline}"
BEFORE="${BEFORE:-.before}"
OUT="${OUT:-out}"
mkdir -p "$OUT"
export NCCL_NVLS_ENABLE=0 PYTHONUNBUFFERED=1
python3 -m pip install -q --no-deps --no-build-isolation --target /tmp/sidp-after . >/dev/null 2>&1 || { echo "install failed"; exit 1; }
if [ -d "$BEFORE" ]; then
  python3 -m pip install -q --no-deps --no-build-isolation --target /tmp/sidp-before "$BEFORE" >/dev/null 2>&1 \
    || { echo "install of $BEFORE failed"; exit 1; }
fi
after="env PYTHONPATH=/tmp/sidp-after"
before="env PYTHONPATH=/tmp/sidp-before"
python3 -c "import jax; print('jax', jax.__version__, jax.devices())"

case "$what" in
  roofline)
    CASES=(--model "${MODEL:-qwen3-32b}" --batch 64,256,128 --context 320,320,1024 --reps 10)  # MODEL=qwen3-14b fits an H100
    timeout 240 $after python3 benchmarks/roofline.py "${CASES[@]}" --out "$OUT/roofline-after.json" 2>&1 | tee "$OUT/roofline-after.log"
    [ -d "$BEFORE" ] && timeout 150 $before python3 "$BEFORE/benchmarks/roofline.py" "${CASES[@]}" --out "$OUT/roofline-before.json" 2>&1 | tee "$OUT/roofline-before.log"
    [ -n "${SKIP_TESTS:-}" ] || (cd tests && timeout 150 env PYTHONPATH=/tmp/sidp-after python3 -m pytest -q -m gpu -p no:cacheprovider . 2>&1 | tail -15 | tee "$OUT/pytest-gpu.log")
    echo "== after";  grep -A5 "^| batch" "$OUT/roofline-after.log"
    echo "== before"; grep -A5 "^| batch" "$OUT/roofline-before.log" 2>/dev/null
    ;;
  throughput)
    export SIDP_JAX_CACHE=/tmp/sidp-cache
    IFS=';' read -ra specs <<< "${SPECS:-1024 256 256;512 1024 1024}"  # prompts in out; ...
    for spec in "${specs[@]}"; do
      set -- $spec
      args=(--model qwen3-32b --mesh dp=1 --compare dp --num-prompts "$1" --input-len "$2" --output-len "$3"
            --gpu-memory-utilization 0.9 --time-limit "${TIME_LIMIT:-100}" --warmup "${WARMUP:-30}")
      timeout 280 $after python3 benchmarks/throughput.py "${args[@]}" --out "$OUT/tp-after-$2-$3.json" 2>&1 | tail -3
      [ -d "$BEFORE" ] && timeout 280 $before python3 "$BEFORE/benchmarks/throughput.py" "${args[@]}" --out "$OUT/tp-before-$2-$3.json" 2>&1 | tail -3
    done
    # warm start: the first run's shapes again, now from the persistent compilation cache
    [ -n "${WARM_START:-1}" ] && timeout 200 $after python3 benchmarks/throughput.py --model qwen3-32b --mesh dp=1 --compare dp --num-prompts 64 \
      --input-len 256 --output-len 256 --gpu-memory-utilization 0.9 --out "$OUT/tp-after-warm-start.json" 2>&1 | tail -1
    python3 - "$OUT" <<'PY'
import glob, json, os, sys
for f in sorted(glob.glob(os.path.join(sys.argv[1], "tp-*.json"))):
    r = json.load(open(f))["rows"][0]
    if "error" in r:
        print(os.path.basename(f), "error", r["error"][-200:]); continue
    print(f"{os.path.basename(f):28s} out tok/s {r['output_tokens_per_s']:8.1f}  total tok/s {r['total_tokens_per_s']:8.1f}  "
          f"complete {r['complete']}  startup {r['startup_s']:.0f} s  device {r['device_ms_per_step']:.1f} ms/step  "
          f"host {r['host_ms_per_step']:.1f} ms/step  steps {r['num_steps']}")
PY
    ;;
  *) echo "usage: $0 roofline|throughput" >&2; exit 2 ;;
esac
