"""The decoder's math for Llama-3.x, Qwen2/2.5 and Qwen3: one `layer` function, walked in Python.

Weights are a plain pytree of per-layer dicts (models/modules.py declares them), so the layers
are a Python loop under `jit`: each projection is one GEMM reading its own array in place (a
`lax.scan` over weights stacked on a layer axis made XLA copy every layer's slice, several times
slower at decode sizes). `layer` is the only copy of a layer's computation; its callers differ in
how attention reaches the keys and values (`attend`) and how the FFN reaches its weights (`ffn`):
  - `paged_layers` (and `forward`, with the embedding and head): one replica's step over the
    paged KV cache. Inside the engine it runs under `jax.shard_map`, so arrays are that replica's
    shards (heads split over `tp` when the layout says so), the only cross-device traffic being a
    `psum` over tp after the attention output and FFN down projections and whatever the SiDP FFN
    strategy (sidp_jax/pool/ffn.py) does;
  - the per-replica WaS runner (sidp_jax/engine/replica_runner.py), one layer per jitted call;
  - `dense_forward`: plain causal attention over a token batch, no cache (the NNX module's call).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from sidp_jax.kernels.paged_attention import paged_attention_reference, write_kv
from sidp_jax.models.config import ModelConfig, rope_inv_freq
from sidp_jax.models.ffn import local_ffn
from sidp_jax.models.fp8 import amax_over, linear
from sidp_jax.models.registry import ffn_group


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


def _proj(x: jax.Array, w: dict, name: str, *, out_dtype=None, reduce_amax=None) -> jax.Array:
    """x through projection `name` of w: a GEMM in the compute dtype, or W8A8 where the weight is
    Quantized (models/fp8.py). reduce_amax: see fp8.quantize_tokens."""
    return linear(x, w[name], out_dtype=out_dtype, reduce_amax=reduce_amax)


def qkv_projection(cfg: ModelConfig, w: dict, x: jax.Array, cos, sin):
    """q [T, Nq, D], k, v [T, Nkv, D] (local heads), normed and rotated, from one fused GEMM."""
    qkv = _proj(x, w, "qkv")  # [T, Nkv, G + 2, D]
    if cfg.qkv_bias:
        qkv = qkv + w["qkv_bias"]
    T, nkv, g2, D = qkv.shape
    q, k, v = qkv[:, :, :g2 - 2].reshape(T, nkv * (g2 - 2), D), qkv[:, :, g2 - 2], qkv[:, :, g2 - 1]
    if cfg.qk_norm:
        q = rms_norm(q, w["q_norm"], cfg.rms_norm_eps)
        k = rms_norm(k, w["k_norm"], cfg.rms_norm_eps)
    return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v


def with_kv_scales(attend, k_scale: jax.Array, v_scale: jax.Array):
    """attend() with static KV scales [Nkv] (local kv heads): the cache holds k / k_scale and
    v / v_scale (an e4m3 cache then spans each head's range), and the scales are folded into the
    queries and the output, since q . (k / s) * s = q . k and p . (v / s) * s = p . v. So every
    attention kernel reads the cache unchanged; with a float cache the result is the same."""
    def attend_scaled(q, k, v, kv):
        per_q_head = lambda s: jnp.repeat(s, q.shape[1] // s.shape[0])[:, None]  # q head h = kv * G + g
        ks, vs = k_scale[:, None], v_scale[:, None]
        o, kv = attend((q * per_q_head(k_scale)).astype(q.dtype), (k / ks).astype(k.dtype), (v / vs).astype(v.dtype), kv)
        return (o * per_q_head(v_scale)).astype(o.dtype), kv
    return attend_scaled


def layer(cfg: ModelConfig, w: dict, h: jax.Array, kv, cos, sin, *, attend, ffn, tp_axis: str | None = None,
          active=None):
    """h + attention(norm(h)), then + ffn(norm(h)): one decoder layer for one replica.

    attend(q, k, v, kv) -> (o [T, Nq, D], kv): how attention reaches keys and values (paged cache,
    or none). ffn(x, active) -> [T, H]: this layer's FFN, its weights bound by the caller. active:
    None, or a traced bool; False skips this replica's attention (an idle replica in an SPMD step;
    the FFN decides for itself)."""
    def attention(h, kv):
        q, k, v = qkv_projection(cfg, w, rms_norm(h, w["attn_norm"], cfg.rms_norm_eps), cos, sin)
        o, kv = (with_kv_scales(attend, w["k_scale"], w["v_scale"]) if "k_scale" in w else attend)(q, k, v, kv)
        out = _proj(o, w, "o", out_dtype=jnp.float32, reduce_amax=amax_over((tp_axis,) if tp_axis else ()))
        if tp_axis is not None:
            out = jax.lax.psum(out, tp_axis)
        return out.astype(h.dtype), kv

    with jax.named_scope("attention"):  # names the ops in profiles; no effect on what runs
        if active is None:
            a, kv = attention(h, kv)
        else:
            a, kv = jax.lax.cond(active, attention, lambda h, kv: (jnp.zeros_like(h), kv), h, kv)
    h = h + a
    with jax.named_scope("ffn"):
        f = ffn(rms_norm(h, w["ffn_norm"], cfg.rms_norm_eps), active)
        if tp_axis is not None:
            f = jax.lax.psum(f, tp_axis)
    return h + f.astype(h.dtype), kv


def paged_attend(cfg: ModelConfig, layer_index, batch: dict, attn_fn):
    """attend() over the flat paged cache {"k", "v"} [L * pages, P, Nkv, D]: write this step's
    K/V at `slots` of the layer's pages, then attend over each token's sequence."""
    def attend(q, k, v, kv):
        offset = layer_index * (kv["k"].shape[0] // cfg.num_layers)
        k_cache = write_kv(kv["k"], k, offset, batch["slots"])
        v_cache = write_kv(kv["v"], v, offset, batch["slots"])
        o = attn_fn(q, k_cache, v_cache, offset, batch["block_tables"], batch["token_seq"], batch["positions"],
                    scale=cfg.head_dim ** -0.5)
        return o, {"k": k_cache, "v": v_cache}
    return attend


def rope_angles(cfg: ModelConfig, positions: jax.Array):
    angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(rope_inv_freq(cfg))
    return jnp.cos(angles), jnp.sin(angles)


def embed(cfg: ModelConfig, params: dict, batch: dict):
    """Token embeddings and the RoPE angles of this step's positions: (x [T, H], cos, sin)."""
    return (params["embed"][batch["tokens"]], *rope_angles(cfg, batch["positions"]))


