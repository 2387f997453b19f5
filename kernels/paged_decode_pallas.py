"""Paged DECODE attention as a Pallas (Triton-lowered) GPU kernel: one query token per sequence.

Same cache layout as `paged_attention.py` (the pure-JAX reference): `[L * num_pages, P, Nkv, D]`,
the layers' page pools end to end, layer l's page p at row `l * num_pages + p`; the layer is
selected by the traced scalar `layer_page_offset` (added to the block table's page ids inside the
kernel, so no slice or copy of the cache is made).

Grid: one program per (sequence, kv head), launched kv-head-fastest (grid (Nkv, S): the Nkv
programs of one sequence run side by side and read the same [P, Nkv, D] page rows together).
GQA: the program loads that kv head's K/V pages once and attends with the kv head's whole
query group (`G = Nq // Nkv` rows) at once, so the K/V bytes, which bound decode, are read
exactly once per kv head. Both matmuls are `tt.dot`s with the group as M: an M=8 dot compiles
and is exact on the GPU stack, so the 64/8 group runs bare (no padding).
A group smaller than `min_rows` (default 8, e.g. MHA's G=1) is zero-padded to `min_rows` rows
*inside* the kernel (in registers: broadcast + select + reshape; no extra HBM traffic, no extra
XLA op) and the padded rows are dropped again before the store. `min_rows=16` forces the
16-row padding of the classic Triton dot limit, which is slower at G=8
(benchmarks/attention_kernels.py, `pallas_r16`).

Per program: loop over the sequence's pages `pages_per_block` at a time (a dynamic trip count
`cdiv(length, pages_per_block * P)`: ragged lengths stop at their own length), gathering the
page id of each of the block's tokens from the block-table row (the next block's ids are loaded
one iteration ahead, in the loop carry, so the K/V gather does not wait on the table), loading
K/V as one masked 2-D gather of [block tokens, D] (`load_kv_tokens`), and an online softmax with
float32 logits, max, sum and accumulator. An FP8 (e4m3) cache is widened to q's dtype, and both
dots run in it. Tokens at or past `length` and pages past the sequence's last page are neither
read nor used (unused block-table entries may hold any value). No reshape stands between the
loads and the dots: gathering [pages, P, D] and reshaping it (`load_kv_block`, which the chunk
kernel still offers) is slower (benchmarks/RESULTS.md, "Paged decode attention kernel").
Rows with length 0 (padding rows) run no iteration and store zeros.

A group that is not a power of 2 (Qwen2.5-7B: 28 / 4 = 7, Qwen2.5-14B: 40 / 8 = 5) gets zero query
heads up to the next power of 2 before the call (`pad_group`: a pad of q, which is small, not of
the K/V), and the extra heads' outputs are dropped.

Constraints (GPU): D a power of 2, pages_per_block and
pages_per_block * P powers of 2 (block tokens >= 16 for the dot's K), D >= 16. `interpret=True`
runs anywhere (the CPU tests) with the same code path.

Timings against the reference and jax's own `pallas.ops.gpu.paged_attention`:
`benchmarks/attention_kernels.py` (`bash benchmarks/gpu_kernels.sh`), read in
benchmarks/RESULTS.md, "Paged decode attention kernel", which also covers the variants this kernel
does not keep: [pages, P, D] loads, FP8 blocks widened to float16, and probes without the QK
and/or PV dot. The launch order (kv head fastest) and the one-ahead block-table prefetch have no
measurement against their alternatives.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

try:  # the Triton GPU backend's compiler params; absent / unusable on a CPU-only build is fine
    from jax.experimental.pallas import triton as plgpu
except Exception:  # pragma: no cover
    plgpu = None

LOG2E = math.log2(math.e)
NEG_INIT = -1e30  # finite running-max start: exp2(NEG_INIT - m) underflows to 0, never NaN


def _is_pow2(n: int) -> bool:
    return n > 0 and (n & (n - 1)) == 0


def next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def pad_group(x: jax.Array, num_kv_heads: int, rows: int) -> jax.Array:
    """[T, Nkv * G, D] -> [T, Nkv * rows, D]: each kv head's query group zero-padded to `rows`
    heads (a group that is not a power of 2, e.g. Qwen2.5-7B's 28 / 4 = 7, runs as 8)."""
    T, Nq, D = x.shape
    G = Nq // num_kv_heads
    x4 = jnp.pad(x.reshape(T, num_kv_heads, G, D), ((0, 0), (0, 0), (0, rows - G), (0, 0)))
    return x4.reshape(T, num_kv_heads * rows, D)


def unpad_group(x: jax.Array, num_kv_heads: int, group: int) -> jax.Array:
    T, Nq, D = x.shape
    return x.reshape(T, num_kv_heads, Nq // num_kv_heads, D)[:, :, :group].reshape(T, num_kv_heads * group, D)


def _load(ref, mask=None, other=None):
    """Masked gather load; plain indexing where the masked form is unavailable."""
    if plgpu is not None and hasattr(plgpu, "load"):
        return plgpu.load(ref) if mask is None else plgpu.load(ref, mask=mask, other=other)
    if mask is None:  # pragma: no cover
        return ref[...]
    return jnp.where(mask, ref[...], other)  # pragma: no cover


def load_kv_block(k_ref, v_ref, page_ids, i, n_pages, length, offset, page_size: int, dtype=None):
    """K/V block i ([ppb * P, D] each, in `dtype`: an FP8 cache is widened to the queries')
    of one sequence, and its valid mask [ppb, P] (token < length).

    page_ids: the block's ppb layer-local ids from the block table. Pages past the sequence's end
    may hold any table value: a safe page is read there instead (the load is masked off anyway).
    Predicated loads stay: unpredicated ones with the stale rows selected away are slower
    (benchmarks/RESULTS.md, "Paged decode attention kernel")."""
    ppb, P, D = page_ids.shape[0], page_size, k_ref.shape[-1]
    page_pos = i * ppb + lax.broadcasted_iota(jnp.int32, (ppb,), 0)
    page_ids = jnp.where(page_pos < n_pages, page_ids, 0) + offset
    tok = (i * ppb * P
           + lax.broadcasted_iota(jnp.int32, (ppb, P), 0) * P
           + lax.broadcasted_iota(jnp.int32, (ppb, P), 1))
    valid = tok < length
    # All-array indexers [ppb, P, D] (what interpret mode can discharge; on Triton the same
    # pointer arithmetic as a page gather + slices: contiguous, vectorised along D).
    shape3 = (ppb, P, D)
    idx = (jnp.broadcast_to(page_ids[:, None, None], shape3),
           lax.broadcasted_iota(jnp.int32, shape3, 1),
           lax.broadcasted_iota(jnp.int32, shape3, 2))
    lmask = jnp.broadcast_to(valid[:, :, None], shape3)
    k = _load(k_ref.at[idx], lmask, 0.0).reshape(ppb * P, D)
    v = _load(v_ref.at[idx], lmask, 0.0).reshape(ppb * P, D)
    if dtype is not None and k.dtype != dtype:
        k, v = k.astype(dtype), v.astype(dtype)
    return k, v, valid


def load_kv_tokens(k_ref, v_ref, token_pages, i, n_pages, length, offset, page_size: int, dtype=None):
    """load_kv_block's [block_k, D] K/V made by one 2-D gather, with no reshape between the loads
    and the dots: token_pages [block_k] holds each token's layer-local page id (block i's tokens
    i * block_k + 0..block_k-1). Returns (k, v, valid [block_k])."""
    block_k, P, D = token_pages.shape[0], page_size, k_ref.shape[-1]
    tok = i * block_k + lax.broadcasted_iota(jnp.int32, (block_k,), 0)
    valid = tok < length
    pages = jnp.where(tok // P < n_pages, token_pages, 0) + offset  # past the end: the safe page
    shape2 = (block_k, D)
    idx = (jnp.broadcast_to(pages[:, None], shape2), jnp.broadcast_to((tok % P)[:, None], shape2),
           lax.broadcasted_iota(jnp.int32, shape2, 1))
    mask = jnp.broadcast_to(valid[:, None], shape2)
    k, v = _load(k_ref.at[idx], mask, 0.0), _load(v_ref.at[idx], mask, 0.0)
    if dtype is not None and k.dtype != dtype:
        k, v = k.astype(dtype), v.astype(dtype)
    return k, v, valid


def online_softmax_step(acc, m_prev, l_prev, logits, v, precision):
    """Fold one block of masked log2-unit logits [rows, block_k] and its V into (acc, max, sum)."""
    m_next = jnp.maximum(m_prev, logits.max(axis=-1))
    alpha = jnp.exp2(m_prev - m_next)
    p = jnp.exp2(logits - m_next[:, None])  # masked: exp2(-inf) = 0
    l_next = alpha * l_prev + p.sum(axis=-1)
    pv = lax.dot_general(p.astype(v.dtype), v, (((1,), (0,)), ((), ())), precision=precision,
                         preferred_element_type=jnp.float32)
    return alpha[:, None] * acc + pv, m_next, l_next


def _decode_kernel(off_ref, len_ref, bt_ref, q_ref, k_ref, v_ref, o_ref, *,
                   scale: float, page_size: int, pages_per_block: int, rows: int, precision):
    # Grid (Nkv, S): program_id(1) is the sequence. off_ref [1]; len_ref [S]; bt_ref [MBp] (this
    # sequence's row); q_ref/o_ref [G, D]; k_ref/v_ref [L*num_pages, P, D] (this kv head, squeezed).
    s = pl.program_id(1)
    length = len_ref[s]
    offset = off_ref[0]
    G, D = q_ref.shape
    P, ppb = page_size, pages_per_block
    block_k = ppb * P
    reps = rows // G

    q = q_ref[...]
    if reps > 1:  # pad the group to `rows` rows with zeros, in registers
        q3 = jnp.broadcast_to(q[None], (reps, G, D))
        first = lax.broadcasted_iota(jnp.int32, (reps, G, D), 0) == 0
        q = jnp.where(first, q3, jnp.zeros_like(q3)).reshape(rows, D)

    n_pages = pl.cdiv(length, P)
    n_blocks = pl.cdiv(length, block_k)
    qk_scale = scale * LOG2E  # logits in log2 units: exp2 instead of exp

    last_block = jnp.maximum(n_blocks - 1, 0)

    def table_block(i):  # block i's page ids, one per token: a gather from the row, clamped to the
        # last block and into the row (always in bounds)
        pos = jnp.minimum(i, last_block) * ppb + lax.broadcasted_iota(jnp.int32, (block_k,), 0) // P
        return _load(bt_ref.at[jnp.minimum(pos, bt_ref.shape[0] - 1)])

    def body(i, carry):
        acc, m_prev, l_prev, ids = carry
        page_ids, ids = ids, table_block(i + 1)  # this block's ids came with the carry; fetch the next's
        # an FP8 cache's blocks widen to the queries' dtype: both dots run in it
        k, v, valid = load_kv_tokens(k_ref, v_ref, page_ids, i, n_pages, length, offset, P, q.dtype)
        logits = lax.dot_general(q, k, (((1,), (1,)), ((), ())), precision=precision,
                                 preferred_element_type=jnp.float32) * qk_scale  # [rows, block_k]
        valid_k = jnp.broadcast_to(valid.reshape(1, block_k), (rows, block_k))
        logits = jnp.where(valid_k, logits, -jnp.inf)
        return (*online_softmax_step(acc, m_prev, l_prev, logits, v, precision), ids)

    acc = jnp.zeros((rows, D), jnp.float32)
    m = jnp.full((rows,), NEG_INIT, jnp.float32)
    l = jnp.zeros((rows,), jnp.float32)
    acc, m, l, _ = lax.fori_loop(0, n_blocks, body, (acc, m, l, table_block(0)))

    l = jnp.where(l > 0, l, 1.0)  # length 0: acc is 0, store zeros (not 0/0)
    out = acc / l[:, None]
    if reps > 1:  # drop the padded rows: keep copy 0 of the [reps, G, D] stack
        out3 = out.reshape(reps, G, D)
        first = lax.broadcasted_iota(jnp.int32, (reps, G, D), 0) == 0
        out = jnp.sum(jnp.where(first, out3, 0.0), axis=0)
    o_ref[...] = out.astype(o_ref.dtype)


def default_pages_per_block(page_size: int, block_tokens: int = 64) -> int:
    return max(1, block_tokens // page_size)


@functools.partial(
    jax.jit,
    static_argnames=("scale", "pages_per_block", "min_rows", "num_warps", "num_stages", "interpret"),
)
def paged_decode_attention(
    q: jax.Array,  # [S, Nq, D]
    k_cache: jax.Array,  # [L * num_pages, P, Nkv, D]
    v_cache: jax.Array,
    layer_page_offset: jax.Array,  # int32 scalar (traced): layer * num_pages
    block_tables: jax.Array,  # [S, MB] int32, layer-local page ids
    lengths: jax.Array,  # [S] int32 valid cached tokens; 0 = padding row (returns zeros)
    *,
    scale: float,
    pages_per_block: int | None = None,
    min_rows: int = 8,
    num_warps: int = 2,
    num_stages: int | None = None,
    interpret: bool = False,
) -> jax.Array:
    """Decode attention of q (one token per sequence row) over its paged K/V. Returns [S, Nq, D].

    Row s attends to cache positions 0..lengths[s]-1 (its own K/V already written), i.e. the
    reference with token_seq = arange(S), positions = lengths - 1.
    pages_per_block: pages per inner-loop step (default: 64 tokens' worth, 64 // P).
    min_rows: the query group is zero-padded in-kernel to at least this many rows; 0/1 disables
    padding. num_warps / num_stages: Triton launch parameters (defaults from the launch sweep,
    benchmarks/RESULTS.md, "Paged decode attention kernel"; stages: 4 for 2-byte inputs, 2 for
    float32, whose 4 stages of 64-token D=128 K/V blocks would need 260 KB of shared memory, more
    than the 227 KB a Hopper GPU gives a block).
    """
    S, Nq, D = q.shape
    NP, P, Nkv, Dk = k_cache.shape
    if Dk != D or v_cache.shape != k_cache.shape:
        raise ValueError(f"shape mismatch: q {q.shape}, k {k_cache.shape}, v {v_cache.shape}")
    if Nq % Nkv:
        raise ValueError(f"Nq={Nq} must be a multiple of Nkv={Nkv}")
    G = Nq // Nkv
    if not _is_pow2(G):  # pad the group to a power of 2 (zero queries, outputs dropped)
        out = paged_decode_attention(pad_group(q, Nkv, next_pow2(G)), k_cache, v_cache, layer_page_offset,
                                     block_tables, lengths, scale=scale, pages_per_block=pages_per_block,
                                     min_rows=min_rows, num_warps=num_warps, num_stages=num_stages,
                                     interpret=interpret)
        return unpad_group(out, Nkv, G)
    ppb = pages_per_block or default_pages_per_block(P)
    num_stages = num_stages or (4 if jnp.dtype(q.dtype).itemsize <= 2 else 2)
    rows = G
    if min_rows and G < min_rows:
        if not (_is_pow2(G) and _is_pow2(min_rows)):
            raise ValueError(f"padding the group needs powers of 2: G={G}, min_rows={min_rows}")
        rows = min_rows
    if not interpret:
        for name, n in (("group rows", rows), ("head_dim", D), ("block tokens", ppb * P), ("pages/block", ppb)):
            if not _is_pow2(n):
                raise ValueError(f"Triton lowering needs {name}={n} to be a power of 2")
        if D < 16 or ppb * P < 16:
            raise ValueError(f"tt.dot needs head_dim and block tokens >= 16: D={D}, {ppb}*{P}")

    MB = block_tables.shape[1]
    MBp = -(-MB // ppb) * ppb
    bt = block_tables.astype(jnp.int32)
    if MBp != MB:  # whole blocks of table entries (the extra ones are never used)
        bt = jnp.pad(bt, ((0, 0), (0, MBp - MB)))
    off = jnp.asarray(layer_page_offset, jnp.int32).reshape(1)
    lengths = lengths.astype(jnp.int32)
    q4 = q.reshape(S, Nkv, G, D)
    precision = lax.Precision.HIGHEST if q.dtype == jnp.float32 else None

    kernel = functools.partial(_decode_kernel, scale=float(scale), page_size=P, pages_per_block=ppb,
                               rows=rows, precision=precision)
    kw = {}
    if not interpret and plgpu is not None:
        kw["compiler_params"] = plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages)
    out = pl.pallas_call(
        kernel,
        grid=(Nkv, S),  # Triton launches program_id(0) fastest: a sequence's kv heads side by side
        in_specs=[
            pl.BlockSpec((1,), lambda h, s: (0,)),  # layer page offset
            pl.BlockSpec((S,), lambda h, s: (0,)),  # lengths (read lengths[s])
            pl.BlockSpec((None, MBp), lambda h, s: (s, 0)),  # block-table row
            pl.BlockSpec((None, None, G, D), lambda h, s: (s, h, 0, 0)),  # q group
            pl.BlockSpec((NP, P, None, D), lambda h, s: (0, 0, h, 0)),  # K, kv head h
            pl.BlockSpec((NP, P, None, D), lambda h, s: (0, 0, h, 0)),  # V, kv head h
        ],
        out_specs=pl.BlockSpec((None, None, G, D), lambda h, s: (s, h, 0, 0)),
        out_shape=jax.ShapeDtypeStruct((S, Nkv, G, D), q.dtype),
        interpret=interpret,
        name=f"paged_decode_G{G}_r{rows}_P{P}_ppb{ppb}_flat",
        **kw,
    )(off, lengths, bt, q4, k_cache, v_cache)
    return out.reshape(S, Nq, D)
