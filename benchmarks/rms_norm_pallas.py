"""Fused RMSNorm (+ residual add) as a Pallas (Triton-lowered) GPU kernel, with its pure-JAX reference.

An experiment, not part of the package: measured, not used by the engine (see the end of this
docstring). It lived in kernels/ until issue 31; benchmarks/norm_kernels.py times it and checks
it against the op-by-op reference (`--interpret` runs that check on CPU).

Semantics are `models/decoder.py::rms_norm` (statistics in float32, the normalised value rounded
to x's dtype, then multiplied by the weight in the promoted dtype), optionally preceded by the
decoder's residual add: with `residual`, the kernel computes `h = x + residual` (rounded to x's
dtype, as `h = h + a` in the decoder is written), normalises *that rounded h*, and returns both
`(rms_norm(h, w, eps), h)`, in one pass: one read of x and residual, one write of y and h.
With `quantize=True` y leaves as the FP8 GEMMs take it: e4m3 values and a float32 scale per
row (models/fp8.py::quantize_tokens of the same y), the row's amax taken in registers in the
same pass.
Note: under jit, XLA's default `--xla_allow_excess_precision` lets its fusion of the same code
normalise the float32 sum instead of the rounded h, so the *jitted* reference / decoder differ
from the op-by-op reference (and from this kernel) by one bf16 ulp in ~20% (on CPU) of the
outputs of the residual form; the op-by-op reference is what norm_kernels.py holds the kernel to
(h bit-exact, y within 2 ulps).

Layout: x (and residual) [..., H], row-major; the leading dims are flattened into T rows (a
free reshape), w [H]. Grid: one program per `block_rows` rows (cdiv(T, block_rows) programs);
each program loads its rows whole, as one [block_rows, BH] tile with BH = next_power_of_2(H)
(Triton block shapes must be powers of two: a non-power-of-two H such as Qwen3-32B's 5120 is
loaded as a padded 8192-wide tile with a column mask; masked lanes read 0 and add nothing to
the sum of squares), computes the sum of squares, rsqrt, scale and weight in float32 in
registers, and stores y (and h) with the same mask. Rows past T in the last block (T not a
multiple of block_rows) are masked off: never read, never written. The refs are the whole
arrays (no BlockSpec tiling), indexed with whole-tile index arrays + masks, so no tile ever
needs to divide the array.

Constraints: float32 / bfloat16 / float16 inputs (residual: same shape and dtype as x); w of
shape [H]; block_rows and num_warps powers of 2; the tile block_rows * BH at most 65536
elements (H up to 65536 at block_rows=1: the row is held in registers, no loop over H).
`interpret=True` runs anywhere (norm_kernels.py --interpret on CPU) with the same code path.

Measured (H200, jax 0.11.2, bf16, H=5120/8192, defaults, vs XLA's fused reference): with the
residual add 1.03-1.04x at T=256, 1.09-1.14x at T=2048, 1.13-1.19x at T=8192; plain norm
0.81-0.84x at T=256, up to 1.33x at T=8192. Under 1 ms per engine step at best, a loss at decode
sizes: the engine does not use it (benchmarks/RESULTS.md).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from sidp_jax.models.fp8 import E4M3, E4M3_MAX, TINY_AMAX, quantize_tokens

try:  # the Triton GPU backend's load/store and compiler params; absent on a CPU-only build is fine
    from jax.experimental.pallas import triton as plgpu
except Exception:  # pragma: no cover
    plgpu = None

MAX_TILE_ELEMENTS = 65536  # block_rows * BH: one program's rows live in registers
SUPPORTED_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


def _is_pow2(n: int) -> bool:
    return n > 0 and (n & (n - 1)) == 0


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def rms_norm_reference(x: jax.Array, w: jax.Array, eps: float, residual: jax.Array | None = None, *,
                       quantize: bool = False):
    """Pure-JAX RMSNorm, `models/decoder.py::rms_norm`; with `residual`, the decoder's add first.

    Returns y, or (y, h) with h = x + residual in x's dtype and y = rms_norm(h, w, eps).
    quantize: y as the FP8 GEMMs take it, (e4m3 values, float32 scale per row) from
    models/fp8.py::quantize_tokens.
    """
    h = x if residual is None else x + residual
    hf = h.astype(jnp.float32)
    hf = hf * lax.rsqrt(jnp.mean(hf * hf, axis=-1, keepdims=True) + eps)
    y = w * hf.astype(h.dtype)
    if quantize:
        y = quantize_tokens(y.reshape(-1, y.shape[-1]))
        y = (y[0].reshape(x.shape), y[1].reshape(x.shape[:-1]))
    return y if residual is None else (y, h)


def default_block_rows(H: int) -> int:
    """Rows per program: 1 for model widths (H >= 2048); small H (e.g. a per-head q/k norm,
    H=128) packs rows up to a 2048-element tile so a program is not a few hundred lanes."""
    return max(1, 2048 // _next_pow2(H))


def default_num_warps(tile_elements: int) -> int:
    """Warps by tile size (the usual Triton norm heuristic): 4 below 2048 elements, 8 below
    8192, 16 from 8192 (H=5120 and 8192 at one row per program)."""
    if tile_elements >= 8192:
        return 16
    if tile_elements >= 2048:
        return 8
    return 4


def _load(ref, mask, other):
    if mask is None:
        return ref[...]
    if plgpu is not None and hasattr(plgpu, "load"):
        return plgpu.load(ref, mask=mask, other=other)
    return jnp.where(mask, ref[...], other)  # pragma: no cover


def _store(ref, val, mask):
    if mask is None:
        ref[...] = val
    elif plgpu is not None and hasattr(plgpu, "store"):
        plgpu.store(ref, val, mask=mask)
    else:  # pragma: no cover
        raise NotImplementedError("masked store needs jax.experimental.pallas.triton")


def _rms_norm_kernel(*refs, eps: float, n_rows: int, n_cols: int, block_rows: int, block_cols: int,
                     has_residual: bool, out_dtype, quantize: bool):
    # x_ref / r_ref / y_ref / h_ref: the whole [T, H] arrays; w_ref: [H]; s_ref: [T] (quantize).
    refs = list(refs)
    x_ref, w_ref = refs.pop(0), refs.pop(0)
    r_ref = refs.pop(0) if has_residual else None
    y_ref = refs.pop(0)
    h_ref = refs.pop(0) if has_residual else None
    s_ref = refs.pop(0) if quantize else None
    BR, BH = block_rows, block_cols
    row0 = pl.program_id(0) * BR
    # Whole-tile array indexers [BR, BH] (what interpret mode can discharge with out-of-bounds
    # lanes dropped; on Triton the same pointer arithmetic as row slices: contiguous along H).
    row_idx = row0 + lax.broadcasted_iota(jnp.int32, (BR, BH), 0)
    col_idx = lax.broadcasted_iota(jnp.int32, (BR, BH), 1)
    tile = (row_idx, col_idx)
    col_vec = lax.broadcasted_iota(jnp.int32, (BH,), 0)

    col_mask = None if BH == n_cols else col_vec < n_cols
    row_mask = None if n_rows % BR == 0 else row_idx < n_rows
    if col_mask is None:
        mask = row_mask
    else:
        col_mask2 = col_idx < n_cols
        mask = col_mask2 if row_mask is None else row_mask & col_mask2

    x = _load(x_ref.at[tile], mask, 0.0)
    if has_residual:
        r = _load(r_ref.at[tile], mask, 0.0)
        h = (x.astype(jnp.float32) + r.astype(jnp.float32)).astype(x.dtype)  # the decoder's h = h + a
        _store(h_ref.at[tile], h, mask)
    else:
        h = x
    hf = h.astype(jnp.float32)  # masked lanes are 0: they add nothing to the sum of squares
    ms = jnp.sum(hf * hf, axis=1) / n_cols
    inv = lax.rsqrt(ms + eps)
    normed = (hf * inv[:, None]).astype(x.dtype).astype(jnp.float32)
    w = _load(w_ref.at[col_vec], col_mask, 0.0).astype(jnp.float32)
    y = (normed * w[None, :]).astype(out_dtype)
    if not quantize:
        _store(y_ref.at[tile], y, mask)
        return
    # models/fp8.py::quantize_tokens on the row in registers: masked lanes are 0, below any amax
    yf = y.astype(jnp.float32)
    scale = jnp.maximum(jnp.max(jnp.abs(yf), axis=1), TINY_AMAX) / E4M3_MAX
    _store(y_ref.at[tile], jnp.clip(yf / scale[:, None], -E4M3_MAX, E4M3_MAX).astype(E4M3), mask)
    row_vec = row0 + lax.broadcasted_iota(jnp.int32, (BR,), 0)
    _store(s_ref.at[row_vec], scale, None if n_rows % BR == 0 else row_vec < n_rows)


@functools.partial(jax.jit, static_argnames=("eps", "quantize", "block_rows", "num_warps", "interpret"))
def fused_rms_norm(
    x: jax.Array,  # [..., H]
    w: jax.Array,  # [H]
    eps: float,
    residual: jax.Array | None = None,  # like x
    *,
    quantize: bool = False,
    block_rows: int | None = None,
    num_warps: int | None = None,
    interpret: bool = False,
):
    """RMSNorm of x over its last axis (weight w); with `residual`, of h = x + residual.

    Returns y (dtype promote(x, w), like the reference), or (y, h) with h in x's dtype.
    quantize: y as (e4m3 values [..., H], float32 scale per row [...]), the per-token dynamic
    quantization of the FP8 GEMMs (models/fp8.py), in the same pass: the row is in registers,
    so its amax needs no second kernel. Measured on an H200 at decode sizes it saves no device
    time over XLA's fused norm + quantization (5.6 against 5.3 us at T=64, 6.7 against 7.3 at
    T=256; RESULTS.md, FP8): the engine does not use it.
    block_rows: rows per program (power of 2; default `default_block_rows(H)`).
    num_warps: Triton warps per program (power of 2; default `default_num_warps(tile)`).
    """
    if x.ndim < 1:
        raise ValueError(f"fused_rms_norm: x must have at least 1 dimension (the normalised one), got {x.shape}")
    H = x.shape[-1]
    if H < 1:
        raise ValueError(f"fused_rms_norm: the normalised dimension is empty: x {x.shape}")
    xdt, wdt = jnp.dtype(x.dtype), jnp.dtype(w.dtype)
    if xdt not in SUPPORTED_DTYPES or wdt not in SUPPORTED_DTYPES:
        raise ValueError(f"fused_rms_norm: dtypes must be float32, bfloat16 or float16; got x {xdt.name}, "
                         f"w {wdt.name}")
    if w.shape != (H,):
        raise ValueError(f"fused_rms_norm: w must have shape ({H},) to match x {x.shape}; got {w.shape}")
    if residual is not None and (residual.shape != x.shape or jnp.dtype(residual.dtype) != xdt):
        raise ValueError(f"fused_rms_norm: residual must match x's shape and dtype: x {x.shape} {xdt.name}, "
                         f"residual {residual.shape} {jnp.dtype(residual.dtype).name}")
    BH = _next_pow2(H)
    BR = default_block_rows(H) if block_rows is None else block_rows
    if not isinstance(BR, int) or not _is_pow2(BR):
        raise ValueError(f"fused_rms_norm: block_rows must be a power of 2, got {block_rows!r}")
    if BR * BH > MAX_TILE_ELEMENTS:
        raise ValueError(f"fused_rms_norm: tile block_rows * next_power_of_2(H) = {BR} * {BH} exceeds "
                         f"{MAX_TILE_ELEMENTS} elements (the rows are held in registers); use fewer block_rows"
                         + ("" if BR > 1 else f" (H={H} is too wide for this single-pass kernel)"))
    nw = default_num_warps(BR * BH) if num_warps is None else num_warps
    if not isinstance(nw, int) or not _is_pow2(nw) or nw > 32:
        raise ValueError(f"fused_rms_norm: num_warps must be a power of 2 up to 32, got {num_warps!r}")

    out_dtype = jnp.result_type(xdt, wdt)
    lead = x.shape[:-1]
    T = 1
    for d in lead:
        T *= d
    if T == 0:  # nothing to launch
        y = (jnp.zeros(x.shape, E4M3), jnp.zeros(lead, jnp.float32)) if quantize else jnp.zeros(x.shape, out_dtype)
        return y if residual is None else (y, jnp.zeros(x.shape, xdt))

    x2 = x.reshape(T, H)
    args = [x2, w]
    out_shape = [jax.ShapeDtypeStruct((T, H), E4M3 if quantize else out_dtype)]
    if residual is not None:
        args.append(residual.reshape(T, H))
        out_shape.append(jax.ShapeDtypeStruct((T, H), xdt))
    if quantize:
        out_shape.append(jax.ShapeDtypeStruct((T,), jnp.float32))
    kernel = functools.partial(_rms_norm_kernel, eps=float(eps), n_rows=T, n_cols=H, block_rows=BR,
                               block_cols=BH, has_residual=residual is not None, out_dtype=out_dtype,
                               quantize=quantize)
    kw = {}
    if not interpret and plgpu is not None:
        kw["compiler_params"] = plgpu.CompilerParams(num_warps=nw)  # no loop: num_stages moot
    outs = pl.pallas_call(
        kernel,
        grid=(pl.cdiv(T, BR),),
        out_shape=tuple(out_shape),
        interpret=interpret,
        name=f"rms_norm{'_add' if residual is not None else ''}{'_fp8' if quantize else ''}_H{H}_br{BR}",
        **kw,
    )(*args)
    y = outs[0].reshape(x.shape)
    if quantize:
        y = (y, outs[-1].reshape(lead))
    return y if residual is None else (y, outs[1].reshape(x.shape))
