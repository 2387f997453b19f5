"""How a parameter is declared, converted from Hugging Face and initialised.

The declarations themselves live in the NNX modules (models/modules.py): each `nnx.Param` carries
its logical axes, initializer and Hugging Face source as variable metadata. `ParamSpec` is that
metadata for one leaf of the engine's weight pytree, from which abstract shapes, shardings (through
a layout's logical-axis rules), random init and checkpoint loading all derive.

A leaf normally holds one model layer's tensor (`layer`), or a model-wide one (`layer=None`). SiDP's
owner placement instead stacks D layers' FFN tensors on a leading axis sharded over "dp"
(`rows`: the model layer in each row, -1 for padding), so each rank's local view is its own layer.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import zlib

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class Convert:
    """Hugging Face tensors -> our layout. Hashable by value, so one jitted converter serves
    every layer. dims: the shape parameters the kind needs (see __call__)."""
    kind: str  # "copy" | "T" | "o" | "qkv" | "qkv_bias" | "gate_up" | "per_kv_head" | "experts_gate_up" | "experts_down"
    dims: tuple[int, ...] = ()

    def __call__(self, ws):
        if self.kind == "copy":
            return ws[0]
        if self.kind == "T":
            return ws[0].T
        if self.kind == "o":  # [H, Nq*D] -> [Nq, D, H]
            nq, d = self.dims
            return ws[0].T.reshape(nq, d, -1)
        if self.kind == "per_kv_head":  # one value per tensor ([] or [1]) or per kv head -> [Nkv]
            return jnp.broadcast_to(jnp.reshape(ws[0], (-1,)), self.dims)
        if self.kind == "gate_up":  # gate, up [I, H] -> [H, 2, I]
            return jnp.stack([ws[0].T, ws[1].T], axis=1)
        if self.kind == "experts_gate_up":  # E gates then E ups, each [I, H] -> [E, H, 2, I]
            (e,) = self.dims
            return jnp.stack([jnp.stack(ws[:e]), jnp.stack(ws[e:])], axis=-1).transpose(0, 2, 3, 1)
        if self.kind == "experts_down":  # E downs [H, I] -> [E, I, H]
            return jnp.stack(ws).transpose(0, 2, 1)
        nkv, g, d = self.dims
        if self.kind == "qkv":  # q [Nq*D, H], k/v [Nkv*D, H] -> [H, Nkv, G+2, D]
            q, k, v = (w.T.reshape(w.shape[1], nkv, -1, d) for w in ws)
            return jnp.concatenate([q, k, v], axis=2)
        if self.kind == "qkv_bias":  # [Nq*D], [Nkv*D] x2 -> [Nkv, G+2, D]
            q, k, v = (w.reshape(nkv, -1, d) for w in ws)
            return jnp.concatenate([q, k, v], axis=1)
        raise ValueError(f"unknown conversion {self.kind!r}")


@dataclasses.dataclass(frozen=True)
class ParamSpec:
    shape: tuple[int, ...]
    axes: tuple[str | None, ...]  # logical axis names, one per dim
    init: str  # "normal" | "ones" | "zeros"
    hf: tuple[str, ...] = ()  # Hugging Face tensor names, "{l}" for the layer index (experts: one name each)
    hf_shapes: tuple[tuple[int, ...], ...] = ()  # their shapes in the checkpoint
    convert: Convert = Convert("copy")
    layer: int | None = None  # the model layer this leaf belongs to (None: model-wide)
    rows: tuple[int, ...] | None = None  # stacked owner groups: model layer per row, -1 padding
    name: str = ""  # the leaf's name inside its layer ("qkv", "gate_up", ...): keys its random init
    dtype: str | None = None  # stored dtype; None: the engine's compute dtype
    quant: object | None = None  # an FP8 leaf: models.fp8.Quant (how it derives from the float weight)

    def __post_init__(self):
        assert len(self.shape) == len(self.axes), (self.shape, self.axes)

    def hf_names(self, layer: int | None) -> list[str]:
        return [n.format(l=layer) for n in self.hf]

    def stored_dtype(self, compute_dtype):
        return jnp.dtype(self.dtype) if self.dtype else jnp.dtype(compute_dtype)


def is_spec(x) -> bool:
    return isinstance(x, ParamSpec)


def declare(rngs, dtype, shape, axes, init, hf=(), hf_shapes=(), convert=Convert("copy"),
            stored_dtype: str | None = None):
    """An nnx.Param with its declaration as metadata: logical axes, initializer, Hugging Face
    source names ("{l}": the layer index) and shapes, converter. stored_dtype: the leaf's dtype
    whatever the engine's compute dtype (None: the compute dtype)."""
    from flax import nnx

    value = initial_value(init, rngs.params(), shape, axes, stored_dtype or dtype)
    return nnx.Param(value, logical_axes=tuple(axes), init=init, hf=tuple(hf), hf_shapes=tuple(hf_shapes),
                     convert=convert, stored_dtype=stored_dtype)


