"""Attention of MIXED steps (prefill chunks beside decode tokens) on one GPU: reference vs kernels.

One replica's step at Qwen3-32B shapes (Nq=64, Nkv=8, D=128, P=16, bf16, one layer of a two-layer
cache), laid out exactly as the engine lays it out (sidp_jax.engine.step_inputs.mixed_step_layout):
  reference   kernels/paged_attention.py under jit (what mixed steps ran before the chunk kernel)
  kernels     kernels/attention.py::mixed_attention (decode kernel over the decode rows, then the
              chunk kernel over the tiles of the other chunks): what the engine runs on GPU now
  chunk_*     the chunk kernel alone over the same tiles, at other tile sizes / warps / stages
Each output is checked against the reference (max |out - ref| / max |ref| over real tokens).
Times: median per call of back-to-back bursts (sidp_jax.engine.timing.single_and_burst_us).

  python benchmarks/mixed_attention.py --out mixed.json
  python benchmarks/mixed_attention.py --interpret --small --reps 2   # CPU smoke test of the script
"""

from __future__ import annotations

import argparse
import functools
import os
import sys

os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.9")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from attention_kernels import err  # noqa: E402

from sidp_jax.engine.step_inputs import bucket, mixed_step_layout  # noqa: E402
from sidp_jax.kernels.attention import mixed_attention  # noqa: E402
from sidp_jax.kernels.paged_attention import paged_attention_reference  # noqa: E402
from sidp_jax.kernels.paged_prefill_pallas import paged_prefill_attention  # noqa: E402
from sidp_jax.engine.timing import single_and_burst_us  # noqa: E402
from provenance import write_result  # noqa: E402  (benchmarks/ is on sys.path)

# name -> (decode rows, their context range, prefill chunks as (tokens, first position))
SCENARIOS = {
    "decode240+prefill256": (240, (512, 1536), [(256, 0)]),
    "decode16+prefill2032": (16, (512, 1536), [(2032, 0)]),
    "chunk2048@2048": (0, None, [(2048, 2048)]),
    "16 prompts x 128": (0, None, [(128, 0)] * 16),
}
SMALL = {"small mixed": (6, (8, 40), [(20, 0), (9, 30)])}


