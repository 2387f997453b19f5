"""The decoder as Flax NNX modules: every tensor declared once, in `DecoderLayer`.

Each `nnx.Param` carries, as variable metadata, its logical axes (which a layout's rules turn
into a sharding), its initializer and its Hugging Face source (names and converter). The model is
that layer times L, beside the embeddings, final norm and LM head.

The engine never calls these modules on its hot path: it takes their abstract state once
(`model_specs`: nnx.eval_shape + nnx.split), places the leaves (random, safetensors or orbax) as a
plain pytree `{"embed", "final_norm", "lm_head"?, "layers": [per-layer dict] * L}` and jits its
step over that, so the module system costs nothing per step. A JAX user can instead take the
module itself (`sidp_jax.loading.checkpoint.from_pretrained`) and call it on token ids for scoring or evaluation: the same
`models.decoder.layer` runs, with dense causal attention and no paged cache.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from flax import nnx

from sidp_jax.models import decoder
from sidp_jax.models.config import ModelConfig
from sidp_jax.models.fp8 import fp8_specs
from sidp_jax.models.params import Convert, ParamSpec, declare
from sidp_jax.models.registry import ffn_group

_LAYER = "model.layers.{l}"


class DecoderLayer(nnx.Module):
    """One decoder layer's weights: attention as the family declares it (q, k, v fused into one
    GEMM at load time; optional qkv bias, per-head q/k norms, static FP8 KV scales), the two
    RMSNorms, and the layer's FFN group under `ffn` (models/ffn.py: dense, or a MoE layer's experts)."""

    def __init__(self, cfg: ModelConfig, index: int, *, dtype=jnp.float32, rngs: nnx.Rngs):
        H, D = cfg.hidden_size, cfg.head_dim
        Nq, Nkv = cfg.num_heads, cfg.num_kv_heads
        G = Nq // Nkv  # query heads per kv head: q head h = kv * G + g, as transformers' repeat_kv
        p = functools.partial(declare, rngs, dtype)
        attn = lambda name: f"{_LAYER}.self_attn.{name}"
        self.attn_norm = p((H,), ("embed",), "ones", [f"{_LAYER}.input_layernorm.weight"], [(H,)])
        # [H, Nkv, G + 2, D]: per kv head its G query heads, then k, then v; splits over tp by kv head.
        self.qkv = p((H, Nkv, G + 2, D), ("embed", "kv_heads", None, "head_dim"), "normal",
                     [attn("q_proj.weight"), attn("k_proj.weight"), attn("v_proj.weight")],
                     [(Nq * D, H), (Nkv * D, H), (Nkv * D, H)], Convert("qkv", (Nkv, G, D)))
        if cfg.qkv_bias:
            self.qkv_bias = p((Nkv, G + 2, D), ("kv_heads", None, "head_dim"), "zeros",
                              [attn("q_proj.bias"), attn("k_proj.bias"), attn("v_proj.bias")],
                              [(Nq * D,), (Nkv * D,), (Nkv * D,)], Convert("qkv_bias", (Nkv, G, D)))
        if cfg.qk_norm:
            self.q_norm = p((D,), ("head_dim",), "ones", [attn("q_norm.weight")], [(D,)])
            self.k_norm = p((D,), ("head_dim",), "ones", [attn("k_norm.weight")], [(D,)])
        if cfg.kv_cache_scales:  # static FP8 KV scales (compressed-tensors kv_cache_scheme), per kv head
            shape = [()] if cfg.kv_cache_scales == "tensor" else [(Nkv,)]
            scale = lambda name: p((Nkv,), ("kv_heads",), "ones", [attn(name)], shape, Convert("per_kv_head", (Nkv,)),
                                   stored_dtype="float32")
            self.k_scale, self.v_scale = scale("k_scale"), scale("v_scale")
        self.o = p((Nq, D, H), ("q_heads", "head_dim", "embed"), "normal", [attn("o_proj.weight")], [(H, Nq * D)],
                   Convert("o", (Nq, D)))
        self.ffn_norm = p((H,), ("embed",), "ones", [f"{_LAYER}.post_attention_layernorm.weight"], [(H,)])
        self.ffn = ffn_group(cfg, index)(cfg, dtype=dtype, rngs=rngs)


class Decoder(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
        H, V = cfg.hidden_size, cfg.vocab_size
        self.cfg = cfg
        p = functools.partial(declare, rngs, dtype)
        self.embed = p((V, H), ("vocab", "embed"), "normal", ["model.embed_tokens.weight"], [(V, H)])
        self.layers = nnx.List([DecoderLayer(cfg, l, dtype=dtype, rngs=rngs) for l in range(cfg.num_layers)])
        self.final_norm = p((H,), ("embed",), "ones", ["model.norm.weight"], [(H,)])
        if not cfg.tie_word_embeddings:
            self.lm_head = p((H, V), ("embed", "vocab"), "normal", ["lm_head.weight"], [(V, H)], Convert("T"))

    def __call__(self, tokens: jax.Array, positions: jax.Array | None = None) -> jax.Array:
        """float32 logits [B, T, V] of token ids [B, T] (or [T] -> [T, V]), causal, no KV cache."""
        return decoder.dense_forward(self.cfg, params_of(self), tokens, positions)


def params_of(model: Decoder) -> dict:
    """The module's weights as the engine's plain pytree (layers as a list)."""
    state = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    state["layers"] = [state["layers"][i] for i in range(len(state["layers"]))]
    return state


def module_from_params(cfg: ModelConfig, params: dict) -> Decoder:
    graphdef, state = nnx.split(abstract_model(cfg, jax.tree.leaves(params)[0].dtype))
    pure = dict(params, layers={i: w for i, w in enumerate(params["layers"])})
    nnx.replace_by_pure_dict(state, pure)
    return nnx.merge(graphdef, state)


def abstract_model(cfg: ModelConfig, dtype=jnp.float32) -> Decoder:
    return nnx.eval_shape(lambda: Decoder(cfg, dtype=dtype, rngs=nnx.Rngs(0)))


@functools.lru_cache(maxsize=32)
def model_specs(cfg: ModelConfig) -> dict:
    """The engine's weight pytree as ParamSpecs, read from the modules' variable metadata (an
    FP8 model: its projections stored as models/fp8.py says)."""
    _, state = nnx.split(abstract_model(dataclasses.replace(cfg, quantization=None)))
    specs: dict = {"layers": [{} for _ in range(cfg.num_layers)]}
    for path, var in jax.tree_util.tree_leaves_with_path(state, is_leaf=lambda x: isinstance(x, nnx.Variable)):
        keys = [str(getattr(k, "key", k)) for k in path]
        meta = var.get_metadata()
        layer = int(keys[1]) if keys[0] == "layers" else None
        leaf = ParamSpec(tuple(var.shape), meta["logical_axes"], meta["init"], meta["hf"], meta["hf_shapes"],
                         meta["convert"], layer=layer, name=keys[-1], dtype=meta.get("stored_dtype"))
        node = specs["layers"][layer] if layer is not None else specs
        for key in keys[2 if layer is not None else 0:-1]:  # a group (the FFN): a nested dict
            node = node.setdefault(key, {})
        node[keys[-1]] = leaf
    if cfg.quantization == "fp8" and cfg.moe_layers:
        raise ValueError("FP8 is not supported for mixture-of-experts models yet: run them in bf16")
    if cfg.quantization == "fp8":
        specs["layers"] = [fp8_specs(w) for w in specs["layers"]]
    elif cfg.quantization is not None:
        raise ValueError(f"quantization {cfg.quantization!r} is not supported (fp8 or none)")
    return specs
