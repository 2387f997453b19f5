"""Model configuration from a Hugging Face `config.json` (both generations) or a shape preset."""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any

import jax.numpy as jnp

# HF architecture name -> our family. One decoder serves all three.
SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
}

_DTYPES = {"bfloat16": jnp.bfloat16, "float16": jnp.float16, "float32": jnp.float32}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    family: str  # "llama" | "qwen2" | "qwen3"
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

    def num_params(self) -> int:
        h, i, l = self.hidden_size, self.intermediate_size, self.num_layers
        attn = h * (self.num_heads + 2 * self.num_kv_heads) * self.head_dim + self.num_heads * self.head_dim * h
        ffn = 3 * h * i
        if self.qkv_bias:
            attn += (self.num_heads + 2 * self.num_kv_heads) * self.head_dim
        if self.qk_norm:
            attn += 2 * self.head_dim
        emb = self.vocab_size * h * (1 if self.tie_word_embeddings else 2)
        return l * (attn + ffn + 2 * h) + emb + h

    def kv_bytes_per_token(self, dtype=jnp.bfloat16) -> int:
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * jnp.dtype(dtype).itemsize


def _rope_from_hf(raw: dict) -> tuple[float, dict | None]:
    """Both config generations: legacy `rope_theta` + `rope_scaling`, current `rope_parameters`."""
    params = raw.get("rope_parameters")
    if params is not None:
        theta = params.get("rope_theta", raw.get("rope_theta", 10000.0))
        scaling = dict(params)
    else:
        theta = raw.get("rope_theta", 10000.0)
        scaling = dict(raw["rope_scaling"]) if raw.get("rope_scaling") else None
    if scaling is not None:
        kind = scaling.get("rope_type", scaling.get("type", "default"))
        if kind == "default":
            scaling = None
        elif kind != "llama3":
            raise ValueError(f"unsupported rope scaling type {kind!r} (supported: default, llama3)")
        else:
            scaling = {k: scaling[k] for k in
                       ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")}
    return float(theta), scaling


# Upper bounds far beyond any released model, so that a corrupt or hostile config.json is refused
# before it sizes anything (10^9 layers would otherwise build for minutes while memory grows).
CONFIG_LIMITS = {"hidden_size": 1 << 16, "num_attention_heads": 1 << 10, "num_key_value_heads": 1 << 10,
                 "head_dim": 1 << 12, "vocab_size": 1 << 22, "intermediate_size": 1 << 20,
                 "num_hidden_layers": 1 << 11, "max_position_embeddings": 1 << 24}


def _pos_int(raw: dict, key: str, default=None) -> int:
    """A positive integer field within CONFIG_LIMITS (a missing optional one gives `default`)."""
    if key not in raw or raw[key] is None:
        if default is not None:
            return default
        raise ValueError(f"config field {key!r} is missing")
    v = raw[key]
    if not isinstance(v, int) or isinstance(v, bool) or v < 1:
        raise ValueError(f"config field {key!r} must be a positive integer, got {v!r}")
    if v > CONFIG_LIMITS.get(key, v):
        raise ValueError(f"config field {key!r} = {v} is beyond any real model (at most {CONFIG_LIMITS[key]:,})")
    return v


def _pos_float(raw: dict, key: str, default: float) -> float:
    v = raw.get(key, default)
    if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v) or v <= 0:
        raise ValueError(f"config field {key!r} must be a positive number, got {v!r}")
    return float(v)


KV_SCALE_STRATEGIES = ("tensor", "attn_head")


def config_from_hf_dict(raw: dict) -> ModelConfig:
    if not isinstance(raw, dict):
        raise ValueError(f"config.json must hold a JSON object, got {type(raw).__name__}")
    archs = raw.get("architectures") or []
    if not isinstance(archs, list) or not all(isinstance(a, str) for a in archs):
        raise ValueError(f"config field 'architectures' must be a list of names, got {archs!r}")
    family = next((SUPPORTED_ARCHITECTURES[a] for a in archs if a in SUPPORTED_ARCHITECTURES), None)
    if family is None:
        got = ", ".join(archs) or raw.get("model_type", "<none>")
        raise ValueError(f"unsupported architecture {got}; supported: {', '.join(SUPPORTED_ARCHITECTURES)}")
    if raw.get("mlp_bias"):
        raise ValueError("mlp_bias=True is not supported")
    if raw.get("use_sliding_window"):
        raise ValueError("sliding-window attention (use_sliding_window=True) is not supported")
    try:
        theta, scaling = _rope_from_hf(raw)
    except (KeyError, TypeError, AttributeError) as e:
        raise ValueError(f"config's rope settings are incomplete or ill-typed ({e!r})") from None
    hidden = _pos_int(raw, "hidden_size")
    heads = _pos_int(raw, "num_attention_heads")
    kv_heads = _pos_int(raw, "num_key_value_heads", heads)
    if heads % kv_heads:
        raise ValueError(f"config: num_attention_heads {heads} is not a multiple of num_key_value_heads {kv_heads}")
    head_dim = _pos_int(raw, "head_dim", max(hidden // heads, 1))
    dtype = raw.get("dtype") or raw.get("torch_dtype") or "bfloat16"
    quant = raw.get("quantization_config")
    # FP8 checkpoints (sidp_jax/loading/fp8.py checks their form) run in FP8; other methods fail there
    quantization = "fp8" if isinstance(quant, dict) and quant.get("quant_method") in ("fp8", "compressed-tensors") \
        else None
    kv_scheme = quant.get("kv_cache_scheme") if isinstance(quant, dict) else None
    kv_cache_scales = None
    if kv_scheme is not None:  # compressed-tensors' static FP8 KV scales: self_attn.k_scale / v_scale
        strategy = kv_scheme.get("strategy") if isinstance(kv_scheme, dict) else None
        if strategy not in KV_SCALE_STRATEGIES or kv_scheme.get("type", "float") != "float" \
                or kv_scheme.get("num_bits", 8) != 8 or kv_scheme.get("dynamic", False):
            raise ValueError(f"config quantization_config.kv_cache_scheme {kv_scheme!r} is not supported "
                             f"(static 8-bit float, strategy one of {', '.join(KV_SCALE_STRATEGIES)})")
        kv_cache_scales = strategy
    return ModelConfig(
        family=family,
        vocab_size=_pos_int(raw, "vocab_size"),
        hidden_size=hidden,
        intermediate_size=_pos_int(raw, "intermediate_size"),
        num_layers=_pos_int(raw, "num_hidden_layers"),
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        rms_norm_eps=_pos_float(raw, "rms_norm_eps", 1e-6),
        rope_theta=theta,
        rope_scaling=tuple(sorted(scaling.items())) if scaling else None,
        max_position_embeddings=_pos_int(raw, "max_position_embeddings", 4096),
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
        qkv_bias=family == "qwen2" or bool(raw.get("attention_bias", False)),
        qk_norm=family == "qwen3",
        checkpoint_dtype=str(dtype).replace("torch.", ""),
        quantization=quantization,
        kv_cache_scales=kv_cache_scales,
    )


def load_config(model_dir: str) -> ModelConfig:
    path = os.path.join(model_dir, "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{model_dir} has no config.json (expected a Hugging Face checkpoint directory)")
    try:
        with open(path, encoding="utf-8") as f:
            raw = json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None
    try:
        return config_from_hf_dict(raw)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None


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
