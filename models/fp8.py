"""FP8 (e4m3) W8A8: how a weight is stored, quantized, and multiplied.

A quantized projection stores its weight as e4m3 with its contracted axes last ([*out, *in], the
layout Hugging Face checkpoints use), beside a float32 scale per output channel ([*out]). The
contracted axes go last because cuBLASLt's FP8 GEMMs take both operands with the contracting
dimension minor: XLA would otherwise transpose the weight on every step. Activations are
quantized per token, on the fly, to the same format (dynamic scaling), so each GEMM is one
e4m3 x e4m3 `dot_general` accumulated in float32 (on Hopper a cuBLASLt FP8 GEMM; on CPU XLA
emulates it), then scaled by the outer product of the two scales.

A quantized weight is one value of type `Quantized` (the e4m3 values and their scales together,
a pytree node), so that layouts, the weight pool and loading handle it as any other weight.
`fp8_specs` turns a layer's ParamSpecs into that storage: the four projections (qkv, o, gate_up,
down) become `Quantized(values, scale)`; norms, biases, embeddings and the LM head stay in the
compute dtype, as in vLLM and in Qwen's own FP8 releases.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

E4M3 = jnp.float8_e4m3fn
E4M3_MAX = 448.0
QUANTIZED = ("qkv", "o", "gate_up", "down")  # the projections W8A8 covers
TINY_AMAX = 1e-12  # an all-zero row or channel gets this amax (its scale never divides by zero)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Quantized:
    """An FP8 projection: e4m3 `values` [*out, *in] and a float32 `scale` per output channel
    [*out]. Its leaves may also be ParamSpecs, shardings or ShapeDtypeStructs: it is a pytree node."""
    values: Any
    scale: Any


def amax_over(axes: tuple[str, ...]):
    """FP8 activations split over mesh `axes`: each token's scale from its whole row (None: local)."""
    return (lambda amax: jax.lax.pmax(amax, axes)) if axes else None


def quantize(w: jax.Array, num_out: int, reduce_amax=None) -> tuple[jax.Array, jax.Array]:
    """w [*out, *in] (num_out leading axes) -> (e4m3 values, float32 scale per output channel [*out]).

    reduce_amax: applied to the amax [*out] before it becomes the scale (see quantize_tokens)."""
    wf = w.astype(jnp.float32)
    amax = jnp.max(jnp.abs(wf), axis=tuple(range(num_out, w.ndim)))
    if reduce_amax is not None:
        amax = reduce_amax(amax)
    scale = jnp.maximum(amax, TINY_AMAX) / E4M3_MAX
    q = jnp.clip(wf / scale.reshape(*scale.shape, *[1] * (w.ndim - num_out)), -E4M3_MAX, E4M3_MAX)
    return q.astype(E4M3), scale


def quantize_tokens(x: jax.Array, reduce_amax=None) -> tuple[jax.Array, jax.Array]:
    """Per-token dynamic quantization of activations x [T, *in] -> (e4m3 [T, *in], scale [T]).

    reduce_amax: where the contracted axes are split over devices (tp, a striped pool), the
    collective that makes each token's amax the whole row's, so that every layout rounds alike."""
    return quantize(x, 1, reduce_amax)


def linear(x: jax.Array, w, *, out_dtype=None, reduce_amax=None):
    """x [T, *in] times a projection -> [T, *out], contracting all of x's axes but the first.

    w an array: [*in, *out] in the compute dtype, one GEMM in out_dtype (default x's).
    w Quantized: e4m3 values [*out, *in] with their per-channel scale [*out]: W8A8 (see the module)."""
    k = x.ndim - 1
    out_dtype = out_dtype or x.dtype
    if not isinstance(w, Quantized):
        dims = ((tuple(range(1, x.ndim)), tuple(range(k))), ((), ()))
        return jax.lax.dot_general(x, w, dims, preferred_element_type=out_dtype)
    xq, x_scale = quantize_tokens(x, reduce_amax)
    x_axes, w_axes = tuple(range(1, x.ndim)), tuple(range(w.values.ndim - k, w.values.ndim))
    y = jax.lax.dot_general(xq, w.values, ((x_axes, w_axes), ((), ())), preferred_element_type=jnp.float32)
    return (y * x_scale.reshape(-1, *[1] * w.scale.ndim) * w.scale).astype(out_dtype)


@dataclasses.dataclass(frozen=True)
class Quant:
    """How a stored FP8 leaf derives from its float weight (hashable: keys jitted converters).

    part: "weight" (the e4m3 values) or "scale"; perm: the float weight's axes in storage order
    ([*out, *in]); num_out: how many of them are output axes; base_shape/base_axes: the float
    weight's own (for its random init, whose scale depends on the fan-in)."""
    part: str
    perm: tuple[int, ...]
    num_out: int
    base_shape: tuple[int, ...]
    base_axes: tuple[str | None, ...]

    def __call__(self, w: jax.Array) -> jax.Array:
        """The float weight (base layout) -> this leaf."""
        q, scale = quantize(jnp.transpose(w, self.perm), self.num_out)
        return q if self.part == "weight" else scale


def contracted_axes(axes: tuple[str | None, ...]) -> tuple[int, ...]:
    """The axes a projection's input contracts: all but the last for projections back into the
    hidden size (o, down), else the first (the hidden size itself)."""
    return tuple(range(len(axes) - 1)) if axes[-1] == "embed" else (0,)


def fp8_specs(layer_specs: dict) -> dict:
    """A layer's ParamSpecs (nested dicts) with the QUANTIZED projections stored as
    Quantized(e4m3 values, float32 scales)."""
    out = {}
    for name, spec in layer_specs.items():
        if isinstance(spec, dict):
            out[name] = fp8_specs(spec)
            continue
        if name not in QUANTIZED:
            out[name] = spec
            continue
        k_axes = contracted_axes(spec.axes)
        o_axes = tuple(i for i in range(len(spec.axes)) if i not in k_axes)
        perm = o_axes + k_axes
        quant = lambda part: Quant(part, perm, len(o_axes), spec.shape, spec.axes)
        values = dataclasses.replace(spec, shape=tuple(spec.shape[i] for i in perm),
                                     axes=tuple(spec.axes[i] for i in perm), dtype="float8_e4m3fn",
                                     quant=quant("weight"))
        scale = dataclasses.replace(spec, shape=tuple(spec.shape[i] for i in o_axes),
                                    axes=tuple(spec.axes[i] for i in o_axes), dtype="float32", quant=quant("scale"))
        out[name] = Quantized(values, scale)
    return out