def head_logits(cfg: ModelConfig, params: dict, x: jax.Array, batch: dict | None = None) -> jax.Array:
    """float32 logits [S, V] of the tokens each sequence row samples from (all tokens: batch None)."""
    x = x if batch is None else x[batch["sample_index"]]
    h = rms_norm(x, params["final_norm"], cfg.rms_norm_eps)
    head = params["embed"].T if cfg.tie_word_embeddings else params["lm_head"]
    return jnp.einsum("sh,hv->sv", h, head, preferred_element_type=jnp.float32)


def own_ffn(cfg: ModelConfig):
    """ffn(x, layer, w, active=None, split_axes=()): layer `layer`'s FFN group (models/registry.py
    ffn_group: dense, or the experts of a MoE layer) on weights where they are."""
    def ffn(x, layer, w, active=None, split_axes=()):
        return local_ffn(x, layer, w, active, split_axes, cfg=cfg, group=ffn_group(cfg, layer))
    return ffn


def paged_layers(cfg: ModelConfig, params: dict, x: jax.Array, cos, sin, kv: dict, batch: dict, *, ffn_for=None,
                 attn_fn=paged_attention_reference, tp_axis: str | None = None, skip_idle: bool = False):
    """Every layer of one replica's step over the paged KV cache: (x [T, H], kv).

    batch: positions [T], slots [T] (flat cache slot written by each token), token_seq [T],
    block_tables [S, MB], num_tokens [] (real tokens; 0 marks an idle replica). kv: {"k", "v"}
    each [L * pages, P, Nkv_local, D]. ffn_for(l) -> (ffn, weights): how layer l's FFN runs and
    the weights it is handed (default: the family's FFN on the layer's own group, own_ffn). skip_idle: an idle replica skips
    its own compute (only worth a `lax.cond` where several replicas share the program)."""
    active = batch["num_tokens"] > 0 if skip_idle else None
    for l, w in enumerate(params["layers"]):
        ffn, ffn_w = ffn_for(l) if ffn_for is not None else (own_ffn(cfg), w["ffn"])
        x, kv = layer(cfg, w, x, kv, cos, sin, attend=paged_attend(cfg, l, batch, attn_fn),
                      ffn=lambda x_, act, ffn=ffn, l=l, ffn_w=ffn_w: ffn(x_, l, ffn_w, act),
                      tp_axis=tp_axis, active=active)
    return x, kv


def forward(cfg: ModelConfig, params: dict, kv: dict, batch: dict, **layer_options):
    """One replica's step from token ids to logits: (logits [S, V] float32 of each row's sampled
    token, kv). batch: paged_layers' fields and tokens [T], sample_index [S]."""
    x, cos, sin = embed(cfg, params, batch)
    x, kv = paged_layers(cfg, params, x, cos, sin, kv, batch, **layer_options)
    return head_logits(cfg, params, x, batch), kv


def causal_attend(token_seq: jax.Array, positions: jax.Array, scale: float):
    """attend() without a cache: every token sees the earlier tokens of its own sequence."""
    def attend(q, k, v, kv):
        T, Nq, D = q.shape
        Nkv = k.shape[1]
        qg = q.reshape(T, Nkv, Nq // Nkv, D)
        s = jnp.einsum("tkgd,ckd->kgtc", qg, k, preferred_element_type=jnp.float32) * scale
        visible = (token_seq[:, None] == token_seq[None, :]) & (positions[None, :] <= positions[:, None])
        p = jax.nn.softmax(jnp.where(visible, s, -jnp.inf), axis=-1)
        o = jnp.einsum("kgtc,ckd->tkgd", p.astype(v.dtype), v, preferred_element_type=jnp.float32)
        return o.reshape(T, Nq, D).astype(q.dtype), kv
    return attend


def dense_forward(cfg: ModelConfig, params: dict, tokens: jax.Array, positions: jax.Array | None = None):
    """float32 logits [B, T, V] for token ids [B, T] ([T] -> [T, V]): causal, no KV cache."""
    squeeze = tokens.ndim == 1
    tokens = tokens[None] if squeeze else tokens
    B, T = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(T), (B, T)) if positions is None else positions.reshape(B, T)
    flat_pos = positions.reshape(-1)
    seq = jnp.repeat(jnp.arange(B), T)
    x = params["embed"][tokens.reshape(-1)]
    cos, sin = rope_angles(cfg, flat_pos)
    attend = causal_attend(seq, flat_pos, cfg.head_dim ** -0.5)
    for l, w in enumerate(params["layers"]):
        x, _ = layer(cfg, w, x, None, cos, sin, attend=attend,
                     ffn=lambda x_, act, w=w, l=l: own_ffn(cfg)(x_, l, w["ffn"]))
    logits = head_logits(cfg, params, x).reshape(B, T, -1)
    return logits[0] if squeeze else logits
