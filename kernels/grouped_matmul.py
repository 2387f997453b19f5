"""The experts' grouped GEMM: rows sorted by expert, in blocks that each belong to one expert.

A mixture-of-experts layer multiplies each routed token row by its expert's weights. The rows are
sorted by expert and each expert's run is padded to a whole number of `block_rows`-row blocks
(models/expert_routing.py), so every block needs one expert's weights, named by `block_expert`.
`grouped_matmul` runs the Pallas kernel (kernels/grouped_matmul_pallas.py) where the program is
compiled for an NVIDIA GPU, and elsewhere the portable path `grouped_matmul_blocks`: a loop over
blocks, each one GEMM of [block_rows, K] by its expert's [K, N], reading only that expert's
weights. Either way the FLOPs are the routed rows' (plus the padding), never the E-times dense
expansion that XLA makes of `lax.ragged_dot` off TPU.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def grouped_matmul(rows: jax.Array, w: jax.Array, block_expert: jax.Array, block_rows: int, out_dtype=None,
                   rows_used: jax.Array | None = None) -> jax.Array:
    """rows [R, K] times w[e] [K, N] of each block's expert e -> [R, N]: the Pallas kernel on
    NVIDIA GPUs, the portable loop elsewhere (chosen when the program is lowered)."""
    from sidp_jax.kernels.grouped_matmul_pallas import grouped_matmul_pallas

    gpu = lambda r, w_, be: grouped_matmul_pallas(r, w_, be, rows_used, block_rows=block_rows, out_dtype=out_dtype)
    portable = lambda r, w_, be: grouped_matmul_blocks(r, w_, be, block_rows, out_dtype)
    return jax.lax.platform_dependent(rows, w, block_expert, cuda=gpu, default=portable)


def grouped_matmul_blocks(rows: jax.Array, w: jax.Array, block_expert: jax.Array, block_rows: int,
                          out_dtype=None) -> jax.Array:
    """rows [R, K] (R a multiple of block_rows) times w[e] [K, N] of each block's expert e
    (block_expert [R / block_rows]) -> [R, N] in out_dtype (default: rows' dtype)."""
    R, K = rows.shape
    out_dtype = out_dtype or rows.dtype
    blocks = rows.reshape(R // block_rows, block_rows, K)

    def one_block(args):
        x, e = args
        we = jax.lax.dynamic_index_in_dim(w, e, axis=0, keepdims=False)
        return jnp.dot(x, we, preferred_element_type=out_dtype)

    return jax.lax.map(one_block, (blocks, block_expert)).reshape(R, w.shape[-1])
