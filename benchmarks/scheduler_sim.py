"""The scheduler alone on a KV-bound offline workload: preemptions and recompute, no model.

Drives sidp_jax.engine.scheduler.Scheduler the way the engine does (every scheduled chunk is computed,
a chunk reaching the end of the known tokens samples one token, a sequence finishes at
max_tokens) for --num-prompts prompts of --input-len tokens and --output-len outputs (ignore_eos),
with the KV capacity per replica of a measured layout, and compares the admission rules that
keep preemption from thrashing (`thrash_guard`, the default) with admitting whatever fits now.
Reports steps, preemptions, and tokens recomputed after preemption (computed tokens beyond
prompt + outputs) with their share of all computed tokens. Steps hardly move (decode sets their
number; recompute fills token budget); the recomputed tokens are the device time lost. CPU only, deterministic, seconds.

  python benchmarks/scheduler_sim.py --kv-tokens 88320,186016 --replicas 2   # dp / sidp at util 0.6
"""

from __future__ import annotations

import argparse

from sidp_jax.sampling_params import SamplingParams
from sidp_jax.engine.scheduler import Scheduler
from sidp_jax.engine.sequence import Sequence
from provenance import write_result  # noqa: E402  (benchmarks/ is on sys.path)


def simulate(kv_tokens: int, replicas: int, args, thrash_guard: bool) -> dict:
    P = args.page_size
    sched = Scheduler(replicas, kv_tokens // P + 1, P, args.max_num_seqs, args.max_num_batched_tokens,
                      thrash_guard=thrash_guard)
    params = SamplingParams(temperature=0, max_tokens=args.output_len, ignore_eos=True)
    for i in range(args.num_prompts):
        sched.add(Sequence(i, i, 0, [1] * args.input_len, params, 0, args.output_len))
    steps = computed = 0
    while sched.has_work():
        plans = sched.schedule()
        for plan in plans:
            for c in plan:
                c.seq.num_computed += c.num_tokens
                computed += c.num_tokens
                if c.samples:
                    c.seq.output_ids.append(1)
                    if len(c.seq.output_ids) >= c.seq.max_tokens:
                        sched.finish(c.seq)
        steps += 1
    # without preemption each sequence computes its prompt and all outputs but the last
    recomputed = computed - args.num_prompts * (args.input_len + args.output_len - 1)
    return {"kv_tokens_per_replica": kv_tokens, "thrash_guard": thrash_guard, "steps": steps,
            "preemptions": sched.num_preemptions, "tokens_computed": computed, "tokens_recomputed": recomputed,
            "recompute_share": recomputed / computed}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kv-tokens", default="88320,186016", help="KV tokens per replica, one run each")
    ap.add_argument("--replicas", type=int, default=2)
    ap.add_argument("--input-len", type=int, default=1024)
    ap.add_argument("--output-len", type=int, default=2048)
    ap.add_argument("--num-prompts", type=int, default=400)
    ap.add_argument("--max-num-seqs", type=int, default=256)
    ap.add_argument("--max-num-batched-tokens", type=int, default=2048)
    ap.add_argument("--page-size", type=int, default=16)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    rows = [simulate(int(kv), args.replicas, args, guard)
            for kv in args.kv_tokens.split(",") for guard in (False, True)]
    print("| KV tokens/replica | admission | steps | preemptions | tokens recomputed | share of computed |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['kv_tokens_per_replica']:,} | {'thrash guard' if r['thrash_guard'] else 'whatever fits'} | "
              f"{r['steps']:,} | {r['preemptions']:,} | {r['tokens_recomputed']:,} | {r['recompute_share']:.1%} |")
    if args.out:
        write_result(args.out, {"args": vars(args), "rows": rows})


if __name__ == "__main__":
    main()
