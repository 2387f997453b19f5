"""The model's configuration (what the engine needs of config.json) and the shape presets.
Reading config.json: models/hf_config.py; the families: models/registry.py."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax.numpy as jnp

_DTYPES = {"bfloat16": jnp.bfloat16, "float16": jnp.float16, "float32": jnp.float32}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    family: str  # a Family's name (models/registry.py)
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: tuple[tuple[str, Any], ...] | None  # frozen dict of the llama3 parameters
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool
    qk_norm: bool
    checkpoint_dtype: str = "bfloat16"
    quantization: str | None = None  # "fp8": W8A8 e4m3 projections (models/fp8.py); None: none
    kv_cache_scales: str | None = None  # the checkpoint's FP8 KV scales: "tensor" or "attn_head" (per kv head)
    # mixture of experts (models/families/qwen3_moe.py): the layers whose FFN is routed experts
    moe_layers: tuple[int, ...] = ()
    num_experts: int = 0
    num_experts_per_tok: int = 0  # top-k experts each token is routed to
    moe_intermediate_size: int = 0  # each expert's intermediate size (intermediate_size: the dense layers')
    norm_topk_prob: bool = False  # the top-k routing weights renormalised to sum to 1

    @property
    def dense_layers(self) -> tuple[int, ...]:
        """The layers whose FFN is a dense SwiGLU (every layer of a dense model)."""
        return tuple(l for l in range(self.num_layers) if l not in self.moe_layers)

    def kv_bytes_per_token(self, dtype=jnp.bfloat16) -> int:
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * jnp.dtype(dtype).itemsize


# The real shapes of the models SiDP targets, for random-weight benchmarks (like vLLM's dummy load).
PRESETS: dict[str, ModelConfig] = {
    "qwen3-8b": ModelConfig(
        family="qwen3", vocab_size=151936, hidden_size=4096, intermediate_size=12288, num_layers=36,
        num_heads=32, num_kv_heads=8, head_dim=128, rms_norm_eps=1e-6, rope_theta=1e6, rope_scaling=None,
        max_position_embeddings=40960, tie_word_embeddings=False, qkv_bias=False, qk_norm=True),
    "qwen3-14b": ModelConfig(
        family="qwen3", vocab_size=151936, hidden_size=5120, intermediate_size=17408, num_layers=40,
        num_heads=40, num_kv_heads=8, head_dim=128, rms_norm_eps=1e-6, rope_theta=1e6, rope_scaling=None,
        max_position_embeddings=40960, tie_word_embeddings=False, qkv_bias=False, qk_norm=True),
    "llama3.1-8b": ModelConfig(
        family="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_layers=32,
        num_heads=32, num_kv_heads=8, head_dim=128, rms_norm_eps=1e-5, rope_theta=5e5,
        rope_scaling=(("factor", 8.0), ("high_freq_factor", 4.0), ("low_freq_factor", 1.0),
                      ("original_max_position_embeddings", 8192)),
        max_position_embeddings=131072, tie_word_embeddings=False, qkv_bias=False, qk_norm=False),
    "qwen3-32b": ModelConfig(
        family="qwen3", vocab_size=151936, hidden_size=5120, intermediate_size=25600, num_layers=64,
        num_heads=64, num_kv_heads=8, head_dim=128, rms_norm_eps=1e-6, rope_theta=1e6, rope_scaling=None,
        max_position_embeddings=40960, tie_word_embeddings=False, qkv_bias=False, qk_norm=True),
    "qwen3-30b-a3b": ModelConfig(
        family="qwen3_moe", vocab_size=151936, hidden_size=2048, intermediate_size=6144, num_layers=48,
        num_heads=32, num_kv_heads=4, head_dim=128, rms_norm_eps=1e-6, rope_theta=1e6, rope_scaling=None,
        max_position_embeddings=40960, tie_word_embeddings=False, qkv_bias=False, qk_norm=True,
        moe_layers=tuple(range(48)), num_experts=128, num_experts_per_tok=8, moe_intermediate_size=768,
        norm_topk_prob=True),
    "qwen3-235b-a22b": ModelConfig(
        family="qwen3_moe", vocab_size=151936, hidden_size=4096, intermediate_size=12288, num_layers=94,
        num_heads=64, num_kv_heads=4, head_dim=128, rms_norm_eps=1e-6, rope_theta=1e6, rope_scaling=None,
        max_position_embeddings=40960, tie_word_embeddings=False, qkv_bias=False, qk_norm=True,
        moe_layers=tuple(range(94)), num_experts=128, num_experts_per_tok=8, moe_intermediate_size=1536,
        norm_topk_prob=True),
    "qwen2.5-72b": ModelConfig(
        family="qwen2", vocab_size=152064, hidden_size=8192, intermediate_size=29568, num_layers=80,
        num_heads=64, num_kv_heads=8, head_dim=128, rms_norm_eps=1e-6, rope_theta=1e6, rope_scaling=None,
        max_position_embeddings=32768, tie_word_embeddings=False, qkv_bias=True, qk_norm=False),
    "llama3.1-70b": ModelConfig(
        family="llama", vocab_size=128256, hidden_size=8192, intermediate_size=28672, num_layers=80,
        num_heads=64, num_kv_heads=8, head_dim=128, rms_norm_eps=1e-5, rope_theta=5e5,
        rope_scaling=(("factor", 8.0), ("high_freq_factor", 4.0), ("low_freq_factor", 1.0),
                      ("original_max_position_embeddings", 8192)),
        max_position_embeddings=131072, tie_word_embeddings=False, qkv_bias=False, qk_norm=False),
}

# Each preset's sampling defaults: the generation_config.json its released (instruct) checkpoint ships.
_QWEN3_SAMPLING = {"temperature": 0.6, "top_k": 20, "top_p": 0.95}
PRESET_GENERATION_DEFAULTS: dict[str, dict] = {
    "qwen3-8b": _QWEN3_SAMPLING, "qwen3-14b": _QWEN3_SAMPLING, "qwen3-32b": _QWEN3_SAMPLING,
    "qwen3-30b-a3b": _QWEN3_SAMPLING, "qwen3-235b-a22b": _QWEN3_SAMPLING,
    "qwen2.5-72b": {"temperature": 0.7, "top_p": 0.8, "top_k": 20, "repetition_penalty": 1.05},
    "llama3.1-8b": {"temperature": 0.6, "top_p": 0.9}, "llama3.1-70b": {"temperature": 0.6, "top_p": 0.9},
}


def dtype_from_name(name: str):
    if name not in _DTYPES:
        raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {name!r}")
    return _DTYPES[name]


def rope_inv_freq(cfg: ModelConfig):
    """Inverse frequencies [head_dim/2], with llama3 scaling applied as transformers does."""
    import numpy as np

    inv = 1.0 / (cfg.rope_theta ** (np.arange(0, cfg.head_dim, 2, dtype=np.float64) / cfg.head_dim))
    if cfg.rope_scaling is None:
        return inv.astype(np.float32)
    s = dict(cfg.rope_scaling)
    factor, lo, hi, orig = s["factor"], s["low_freq_factor"], s["high_freq_factor"], s["original_max_position_embeddings"]
    low_wavelen, high_wavelen = orig / lo, orig / hi
    wavelen = 2 * math.pi / inv
    scaled = np.where(wavelen > low_wavelen, inv / factor, inv)
    smooth = (orig / wavelen - lo) / (hi - lo)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return np.where(medium, smoothed, scaled).astype(np.float32)
