"""Paged attention for prefill CHUNKS (many query tokens per sequence) as a Pallas GPU kernel.

Same cache layout as `paged_attention.py` (the pure-JAX reference) and `paged_decode_pallas.py`:
`[L * num_pages, P, Nkv, D]`, layer l's page p at row `l * num_pages + p`, the layer chosen by
the traced scalar `layer_page_offset`.

The work is cut into TILES of up to `tile_tokens` consecutive query tokens of one sequence row,
described by the host (sidp_jax/engine/step_inputs.py, `mixed_step_layout`; `num_tiles` fixes
their count) as `tiles[i] = (row, t0, n, p0)`: the tile's tokens are flat tokens `t0 .. t0+n-1`
at cache positions `p0 .. p0+n-1` of sequence row `row` (a chunk's positions are consecutive).
A tile with n == 0 is padding and does nothing.

Grid: one program per (tile, kv head), kv head fastest. A program gathers its tile's queries for
the kv head's whole GQA group as one `[tile_tokens * G, D]` matrix (row r = token r // G, head
r % G), then walks the row's pages `pages_per_block` at a time up to `p0 + n` (its last token's
position), with a causal mask (key j visible to the query at position p iff j <= p) and an
online softmax in float32. So each K/V block is read once per tile and kv head, and every
tile-token x group-head pair shares it.

Output: tokens the tiles do not cover keep the values of `out_init` (aliased to the output; the
decode rows of a mixed step are filled there by the decode kernel first, padding tokens stay
zero). Queries and outputs are read and written with masked gathers/scatters of the tile's rows,
so tiles need no alignment and no padded copy of q is made.

It exists because the reference gathers each token's whole context: on long chunks and mixed
steps the kernels take a small fraction of the reference's time (benchmarks/mixed_attention.py;
benchmarks/RESULTS.md, "Mixed-step (chunk) attention kernel"). Tiles of 16 tokens x the group,
4 warps and 2 stages are the launch sweep's best there; 32- and 64-token tiles are slower.

Constraints (GPU): G, tile_tokens, D, pages_per_block and pages_per_block * P powers of 2,
D >= 16 and pages_per_block * P >= 16. `interpret=True` runs anywhere (the CPU tests).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from sidp_jax.kernels.paged_decode_pallas import (LOG2E, NEG_INIT, _is_pow2, _load, default_pages_per_block,
                                                  load_kv_block, load_kv_tokens, next_pow2, online_softmax_step,
                                                  pad_group, plgpu, unpad_group)

DEFAULT_TILE_TOKENS = 16


def _store(ref, val, mask):
    if plgpu is not None and hasattr(plgpu, "store"):
        return plgpu.store(ref, val, mask=mask)
    ref[...] = jnp.where(mask, val, ref[...])  # pragma: no cover


def _chunk_kernel(off_ref, tile_ref, bt_ref, q_ref, init_ref, k_ref, v_ref, o_ref, *, scale: float,
                  page_size: int, pages_per_block: int, tile_tokens: int, precision, flat_loads: bool):
    # off_ref [1]; tile_ref [4] = (row, t0, n, p0); bt_ref [S, MBp]; q_ref/o_ref [T, G, D] (this kv
    # head); k_ref/v_ref [L*num_pages, P, D] (this kv head). init_ref aliases o_ref (unused here).
    del init_ref
    row, t0, n, p0 = tile_ref[0], tile_ref[1], tile_ref[2], tile_ref[3]
    offset = off_ref[0]
    T, G, D = q_ref.shape
    BQ, P, ppb = tile_tokens, page_size, pages_per_block
    R, block_k = BQ * G, ppb * P

    shape_q = (BQ, G, D)
    tok = lax.broadcasted_iota(jnp.int32, shape_q, 0)
    q_idx = (t0 + tok, lax.broadcasted_iota(jnp.int32, shape_q, 1), lax.broadcasted_iota(jnp.int32, shape_q, 2))
    q_mask = tok < n
    q = _load(q_ref.at[q_idx], q_mask, 0.0).reshape(R, D)
    q_pos = p0 + lax.broadcasted_iota(jnp.int32, (R, block_k), 0) // G  # each row's query position

    kv_len = jnp.where(n > 0, p0 + n, 0)
    n_pages = pl.cdiv(kv_len, P)
    n_blocks = pl.cdiv(kv_len, block_k)
    qk_scale = scale * LOG2E

    def body(i, carry):
        acc, m_prev, l_prev = carry
        if flat_loads:  # one page id per token, gathered from the row; [block_k, D] loads, no reshape
            pos = i * ppb + lax.broadcasted_iota(jnp.int32, (block_k,), 0) // P
            token_pages = _load(bt_ref.at[jnp.broadcast_to(row, (block_k,)), pos])
            k, v, _ = load_kv_tokens(k_ref, v_ref, token_pages, i, n_pages, kv_len, offset, P, q_ref.dtype)
        else:
            page_ids = bt_ref[row, pl.ds(i * ppb, ppb)]
            k, v, _ = load_kv_block(k_ref, v_ref, page_ids, i, n_pages, kv_len, offset, P, q_ref.dtype)
        logits = lax.dot_general(q, k, (((1,), (1,)), ((), ())), precision=precision,
                                 preferred_element_type=jnp.float32) * qk_scale  # [R, block_k]
        key_row = i * block_k + lax.broadcasted_iota(jnp.int32, (R, block_k), 1)
        logits = jnp.where(key_row <= q_pos, logits, -jnp.inf)  # causal; also drops keys >= kv_len
        return online_softmax_step(acc, m_prev, l_prev, logits, v, precision)

    acc = jnp.zeros((R, D), jnp.float32)
    m = jnp.full((R,), NEG_INIT, jnp.float32)
    l = jnp.zeros((R,), jnp.float32)
    acc, m, l = lax.fori_loop(0, n_blocks, body, (acc, m, l))
    l = jnp.where(l > 0, l, 1.0)
    out = (acc / l[:, None]).astype(o_ref.dtype).reshape(BQ, G, D)
    _store(o_ref.at[q_idx], out, q_mask)


@functools.partial(
    jax.jit,
    static_argnames=("scale", "tile_tokens", "pages_per_block", "num_warps", "num_stages", "flat_loads",
                     "interpret"),
)
def paged_prefill_attention(
    q: jax.Array,  # [T, Nq, D]
    k_cache: jax.Array,  # [L * num_pages, P, Nkv, D]
    v_cache: jax.Array,
    layer_page_offset: jax.Array,  # int32 scalar (traced): layer * num_pages
    block_tables: jax.Array,  # [S, MB] int32, layer-local page ids
    tiles: jax.Array,  # [NT, 4] int32 (row, t0, n, p0); n == 0: padding tile
    out_init: jax.Array,  # [T, Nq, D]: kept for tokens no tile covers
    *,
    scale: float,
    tile_tokens: int = DEFAULT_TILE_TOKENS,
    pages_per_block: int | None = None,
    num_warps: int = 4,
    num_stages: int | None = None,
    flat_loads: bool = True,
    interpret: bool = False,
) -> jax.Array:
    """Causal attention of each tile's query tokens over its row's pages. Returns [T, Nq, D].

    flat_loads: gather K/V blocks as [block tokens, D] from per-token page ids, as the decode
    kernel does (default: faster with bf16 and 16-token tiles, benchmarks/RESULTS.md,
    "Mixed-step (chunk) attention kernel"); False: [pages, P, D] loads reshaped to
    [block tokens, D].

    Defaults (tuned for bf16, G=8, D=128): 64-token K/V blocks, 4 warps, 2 stages. With 4-byte
    inputs they would need 266 KB of shared memory (a Hopper GPU gives a block 227 KB): float32
    runs 32-token blocks in 1 stage."""
    T, Nq, D = q.shape
    NP, P, Nkv, Dk = k_cache.shape
    if Dk != D or v_cache.shape != k_cache.shape or out_init.shape != q.shape:
        raise ValueError(f"shape mismatch: q {q.shape}, k {k_cache.shape}, v {v_cache.shape}, "
                         f"out_init {out_init.shape}")
    if Nq % Nkv:
        raise ValueError(f"Nq={Nq} must be a multiple of Nkv={Nkv}")
    if tiles.ndim != 2 or tiles.shape[1] != 4:
        raise ValueError(f"tiles must be [num_tiles, 4] (row, t0, n, p0), got {tiles.shape}")
    G = Nq // Nkv
    if not _is_pow2(G):  # pad the group to a power of 2 (zero queries, outputs dropped)
        Gp = next_pow2(G)
        out = paged_prefill_attention(pad_group(q, Nkv, Gp), k_cache, v_cache, layer_page_offset, block_tables,
                                      tiles, pad_group(out_init, Nkv, Gp), scale=scale, tile_tokens=tile_tokens,
                                      pages_per_block=pages_per_block, num_warps=num_warps,
                                      num_stages=num_stages, flat_loads=flat_loads, interpret=interpret)
        return unpad_group(out, Nkv, G)
    wide = jnp.dtype(q.dtype).itemsize > 2
    ppb = pages_per_block or default_pages_per_block(P, 32 if wide else 64)
    num_stages = num_stages or (1 if wide else 2)
    if not interpret:
        for name, n in (("group", G), ("tile tokens", tile_tokens), ("head_dim", D),
                        ("block tokens", ppb * P), ("pages/block", ppb)):
            if not _is_pow2(n):
                raise ValueError(f"Triton lowering needs {name}={n} to be a power of 2")
        if D < 16 or ppb * P < 16:
            raise ValueError(f"tt.dot needs head_dim and block tokens >= 16: D={D}, {ppb}*{P}")

    S, MB = block_tables.shape
    MBp = -(-MB // ppb) * ppb
    bt = block_tables.astype(jnp.int32)
    if MBp != MB:
        bt = jnp.pad(bt, ((0, 0), (0, MBp - MB)))
    off = jnp.asarray(layer_page_offset, jnp.int32).reshape(1)
    NT = tiles.shape[0]
    precision = lax.Precision.HIGHEST if q.dtype == jnp.float32 else None
    kernel = functools.partial(_chunk_kernel, scale=float(scale), page_size=P, pages_per_block=ppb,
                               tile_tokens=tile_tokens, precision=precision, flat_loads=flat_loads)
    kw = {}
    if not interpret and plgpu is not None:
        kw["compiler_params"] = plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages)
    per_head = pl.BlockSpec((T, None, G, D), lambda h, i: (0, h, 0, 0))
    out = pl.pallas_call(
        kernel,
        grid=(Nkv, NT),  # program_id(0) runs fastest: a tile's kv heads side by side
        in_specs=[
            pl.BlockSpec((1,), lambda h, i: (0,)),
            pl.BlockSpec((None, 4), lambda h, i: (i, 0)),
            pl.BlockSpec((S, MBp), lambda h, i: (0, 0)),
            per_head,  # q
            per_head,  # out_init (aliased to the output)
            pl.BlockSpec((NP, P, None, D), lambda h, i: (0, 0, h, 0)),
            pl.BlockSpec((NP, P, None, D), lambda h, i: (0, 0, h, 0)),
        ],
        out_specs=per_head,
        out_shape=jax.ShapeDtypeStruct((T, Nkv, G, D), q.dtype),
        input_output_aliases={4: 0},
        interpret=interpret,
        name=f"paged_prefill_G{G}_BQ{tile_tokens}_P{P}_ppb{ppb}" + ("_flat" if flat_loads else ""),
        **kw,
    )(off, tiles.astype(jnp.int32), bt, q.reshape(T, Nkv, G, D), out_init.reshape(T, Nkv, G, D),
      k_cache, v_cache)
    return out.reshape(T, Nq, D)