def build(decode_rows, ctx_range, chunks, *, Nq, Nkv, D, P, dtype, tile_tokens, seed):
    rng = np.random.default_rng(seed)
    ctx = rng.integers(*ctx_range, decode_rows) if decode_rows else np.zeros(0, int)
    rows = [(1, int(c) - 1) for c in ctx] + list(chunks)  # (n, p0); decode rows first, as the engine
    T = bucket(sum(n for n, _ in rows), 8, 1 << 20)
    S = bucket(len(rows), 4, 1 << 20)
    MB = bucket(max(-(-(p0 + n) // P) for n, p0 in rows), 4, 1 << 20)
    num_pages = S * MB + 1
    spans, token_seq, positions, t = [], np.zeros(T, np.int32), np.zeros(T, np.int32), 0
    for row, (n, p0) in enumerate(rows):
        spans.append((row, t, n, p0))
        token_seq[t:t + n], positions[t:t + n] = row, np.arange(p0, p0 + n)
        t += n
    decode_len, tiles = mixed_step_layout(spans, S, T, tile_tokens)
    kq, kk, kv = jax.random.split(jax.random.key(seed), 3)
    shape = (2 * num_pages, P, Nkv, D)
    return dict(
        q=(2.0 * jax.random.normal(kq, (T, Nq, D), jnp.float32)).astype(dtype),
        k=jax.random.normal(kk, shape, jnp.float32).astype(dtype),
        v=jax.random.normal(kv, shape, jnp.float32).astype(dtype),
        off=jnp.int32(num_pages), bt=jnp.asarray((1 + rng.permutation(S * MB)).reshape(S, MB), jnp.int32),
        token_seq=jnp.asarray(token_seq), positions=jnp.asarray(positions), real=t, T=T, S=S,
        decode_len=jnp.asarray(decode_len), tiles=jnp.asarray(tiles), spans=spans,
        kv_tokens=int(sum(p0 + n for n, p0 in rows)), q_tokens=t)


def chunk_variants(sweep: bool):
    yield "chunk_t16_w4_s2", dict(tile_tokens=16, num_warps=4, num_stages=2)
    yield "chunk_t16_w4_s2_reshaped", dict(tile_tokens=16, num_warps=4, num_stages=2, flat_loads=False)
    if sweep:
        for tt, w, st in ((8, 4, 2), (32, 4, 2), (16, 8, 2), (32, 8, 2), (16, 4, 3), (64, 8, 2)):
            yield f"chunk_t{tt}_w{w}_s{st}", dict(tile_tokens=tt, num_warps=w, num_stages=st)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--burst", type=int, default=5)
    ap.add_argument("--sweep", action="store_true", help="also time other tile sizes / warps / stages")
    ap.add_argument("--interpret", action="store_true")
    ap.add_argument("--small", action="store_true", help="a tiny scenario and heads (CPU smoke test)")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    Nq, Nkv, D, P = (8, 2, 32, 8) if a.small else (64, 8, 128, 16)
    dtype = jnp.bfloat16
    scale = D ** -0.5
    print(f"device: {jax.devices()[0].device_kind}  jax {jax.__version__}  Nq={Nq} Nkv={Nkv} D={D} P={P}", flush=True)
    rows = []
    for name, (dec, ctx, chunks) in (SMALL if a.small else SCENARIOS).items():
        for vname, kw in [("kernels", {})] + list(chunk_variants(a.sweep)):
            tile = kw.get("tile_tokens", 16)
            x = build(dec, ctx, chunks, Nq=Nq, Nkv=Nkv, D=D, P=P, dtype=dtype, tile_tokens=tile, seed=len(name))
            common = (x["q"], x["k"], x["v"], x["off"], x["bt"])
            ref_fn = jax.jit(functools.partial(paged_attention_reference, scale=scale))
            ref = jax.block_until_ready(ref_fn(*common, x["token_seq"], x["positions"]))
            cands = []
            if vname == "kernels":
                cands.append(("reference", ref_fn, (*common, x["token_seq"], x["positions"])))
                fn = jax.jit(functools.partial(mixed_attention, scale=scale, interpret=a.interpret))
                cands.append(("kernels", lambda *args, fn=fn, x=x: fn(*args, decode_len=x["decode_len"],
                                                                      tiles=x["tiles"]),
                              (*common, x["token_seq"], x["positions"])))
            if not dec:  # chunk kernel alone covers every token only without decode rows
                fn = jax.jit(functools.partial(paged_prefill_attention, scale=scale, interpret=a.interpret, **kw))
                cands.append((vname, fn, (*common, x["tiles"], jnp.zeros_like(x["q"]))))
            for impl, fn, args in cands:
                row = dict(scenario=name, impl=impl, T=x["T"], S=x["S"], q_tokens=x["q_tokens"],
                           kv_tokens=x["kv_tokens"])
                try:
                    out = jax.block_until_ready(fn(*args))
                    row["err_vs_ref"] = err(out[:x["real"]], ref[:x["real"]])
                    row["us_single"], row["us"] = single_and_burst_us(fn, *args, reps=a.reps, burst=a.burst)
                except Exception as e:  # noqa: BLE001
                    row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
                rows.append(row)
                print(f"  {name:24s} {impl:20s} " + (f"FAILED {row['error']}" if "error" in row else
                      f"{row['us']:10.1f} us  err {row['err_vs_ref']:.2e}"), flush=True)
            del x, ref

    print("\n| scenario | impl | T | q tokens | us/call | vs reference | max rel err |")
    print("|---|---|---|---|---|---|---|")
    ref_us = {r["scenario"]: r["us"] for r in rows if r["impl"] == "reference" and "us" in r}
    for r in rows:
        if "error" in r:
            print(f"| {r['scenario']} | {r['impl']} | {r['T']} | {r['q_tokens']} | failed | | {r['error'][:60]} |")
        else:
            speed = f"{ref_us[r['scenario']] / r['us']:.1f}x" if r["scenario"] in ref_us else ""
            print(f"| {r['scenario']} | {r['impl']} | {r['T']} | {r['q_tokens']} | {r['us']:.1f} | {speed} | "
                  f"{r['err_vs_ref']:.2e} |")
    if a.out:
        meta = dict(device=jax.devices()[0].device_kind, jax=jax.__version__, Nq=Nq, Nkv=Nkv, D=D, P=P,
                    dtype="bfloat16", reps=a.reps, burst=a.burst, argv=sys.argv[1:])
        write_result(a.out, dict(meta=meta, rows=rows))
        print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
