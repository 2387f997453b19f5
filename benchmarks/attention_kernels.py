"""Paged decode attention on one GPU: the pure-JAX reference vs the Pallas kernel vs jax's own.

For decode (one query token per sequence) at serving shapes (one layer of a cache of
L_CACHE layers' page pools, Nq=64 / Nkv=8 per device, D=128, P=16, bf16) times
  reference   kernels/paged_attention.py::paged_attention_reference under jit
  pallas*     kernels/paged_decode_pallas.py (variants: pages per block, warps, stages, group padding;
              the reshaped-load, float16-widening and probe rows of the 2026-12-02 results are
              options the kernel no longer has: benchmarks/RESULTS.md)
  jax_paged*  jax.experimental.pallas.ops.gpu.paged_attention.paged_attention (deprecated; its
              layout [Nkv, pages, P, D] is made by a transpose, and q pre-multiplied by the
              scale it lacks, outside the timed region; k{n} = its k_splits)
and checks each against the reference (max |out - ref| / max |ref|) and against a float32
reference on the upcast inputs. Times: median of --reps calls after warm-up, each call
followed by jax.block_until_ready ("us"), and the median per call of --burst back-to-back calls
then one block ("us_burst", which hides the Python dispatch gap). GB/s counts the K/V bytes the
sequences' lengths need, read once.

  python benchmarks/attention_kernels.py --out attn.json
  python benchmarks/attention_kernels.py --batch 64 --context 2048 --sweep --only 'w2_s(4|5)'  # tune
  python benchmarks/attention_kernels.py --interpret --batch 4 --context 64 --q-heads 16 --kv-heads 2 \
      --head-dim 32 --min-pages 64 --reps 3 --burst 2      # CPU smoke test of the script itself
"""

from __future__ import annotations

import argparse
import functools
import itertools
import os
import re
import sys
import warnings

os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.9")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from sidp_jax.kernels.paged_attention import paged_attention_reference  # noqa: E402
from sidp_jax.kernels.paged_decode_pallas import paged_decode_attention  # noqa: E402
from sidp_jax.engine.timing import single_and_burst_us  # noqa: E402
from provenance import write_result  # noqa: E402  (benchmarks/ is on sys.path)

L_CACHE = 2  # layers' pools in the cache; the timed layer is the last (non-zero page offset)


