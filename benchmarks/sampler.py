"""The sampler alone: ms per call for each sampling mix, at S rows and a V-token vocabulary.

Each mix is one batch of S rows (`mixed`: the rows cycle through every other mix), run by
  engine        sidp_jax/engine/sampler.py::sample, as every step runs it (gated searches; penalties
                from device counts, the sampled tokens added to them)
  ungated       the same with every search run whatever the rows ask (the gates' worth)
  sort          the previous sampler's filters, for comparison: argsort the vocabulary, cumsum,
                inverse argsort (what every filtered step paid before)
Logits are Gaussian with --spread standard deviation (2.0: a random-weight model's flat tail, where
top_p's nucleus is tens of thousands of tokens; the search costs the same whatever the nucleus).
Times: median of --reps calls, each followed by block_until_ready ("ms"), and the time for the call
to return before blocking ("dispatch_ms": a lax.cond that made the host wait for its predicate
would show here as dispatch close to ms). Also lax.top_k at a few k ("top_k" rows), the XLA op
behind the top-N logprobs.

  python benchmarks/sampler.py --rows 64,256,512 --out benchmarks/results/<date>-<gpu>-sampler.json
  python benchmarks/sampler.py --rows 8 --vocab 2000 --reps 2 --out /tmp/s.json   # CPU smoke test
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from provenance import write_result  # noqa: E402  (benchmarks/ is on sys.path)
from sidp_jax.engine.penalty_counts import count_sampled
from sidp_jax.engine.sampler import PIVOTS, ordered_keys, sample

MIXES = {  # name -> per-row options (vLLM's names); every unnamed option is off
    "greedy": dict(temperature=0.0),
    "temperature_1": dict(temperature=1.0),
    "qwen3_default": dict(temperature=0.6, top_k=20, top_p=0.95),
    "top_p_0.9": dict(temperature=1.0, top_p=0.9),
    "top_k_50": dict(temperature=1.0, top_k=50),
    "min_p_0.05": dict(temperature=1.0, min_p=0.05),
    "logprobs_5": dict(temperature=1.0, num_logprobs=5),
    "logit_bias": dict(temperature=1.0, bias=True),
    "penalties": dict(temperature=1.0, repetition_penalty=1.1, presence_penalty=0.5, frequency_penalty=0.5),
}


def rows_for(mix: str, S: int, W: int = 16) -> dict:
    names = [m for m in MIXES if m != "mixed"] if mix == "mixed" else [mix]
    opts = [MIXES[names[i % len(names)]] for i in range(S)]
    col = lambda k, d, dt: jnp.asarray([o.get(k, d) for o in opts], dt)
    ids = np.full((S, W), -1, np.int32)
    bias = np.zeros((S, W), np.float32)
    for i, o in enumerate(opts):
        if o.get("bias"):
            ids[i, :4], bias[i, :4] = [11, 22, 33, 44], [5.0, -5.0, 100.0, -100.0]
    slot = jnp.asarray([i + 1 if "repetition_penalty" in o else 0 for i, o in enumerate(opts)], jnp.int32)
    return {"temperature": col("temperature", 0.0, jnp.float32), "top_k": col("top_k", 0, jnp.int32),
            "penalty_slot": slot, "count_slot": slot, "repetition_penalty": col("repetition_penalty", 1.0, jnp.float32),
            "presence_penalty": col("presence_penalty", 0.0, jnp.float32),
            "frequency_penalty": col("frequency_penalty", 0.0, jnp.float32),
            "top_p": col("top_p", 1.0, jnp.float32), "min_p": col("min_p", 0.0, jnp.float32),
            "num_logprobs": col("num_logprobs", -1, jnp.int32), "seed": jnp.arange(S, dtype=jnp.uint32),
            "step": jnp.zeros(S, jnp.int32), "edit_ids": jnp.asarray(ids), "edit_bias": jnp.asarray(bias),
            "edit_allow": jnp.zeros((S, W), bool)}


def sort_sampler(logits, p):
    """The filters as the engine ran them before: a full argsort and its inverse per row."""
    V = logits.shape[-1]
    scaled = logits / jnp.where(p["temperature"] > 0, p["temperature"], 1.0)[:, None]
    order = jnp.argsort(-scaled, axis=-1)
    s = jnp.take_along_axis(scaled, order, axis=-1)
    probs = jax.nn.softmax(s, axis=-1)
    keep = (p["top_k"][:, None] <= 0) | (jnp.arange(V)[None, :] < p["top_k"][:, None])
    keep &= jnp.cumsum(probs, axis=-1) - probs < p["top_p"][:, None]
    keep &= probs >= p["min_p"][:, None] * probs[:, :1]
    filtered = jnp.take_along_axis(jnp.where(keep.at[:, 0].set(True), s, -jnp.inf), jnp.argsort(order, axis=-1), axis=-1)
    keys = jax.vmap(lambda s_, n: jax.random.fold_in(jax.random.key(s_), n))(p["seed"], p["step"])
    g = jax.vmap(lambda k: jax.random.gumbel(k, (V,), jnp.float32))(keys)
    return jnp.argmax(filtered + g, axis=-1)


def timed(fn, args, reps: int) -> dict:
    jax.block_until_ready(fn(*args))  # compile
    total, dispatch = [], []
    for _ in range(reps):
        t0 = time.perf_counter()
        out = fn(*args)
        t1 = time.perf_counter()
        jax.block_until_ready(out)
        total.append(time.perf_counter() - t0)
        dispatch.append(t1 - t0)
    return {"ms": 1e3 * statistics.median(total), "dispatch_ms": 1e3 * statistics.median(dispatch)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", default="64,128,256,512")
    ap.add_argument("--vocab", type=int, default=151936)
    ap.add_argument("--spread", type=float, default=2.0)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--mixes", default=",".join([*MIXES, "mixed"]))
    ap.add_argument("--variants", default="engine,ungated,sort")
    ap.add_argument("--top-k", default="5,16,20,50", help="lax.top_k sizes to time")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    def engine_step(gated):  # the sampler as the step runs it: penalties from counts, sampled tokens counted
        def run(x, p, counts):
            out = sample(x, p, gated, counts)
            return out.tokens, count_sampled(counts, p, out.tokens)
        return jax.jit(run)

    variants = {"engine": engine_step(True), "ungated": engine_step(False), "sort": jax.jit(lambda x, p, c: sort_sampler(x, p))}
    rows = []
    for S in map(int, args.rows.split(",")):
        logits = jax.random.normal(jax.random.key(S), (S, args.vocab), jnp.float32) * args.spread
        counts = jax.random.randint(jax.random.key(S + 1), (S + 1, args.vocab), 0, 2, jnp.int32)  # half the vocabulary seen
        for mix in args.mixes.split(","):
            p = rows_for(mix, S)
            for name in args.variants.split(","):
                if name == "sort" and mix in ("logprobs_5", "logit_bias", "penalties"):
                    continue  # the old sampler's cost for these is its temperature path (penalties: a history)
                r = {"rows": S, "vocab": args.vocab, "mix": mix, "sampler": name,
                     **timed(variants[name], (logits, p, counts), args.reps)}
                rows.append(r)
                print(r, flush=True)
        keys = ordered_keys(logits)
        piv = jnp.sort(keys[:, :PIVOTS], axis=1)
        e = jnp.exp(logits - logits.max(axis=1, keepdims=True))
        passes = {  # one pass of the threshold search, pivots as the minor axis (the engine's) or the major
            "count [S,V,P]": lambda k, q, w: jnp.sum(k[:, :, None] >= q[:, None, :], axis=1, dtype=jnp.int32),
            "count [S,P,V]": lambda k, q, w: jnp.sum(k[:, None, :] >= q[:, :, None], axis=2, dtype=jnp.int32),
            "mass [S,V,P]": lambda k, q, w: jnp.sum(jnp.where(k[:, :, None] >= q[:, None, :], w[:, :, None], 0.0), axis=1),
            "mass [S,P,V]": lambda k, q, w: jnp.sum(jnp.where(k[:, None, :] >= q[:, :, None], w[:, None, :], 0.0), axis=2)}
        for name, fn in passes.items():
            r = {"rows": S, "vocab": args.vocab, "mix": f"one search pass, {name}", "sampler": "pass",
                 **timed(jax.jit(fn), (keys, piv, e), args.reps)}
            rows.append(r)
            print(r, flush=True)
        for k in map(int, args.top_k.split(",")):
            r = {"rows": S, "vocab": args.vocab, "mix": f"lax.top_k k={k}", "sampler": "top_k",
                 **timed(jax.jit(lambda x, k=k: jax.lax.top_k(x, k)), (logits,), args.reps)}
            rows.append(r)
            print(r, flush=True)
    if args.out:
        write_result(args.out, {"args": vars(args), "device": jax.devices()[0].device_kind, "rows": rows})
    print(f"\n{'S':>5} {'mix':<18}" + "".join(f"{v:>12}" for v in args.variants.split(",")) + "   (ms per call)")
    for S in map(int, args.rows.split(",")):
        for mix in args.mixes.split(","):
            got = {r["sampler"]: r["ms"] for r in rows if r["rows"] == S and r["mix"] == mix}
            print(f"{S:>5} {mix:<18}" + "".join(f"{got[v]:>12.3f}" if v in got else f"{'-':>12}"
                                            for v in args.variants.split(",")))
        print(f"{S:>5} one search pass ms: " + ", ".join(f"{r['mix'].split(', ')[1]} {r['ms']:.3f}" for r in rows
                                                         if r["rows"] == S and r["sampler"] == "pass"))
        print(f"{S:>5} lax.top_k ms: " + ", ".join(f"k={r['mix'].split('=')[1]} {r['ms']:.3f}" for r in rows
                                                  if r["rows"] == S and r["sampler"] == "top_k"))


if __name__ == "__main__":
    main()
