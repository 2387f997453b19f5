"""The experts' grouped GEMM as a Pallas (Triton-lowered) GPU kernel.

Same contract as kernels/grouped_matmul.py (the portable path, and this kernel's reference): rows
[R, K] sorted by expert in blocks of `block_rows` rows, each block multiplied by its expert's
weights w[e] [K, N] (e = block_expert[block]). One program per (row block, N tile): it reads its
block's expert id, then streams that expert's [K, block_n] weight tile through `block_k`-deep
dots into a float32 accumulator. So each expert's weights are read once per row block that uses
them: at decode sizes (a few rows per expert) that is once per step, the weight-read floor; at
prefill sizes the blocks are full and the kernel is a plain tiled GEMM per expert.

Row blocks past the routed rows (all padding, `num_rows_used` onwards) skip their dots and store
zeros. Triton needs power-of-2 tiles: block_rows, block_n and block_k (>= 16 for its dot); the
arrays themselves may have any K and N that those tiles divide. `interpret=True` runs the same
code anywhere (the CPU tests).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

try:  # the Triton GPU backend's compiler params; absent on some CPU-only builds
    from jax.experimental.pallas import triton as plgpu
except Exception:  # pragma: no cover
    plgpu = None


def _largest_pow2_tile(n: int, cap: int) -> int:
    """The largest power of 2 <= cap that divides n (1 if n is odd)."""
    t = 1
    while t * 2 <= cap and n % (t * 2) == 0:
        t *= 2
    return t


def _kernel(used_ref, be_ref, x_ref, w_ref, o_ref, *, block_rows, block_n, block_k, num_k, precision):
    b, n = pl.program_id(0), pl.program_id(1)
    rows = pl.ds(pl.multiple_of(b * block_rows, block_rows), block_rows)
    cols = pl.ds(pl.multiple_of(n * block_n, block_n), block_n)

    def compute():
        e = be_ref[b]

        def step(i, acc):
            ks = pl.ds(pl.multiple_of(i * block_k, block_k), block_k)
            return acc + lax.dot_general(x_ref[rows, ks], w_ref[e, ks, cols], (((1,), (0,)), ((), ())),
                                         precision=precision, preferred_element_type=jnp.float32)

        acc = lax.fori_loop(0, num_k, step, jnp.zeros((block_rows, block_n), jnp.float32))
        o_ref[...] = acc.astype(o_ref.dtype)

    def skip():
        o_ref[...] = jnp.zeros((block_rows, block_n), o_ref.dtype)

    lax.cond(b * block_rows < used_ref[0], compute, skip)


@functools.partial(jax.jit, static_argnames=("block_rows", "block_n", "block_k", "out_dtype", "num_warps",
                                             "num_stages", "interpret"))
def grouped_matmul_pallas(rows: jax.Array, w: jax.Array, block_expert: jax.Array, num_rows_used: jax.Array | None = None,
                          *, block_rows: int, block_n: int = 128, block_k: int = 64, out_dtype=None,
                          num_warps: int = 4, num_stages: int = 3, interpret: bool = False) -> jax.Array:
    """rows [R, K] times w[block_expert[b]] [K, N] per block of block_rows rows -> [R, N].
    num_rows_used: rows past it are padding (zeros out, no dots); None: all rows are used."""
    R, K = rows.shape
    E, Kw, N = w.shape
    if Kw != K or R % block_rows:
        raise ValueError(f"shapes: rows {rows.shape}, w {w.shape}, block_rows {block_rows}")
    block_n, block_k = _largest_pow2_tile(N, block_n), _largest_pow2_tile(K, block_k)
    out_dtype = out_dtype or rows.dtype
    used = jnp.full((1,), R, jnp.int32) if num_rows_used is None else jnp.reshape(num_rows_used, (1,)).astype(jnp.int32)
    precision = lax.Precision.HIGHEST if rows.dtype == jnp.float32 else None
    kernel = functools.partial(_kernel, block_rows=block_rows, block_n=block_n, block_k=block_k, num_k=K // block_k,
                               precision=precision)
    kw = {}
    if not interpret and plgpu is not None:
        kw["compiler_params"] = plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages)
    NB = R // block_rows
    return pl.pallas_call(
        kernel,
        grid=(NB, N // block_n),
        in_specs=[
            pl.BlockSpec((1,), lambda b, n: (0,)),  # rows used
            pl.BlockSpec((NB,), lambda b, n: (0,)),  # each block's expert
            pl.BlockSpec((R, K), lambda b, n: (0, 0)),  # all rows: the program slices its block
            pl.BlockSpec((E, K, N), lambda b, n: (0, 0, 0)),  # all experts: the program reads one
        ],
        out_specs=pl.BlockSpec((block_rows, block_n), lambda b, n: (b, n)),
        out_shape=jax.ShapeDtypeStruct((R, N), out_dtype),
        interpret=interpret,
        name=f"grouped_matmul_m{block_rows}_n{block_n}_k{block_k}",
        **kw,
    )(used, block_expert.astype(jnp.int32), rows, w)