def make_inputs(S, ctx, *, Nq, Nkv, D, P, dtype, kv_dtype, ragged, min_pages, seed):
    rng = np.random.default_rng(seed)
    MB = ctx // P
    num_pages = max(min_pages, S * MB + 1)  # distinct pages per sequence: no L2 reuse across rows
    if ragged:
        lengths = rng.integers(ctx // 2, ctx + 1, S)
    else:
        lengths = np.full(S, ctx)
    pages = 1 + rng.permutation(num_pages - 1)[: S * MB]
    key = jax.random.key(seed)
    kq, kk, kv = jax.random.split(key, 3)
    shape = (L_CACHE * num_pages, P, Nkv, D)
    k = jax.random.normal(kk, shape, jnp.float32).astype(kv_dtype)
    v = jax.random.normal(kv, shape, jnp.float32).astype(kv_dtype)
    q = (2.0 * jax.random.normal(kq, (S, Nq, D), jnp.float32)).astype(dtype)
    layer = L_CACHE - 1
    return dict(q=q, k=k, v=v, off=jnp.int32(layer * num_pages), layer=layer, num_pages=num_pages,
                bt=jnp.asarray(pages.reshape(S, MB), jnp.int32), lengths=jnp.asarray(lengths, jnp.int32))


def err(out, ref) -> float:
    out = np.asarray(jnp.asarray(out, jnp.float32))
    ref = np.asarray(jnp.asarray(ref, jnp.float32))
    if not np.isfinite(out).all():
        return float("nan")
    return float(np.abs(out - ref).max() / np.abs(ref).max())


def pallas_variants(sweep: bool, P: int):
    if sweep:
        for block_tokens, w, st, r in itertools.product((32, 64, 128, 256), (2, 4, 8), (2, 3, 4, 5), (16, 8)):
            yield (f"pallas_bt{block_tokens}_w{w}_s{st}_r{r}",
                   dict(pages_per_block=max(1, block_tokens // P), num_warps=w, num_stages=st, min_rows=r))
        return
    yield "pallas", dict()  # defaults: 64-token blocks, 2 warps, 4 stages, bare 8-row group
    yield "pallas_r16", dict(min_rows=16)  # group zero-padded to 16 rows in-kernel
    yield "pallas_bt128_w4_s2", dict(pages_per_block=max(1, 128 // P), num_warps=4, num_stages=2)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", default="64,256")
    ap.add_argument("--context", default="512,2048")
    ap.add_argument("--q-heads", type=int, default=64)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--page-size", type=int, default=16)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--kv-dtype", default=None, help="the cache's dtype (default --dtype; float8_e4m3fn: an FP8 cache)")
    ap.add_argument("--min-pages", type=int, default=4096, help="pages per layer pool, at least")
    ap.add_argument("--ragged", action="store_true", help="lengths uniform in [ctx/2, ctx] (default: all ctx)")
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--burst", type=int, default=10)
    ap.add_argument("--sweep", action="store_true", help="time a grid of kernel configurations")
    ap.add_argument("--only", default=None, help="regex: keep the kernel variants whose name matches")
    ap.add_argument("--no-jax-paged", action="store_true")
    ap.add_argument("--interpret", action="store_true", help="Pallas interpret mode (CPU smoke test of this script)")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()

    dtype = jnp.dtype(a.dtype)
    kv_dtype = jnp.dtype(a.kv_dtype or a.dtype)
    Nq, Nkv, D, P = a.q_heads, a.kv_heads, a.head_dim, a.page_size
    scale = D ** -0.5
    print(f"device: {jax.devices()[0].device_kind}  jax {jax.__version__}  Nq={Nq} Nkv={Nkv} D={D} P={P} "
          f"{dtype.name}, cache {kv_dtype.name}", flush=True)
    rows = []
    for S, ctx in itertools.product([int(x) for x in a.batch.split(",")], [int(x) for x in a.context.split(",")]):
        x = make_inputs(S, ctx, Nq=Nq, Nkv=Nkv, D=D, P=P, dtype=dtype, kv_dtype=kv_dtype, ragged=a.ragged,
                        min_pages=a.min_pages, seed=S * 100003 + ctx)
        kv_bytes = int(np.asarray(x["lengths"]).sum()) * Nkv * D * 2 * kv_dtype.itemsize
        token_seq, positions = jnp.arange(S, dtype=jnp.int32), x["lengths"] - 1
        common = (x["q"], x["k"], x["v"], x["off"], x["bt"])

        ref_fn = jax.jit(functools.partial(paged_attention_reference, scale=scale))
        ref = jax.block_until_ready(ref_fn(*common, token_seq, positions))
        f32 = lambda t: t.astype(jnp.float32)
        with jax.default_matmul_precision("highest"):
            ref32 = jax.block_until_ready(ref_fn(f32(x["q"]), f32(x["k"]), f32(x["v"]), x["off"], x["bt"],
                                                 token_seq, positions))

        cands = [("reference", ref_fn, (*common, token_seq, positions))]
        for name, kw in pallas_variants(a.sweep, P):
            if a.only and not re.search(a.only, name):
                continue
            fn = jax.jit(functools.partial(paged_decode_attention, scale=scale, interpret=a.interpret, **kw))
            cands.append((name, fn, (*common, x["lengths"])))
        if not a.no_jax_paged:
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", DeprecationWarning)
                    from jax.experimental.pallas.ops.gpu import paged_attention as jpa
                lo = x["layer"] * x["num_pages"]
                to_heads = lambda c: jnp.transpose(c[lo: lo + x["num_pages"]], (2, 0, 1, 3))  # [Nkv, pages, P, D]
                kp, vp = jax.block_until_ready((to_heads(x["k"]), to_heads(x["v"])))
                MB = x["bt"].shape[1]
                qs = jax.block_until_ready((x["q"].astype(jnp.float32) * scale).astype(x["q"].dtype))
                for ks in sorted({16, 4, 1}):
                    if MB % ks:
                        continue
                    fn = jax.jit(functools.partial(jpa.paged_attention, k_splits=ks, interpret=a.interpret))
                    # it has no scale argument: q is pre-scaled (outside the timed region)
                    cands.append((f"jax_paged_k{ks}", fn, (qs, kp, vp, x["bt"], x["lengths"])))
            except Exception as e:  # noqa: BLE001
                print(f"  jax paged_attention unavailable: {type(e).__name__}: {e}", flush=True)

        for name, fn, args in cands:
            row = dict(batch=S, context=ctx, impl=name, kv_bytes=kv_bytes)
            try:
                out = jax.block_until_ready(fn(*args))
                row["err_vs_ref"] = err(out, ref)
                row["err_vs_f32"] = err(out, ref32)
                row["us"], row["us_burst"] = single_and_burst_us(fn, *args, reps=a.reps, burst=a.burst)
                row["GB_s"] = kv_bytes / (row["us_burst"] * 1e-6) / 1e9
            except Exception as e:  # noqa: BLE001
                row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
            rows.append(row)
            if "error" in row:
                print(f"  S={S:4d} ctx={ctx:5d} {name:28s} FAILED {row['error']}", flush=True)
            else:
                print(f"  S={S:4d} ctx={ctx:5d} {name:28s} {row['us']:9.1f} us  {row['us_burst']:9.1f} us_burst "
                      f"{row['GB_s']:7.0f} GB/s  err {row['err_vs_ref']:.2e} (vs f32 {row['err_vs_f32']:.2e})",
                      flush=True)
        del x, ref, ref32, cands

    print("\n| batch | context | impl | us/call | us/call (burst) | GB/s | max rel err vs ref | vs f32 ref |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['batch']} | {r['context']} | {r['impl']} | failed | | | {r['error'][:80]} | |")
        else:
            print(f"| {r['batch']} | {r['context']} | {r['impl']} | {r['us']:.1f} | {r['us_burst']:.1f} | "
                  f"{r['GB_s']:.0f} | {r['err_vs_ref']:.2e} | {r['err_vs_f32']:.2e} |")
    if a.out:
        meta = dict(device=jax.devices()[0].device_kind, jax=jax.__version__, Nq=Nq, Nkv=Nkv, D=D, P=P,
                    dtype=dtype.name, kv_dtype=kv_dtype.name, ragged=a.ragged, reps=a.reps, burst=a.burst, argv=sys.argv[1:])
        write_result(a.out, dict(meta=meta, rows=rows))
        print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
