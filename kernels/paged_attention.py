"""Attention over the paged KV cache for a flat ragged batch: the pure-JAX reference.

Cache layout (per replica): `[num_layers * num_pages, page_size, num_kv_heads, head_dim]`, i.e.
the layers' page pools laid end to end, so one layer's pages are addressed as
`layer * num_pages + page` without slicing the cache. Page 0 of every layer is a scratch page
that padding tokens write to and nobody reads for real.

Each token of the flat batch belongs to one sequence row (`token_seq`) and sees that row's
cache positions `0..position` (its own K/V were written before this call), which covers
decode tokens, prefill chunks and chunks continuing an earlier prefix alike.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from sidp_jax.models.fp8 import E4M3, E4M3_MAX


def write_kv(cache: jax.Array, new: jax.Array, layer_offset: jax.Array, slots: jax.Array) -> jax.Array:
    """cache[layer_offset*P + slot] = new; slots are flat `page * page_size + offset` indices.
    An e4m3 cache (kv_cache_dtype="fp8"; new is already divided by any KV scale) saturates at
    +-448 instead of turning into NaN."""
    pages_times_p = cache.shape[0] * cache.shape[1]
    flat = cache.reshape(pages_times_p, *cache.shape[2:])
    if cache.dtype == E4M3:
        new = jnp.clip(new.astype(jnp.float32), -E4M3_MAX, E4M3_MAX)
    flat = flat.at[layer_offset * cache.shape[1] + slots].set(new.astype(cache.dtype))
    return flat.reshape(cache.shape)


def paged_attention_reference(
    q: jax.Array,  # [T, Nq, D]
    k_cache: jax.Array,  # [L * pages, P, Nkv, D]
    v_cache: jax.Array,
    layer_page_offset: jax.Array,  # scalar: layer * pages
    block_tables: jax.Array,  # [S, MB] page ids per sequence row
    token_seq: jax.Array,  # [T] sequence row of each token
    positions: jax.Array,  # [T]
    *,
    scale: float,
    chunk: int = 128,
) -> jax.Array:
    T, Nq, D = q.shape
    Nkv = k_cache.shape[2]
    P = k_cache.shape[1]
    MB = block_tables.shape[1]

    def one_chunk(args):
        qc, seq, pos = args  # [t, Nq, D], [t], [t]
        pages = block_tables[seq] + layer_page_offset  # [t, MB]
        k = k_cache[pages].reshape(-1, MB * P, Nkv, D).astype(q.dtype)  # an FP8 cache widens here
        v = v_cache[pages].reshape(-1, MB * P, Nkv, D).astype(q.dtype)
        qg = qc.reshape(-1, Nkv, Nq // Nkv, D)
        s = jnp.einsum("tkgd,tckd->tkgc", qg, k, preferred_element_type=jnp.float32) * scale
        visible = jnp.arange(MB * P)[None, :] <= pos[:, None]
        s = jnp.where(visible[:, None, None, :], s, -jnp.inf)
        p = jax.nn.softmax(s, axis=-1)
        o = jnp.einsum("tkgc,tckd->tkgd", p.astype(v.dtype), v, preferred_element_type=jnp.float32)
        return o.reshape(-1, Nq, D).astype(q.dtype)

    if T <= chunk:
        return one_chunk((q, token_seq, positions))
    # Bound the gathered K/V to `chunk` tokens at a time: pad T up, loop over chunks.
    n = -(-T // chunk)
    pad = lambda a: jnp.pad(a, [(0, n * chunk - T)] + [(0, 0)] * (a.ndim - 1)).reshape(n, chunk, *a.shape[1:])
    out = jax.lax.map(one_chunk, (pad(q), pad(token_seq), pad(positions)))
    return out.reshape(n * chunk, Nq, D)[:T]
