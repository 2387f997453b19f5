"""The model families the engine runs, by Hugging Face architecture. Adding a family: a module
under models/families/ and a line here."""

from __future__ import annotations

from sidp_jax.models.families import llama, qwen2, qwen3, qwen3_moe
from sidp_jax.models.family import Family

FAMILIES: tuple[Family, ...] = (
    llama.FAMILY,
    qwen2.FAMILY,
    qwen3.FAMILY,
    qwen3_moe.FAMILY,
)

BY_ARCHITECTURE: dict[str, Family] = {arch: f for f in FAMILIES for arch in f.architectures}
BY_NAME: dict[str, Family] = {f.name: f for f in FAMILIES}


def family_of(cfg) -> Family:
    """The Family of a ModelConfig."""
    return BY_NAME[cfg.family]


def ffn_group(cfg, layer: int) -> type:
    """The FFN group class (models/ffn.py) of the model's layer `layer`."""
    return family_of(cfg).ffn_group(cfg, layer)


def num_params(cfg) -> int:
    """Parameters of the model (embeddings, attention, norms and each layer's FFN group)."""
    h, l = cfg.hidden_size, cfg.num_layers
    attn = h * (cfg.num_heads + 2 * cfg.num_kv_heads) * cfg.head_dim + cfg.num_heads * cfg.head_dim * h
    if cfg.qkv_bias:
        attn += (cfg.num_heads + 2 * cfg.num_kv_heads) * cfg.head_dim
    if cfg.qk_norm:
        attn += 2 * cfg.head_dim
    emb = cfg.vocab_size * h * (1 if cfg.tie_word_embeddings else 2)
    return l * (attn + 2 * h) + sum(ffn_group(cfg, i).num_params(cfg) for i in range(l)) + emb + h
