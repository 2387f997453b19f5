"""ModelConfig from a Hugging Face `config.json` (both generations of its rope fields), every
field checked: the family from "architectures" (models/registry.py), bounds that no released
model exceeds, and the FP8 forms the engine runs."""

from __future__ import annotations

import json
import math
import os

from sidp_jax.models.config import ModelConfig
from sidp_jax.models.registry import BY_ARCHITECTURE


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
                 "num_hidden_layers": 1 << 11, "max_position_embeddings": 1 << 24,
                 "num_experts": 1 << 12, "num_experts_per_tok": 1 << 8, "moe_intermediate_size": 1 << 20,
                 "decoder_sparse_step": 1 << 11}


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


def _moe_fields(raw: dict, num_layers: int) -> dict:
    """A mixture-of-experts family's fields (transformers' Qwen3MoeConfig): layer l has experts iff
    l is not in mlp_only_layers and (l + 1) % decoder_sparse_step == 0."""
    if "num_experts" not in raw and "num_local_experts" in raw:  # the name transformers 5 writes
        raw = {**raw, "num_experts": raw["num_local_experts"]}
    experts = _pos_int(raw, "num_experts")
    top_k = _pos_int(raw, "num_experts_per_tok")
    if top_k > experts:
        raise ValueError(f"config field 'num_experts_per_tok' = {top_k} exceeds num_experts = {experts}")
    step = _pos_int(raw, "decoder_sparse_step", 1)
    dense = raw.get("mlp_only_layers") or []
    if not isinstance(dense, list) or not all(isinstance(l, int) and not isinstance(l, bool) and 0 <= l < num_layers
                                              for l in dense):
        raise ValueError(f"config field 'mlp_only_layers' must be a list of layer indices below {num_layers}, "
                         f"got {dense!r}")
    norm = raw.get("norm_topk_prob", False)  # transformers' class default
    if not isinstance(norm, bool):
        raise ValueError(f"config field 'norm_topk_prob' must be true or false, got {norm!r}")
    return dict(moe_layers=tuple(l for l in range(num_layers) if l not in dense and (l + 1) % step == 0),
                num_experts=experts, num_experts_per_tok=top_k,
                moe_intermediate_size=_pos_int(raw, "moe_intermediate_size"), norm_topk_prob=norm)


def config_from_hf_dict(raw: dict) -> ModelConfig:
    if not isinstance(raw, dict):
        raise ValueError(f"config.json must hold a JSON object, got {type(raw).__name__}")
    archs = raw.get("architectures") or []
    if not isinstance(archs, list) or not all(isinstance(a, str) for a in archs):
        raise ValueError(f"config field 'architectures' must be a list of names, got {archs!r}")
    family = next((BY_ARCHITECTURE[a] for a in archs if a in BY_ARCHITECTURE), None)
    if family is None:
        got = ", ".join(archs) or raw.get("model_type", "<none>")
        raise ValueError(f"unsupported architecture {got}; supported: {', '.join(BY_ARCHITECTURE)}")
    for key, required in family.unsupported:
        if raw.get(key, required) != required:
            raise ValueError(f"{key}={raw[key]!r} is not supported for {family.name} (only {required!r})")
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
    # FP8 checkpoints (sidp_jax/loading/fp8_checkpoint.py checks their form) run in FP8; other methods fail there
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
    num_layers = _pos_int(raw, "num_hidden_layers")
    moe = _moe_fields(raw, num_layers) if family.moe_ffn is not None else {}
    return ModelConfig(
        family=family.name,
        vocab_size=_pos_int(raw, "vocab_size"),
        hidden_size=hidden,
        intermediate_size=_pos_int(raw, "intermediate_size"),
        num_layers=num_layers,
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        rms_norm_eps=_pos_float(raw, "rms_norm_eps", 1e-6),
        rope_theta=theta,
        rope_scaling=tuple(sorted(scaling.items())) if scaling else None,
        max_position_embeddings=_pos_int(raw, "max_position_embeddings", 4096),
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
        qkv_bias=family.attention_bias(raw),
        qk_norm=family.qk_norm,
        checkpoint_dtype=str(dtype).replace("torch.", ""),
        quantization=quantization,
        kv_cache_scales=kv_cache_scales,
        **moe,
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
