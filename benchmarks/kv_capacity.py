"""Usable KV tokens per GPU per layout, measured after weights and the compiled step are on the
devices, beside the analytic bound (sidp_jax/parallel/capacity.py) with the measured step temporaries as
workspace. Each configuration runs in its own process so memory from the last one is gone.

  python benchmarks/kv_capacity.py --model qwen3-32b --mesh dp=2 --layouts dp,tp,sidp --util 0.9,0.6
  python benchmarks/kv_capacity.py --model qwen3-32b --mesh dp=2 --quantization fp8 --kv-cache-dtype fp8
"""

from __future__ import annotations

import argparse
import json

from child_process import report, run_child  # benchmarks/ is on sys.path when run as a script
from provenance import write_result  # noqa: E402  (benchmarks/ is on sys.path)


def measure(model: str, mesh: str, layout_name: str, placement: str, util: float, quantization: str = "none",
            kv_cache_dtype: str = "auto") -> dict:
    """layout_name: dp | tp | sidp | sidp/was | sidp/cas (forcing an FFN mode)."""
    import jax

    from sidp_jax import LLM
    from sidp_jax.parallel.layouts import kv_tokens_per_gpu
    from sidp_jax.engine.memory import device_memory

    parallel, _, ffn_mode = layout_name.partition("/")
    try:
        llm = LLM(model, mesh=mesh, parallel=parallel, placement=placement, ffn_mode=ffn_mode or "auto",
                  gpu_memory_utilization=util,
                  max_model_len=4096, max_num_seqs=256, max_num_batched_tokens=2048, verbose=False,
                  quantization=None if quantization == "none" else quantization, kv_cache_dtype=kv_cache_dtype)
    except (MemoryError, ValueError) as e:
        return {"error": str(e)}
    info = llm.kv_info
    lay = llm.layout
    per_gpu = info["tokens_per_replica"] // lay.tp  # tokens held by the whole machine / GPUs
    mem = device_memory(jax.devices()[0])
    temp = float(info["kv_sizing"].split("temporaries ")[1].split(" GiB")[0]) * 2**30 if "temporaries" in info[
        "kv_sizing"] else 0.0
    D = lay.num_replicas if parallel != "tp" else lay.tp
    bound = kv_tokens_per_gpu(llm.cfg, parallel, D, mem["total"], util, workspace_bytes=temp,
                              tp=lay.tp if parallel != "tp" else 1, placement=placement, count_ffn_buffer=False,
                              dtype=llm.dtype, kv_dtype=llm.kv_dtype)
    bound //= lay.tp  # per GPU as above (for tp the formula gives the group's tokens)
    return {"kv_tokens_per_gpu": per_gpu, "bound": bound, "gap": 1 - per_gpu / bound if bound else None,
            "step_temp_gib": temp / 2**30, "device_total_gib": mem["total"] / 2**30, "kv_sizing": info["kv_sizing"],
            "ffn_mode_crossover": info["mode_crossover_tokens"]}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="qwen3-32b")
    ap.add_argument("--mesh", default="dp=2")
    ap.add_argument("--layouts", default="dp,tp,sidp")
    ap.add_argument("--placement", default="striped")
    ap.add_argument("--util", default="0.9,0.6")
    ap.add_argument("--quantization", default="none", help="none or fp8 (W8A8 weights)")
    ap.add_argument("--kv-cache-dtype", default="auto", help="auto or fp8")
    ap.add_argument("--out", default=None)
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)  # child process: 'parallel:util'
    args = ap.parse_args()
    if args.one:
        layout_name, util = args.one.split(":")
        report(measure(args.model, args.mesh, layout_name, args.placement, float(util), args.quantization,
                       args.kv_cache_dtype))
        return
    rows = []
    for util in args.util.split(","):
        for parallel in args.layouts.split(","):
            res, _ = run_child([__file__, "--model", args.model, "--mesh", args.mesh, "--placement", args.placement,
                                "--quantization", args.quantization, "--kv-cache-dtype", args.kv_cache_dtype,
                                "--one", f"{parallel}:{util}"], error_chars=2000)
            res.update({"model": args.model, "mesh": args.mesh, "parallel": parallel, "util": float(util)})
            rows.append(res)
            print(json.dumps(res), flush=True)
    if args.out:
        write_result(args.out, {"args": vars(args), "rows": rows})
    print(f"\n{'util':>5} {'layout':>6} {'KV tok/GPU':>11} {'bound':>9} {'gap':>6} {'vs dp':>6}")
    for util in args.util.split(","):
        dp = next((r.get("kv_tokens_per_gpu") for r in rows if r["parallel"] == "dp" and r["util"] == float(util)), None)
        for r in (r for r in rows if r["util"] == float(util)):
            if "error" in r:
                print(f"{util:>5} {r['parallel']:>6}  error: {r['error'][-120:]}")
                continue
            ratio = f"{r['kv_tokens_per_gpu'] / dp:.2f}x" if dp else "-"
            print(f"{util:>5} {r['parallel']:>6} {r['kv_tokens_per_gpu']:>11,} {r['bound']:>9,} "
                  f"{100 * r['gap']:>5.1f}% {ratio:>6}")


if __name__ == "__main__":
    main()
