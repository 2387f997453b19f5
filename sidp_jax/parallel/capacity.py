"""What each layout keeps on one GPU, and the KV capacity that leaves (the design card's bounds;
its targets and the measured capacities are in benchmarks/RESULTS.md).

Per GPU: `dp` holds every weight; `sidp` holds embeddings, attention, norms, 1/D of the FFN
and a two-layer FFN buffer (the fetched layer in flight plus the one being used); `tp` holds
1/T of the heads and FFN (embeddings replicated) but also only 1/T of each token's KV.
"""

from __future__ import annotations

import math

import jax.numpy as jnp

from sidp_jax.models.config import ModelConfig


def _projection_item(cfg: ModelConfig, dtype) -> int:
    """Bytes per element of the projections (qkv, o, gate_up, down): 1 in FP8."""
    return 1 if cfg.quantization == "fp8" else jnp.dtype(dtype).itemsize


def _scale_bytes(cfg: ModelConfig, ffn_only: bool = False) -> int:
    """An FP8 layer's float32 per-channel scales (ffn_only: gate_up's and down's)."""
    if cfg.quantization != "fp8":
        return 0
    ffn = 2 * cfg.intermediate_size + cfg.hidden_size
    return 4 * (ffn if ffn_only else ffn + (cfg.num_heads + 2 * cfg.num_kv_heads) * cfg.head_dim + cfg.hidden_size)


def ffn_layer_bytes(cfg: ModelConfig, dtype=jnp.bfloat16) -> int:
    return 3 * cfg.hidden_size * cfg.intermediate_size * _projection_item(cfg, dtype) + _scale_bytes(cfg, True)


def weight_bytes_per_gpu(cfg: ModelConfig, parallel: str, dp: int, tp: int = 1, placement: str = "striped",
                         dtype=jnp.bfloat16, include_buffer: bool = True) -> int:
    """Bytes of weights one GPU holds under a layout (the FFN buffer counted for sidp; FP8
    projections at one byte per weight plus their scales)."""
    item = jnp.dtype(dtype).itemsize
    ffn = ffn_layer_bytes(cfg, dtype) * cfg.num_layers
    emb = cfg.vocab_size * cfg.hidden_size * item * (1 if cfg.tie_word_embeddings else 2)
    norm_params = 2 * cfg.hidden_size * cfg.num_layers + cfg.hidden_size + (
        2 * cfg.head_dim * cfg.num_layers if cfg.qk_norm else 0)
    bias_params = (cfg.num_heads + 2 * cfg.num_kv_heads) * cfg.head_dim * cfg.num_layers if cfg.qkv_bias else 0
    norms = norm_params * item  # replicated everywhere
    projections = cfg.num_params() - emb // item - norm_params - bias_params
    heads_and_ffn = (projections * _projection_item(cfg, dtype) + bias_params * item  # what tp splits
                     + _scale_bytes(cfg) * cfg.num_layers)
    total = emb + norms + heads_and_ffn
    if parallel == "tp":
        return total - heads_and_ffn + heads_and_ffn // (dp * tp)
    attn = heads_and_ffn - ffn
    rest = total - heads_and_ffn
    if parallel == "dp" or dp == 1:
        return rest + (attn + ffn) // tp
    if placement == "owner":
        local_ffn = math.ceil(cfg.num_layers / dp) * ffn_layer_bytes(cfg, dtype) // tp
    else:
        local_ffn = ffn // (dp * tp)
    buffer = 2 * ffn_layer_bytes(cfg, dtype) // tp if include_buffer else 0
    return rest + attn // tp + local_ffn + buffer


def kv_tokens_per_gpu(cfg: ModelConfig, parallel: str, dp: int, memory_bytes: float, utilization: float,
                      workspace_bytes: float = 3e9, tp: int = 1, placement: str = "striped",
                      count_ffn_buffer: bool = True, dtype=jnp.bfloat16, kv_dtype=None) -> int:
    """Analytic bound: KV tokens one GPU can hold (tp: tokens of the whole tp group per GPU).
    count_ffn_buffer=False when the workspace already includes it (measured step temporaries).
    dtype: the compute dtype (cfg.quantization sizes the projections); kv_dtype: the cache's
    (default: dtype)."""
    free = memory_bytes * utilization - workspace_bytes - weight_bytes_per_gpu(
        cfg, parallel, dp, tp, placement, dtype=dtype, include_buffer=count_ffn_buffer)
    shards = dp * tp if parallel == "tp" else tp
    return max(0, int(free // (cfg.kv_bytes_per_token(kv_dtype or dtype) / shards)))


def dp_comparison_line(cfg: ModelConfig, parallel: str, dp: int, tp: int, placement: str, tokens_per_gpu: int,
                       kv_bytes_per_token_per_gpu: float, dtype=jnp.bfloat16) -> str:
    """'KV cache: 391,000 tokens/GPU (dp would have 223,000: 1.75x)' from a measured capacity."""
    saved = (weight_bytes_per_gpu(cfg, "dp", dp, tp, dtype=dtype)
             - weight_bytes_per_gpu(cfg, parallel, dp, tp, placement, dtype=dtype))
    dp_tokens = max(0, int(tokens_per_gpu - saved / kv_bytes_per_token_per_gpu))
    if dp_tokens <= 0:
        return f"KV cache: {tokens_per_gpu:,} tokens/GPU (dp would not fit a replica per GPU)"
    return (f"KV cache: {tokens_per_gpu:,} tokens/GPU (dp would have {dp_tokens:,}: "
            f"{tokens_per_gpu / dp_tokens:.2f}x)")
