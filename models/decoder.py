"""One decoder for Llama-3.x, Qwen2/2.5 and Qwen3, over a paged KV cache.

`forward` is written for ONE replica's view of the data: inside the engine it runs under
`jax.shard_map`, so arrays are that replica's shards (heads split over `tp` when the layout
says so) and the only cross-device traffic is the explicit collectives: a `psum` over the
tensor-parallel axis after the attention output and FFN down projections, and whatever the
FFN strategy (`ffn_fn`) does to reach pooled weights (the SiDP modes live in sidp_jax/pool/).
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from sidp_jax.config import ModelConfig, rope_inv_freq
from sidp_jax.kernels.paged_attention import paged_attention_reference, write_kv

# ffn_fn(x [T, H], layer_index, ffn_layer_params, active) -> [T, H], partial over tp if tp-sharded.
FfnFn = Callable[[jax.Array, jax.Array, dict], jax.Array]


def rms_norm(x: jax.Array, w: jax.Array, eps: float) -> jax.Array:
    xf = x.astype(jnp.float32)
    xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return w * xf.astype(x.dtype)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate-half RoPE as in transformers; x [T, N, D], cos/sin [T, D/2] float32."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half].astype(jnp.float32), x[..., half:].astype(jnp.float32)
    c, s = cos[:, None, :], sin[:, None, :]
    return jnp.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], axis=-1).astype(x.dtype)


def dense_ffn(x: jax.Array, layer: jax.Array, w: dict, active=None) -> jax.Array:
    """SwiGLU with the layer's own (local) weights: gate_up [H, 2, I], down [I, H].

    active: this replica has tokens this step; when False the GEMMs are skipped (the paper's
    dummy skipping: an idle replica only takes part in the collectives)."""
    del layer

    def run():
        gu = jnp.einsum("th,hci->tci", x, w["gate_up"], preferred_element_type=jnp.float32)
        h = (jax.nn.silu(gu[:, 0]) * gu[:, 1]).astype(x.dtype)
        return jnp.einsum("ti,ih->th", h, w["down"], preferred_element_type=jnp.float32).astype(x.dtype)

    return run() if active is None else jax.lax.cond(active, run, lambda: jnp.zeros_like(x))


def attention_block(cfg, w, x, kv, layer, batch, cos, sin, attn_fn, tp_axis):
    dt = x.dtype
    q = jnp.einsum("th,hnd->tnd", x, w["q"], preferred_element_type=jnp.float32)
    k = jnp.einsum("th,hnd->tnd", x, w["k"], preferred_element_type=jnp.float32)
    v = jnp.einsum("th,hnd->tnd", x, w["v"], preferred_element_type=jnp.float32)
    if cfg.qkv_bias:
        q, k, v = q + w["q_bias"], k + w["k_bias"], v + w["v_bias"]
    q, k, v = q.astype(dt), k.astype(dt), v.astype(dt)
    if cfg.qk_norm:
        q = rms_norm(q, w["q_norm"], cfg.rms_norm_eps)
        k = rms_norm(k, w["k_norm"], cfg.rms_norm_eps)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    pages = kv["k"].shape[0] // cfg.num_layers
    offset = layer * pages
    k_cache = write_kv(kv["k"], k, offset, batch["slots"])
    v_cache = write_kv(kv["v"], v, offset, batch["slots"])
    o = attn_fn(q, k_cache, v_cache, offset, batch["block_tables"], batch["token_seq"], batch["positions"],
                scale=cfg.head_dim ** -0.5)
    out = jnp.einsum("tnd,ndh->th", o, w["o"], preferred_element_type=jnp.float32)
    if tp_axis is not None:
        out = jax.lax.psum(out, tp_axis)
    return out.astype(dt), {"k": k_cache, "v": v_cache}


def embed(cfg: ModelConfig, params: dict, batch: dict):
    """Token embeddings and the RoPE angles of this step's positions: (x [T, H], cos, sin)."""
    x = params["embed"][batch["tokens"]]
    inv_freq = jnp.asarray(rope_inv_freq(cfg))
    angles = batch["positions"].astype(jnp.float32)[:, None] * inv_freq[None, :]
    return x, jnp.cos(angles), jnp.sin(angles)


def attention_residual(cfg, w, h, kv, layer, batch, cos, sin, attn_fn, tp_axis, active):
    """h + attention(norm(h)), writing this step's K/V; an idle replica skips it all."""
    a, kv = jax.lax.cond(
        active, lambda: attention_block(cfg, w, rms_norm(h, w["attn_norm"], cfg.rms_norm_eps), kv, layer, batch,
                                        cos, sin, attn_fn, tp_axis),
        lambda: (jnp.zeros_like(h), kv))
    return h + a, kv


def ffn_input(cfg: ModelConfig, w: dict, h: jax.Array) -> jax.Array:
    return rms_norm(h, w["ffn_norm"], cfg.rms_norm_eps)


def head_logits(cfg: ModelConfig, params: dict, x: jax.Array, batch: dict) -> jax.Array:
    """float32 logits [S, V] of the tokens each sequence row samples from."""
    h = rms_norm(x[batch["sample_index"]], params["final_norm"], cfg.rms_norm_eps)
    head = params["embed"].T if cfg.tie_word_embeddings else params["lm_head"]
    return jnp.einsum("sh,hv->sv", h, head, preferred_element_type=jnp.float32)


def forward(
    cfg: ModelConfig,
    params: dict,
    kv: dict,
    batch: dict,
    *,
    ffn_fn: FfnFn = dense_ffn,
    attn_fn=paged_attention_reference,
    tp_axis: str | None = None,
    ffn_in_scan: bool = True,
    unroll: int | bool = 1,
):
    """Run one step for one replica.

    batch: tokens [T], positions [T], slots [T] (flat cache slot written by each token),
    token_seq [T], block_tables [S, MB], sample_index [S] (token whose logits row S samples),
    num_tokens [] (real tokens; 0 marks an idle replica, which skips its own compute).
    kv: {"k", "v"} each [L * pages, P, Nkv_local, D]. Returns (logits [S, V] float32, kv).
    ffn_in_scan: feed params["ffn"] to ffn_fn layer by layer (stacked per layer); otherwise
    ffn_fn gets None and reaches its weights itself (SiDP owner placement).
    """
    x, cos, sin = embed(cfg, params, batch)
    active = batch["num_tokens"] > 0

    def layer_step(carry, xs):
        h, kv = carry
        w, ffn_w, layer = xs
        h, kv = attention_residual(cfg, w, h, kv, layer, batch, cos, sin, attn_fn, tp_axis, active)
        f = ffn_fn(ffn_input(cfg, w, h), layer, ffn_w, active)
        if tp_axis is not None:
            f = jax.lax.psum(f, tp_axis)
        return (h + f, kv), None

    layers = jnp.arange(cfg.num_layers, dtype=jnp.int32)
    ffn_xs = params["ffn"] if ffn_in_scan else None
    (x, kv), _ = jax.lax.scan(layer_step, (x, kv), (params["layers"], ffn_xs, layers), unroll=unroll)
    return head_logits(cfg, params, x, batch), kv