def fan_in(shape: tuple[int, ...], axes: tuple) -> int:
    """Input width: the hidden size, or for projections back into it (o, down) the dims in between
    (an expert's own: not the experts axis)."""
    if axes[-1] == "embed" and axes[0] != "vocab":
        return math.prod(n for n, a in zip(shape[:-1], axes[:-1]) if a != "experts")
    return shape[axes.index("embed")]


def initial_value(init: str, key, shape, axes, dtype) -> jax.Array:
    if init == "ones":
        return jnp.ones(shape, dtype)
    if init == "zeros":
        return jnp.zeros(shape, dtype)
    scale = fan_in(shape, axes) ** -0.5  # keeps activations O(1): tiny random models get non-flat logits
    return (scale * jax.random.normal(key, shape, jnp.float32)).astype(dtype)


def _leaf_key(key, name: str, layer: int | None):
    """The same weights for a layer whatever the layout stores it as (per-layer leaf or owner row)."""
    k = jax.random.fold_in(key, zlib.crc32(name.encode()))
    return jax.random.fold_in(k, 0 if layer is None else layer + 1)


def _leaf_value(init: str, key, shape, axes, dtype, quant) -> jax.Array:
    """A leaf's random value; an FP8 leaf is its float weight's quantized values or scales."""
    if quant is None:
        return initial_value(init, key, shape, axes, dtype)
    return quant(initial_value(init, key, quant.base_shape, quant.base_axes, jnp.float32)).astype(dtype)


@functools.lru_cache(maxsize=None)
def _maker(init: str, shape: tuple, axes: tuple, dtype, valid: tuple | None, sharding, quant=None):
    """One jitted initializer per (shape, kind, sharding), shared by every layer: keys are traced."""
    if valid is None:
        fn = lambda key: _leaf_value(init, key, shape, axes, dtype, quant)
    else:  # an owner group: one row per layer (its own key), padding rows zero
        row = lambda key: _leaf_value(init, key, shape[1:], axes[1:], dtype, quant)
        mask = jnp.asarray(valid).reshape(-1, *[1] * (len(shape) - 1))
        fn = lambda keys: jnp.where(mask, jax.vmap(row)(keys), jnp.zeros((), dtype))
    return jax.jit(fn, out_shardings=sharding)


def init_params(specs, key: jax.Array, dtype, shardings=None):
    """Random weights (benchmark presets, tests) for a ParamSpec tree, made in their target shardings."""
    flat, treedef = jax.tree_util.tree_flatten(specs, is_leaf=is_spec)
    out_shardings = [None] * len(flat) if shardings is None else jax.tree.leaves(shardings)
    arrays = []
    for spec, sh in zip(flat, out_shardings):
        if spec.rows is None:
            keys, valid = _leaf_key(key, spec.name, spec.layer), None
        else:
            keys = jnp.stack([_leaf_key(key, spec.name, max(l, 0)) for l in spec.rows])
            valid = tuple(l >= 0 for l in spec.rows)
        arrays.append(_maker(spec.init, spec.shape, spec.axes, spec.stored_dtype(dtype), valid, sh, spec.quant)(keys))
    return jax.tree.unflatten(treedef, arrays)


def expected_hf_shapes(specs) -> dict[str, tuple[int, ...]]:
    """Every Hugging Face tensor the ParamSpec tree reads, with its shape."""
    shapes = {}
    for spec in jax.tree.leaves(specs, is_leaf=is_spec):
        layers = [spec.layer] if spec.rows is None else [l for l in spec.rows if l >= 0]
        for layer in layers:
            shapes.update(zip(spec.hf_names(layer), spec.hf_shapes))
    return shapes
