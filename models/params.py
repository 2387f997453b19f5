"""Every parameter of the decoder declared once: shape, logical axes, initializer.

Abstract shapes, shardings (through a layout's logical-axis rules) and random init all derive
from `param_specs`. Layer weights are stacked on a leading `layers` axis; the FFN weights form
their own subtree (`params["ffn"]`) so that a layout can pool them across the data-parallel
group without touching the rest.
"""

from __future__ import annotations

import dataclasses
import math
import jax
import jax.numpy as jnp

from sidp_jax.config import ModelConfig


@dataclasses.dataclass(frozen=True)
class ParamSpec:
    shape: tuple[int, ...]
    axes: tuple[str | None, ...]  # logical axis names, one per dim
    init: str  # "normal" | "ones" | "zeros"

    def __post_init__(self):
        assert len(self.shape) == len(self.axes), (self.shape, self.axes)


def param_specs(cfg: ModelConfig) -> dict:
    """Nested dict of ParamSpec mirroring the params pytree."""
    L, H, I = cfg.num_layers, cfg.hidden_size, cfg.intermediate_size
    Nq, Nkv, D, V = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.vocab_size
    attn = {
        "attn_norm": ParamSpec((L, H), ("layers", "embed"), "ones"),
        "q": ParamSpec((L, H, Nq, D), ("layers", "embed", "q_heads", "head_dim"), "normal"),
        "k": ParamSpec((L, H, Nkv, D), ("layers", "embed", "kv_heads", "head_dim"), "normal"),
        "v": ParamSpec((L, H, Nkv, D), ("layers", "embed", "kv_heads", "head_dim"), "normal"),
        "o": ParamSpec((L, Nq, D, H), ("layers", "q_heads", "head_dim", "embed"), "normal"),
        "ffn_norm": ParamSpec((L, H), ("layers", "embed"), "ones"),
    }
    if cfg.qkv_bias:
        attn["q_bias"] = ParamSpec((L, Nq, D), ("layers", "q_heads", "head_dim"), "zeros")
        attn["k_bias"] = ParamSpec((L, Nkv, D), ("layers", "kv_heads", "head_dim"), "zeros")
        attn["v_bias"] = ParamSpec((L, Nkv, D), ("layers", "kv_heads", "head_dim"), "zeros")
    if cfg.qk_norm:
        attn["q_norm"] = ParamSpec((L, D), ("layers", "head_dim"), "ones")
        attn["k_norm"] = ParamSpec((L, D), ("layers", "head_dim"), "ones")
    specs = {
        "embed": ParamSpec((V, H), ("vocab", "embed"), "normal"),
        "layers": attn,
        # gate and up fused on one axis: one tensor (one transfer) per layer instead of two.
        "ffn": {
            "gate_up": ParamSpec((L, H, 2, I), ("ffn_layers", "embed", None, "ffn"), "normal"),
            "down": ParamSpec((L, I, H), ("ffn_layers", "ffn", "embed"), "normal"),
        },
        "final_norm": ParamSpec((H,), ("embed",), "ones"),
    }
    if not cfg.tie_word_embeddings:
        specs["lm_head"] = ParamSpec((H, V), ("embed", "vocab"), "normal")
    return specs


def is_spec(x) -> bool:
    return isinstance(x, ParamSpec)


def _fan_in(spec: ParamSpec) -> int:
    """Input width: the hidden size, or for projections back into it (o, down) the dims in between."""
    if spec.axes[-1] == "embed" and spec.axes[0] != "vocab":
        return math.prod(spec.shape[1:-1])
    return spec.shape[spec.axes.index("embed")]


def init_params(specs: dict, key: jax.Array, dtype, shardings=None, ffn_order=None) -> dict:
    """Random weights (benchmark presets, tests) for a ParamSpec tree, made in their target shardings.

    Stacked FFN rows are drawn per model layer (`ffn_order`: stored row -> layer, -1 padding),
    so a layout that stores layers in another order still holds the very same model.
    """
    flat, treedef = jax.tree_util.tree_flatten_with_path(specs, is_leaf=is_spec)
    keys = list(jax.random.split(key, len(flat)))
    out_shardings = [None] * len(flat) if shardings is None else jax.tree.leaves(shardings)

    def make(spec: ParamSpec, k, order) -> jax.Array:
        if spec.init == "ones":
            return jnp.ones(spec.shape, dtype)
        if spec.init == "zeros":
            return jnp.zeros(spec.shape, dtype)
        scale = _fan_in(spec) ** -0.5  # keeps activations O(1): tiny random models get non-flat logits
        if order is None:
            return (scale * jax.random.normal(k, spec.shape, jnp.float32)).astype(dtype)
        row = lambda layer: scale * jax.random.normal(jax.random.fold_in(k, layer), spec.shape[1:], jnp.float32)
        rows = jax.vmap(row)(jnp.maximum(order, 0))
        mask = (order >= 0).reshape(-1, *[1] * (len(spec.shape) - 1))
        return jnp.where(mask, rows, 0).astype(dtype)

    arrays = []
    for (path, spec), k, sh in zip(flat, keys, out_shardings):
        order = None
        if path[0].key == "ffn":
            order = jnp.asarray(ffn_order if ffn_order is not None else range(spec.shape[0]), jnp.int32)
        arrays.append(jax.jit(make, static_argnums=0, out_shardings=sh)(spec, k, order))
    return jax.tree.unflatten(treedef, arrays)
