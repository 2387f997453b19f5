"""Hugging Face checkpoint -> params pytree, placed shard by shard.

Each device's shard of every leaf is built on that device from the mmapped safetensors (see
_load_leaf): no host buffer holds more than one tensor's bytes (a read-only mmap view), and no
device more than its shard plus one layer's raw tensors. A layout may store stacked FFN layers in another order (`layer_order`,
storage row -> checkpoint layer, -1 for padding rows), as SiDP's owner placement does.
"""

from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import SingleDeviceSharding

from sidp_jax.config import ModelConfig
from sidp_jax.models.params import is_spec
from sidp_jax.safetensors_io import CheckpointError, SafetensorsCheckpoint

Index = tuple[slice, ...]


def _layer(l: int) -> str:
    return f"model.layers.{l}"


def _sources(cfg: ModelConfig) -> dict[str, tuple[Callable[[int], list[str]], Callable]]:
    """leaf path -> (HF names for layer l, convert(list of HF arrays) -> our per-layer array view)."""
    Nq, Nkv, D, H = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.hidden_size
    proj = lambda n: (lambda ws: ws[0].T.reshape(H, n, D))  # [n*D, H] -> [H, n, D]
    bias = lambda n: (lambda ws: ws[0].reshape(n, D))
    ident = lambda ws: ws[0]
    attn = lambda name: (lambda l: [f"{_layer(l)}.self_attn.{name}"])
    src = {
        "layers/attn_norm": (lambda l: [f"{_layer(l)}.input_layernorm.weight"], ident),
        "layers/q": (attn("q_proj.weight"), proj(Nq)),
        "layers/k": (attn("k_proj.weight"), proj(Nkv)),
        "layers/v": (attn("v_proj.weight"), proj(Nkv)),
        "layers/o": (attn("o_proj.weight"), lambda ws: ws[0].T.reshape(Nq, D, H)),
        "layers/ffn_norm": (lambda l: [f"{_layer(l)}.post_attention_layernorm.weight"], ident),
        "ffn/gate_up": (lambda l: [f"{_layer(l)}.mlp.gate_proj.weight", f"{_layer(l)}.mlp.up_proj.weight"],
                        lambda ws: jnp.stack([ws[0].T, ws[1].T], axis=1)),
        "ffn/down": (lambda l: [f"{_layer(l)}.mlp.down_proj.weight"], lambda ws: ws[0].T),
        "embed": (lambda _: ["model.embed_tokens.weight"], ident),
        "final_norm": (lambda _: ["model.norm.weight"], ident),
    }
    if cfg.qkv_bias:
        src["layers/q_bias"] = (attn("q_proj.bias"), bias(Nq))
        src["layers/k_bias"] = (attn("k_proj.bias"), bias(Nkv))
        src["layers/v_bias"] = (attn("v_proj.bias"), bias(Nkv))
    if cfg.qk_norm:
        src["layers/q_norm"] = (attn("q_norm.weight"), ident)
        src["layers/k_norm"] = (attn("k_norm.weight"), ident)
    if not cfg.tie_word_embeddings:
        src["lm_head"] = (lambda _: ["lm_head.weight"], lambda ws: ws[0].T)
    return src


def _expected_hf_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    H, I, D = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    q, kv = cfg.num_heads * D, cfg.num_kv_heads * D
    per_layer = {
        "input_layernorm.weight": (H,), "post_attention_layernorm.weight": (H,),
        "self_attn.q_proj.weight": (q, H), "self_attn.k_proj.weight": (kv, H),
        "self_attn.v_proj.weight": (kv, H), "self_attn.o_proj.weight": (H, q),
        "mlp.gate_proj.weight": (I, H), "mlp.up_proj.weight": (I, H), "mlp.down_proj.weight": (H, I),
    }
    if cfg.qkv_bias:
        per_layer |= {"self_attn.q_proj.bias": (q,), "self_attn.k_proj.bias": (kv,), "self_attn.v_proj.bias": (kv,)}
    if cfg.qk_norm:
        per_layer |= {"self_attn.q_norm.weight": (D,), "self_attn.k_norm.weight": (D,)}
    shapes = {f"{_layer(l)}.{k}": v for l in range(cfg.num_layers) for k, v in per_layer.items()}
    shapes["model.embed_tokens.weight"] = (cfg.vocab_size, H)
    shapes["model.norm.weight"] = (H,)
    if not cfg.tie_word_embeddings:
        shapes["lm_head.weight"] = (cfg.vocab_size, H)
    return shapes


