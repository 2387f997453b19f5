"""Offline throughput like `vllm bench throughput`, several layouts in ONE invocation.

Random prompts of --input-len tokens, --output-len generated tokens each (ignore_eos), on a preset
shape with random weights or a checkpoint. Each layout runs in its own process (clean memory).
A run longer than --time-limit is cut there and its steady-state rate reported (after a warm-up
window that absorbs compilation); the JSON says so. --sampling greedy,default,... runs several
sampling mixes (benchmarks/sampling_mixes.py) one after another on the same engine, each on fresh
prompts (no mix reuses another's cached pages), each to completion; every row carries its mix
under "sampling" (default: greedy alone, as before). --scheduling async,sync runs each layout with
the host overlap on and off; wall / host / device ms per step cover the same window as the rates.

  python benchmarks/throughput.py --model qwen3-32b --mesh dp=2 --compare dp,tp,sidp \
      --input-len 1024 --output-len 2048 --num-prompts 2000 --gpu-memory-utilization 0.9
  python benchmarks/throughput.py --model qwen3-8b --mesh dp=1 --compare dp --max-num-seqs 256 \
      --max-num-batched-tokens 2048 --input-len 512 --output-len 256 --num-prompts 1024 \
      --sampling greedy,default,temperature_1,top_p_0.9,top_k_50,min_p_0.05,logprobs_5,penalties,logit_bias,mixed
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import sampling_mixes
from child_process import report, run_child  # benchmarks/ is on sys.path when run as a script
from provenance import write_result  # noqa: E402  (benchmarks/ is on sys.path)


def make_prompts(args, vocab: int, rng) -> list[list[int]]:
    """--workload random: distinct random prompts of --input-len tokens; fewshot: one shared
    --prefix-len prefix, then --input-len distinct tokens each (rollouts: random, with --n)."""
    draw = lambda n: rng.integers(100, vocab - 100, size=n).tolist()
    if args.workload == "fewshot":
        prefix = draw(args.prefix_len)
        return [prefix + draw(args.input_len) for _ in range(args.num_prompts)]
    return [draw(args.input_len) for _ in range(args.num_prompts)]


def run_one(args, parallel: str, async_scheduling: bool, prefix_caching: bool, quantization: str = "none",
            kv_cache_dtype: str = "auto", max_num_seqs: int = 512, max_num_batched_tokens: int = 4096) -> dict:
    from sidp_jax import LLM

    t_start = time.perf_counter()
    llm = LLM(args.model, mesh=args.mesh, parallel=parallel, placement=args.placement, ffn_mode=args.ffn_mode,
              gpu_memory_utilization=args.gpu_memory_utilization,
              max_model_len=args.max_model_len or (args.input_len + args.output_len
                                                   + (args.prefix_len if args.workload == "fewshot" else 0)),
              max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens, verbose=True,
              async_scheduling=async_scheduling, enable_prefix_caching=prefix_caching,
              quantization=None if quantization == "none" else quantization, kv_cache_dtype=kv_cache_dtype)
    startup_s = time.perf_counter() - t_start
    setup = {"startup_s": startup_s, "model_defaults": llm.generation_defaults(), "parallel": parallel,
             "async_scheduling": async_scheduling, "prefix_caching": prefix_caching, "quantization": quantization,
             "kv_cache_dtype": kv_cache_dtype, "max_num_seqs": max_num_seqs,
             "max_num_batched_tokens": max_num_batched_tokens}
    rows = []
    for seed, mix in enumerate(sampling_mixes.parse(args.sampling)):
        rows.append({"sampling": mix, "structured": mix in sampling_mixes.STRUCTURED,
                     **run_mix(args, llm, mix, seed, setup)})
        # each mix's row as soon as it is done: an outer timeout still leaves the finished mixes
        print(f"[sidp_jax] mix {mix}: {rows[-1]['output_tokens_per_s']:.0f} output tokens/s, "
              f"complete {rows[-1]['complete']}, compiled mid-run {len(rows[-1]['variants_compiled_in_run'])}", flush=True)
        if args.out:
            with open(f"{args.out}.{parallel}.rows.jsonl", "a") as f:
                f.write(json.dumps(rows[-1]) + "\n")
    return {"rows": rows}


def run_mix(args, llm, mix: str, seed: int, setup: dict) -> dict:
    """One sampling mix to completion (or --time-limit) on fresh prompts; the row of results."""
    import numpy as np

    from sidp_jax import SamplingParams
    from sidp_jax.engine.step_times import step_times

    rng = np.random.default_rng(seed)
    vocab = llm.cfg.vocab_size
    prompts = make_prompts(args, vocab, rng)
    if args.n > 1 and mix == "greedy":  # rollouts: seeded, temperature 1 (as before --sampling)
        sps = [SamplingParams(temperature=1.0, seed=0, n=args.n, max_tokens=args.output_len, ignore_eos=True)]
    else:
        sps = [SamplingParams(n=args.n, max_tokens=args.output_len, ignore_eos=True,
                              **sampling_mixes.mix_fields(mix, setup["model_defaults"], i)) for i in range(len(prompts))]
    engine = llm.engine
    before = llm.stats()
    compiled_before = set(before.get("first_call_seconds") or {})
    for req in llm._requests(prompts, sps if len(sps) > 1 else sps[0])[0]:
        engine.add(req)
    seqs = list(engine.scheduler.waiting)
    start = time.perf_counter()
    marks = []  # (time, output tokens so far, prompt tokens computed so far)
    at_warmup = None  # engine.stats() when the warm-up window ended
    while engine.has_work():
        engine.step()
        now = time.perf_counter()
        if at_warmup is None and now - start >= args.warmup:
            at_warmup = engine.stats()
        out_tok = sum(len(s.output_ids) for s in seqs)
        in_tok = sum(min(s.num_computed, len(s.prompt_ids)) for s in seqs)
        marks.append((now - start, out_tok, in_tok))
        if now - start > args.time_limit:
            break
    done = not engine.has_work()
    t_end, out_end, in_end = marks[-1]
    if done:
        t0, out0, in0, finished = 0.0, 0, 0, args.num_prompts
    else:  # steady state: drop the warm-up window
        t0, out0, in0 = next(m for m in marks if m[0] >= args.warmup)
        finished = sum(s.finish_reason is not None for s in seqs)
    dt = t_end - t0
    stats = llm.stats()
    for k in ("num_preemptions", "prefill_tokens_requested", "prefill_tokens_computed", "steps_found_ready",
              "device_fed_tokens"):  # this mix's share of the engine's running totals
        stats[k] -= before[k]
    stats["steps_per_mode"] = {m: n - before["steps_per_mode"].get(m, 0) for m, n in stats["steps_per_mode"].items()}
    base = at_warmup if not done and at_warmup else before
    steps = max(stats["num_steps"] - base["num_steps"], 1)
    window = step_times(*(stats[f"{k}_seconds"] - base[f"{k}_seconds"] for k in ("wall", "host", "device")), steps)
    prompt_tokens, output_tokens = in_end - in0, out_end - out0
    vllm_keys = {  # `vllm bench throughput --output-json`'s keys, over the same window as the rates
        "elapsed_time": dt, "num_requests": finished, "total_num_tokens": prompt_tokens + output_tokens,
        "requests_per_second": finished / dt if done else None,
        "tokens_per_second": (prompt_tokens + output_tokens) / dt,
        "total_num_prompt_tokens": prompt_tokens, "total_num_output_tokens": output_tokens}
    return {**vllm_keys, "complete": done, "window_s": dt, "finished_requests": finished,
            "requests_per_s": finished / t_end if done else None,
            "output_tokens_per_s": (out_end - out0) / dt, "total_tokens_per_s": (out_end - out0 + in_end - in0) / dt,
            "kv_tokens_per_replica": stats["kv_tokens_per_replica"], "num_replicas": stats["num_replicas"],
            "steps_per_mode": stats["steps_per_mode"], "num_preemptions": stats["num_preemptions"],
            **window, "steps_in_window": steps, "workload": args.workload, "weights": llm.cfg.quantization or str(__import__("numpy").dtype(llm.dtype)),
            **{k: stats[k] for k in ("prefill_tokens_requested", "prefill_tokens_computed", "prefix_cache_hit_rate",
                                     "prefix_cache_evictions")},
            "steps_found_ready": stats["steps_found_ready"], "device_fed_tokens": stats["device_fed_tokens"],
            "precompile_seconds": stats.get("precompile_seconds"),
            "num_steps": stats["num_steps"] - before["num_steps"], "steps_per_attention": stats["steps_per_attention"],
            "sampling_fields": sampling_mixes.mix_fields(mix, setup["model_defaults"], 0) if mix != "mixed" else "cycle",
            "variants_compiled_in_run": sorted(set(stats.get("first_call_seconds") or {}) - compiled_before),
            **setup, "first_call_seconds": stats.get("first_call_seconds"),
            "compile_cache": getattr(llm, "compile_cache", None), "device": llm.layout.mesh.devices.flat[0].device_kind,
            "jax": __import__("jax").__version__}


def batch_limits(args) -> list[tuple[int, int]]:
    """(max_num_seqs, max_num_batched_tokens) pairs: the two comma lists side by side."""
    seqs = [int(v) for v in str(args.max_num_seqs).split(",")]
    tokens = [int(v) for v in str(args.max_num_batched_tokens).split(",")]
    if len(seqs) != len(tokens) and 1 not in (len(seqs), len(tokens)):
        raise SystemExit(f"--max-num-seqs has {len(seqs)} values and --max-num-batched-tokens {len(tokens)}: "
                         "give both the same number, or one of them a single value")
    n = max(len(seqs), len(tokens))
    return list(zip(seqs * n if len(seqs) == 1 else seqs, tokens * n if len(tokens) == 1 else tokens))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="qwen3-32b")
    ap.add_argument("--mesh", default="dp=2")
    ap.add_argument("--compare", default="dp,tp,sidp")
    ap.add_argument("--placement", default="striped")
    ap.add_argument("--ffn-mode", default="auto")
    ap.add_argument("--input-len", type=int, default=1024)
    ap.add_argument("--output-len", type=int, default=2048)
    ap.add_argument("--num-prompts", type=int, default=1000)
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    ap.add_argument("--max-num-seqs", default="512",
                    help="comma list, paired with --max-num-batched-tokens's (one value pairs with every other)")
    ap.add_argument("--max-num-batched-tokens", default="4096", help="comma list, paired with --max-num-seqs's")
    ap.add_argument("--time-limit", type=float, default=150.0)
    ap.add_argument("--warmup", type=float, default=40.0)
    ap.add_argument("--out", default=None)
    ap.add_argument("--scheduling", default="async",
                    help="comma list of async (host overlap, the default) and sync: each layout runs in each")
    ap.add_argument("--max-model-len", type=int, default=None,
                    help="default: the workload's longest sequence (one value across runs shares compiled steps)")
    ap.add_argument("--workload", choices=["random", "fewshot"], default="random")
    ap.add_argument("--prefix-len", type=int, default=2048, help="fewshot: the shared prefix's tokens")
    ap.add_argument("--n", type=int, default=1, help="samples per prompt (rollouts: seeded, temperature 1)")
    ap.add_argument("--prefix-caching", default="on", help="comma list of on and off: each layout runs in each")
    ap.add_argument("--quantization", default="none", help="comma list of none and fp8: each layout runs in each")
    ap.add_argument("--kv-cache-dtype", default="auto", help="comma list of auto and fp8")
    ap.add_argument("--sampling", default="greedy",
                    help=f"comma list of sampling mixes, run one after another on one engine: {', '.join(sampling_mixes.NAMES)}")
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        parallel, scheduling, caching, quant, kv, seqs, tokens = args.one.split(":")
        report(run_one(args, parallel, scheduling == "async", caching == "on", quant, kv, int(seqs), int(tokens)))
        return
    rows = []
    runs = [(p, sch, c, q, kv, *limits) for p in args.compare.split(",") for sch in args.scheduling.split(",")
            for c in args.prefix_caching.split(",") for q in args.quantization.split(",")
            for kv in args.kv_cache_dtype.split(",") for limits in batch_limits(args)]
    if any(sch not in ("async", "sync") or c not in ("on", "off") for _, sch, c, *_ in runs):
        raise SystemExit("--scheduling takes async and/or sync, --prefix-caching on and/or off")
    for run in runs:
        parallel, scheduling, caching, quant, kv, seqs, tokens = run
        got, _ = run_child([__file__, *sys.argv[1:], "--one", ":".join(map(str, run))])
        for res in got.get("rows", [got]):  # one row per sampling mix, or the child's error
            res.update({k: v for k, v in dict(parallel=parallel, async_scheduling=scheduling == "async",
                                              prefix_caching=caching == "on", quantization=quant, kv_cache_dtype=kv,
                                              max_num_seqs=seqs, max_num_batched_tokens=tokens).items() if k not in res})
            rows.append(res)
            print(json.dumps(res), flush=True)
        if args.out:  # after every run: an outer timeout still leaves the finished rows
            write_result(args.out, {"args": vars(args), "rows": rows,
                                    "complete": len(rows) == len(runs) * len(sampling_mixes.parse(args.sampling))})
    for r in rows:
        if "error" in r:
            print(f"{r['parallel']}: error {r['error'][-300:]}")
            continue
        rps = f"{r['requests_per_s']:.2f}" if r["requests_per_s"] else "n/a (cut)"
        print(f"Total num prompt tokens:  {r.get('total_num_prompt_tokens', 0):,}")
        print(f"Total num output tokens:  {r.get('total_num_output_tokens', 0):,}")
        print(f"{r['parallel']:>5} {'async' if r['async_scheduling'] else 'sync':>5} {r.get('sampling', ''):>13} "
              f"seqs {r.get('max_num_seqs')} tokens {r.get('max_num_batched_tokens')} "
              f"weights {r.get('quantization', 'none'):>4} kv {r.get('kv_cache_dtype', 'auto'):>4} "
              f"cache {'on' if r.get('prefix_caching') else 'off':>3}: Throughput: {rps} requests/s, {r['total_tokens_per_s']:.2f} total tokens/s, "
              f"{r['output_tokens_per_s']:.2f} output tokens/s | KV {r['kv_tokens_per_replica']:,}/replica, "
              f"modes {r['steps_per_mode']}, preempt {r['num_preemptions']}, "
              f"wall {r['wall_ms_per_step']:.1f} / host {r['host_ms_per_step']:.1f} / device "
              f"{r['device_ms_per_step']:.1f} ms/step, device idle {r['device_idle_share']:.1%}, "
              f"prefill computed {r.get('prefill_tokens_computed', 0):,} of {r.get('prefill_tokens_requested', 0):,}, "
              f"start-up {r.get('startup_s', 0):.0f} s")

    if len(sampling_mixes.parse(args.sampling)) > 1:
        print_sampling_table(rows)


def print_sampling_table(rows: list[dict]) -> None:
    """Each mix's output tokens/s against greedy's in the same configuration (the issue's target: >= 0.95x)."""
    print(f"\n{'layout':>6} {'sampling':>14} {'out tok/s':>10} {'x greedy':>9} {'wall ms/step':>13} {'idle':>6} "
          f"{'preempt':>8} {'compiled mid-run':>17} complete")
    for r in rows:
        if "error" in r:
            print(f"{r.get('parallel', '?'):>6} {r.get('sampling', '?'):>14} error")
            continue
        same = lambda o: all(o.get(k) == r.get(k) for k in ("parallel", "async_scheduling", "prefix_caching",
                                                             "quantization", "kv_cache_dtype", "max_num_seqs"))
        greedy = next((o for o in rows if o.get("sampling") == "greedy" and "error" not in o and same(o)), None)
        ratio = f"{r['output_tokens_per_s'] / greedy['output_tokens_per_s']:.3f}" if greedy else "-"
        print(f"{r['parallel']:>6} {r['sampling']:>14} {r['output_tokens_per_s']:>10.0f} {ratio:>9} "
              f"{r['wall_ms_per_step']:>13.1f} {r['device_idle_share']:>6.1%} {r['num_preemptions']:>8} "
              f"{len(r.get('variants_compiled_in_run') or []):>17} {r['complete']}")


if __name__ == "__main__":
    main()
