"""The fused RMSNorm (+ residual) Pallas kernel against the pure-JAX reference and the decoder's
rms_norm (interpret mode on CPU; -m gpu for the compiled Triton kernel)."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sidp_jax.kernels.rms_norm_pallas import fused_rms_norm, rms_norm_reference
from sidp_jax.models.decoder import rms_norm as decoder_rms_norm
from sidp_jax.models.fp8 import E4M3, E4M3_MAX, quantize_tokens

_seed = itertools.count(2000)


def make_case(shape, dtype, *, w_dtype=None, scale_range=(-1.0, 1.0), gain=1.0):
    """Fresh random x, residual, w. Each row gets its own magnitude (10**U(scale_range)), so a
    wrong reduction axis or rows mixed between programs changes the answer; w is far from 1."""
    rng = np.random.default_rng(next(_seed))
    H = shape[-1]
    row_scale = gain * 10.0 ** rng.uniform(*scale_range, shape[:-1] + (1,))
    x = jnp.asarray(rng.standard_normal(shape) * row_scale, jnp.float32).astype(dtype)
    r = jnp.asarray(rng.standard_normal(shape) * row_scale, jnp.float32).astype(dtype)
    w = jnp.asarray(rng.normal(1.0, 0.5, H), jnp.float32).astype(w_dtype or dtype)
    return x, r, w


def f32(a):
    return np.asarray(jnp.asarray(a).astype(jnp.float32))


def check_close(out, ref, dtype, ulps: int = 1):
    o, r = f32(out), f32(ref)
    assert np.isfinite(o).all()
    if jnp.dtype(dtype) == jnp.float32:
        np.testing.assert_allclose(o, r, rtol=1e-5, atol=1e-6 * np.abs(r).max())
    else:
        # summation order / rsqrt may move a value across a rounding boundary: at most 1 ulp
        # (2**-7 relative for bf16, 2**-10 for f16), and only rarely
        ulp = 2.0 ** -7 if jnp.dtype(dtype) == jnp.bfloat16 else 2.0 ** -10
        np.testing.assert_allclose(o, r, rtol=ulps * ulp, atol=1e-6 * np.abs(r).max())
        assert (o != r).mean() < 0.02, (o != r).mean()


def run_both(x, w, eps, r, **kw):
    y = fused_rms_norm(x, w, eps, **kw)
    y2, h2 = fused_rms_norm(x, w, eps, r, **kw)
    return y, y2, h2


def test_reference_is_the_decoder_rms_norm():
    """Bit-for-bit: rms_norm_reference == decoder's rms_norm, and with a residual == the decoder's
    `h = x + r; rms_norm(h, w, eps)`; and the float32 reference is RMSNorm (float64 numpy)."""
    for dtype in (jnp.float32, jnp.bfloat16):
        x, r, w = make_case((9, 80), dtype)
        eps = 1e-6
        np.testing.assert_array_equal(f32(rms_norm_reference(x, w, eps)), f32(decoder_rms_norm(x, w, eps)))
        y, h = rms_norm_reference(x, w, eps, residual=r)
        assert h.dtype == x.dtype and y.dtype == x.dtype
        np.testing.assert_array_equal(f32(h), f32(x + r))
        np.testing.assert_array_equal(f32(y), f32(decoder_rms_norm(x + r, w, eps)))
    x, _, w = make_case((5, 48), jnp.float32, scale_range=(-3.5, -2.5))  # eps matters at this scale
    xn, wn, eps = np.asarray(x, np.float64), np.asarray(w, np.float64), 1e-5
    want = wn * xn / np.sqrt((xn * xn).mean(-1, keepdims=True) + eps)
    np.testing.assert_allclose(f32(rms_norm_reference(x, w, eps)), want, rtol=1e-5)
    assert not np.allclose(want, wn * xn / np.sqrt((xn * xn).mean(-1, keepdims=True)), rtol=1e-2)


# (T, H, block_rows, dtype)
CASES = [
    (8, 128, 4, jnp.float32),  # no masking at all: T % block_rows == 0, H a power of 2
    (7, 80, 4, jnp.float32),  # row mask and column mask (H=80 in a 128-wide tile)
    (13, 80, 8, jnp.bfloat16),  # last block: 5 of 8 rows live
    (6, 96, None, jnp.bfloat16),  # default block_rows (2048 // 128 = 16 > T: one partial block)
    (33, 256, 8, jnp.float16),
    (5, 5120, 1, jnp.bfloat16),  # Qwen3-32B width: 5120 in an 8192-wide tile
    (3, 5120, 2, jnp.float32),  # ... and a partial row block
    (3, 8192, 1, jnp.bfloat16),  # Llama-70B width
]


@pytest.mark.parametrize("T,H,block_rows,dtype", CASES)
def test_matches_reference_interpret(T, H, block_rows, dtype):
    x, r, w = make_case((T, H), dtype)
    eps = 1e-6
    y, y2, h2 = run_both(x, w, eps, r, block_rows=block_rows, interpret=True)
    ry = rms_norm_reference(x, w, eps)
    ry2, rh2 = rms_norm_reference(x, w, eps, residual=r)
    assert y.shape == x.shape and y.dtype == ry.dtype
    assert h2.shape == x.shape and h2.dtype == x.dtype
    check_close(y, ry, dtype)
    check_close(y2, ry2, dtype)
    np.testing.assert_array_equal(f32(h2), f32(rh2))  # the residual sum is elementwise: exact


@pytest.mark.parametrize("T,H,block_rows,dtype", [c for c in CASES if c[3] != jnp.float16] + [(4, 80, 2, jnp.bfloat16)])
def test_quantized_output_is_the_fp8_quantization_of_y_interpret(T, H, block_rows, dtype):
    """quantize=True gives models/fp8.quantize_tokens of the kernel's own y (with and without the
    residual add; h unchanged): the scale within one ulp, the codes exact for that scale; y itself is held to the reference above. The last
    case has an all-zero row (its scale is the floor's, its values 0)."""
    x, r, w = make_case((T, H), dtype)
    if T == 4:
        x, r = x.at[1].set(0), r.at[1].set(0)
    eps = 1e-6
    kw = dict(block_rows=block_rows, interpret=True)
    for res in (None, r):
        plain = fused_rms_norm(x, w, eps, res, **kw)
        quant = fused_rms_norm(x, w, eps, res, quantize=True, **kw)
        (y, (q, scale)) = (plain, quant) if res is None else (plain[0], quant[0])
        if res is not None:
            np.testing.assert_array_equal(f32(quant[1]), f32(plain[1]))
        _, want_scale = quantize_tokens(y)
        assert q.dtype == E4M3 and q.shape == (T, H) and scale.shape == (T,) and scale.dtype == jnp.float32
        # The scale is amax / 448, computed by two different programs: XLA may turn the division
        # into a multiply by the reciprocal, one float32 ulp apart (seen on jax 0.12.1). The codes
        # are then exactly those quantize_tokens' rounding gives for the kernel's own scale.
        np.testing.assert_array_max_ulp(np.asarray(scale), np.asarray(want_scale), maxulp=1)
        codes_for_own_scale = np.clip(f32(y) / np.asarray(scale)[:, None], -E4M3_MAX, E4M3_MAX)
        np.testing.assert_array_equal(f32(q), f32(jnp.asarray(codes_for_own_scale).astype(E4M3)))
        assert np.abs(f32(q)).max() == E4M3_MAX  # each row's largest element maps to the top of e4m3
        deq = f32(q) * np.asarray(scale)[:, None]
        assert np.linalg.norm(deq - f32(y)) <= 2.0 ** -4 * np.linalg.norm(f32(y))  # e4m3's rounding bound


def test_quantized_reference_is_norm_then_quantize_tokens():
    x, r, w = make_case((3, 5, 64), jnp.bfloat16)
    (q, scale), h = rms_norm_reference(x, w, 1e-6, r, quantize=True)
    want_q, want_scale = quantize_tokens(rms_norm_reference(x, w, 1e-6, r)[0].reshape(15, 64))
    assert q.shape == (3, 5, 64) and scale.shape == (3, 5)
    np.testing.assert_array_equal(f32(q).reshape(15, 64), f32(want_q))
    np.testing.assert_array_equal(np.asarray(scale).reshape(15), np.asarray(want_scale))


def test_eps_is_applied_interpret():
    """Inputs of magnitude ~1e-3: mean(x^2) ~ eps, so a dropped or misplaced eps fails."""
    x, r, w = make_case((6, 80), jnp.float32, scale_range=(-3.2, -2.8))
    eps = 1e-6
    y, y2, h2 = run_both(x, w, eps, r, block_rows=4, interpret=True)
    check_close(y, rms_norm_reference(x, w, eps), jnp.float32)
    check_close(y2, rms_norm_reference(x, w, eps, residual=r)[0], jnp.float32)
    assert not np.allclose(f32(y), f32(rms_norm_reference(x, w, 0.0)), rtol=1e-2)


def test_leading_dims_and_mixed_weight_dtype_interpret():
    """[T, N, D] (the per-head q/k norm shape) and a float32 weight on bfloat16 activations
    (output float32, like the reference's promotion)."""
    x, r, w = make_case((5, 3, 64), jnp.bfloat16, w_dtype=jnp.float32)
    eps = 1e-6
    y, y2, h2 = run_both(x, w, eps, r, interpret=True)
    ry = rms_norm_reference(x, w, eps)
    ry2, rh2 = rms_norm_reference(x, w, eps, residual=r)
    assert y.shape == (5, 3, 64) and y.dtype == ry.dtype == jnp.float32
    assert h2.dtype == jnp.bfloat16
    check_close(y, ry, jnp.bfloat16)  # bf16-rounded normalised values times an f32 weight
    check_close(y2, ry2, jnp.bfloat16)
    np.testing.assert_array_equal(f32(h2), f32(rh2))


def test_empty_rows():
    x = jnp.zeros((0, 80), jnp.bfloat16)
    w = jnp.ones((80,), jnp.bfloat16)
    y, h = fused_rms_norm(x, w, 1e-6, x, interpret=True)
    assert y.shape == (0, 80) and h.shape == (0, 80)


@pytest.mark.parametrize("kw,args,match", [
    (dict(), dict(w_shape=(81,)), "w must have shape"),
    (dict(), dict(r_dtype=jnp.float32), "residual must match"),
    (dict(), dict(r_shape=(4, 80)), "residual must match"),
    (dict(), dict(x_dtype=jnp.int32), "dtypes must be"),
    (dict(block_rows=3), dict(), "block_rows must be a power of 2"),
    (dict(num_warps=6), dict(), "num_warps must be a power of 2"),
    (dict(block_rows=16), dict(H=5120), "exceeds 65536"),
    (dict(), dict(H=70000), "too wide"),
])
def test_unsupported_inputs_raise(kw, args, match):
    H = args.get("H", 80)
    x = jnp.ones((3, H), args.get("x_dtype", jnp.bfloat16))
    w = jnp.ones(args.get("w_shape", (H,)), jnp.bfloat16)
    r = jnp.ones(args.get("r_shape", (3, H)), args.get("r_dtype", x.dtype))
    with pytest.raises(ValueError, match=match):
        fused_rms_norm(x, w, 1e-6, r, interpret=True, **kw)


@pytest.mark.gpu
@pytest.mark.skipif(not any(d.platform == "gpu" for d in jax.devices()), reason="needs a GPU")
@pytest.mark.parametrize("block_rows,num_warps", [(None, None), (1, 8), (2, 16), (4, 16)])
def test_matches_reference_on_gpu(block_rows, num_warps):
    """The compiled Triton kernel at Qwen3-32B's H=5120 (non-power-of-2: masked 8192-wide tile),
    T=2048 bf16, with and without the residual add; vs the reference on the same GPU."""
    T, H = 2048, 5120
    x, r, w = make_case((T, H), jnp.bfloat16)
    eps = 1e-6
    y, y2, h2 = run_both(x, w, eps, r, block_rows=block_rows, num_warps=num_warps)
    # op by op, not jitted: under jit XLA's excess precision may normalise the float32 x + r
    # instead of the rounded h (about 20% of bf16 outputs then differ by an ulp)
    ry = rms_norm_reference(x, w, eps)
    ry2, rh2 = rms_norm_reference(x, w, eps, residual=r)
    # 2 ulps: the reference rounds x * inv_rms to bf16 and then w * that; the compiled kernel's
    # float32 math (and GPU rsqrt) lands up to 2 ulps away in a handful of the 10M outputs
    # (measured on H200: 7 elements of one row)
    check_close(y, ry, jnp.bfloat16, ulps=2)
    check_close(y2, ry2, jnp.bfloat16, ulps=2)
    np.testing.assert_array_equal(f32(h2), f32(rh2))


@pytest.mark.gpu
@pytest.mark.skipif(not any(d.platform == "gpu" for d in jax.devices()), reason="needs a GPU")
def test_quantized_output_on_gpu():
    """quantize=True compiled, decode-sized (T=64 and a partial T=77 at block_rows=2), H=5120
    bf16, with the residual: against the op-by-op reference. The kernel's y may sit an ulp or two
    from the reference's (above), which can move an amax or a rounding: so the scales agree to
    two bf16 ulps and nearly every e4m3 value is identical, the rest one e4m3 step apart."""
    for T, br in ((64, None), (77, 2)):
        x, r, w = make_case((T, 5120), jnp.bfloat16)
        (q, scale), h = fused_rms_norm(x, w, 1e-6, r, quantize=True, block_rows=br)
        (rq, rscale), rh = rms_norm_reference(x, w, 1e-6, r, quantize=True)
        np.testing.assert_array_equal(f32(h), f32(rh))
        np.testing.assert_allclose(np.asarray(scale), np.asarray(rscale), rtol=2 * 2.0 ** -7)
        qf, rqf = f32(q), f32(rq)
        assert (qf != rqf).mean() < 0.01, (qf != rqf).mean()
        np.testing.assert_allclose(qf, rqf, rtol=2.0 ** -3 + 2 * 2.0 ** -7, atol=2.0 ** -9)


@pytest.mark.gpu
@pytest.mark.skipif(not any(d.platform == "gpu" for d in jax.devices()), reason="needs a GPU")
def test_partial_block_on_gpu():
    """T not a multiple of block_rows on the GPU (row mask), Llama-70B H=8192, float32."""
    T, H = 1027, 8192
    x, r, w = make_case((T, H), jnp.float32)
    eps = 1e-5
    y, y2, h2 = run_both(x, w, eps, r, block_rows=2, num_warps=16)
    check_close(y, rms_norm_reference(x, w, eps), jnp.float32)
    ry2, rh2 = rms_norm_reference(x, w, eps, residual=r)
    check_close(y2, ry2, jnp.float32)
    np.testing.assert_array_equal(f32(h2), f32(rh2))