def validate(ckpt: SafetensorsCheckpoint, cfg: ModelConfig) -> None:
    expected = _expected_hf_shapes(cfg)
    names = ckpt.names()
    missing = sorted(set(expected) - names)
    if missing:
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise CheckpointError(f"checkpoint {ckpt.model_dir} is missing tensors: {', '.join(missing[:5])}{more}")
    ignorable = {"lm_head.weight"} if cfg.tie_word_embeddings else set()
    unexpected = sorted(n for n in names - set(expected) - ignorable if not n.endswith("rotary_emb.inv_freq"))
    if unexpected:
        raise CheckpointError(
            f"unexpected tensor {unexpected[0]} in {ckpt.file_of(unexpected[0])}"
            + (f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else "")
            + f" for architecture {cfg.family}")
    for name, shape in expected.items():
        got = ckpt.shape(name)
        if got != shape:
            raise CheckpointError(f"tensor {name} in {ckpt.file_of(name)} has shape {list(got)}, expected {list(shape)}")


def load_params(model_dir: str, cfg: ModelConfig, dtype, layout) -> dict:
    """Load a checkpoint into arrays placed as `layout` says (a sidp_jax.layouts.Layout)."""
    ckpt = SafetensorsCheckpoint(model_dir)
    validate(ckpt, cfg)
    sources = _sources(cfg)
    ffn_order = layout.ffn_layer_order(cfg)
    specs = layout.param_specs(cfg)
    flat_specs = jax.tree_util.tree_flatten_with_path(specs, is_leaf=is_spec)[0]
    arrays = [_load_leaf(ckpt, spec, sharding, *sources["/".join(p.key for p in path)], dtype,
                         ffn_order if path[0].key == "ffn" else None)
              for (path, spec), sharding in zip(flat_specs, jax.tree.leaves(layout.param_shardings(cfg)))]
    return jax.tree.unflatten(jax.tree.structure(specs, is_leaf=is_spec), arrays)


@functools.lru_cache(maxsize=None)
def _converter(convert, index: Index, dtype):
    """jit: raw HF tensors (on one device) -> our layout, sliced to a shard, cast."""
    return jax.jit(lambda *ws: convert(ws)[index].astype(dtype))


@functools.lru_cache(maxsize=None)
def _row_setter():
    return jax.jit(lambda buf, piece, i: jax.lax.dynamic_update_index_in_dim(buf, piece, i, 0), donate_argnums=0)


def _load_leaf(ckpt, spec, sharding, names_of, convert, dtype, ffn_order):
    """Build each device's shard ON that device: the raw (contiguous) HF tensors are copied over
    as they are on disk and transposed/sliced/cast there, which is far faster than numpy's
    strided copies; stacked leaves fill a donated buffer row by row, so the peak is one shard
    plus one layer's raw tensors."""
    stacked = spec.axes[0] in ("layers", "ffn_layers")
    rows = ffn_order if ffn_order is not None else np.arange(spec.shape[0])
    shards = []
    for device, index in sharding.addressable_devices_indices_map(spec.shape).items():
        index = tuple(slice(*s.indices(d)) for s, d in zip(index, spec.shape))
        raw = lambda layer: [jax.device_put(ckpt.get(n), device) for n in names_of(layer)]
        if not stacked:
            shards.append(_converter(convert, index, dtype)(*raw(0)))
            continue
        shard_shape = tuple(len(range(*s.indices(d))) for s, d in zip(index, spec.shape))
        buf = jax.jit(lambda: jnp.zeros(shard_shape, dtype), out_shardings=SingleDeviceSharding(device))()
        for i, row in enumerate(rows[index[0]]):
            if row >= 0:
                buf = _row_setter()(buf, _converter(convert, index[1:], dtype)(*raw(int(row))), i)
        shards.append(buf)
    return jax.make_array_from_single_device_arrays(spec.shape, sharding, shards)
