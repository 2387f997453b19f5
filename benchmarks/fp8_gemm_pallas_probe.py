"""Probe: a skinny FP8 GEMM written in Pallas (Triton backend) against XLA's FP8 dot (cuBLASLt).

y[M, N] = (x[M, K] e4m3 @ w[N, K]^T e4m3, float32 accumulation) * x_scale[M] * w_scale[N], as
bf16: the engine's W8A8 projection with the weight's contracted axis last. Each program owns a
bm x bn output tile and walks K in bk steps (split S ways over a third grid axis, whose float32
partial tiles are summed outside). Block configs are (bm, bn, bk, S, num_warps, num_stages).
Times are of back-to-back calls of one jitted GEMM (async dispatch keeps the GPU busy), each
checked against the float32 product first. On CPU it runs in interpret mode (--interpret) as a
smoke test of the kernel's arithmetic only.

  python benchmarks/fp8_gemm_pallas_probe.py                 # one GPU
  python benchmarks/fp8_gemm_pallas_probe.py --interpret --shapes 64,256,128 --reps 1
"""

from __future__ import annotations

import argparse
import functools
import time
import warnings

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

F32 = jnp.float32
CONFIGS = [(128, 64, 128, 1, 4, 4), (128, 128, 128, 1, 4, 4), (64, 64, 256, 1, 4, 3),
           (128, 64, 128, 2, 4, 4), (64, 128, 128, 4, 4, 4), (64, 64, 128, 1, 4, 6)]


def pallas_fp8_gemm(x, w, x_scale, w_scale, *, bm, bn, bk, splits, num_warps, num_stages, interpret=False):
    M, K = x.shape
    N = w.shape[0]
    bm = min(bm, M)
    k_per_split = K // splits

    def kernel(x_ref, w_ref, xs_ref, ws_ref, o_ref):
        s = pl.program_id(2)

        def step(i, acc):
            k0 = pl.multiple_of(s * k_per_split + i * bk, bk)
            return acc + plgpu.dot(x_ref[:, pl.ds(k0, bk)], w_ref[:, pl.ds(k0, bk)], trans_b=True)

        acc = lax.fori_loop(0, k_per_split // bk, step, jnp.zeros((bm, bn), F32))
        if splits == 1:
            o_ref[...] = (acc * xs_ref[...][:, None] * ws_ref[...][None, :]).astype(o_ref.dtype)
        else:
            o_ref[...] = acc

    whole = splits == 1
    out = pl.pallas_call(
        kernel, grid=(M // bm, N // bn, splits),
        in_specs=[pl.BlockSpec((bm, K), lambda i, j, s: (i, 0)), pl.BlockSpec((bn, K), lambda i, j, s: (j, 0)),
                  pl.BlockSpec((bm,), lambda i, j, s: (i,)), pl.BlockSpec((bn,), lambda i, j, s: (j,))],
        out_specs=(pl.BlockSpec((bm, bn), lambda i, j, s: (i, j)) if whole
                   else pl.BlockSpec((None, bm, bn), lambda i, j, s: (s, i, j))),
        out_shape=jax.ShapeDtypeStruct((M, N) if whole else (splits, M, N), jnp.bfloat16 if whole else F32),
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret)(x, w, x_scale, w_scale)
    return out if whole else (out.sum(0) * x_scale[:, None] * w_scale[None, :]).astype(jnp.bfloat16)


def us_per_call(f, *args, reps: int) -> float:
    f(*args).block_until_ready()
    t = time.perf_counter()
    for _ in range(reps):
        r = f(*args)
    r.block_until_ready()
    return (time.perf_counter() - t) / reps * 1e6


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="128,5120,25600;64,25600,5120;256,5120,51200", help="M,K,N;...")
    ap.add_argument("--reps", type=int, default=50)
    ap.add_argument("--interpret", action="store_true")
    a = ap.parse_args()
    warnings.simplefilter("ignore")  # the Pallas Triton backend warns that it is deprecated
    print(jax.__version__, jax.devices())
    for M, K, N in (tuple(int(v) for v in s.split(",")) for s in a.shapes.split(";")):
        x = jax.random.normal(jax.random.key(0), (M, K)).astype(jnp.float8_e4m3fn)
        w = jax.random.normal(jax.random.key(1), (N, K)).astype(jnp.float8_e4m3fn)
        xs, ws = jnp.ones((M,), F32), jnp.full((N,), 0.01, F32)
        want = jnp.dot(x.astype(F32), w.astype(F32).T) * 0.01
        xla = jax.jit(lambda x, w: (jnp.dot(x, w.T, preferred_element_type=F32) * 0.01).astype(jnp.bfloat16))
        print(M, K, N, "HBM-bound us", N * K / 4.8e6, "xla", round(us_per_call(xla, x, w, reps=a.reps), 1))
        for c in CONFIGS:
            if M % min(c[0], M) or N % c[1] or K % (c[2] * c[3]):
                continue
            try:
                f = jax.jit(functools.partial(pallas_fp8_gemm, bm=c[0], bn=c[1], bk=c[2], splits=c[3], num_warps=c[4],
                                              num_stages=c[5], interpret=a.interpret))
                err = float(jnp.abs(f(x, w, xs, ws).astype(F32) - want).max())
                print(" ", c, round(us_per_call(f, x, w, xs, ws, reps=a.reps), 1), "us err", err)
            except Exception as ex:  # a config Triton rejects is reported, the others still run
                print(" ", c, "FAIL", type(ex).__name__, str(ex)[:400])


if __name__ == "__main__":
    main()
