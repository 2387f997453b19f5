"""The model families the engine runs, by Hugging Face architecture. Adding a family: a module
under models/families/ and a line here."""

from __future__ import annotations

from sidp_jax.models.families import llama, qwen2, qwen3
from sidp_jax.models.family import Family

FAMILIES: tuple[Family, ...] = (
    llama.FAMILY,
    qwen2.FAMILY,
    qwen3.FAMILY,
)

BY_ARCHITECTURE: dict[str, Family] = {arch: f for f in FAMILIES for arch in f.architectures}
BY_NAME: dict[str, Family] = {f.name: f for f in FAMILIES}


def family_of(cfg) -> Family:
    """The Family of a ModelConfig."""
    return BY_NAME[cfg.family]


def num_params(cfg) -> int:
    """Parameters of the model (embeddings, attention, norms and the family's FFN group)."""
    h, l = cfg.hidden_size, cfg.num_layers
    attn = h * (cfg.num_heads + 2 * cfg.num_kv_heads) * cfg.head_dim + cfg.num_heads * cfg.head_dim * h
    if cfg.qkv_bias:
        attn += (cfg.num_heads + 2 * cfg.num_kv_heads) * cfg.head_dim
    if cfg.qk_norm:
        attn += 2 * cfg.head_dim
    emb = cfg.vocab_size * h * (1 if cfg.tie_word_embeddings else 2)
    return l * (attn + family_of(cfg).ffn.num_params(cfg) + 2 * h) + emb + h
