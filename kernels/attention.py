"""Which attention a step runs: the Pallas kernels on GPU, the pure-JAX reference elsewhere.

Decode-only steps run the decode kernel alone. Mixed steps (prefill chunks beside decode tokens)
run the decode kernel over the leading one-token rows and the chunk kernel
(paged_prefill_pallas.py) over the tiles of every other chunk (`mixed_attention`).

`decode_attention` has the decoder's `attn_fn` signature (models/decoder.py) and is only valid for
a batch built as a decode-only step (sidp_jax/engine/step_inputs.py): one token per sequence row, token i in
row i (S == T), so the block tables are already aligned to the tokens and `token_seq` is not needed.
Padding tokens sit at position 0 of a padding row whose block-table row is all zeros: they attend
to one token of the scratch page 0 (finite: zeros or padding writes) and their output is never
used; real tokens' outputs are exact.
"""

from __future__ import annotations

import jax.numpy as jnp

from sidp_jax.kernels.paged_decode_pallas import default_pages_per_block, paged_decode_attention
from sidp_jax.kernels.paged_prefill_pallas import DEFAULT_TILE_TOKENS, paged_prefill_attention


def _is_pow2(n: int) -> bool:
    return n > 0 and (n & (n - 1)) == 0


def kernel_unsupported_reason(cfg, layout, page_size: int) -> str | None:
    """Why the kernels' GPU constraints fail for this model, layout (tp-local heads) and page size;
    None when they hold."""
    if cfg.num_heads % layout.tp or cfg.num_kv_heads % layout.tp or cfg.num_heads % cfg.num_kv_heads:
        return f"{cfg.num_heads} query / {cfg.num_kv_heads} kv heads do not split evenly over tp={layout.tp}"
    ppb = default_pages_per_block(page_size)  # a query group of any size is padded to a power of 2
    if not (_is_pow2(cfg.head_dim) and cfg.head_dim >= 16):
        return f"head_dim {cfg.head_dim} is not a power of 2 of at least 16"
    if not (_is_pow2(ppb) and _is_pow2(ppb * page_size) and ppb * page_size >= 16):
        return f"page size {page_size} gives {ppb} pages of {page_size} tokens per block, not powers of 2 >= 16"
    return None


def decode_attention(q, k_cache, v_cache, offset, block_tables, token_seq, positions, *, scale: float,
                     interpret: bool = False):
    """attn_fn for decode-only steps: q [T, Nq, D] with token i in row i of block_tables [T, MB]."""
    del token_seq  # == arange(T) in a decode-only step
    if block_tables.shape[0] != q.shape[0]:
        raise ValueError(f"decode-only step needs one row per token: {block_tables.shape[0]} rows, "
                         f"{q.shape[0]} tokens")
    return paged_decode_attention(q, k_cache, v_cache, offset, block_tables, positions + 1, scale=scale,
                                  interpret=interpret)


def mixed_attention(q, k_cache, v_cache, offset, block_tables, token_seq, positions, *, decode_len, tiles,
                    scale: float, tile_tokens: int = DEFAULT_TILE_TOKENS, interpret: bool = False):
    """attn_fn for mixed steps laid out by sidp_jax.engine.step_inputs with `tile_tokens` (decode_len, tiles).

    Rows with decode_len > 0 have their one token at the row's own index: the decode kernel fills
    those tokens (and zeros for the rest of the first min(S, T) tokens); the chunk kernel then
    writes every tiled token over that. Padding tokens stay zero."""
    del token_seq, positions  # the tiles and decode_len carry what the kernels need
    T = q.shape[0]
    rows = min(block_tables.shape[0], T)
    dec = paged_decode_attention(q[:rows], k_cache, v_cache, offset, block_tables[:rows], decode_len[:rows],
                                 scale=scale, interpret=interpret)
    init = jnp.concatenate([dec, jnp.zeros((T - rows, *q.shape[1:]), q.dtype)]) if rows < T else dec
    return paged_prefill_attention(q, k_cache, v_cache, offset, block_tables, tiles, init, scale=scale,
                                   tile_tokens=tile_tokens, interpret=interpret)
