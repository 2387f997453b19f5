"""Hugging Face checkpoint -> params pytree, placed shard by shard.

What to read, and how to convert it, comes from the modules' declarations (models/modules.py):
each leaf's ParamSpec names its Hugging Face tensors, their shapes and its converter. Each
device's shard of every leaf is built on that device from the mmapped safetensors (see
_load_leaf): no host buffer holds more than one tensor's bytes (a read-only mmap view), and no
device more than its shard plus one layer's raw tensors.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp

from sidp_jax.loading.fp8_checkpoint import open_checkpoint
from sidp_jax.loading.safetensors_io import CheckpointError, SafetensorsCheckpoint
from sidp_jax.models.config import ModelConfig
from sidp_jax.models.hf_config import load_config
from sidp_jax.models.modules import Decoder, model_specs, module_from_params
from sidp_jax.models.params import expected_hf_shapes, is_spec

Index = tuple[slice, ...]


def validate(ckpt: SafetensorsCheckpoint, cfg: ModelConfig) -> None:
    """Every tensor the model declares is there with its shape, and nothing else is."""
    expected = expected_hf_shapes(model_specs(cfg))
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
        if got != shape and not (math.prod(got) == math.prod(shape) == 1):  # one value: [] or [1]
            raise CheckpointError(f"tensor {name} in {ckpt.file_of(name)} has shape {list(got)}, expected {list(shape)}")


def load_params(model_dir: str, cfg: ModelConfig, dtype, layout) -> dict:
    """Load a checkpoint into arrays placed as `layout` says (a sidp_jax.parallel.layouts.Layout)."""
    ckpt = open_checkpoint(model_dir)
    validate(ckpt, cfg)
    specs = layout.stored_specs(cfg)
    flat, treedef = jax.tree_util.tree_flatten(specs, is_leaf=is_spec)
    shardings = jax.tree.leaves(layout.param_shardings(cfg))
    # Leaves made from the same tensors (an FP8 weight and its scales) are read once together.
    groups: dict[tuple, list[int]] = {}
    for i, spec in enumerate(flat):
        groups.setdefault((spec.hf, spec.layer, spec.rows), []).append(i)
    arrays: list = [None] * len(flat)
    for members in groups.values():
        loaded = _load_leaves(ckpt, [flat[i] for i in members], [shardings[i] for i in members], dtype)
        for i, a in zip(members, loaded):
            arrays[i] = a
    return jax.tree.unflatten(treedef, arrays)


@functools.lru_cache(maxsize=None)
def _converter(convert, quant, index: Index, dtype):
    """jit: raw HF tensors (on one device) -> our layout (an FP8 leaf: quantized whole, so a
    shard's scales are its channels' over the full input), sliced to a shard, cast."""
    def fn(*ws):
        w = convert(ws)
        return (w if quant is None else quant(w))[index].astype(dtype)
    return jax.jit(fn)


def _load_leaves(ckpt, specs: list, shardings: list, dtype) -> list:
    """Leaves made from the same Hugging Face tensors (one leaf, or an FP8 weight and its scales).

    Each device's shard is built ON that device: the raw (contiguous) HF tensors are copied over
    as they are on disk, once per device, and transposed/quantized/sliced/cast there, which is
    far faster than numpy's strided copies. A stacked owner group gets its rows one layer at a
    time, so the peak is one shard plus one layer's raw tensors."""
    first = specs[0]
    maps = [sh.addressable_devices_indices_map(s.shape) for s, sh in zip(specs, shardings)]
    shards: list[list] = [[] for _ in specs]
    for device in maps[0]:
        index = [tuple(slice(*x.indices(d)) for x, d in zip(m[device], s.shape)) for m, s in zip(maps, specs)]
        raw = lambda layer: [jax.device_put(_floating(ckpt, n), device) for n in first.hf_names(layer)]
        convert = lambda i, idx, ws: _converter(specs[i].convert, specs[i].quant, idx,
                                                specs[i].stored_dtype(dtype))(*ws)
        if first.rows is None:
            ws = raw(first.layer)
            for i in range(len(specs)):
                shards[i].append(convert(i, index[i], ws))
            continue
        rows: list[list] = [[] for _ in specs]
        for layer in first.rows[index[0][0]]:  # every leaf of a group shares its rows' sharding
            ws = raw(layer) if layer >= 0 else None
            for i, s in enumerate(specs):
                row_shape = tuple(len(range(*x.indices(d))) for x, d in zip(index[i][1:], s.shape[1:]))
                rows[i].append(convert(i, index[i][1:], ws) if ws is not None
                               else jnp.zeros(row_shape, s.stored_dtype(dtype), device=device))
        for i in range(len(specs)):
            shards[i].append(rows[i][0][None] if len(rows[i]) == 1 else jnp.stack(rows[i]))
    return [jax.make_array_from_single_device_arrays(s.shape, sh, sd) for s, sh, sd in zip(specs, shardings, shards)]


def from_pretrained(model_dir: str, dtype=jnp.bfloat16, device=None) -> Decoder:
    """A Hugging Face checkpoint directory as a Decoder module on one device (default: the first).
    The module is the float model: an FP8 checkpoint's weights are dequantized into it."""
    from sidp_jax.parallel.layouts import make_layout

    cfg = dataclasses.replace(load_config(model_dir), quantization=None)
    layout = make_layout("dp=1", "dp", devices=[device or jax.devices()[0]])
    return module_from_params(cfg, load_params(model_dir, cfg, dtype, layout))


def _floating(ckpt, name: str):
    """A weight as stored, refused unless its dtype is a floating type: a header that calls a
    bf16 tensor I16 (byte counts consistent) would otherwise load integer weights."""
    w = ckpt.get(name)
    if not jnp.issubdtype(w.dtype, jnp.inexact):
        raise CheckpointError(f"tensor {name} in {ckpt.file_of(name)} is stored as {w.dtype}, not a floating "
                              f"type: a model weight must be float (the header may be wrong)")
    return w
