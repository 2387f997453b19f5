"""A model's weight bytes by where the layouts put them, and the KV capacity left beside them.

`weight_bytes` splits the model into what every GPU of a replica holds whole (embeddings, LM head,
norms), what tensor parallelism splits (attention projections) and the FFN groups that SiDP pools
(their bytes come from each layer's FFN group, models/ffn.py). Each layout
(sidp_jax/parallel/layouts.py) adds these parts up its own way.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from sidp_jax.models.config import ModelConfig
from sidp_jax.models.registry import ffn_group


def projection_item(cfg: ModelConfig, dtype) -> int:
    """Bytes per element of the projections (qkv, o and the FFN's): 1 in FP8."""
    return 1 if cfg.quantization == "fp8" else jnp.dtype(dtype).itemsize


def ffn_layer_bytes(cfg: ModelConfig, dtype=jnp.bfloat16, layer: int | None = None) -> int:
    """Layer `layer`'s FFN group (FP8: its values and scales); None: the largest layer's."""
    item = projection_item(cfg, dtype)
    layers = range(cfg.num_layers) if layer is None else (layer,)
    return max(ffn_group(cfg, l).bytes_per_layer(cfg, item) for l in layers)


@dataclasses.dataclass(frozen=True)
class WeightBytes:
    replicated: int  # embeddings, LM head, norms: whole on every GPU
    attention: int  # every layer's attention projections, biases and FP8 scales: what tp splits
    ffn_layer: int  # the largest layer's FFN group: what tp splits and SiDP pools (and buffers)
    ffn: int  # every layer's FFN groups (a MoE model's dense and expert layers differ)

    @property
    def total(self) -> int:
        return self.replicated + self.attention + self.ffn


def weight_bytes(cfg: ModelConfig, dtype=jnp.bfloat16) -> WeightBytes:
    item, proj = jnp.dtype(dtype).itemsize, projection_item(cfg, dtype)
    H, D, L = cfg.hidden_size, cfg.head_dim, cfg.num_layers
    qkv_out = (cfg.num_heads + 2 * cfg.num_kv_heads) * D
    emb = cfg.vocab_size * H * item * (1 if cfg.tie_word_embeddings else 2)
    norms = (2 * H * L + H + (2 * D * L if cfg.qk_norm else 0)) * item
    per_layer = (H * qkv_out + cfg.num_heads * D * H) * proj + (qkv_out * item if cfg.qkv_bias else 0)
    if cfg.quantization == "fp8":
        per_layer += 4 * (qkv_out + H)  # float32 scales per output channel of qkv and o
    ffn = sum(ffn_layer_bytes(cfg, dtype, l) for l in range(L))
    return WeightBytes(emb + norms, per_layer * L, ffn_layer_bytes(cfg, dtype), ffn)
