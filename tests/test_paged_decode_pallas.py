"""The Pallas paged decode kernel against the pure-JAX reference (interpret mode on CPU; -m gpu for real)."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sidp_jax.kernels.paged_attention import paged_attention_reference
from sidp_jax.kernels.paged_decode_pallas import paged_decode_attention

_seed = itertools.count(1000)


def make_case(*, S, Nq, Nkv, D, P, MB, L, num_pages, layer, lengths, dtype, q_gain=2.0):
    """Random q/K/V over L layers' page pools; each row gets distinct random pages of `layer`.

    Block-table entries past a row's last page hold other random (valid) page ids: the kernel
    must not use them.
    """
    rng = np.random.default_rng(next(_seed))  # fresh inputs for every case
    q = jnp.asarray(q_gain * rng.standard_normal((S, Nq, D), np.float32)).astype(dtype)
    k = jnp.asarray(rng.standard_normal((L * num_pages, P, Nkv, D), np.float32)).astype(dtype)
    v = jnp.asarray(rng.standard_normal((L * num_pages, P, Nkv, D), np.float32)).astype(dtype)
    assert S * MB <= num_pages - 1
    pages = 1 + rng.permutation(num_pages - 1)[: S * MB]  # page 0 = scratch
    block_tables = jnp.asarray(pages.reshape(S, MB), jnp.int32)
    lengths = jnp.asarray(lengths, jnp.int32)
    assert lengths.shape == (S,) and int(lengths.max()) <= MB * P
    return q, k, v, jnp.int32(layer * num_pages), block_tables, lengths


def reference(q, k, v, off, bt, lengths, scale):
    S = q.shape[0]
    return paged_attention_reference(q, k, v, off, bt, jnp.arange(S, dtype=jnp.int32), lengths - 1, scale=scale)


def check(out, ref, lengths, dtype):
    out = np.asarray(out.astype(jnp.float32))
    ref = np.asarray(ref.astype(jnp.float32))
    lengths = np.asarray(lengths)
    assert np.isfinite(out).all()
    assert (out[lengths == 0] == 0).all(), "padding rows (length 0) must be zeros"
    live = lengths > 0
    o, r = out[live], ref[live]
    if dtype == jnp.float32:
        np.testing.assert_allclose(o, r, rtol=1e-5, atol=1e-5)
    else:
        rel = np.linalg.norm(o - r) / np.linalg.norm(r)
        assert rel < 2e-2, rel
        np.testing.assert_allclose(o, r, rtol=5e-2, atol=2e-2 * np.abs(r).max())


# (Nq, Nkv, D, P, MB, pages_per_block, min_rows, dtype)
CASES = [
    (4, 2, 16, 4, 7, 2, 16, jnp.float32),  # G=2 padded to 16; MB not a multiple of ppb
    (8, 1, 32, 16, 5, None, 16, jnp.float32),  # G=8 padded to 16; default ppb (8 pages/block)
    (8, 8, 16, 16, 4, 1, 1, jnp.float32),  # MHA (G=1), no padding, one page per block
    (8, 8, 16, 4, 6, 4, 16, jnp.float32),  # MHA padded to 16 rows
    (8, 1, 32, 16, 3, 2, 8, jnp.float32),  # G=8 unpadded
    (4, 2, 16, 4, 5, None, 8, jnp.float32),  # defaults: G=2 padded to 8, 16 pages per block
    (4, 2, 32, 4, 8, 4, 16, jnp.bfloat16),
    (8, 1, 16, 16, 4, 2, 16, jnp.bfloat16),
    (28, 4, 16, 16, 4, 2, 8, jnp.float32),  # Qwen2.5-7B's group of 7, padded to 8
    (40, 8, 16, 16, 4, 2, 8, jnp.bfloat16),  # Qwen2.5-14B's group of 5, padded to 8
    (6, 2, 16, 4, 5, None, 16, jnp.float32),  # a group of 3 padded to 4, then to 16 rows
]


@pytest.mark.parametrize("Nq,Nkv,D,P,MB,ppb,min_rows,dtype", CASES)
def test_matches_reference_interpret(Nq, Nkv, D, P, MB, ppb, min_rows, dtype):
    cap = MB * P
    # ragged: 1 token, a full last page, a length-0 padding row, a full table, odd lengths
    lengths = [1, P, 0, cap, 2 * P + 1, cap - 1, P - 1 if P > 1 else 1, max(1, cap // 2)]
    S = len(lengths)
    L, num_pages, layer = 3, S * MB + 5, 2
    args = make_case(S=S, Nq=Nq, Nkv=Nkv, D=D, P=P, MB=MB, L=L, num_pages=num_pages, layer=layer,
                     lengths=lengths, dtype=dtype)
    scale = D ** -0.5
    out = paged_decode_attention(*args, scale=scale, pages_per_block=ppb, min_rows=min_rows, interpret=True)
    assert out.shape == args[0].shape and out.dtype == args[0].dtype
    check(out, reference(*args, scale), args[5], dtype)


def test_layer_offset_is_traced_and_selects_the_layer():
    """One jitted function over a traced layer: each layer's pool gives that layer's answer."""
    S, Nq, Nkv, D, P, MB, L = 3, 4, 2, 16, 4, 3, 3
    num_pages = S * MB + 2
    q, k, v, _, bt, lengths = make_case(S=S, Nq=Nq, Nkv=Nkv, D=D, P=P, MB=MB, L=L, num_pages=num_pages,
                                        layer=0, lengths=[5, 12, 1], dtype=jnp.float32)
    f = jax.jit(lambda layer: paged_decode_attention(q, k, v, layer * num_pages, bt, lengths, scale=0.25,
                                                     pages_per_block=2, interpret=True))
    outs = [np.asarray(f(jnp.int32(layer))) for layer in range(L)]
    for layer in range(L):
        ref = reference(q, k, v, jnp.int32(layer * num_pages), bt, lengths, 0.25)
        np.testing.assert_allclose(outs[layer], np.asarray(ref), rtol=1e-5, atol=1e-5)
    assert not np.allclose(outs[0], outs[1])


def test_stale_cache_past_length_is_ignored():
    """NaN in cache slots past each row's length (same page or pages past the end) never leaks in."""
    lengths = [3, 9, 16]
    S, Nq, Nkv, D, P, MB, L = 3, 4, 1, 16, 4, 4, 1
    q, k, v, off, bt, lengths = make_case(S=S, Nq=Nq, Nkv=Nkv, D=D, P=P, MB=MB, L=L, num_pages=S * MB + 1,
                                          layer=0, lengths=lengths, dtype=jnp.float32)
    ref = reference(q, k, v, off, bt, lengths, 0.25)
    btn = np.asarray(bt)
    kn, vn = np.array(k), np.array(v)
    for s, n in enumerate(np.asarray(lengths)):
        for t in range(int(n), MB * P):
            kn[btn[s, t // P], t % P] = np.nan
            vn[btn[s, t // P], t % P] = np.nan
    kn[0], vn[0] = np.nan, np.nan  # the scratch page too
    out = paged_decode_attention(q, jnp.asarray(kn), jnp.asarray(vn), off, bt, lengths, scale=0.25,
                                 pages_per_block=2, interpret=True)
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not any(d.platform == "gpu" for d in jax.devices()), reason="needs a GPU")
@pytest.mark.parametrize("P,max_len", [(16, 2048), (32, 1024)])
def test_matches_reference_on_gpu(P, max_len):
    """The compiled Triton kernel (defaults: bare 8-row group) at per-device serving shapes
    (64 q heads / 8 kv heads, D=128, bf16), ragged lengths incl. 1, a full page, the full table, 0."""
    S, Nq, Nkv, D, L = 64, 64, 8, 128, 2
    MB = max_len // P
    rng = np.random.default_rng(next(_seed))
    lengths = rng.integers(1, max_len + 1, S)
    lengths[:4] = [1, P, max_len, 0]
    num_pages = S * MB + 7
    args = make_case(S=S, Nq=Nq, Nkv=Nkv, D=D, P=P, MB=MB, L=L, num_pages=num_pages, layer=1,
                     lengths=lengths, dtype=jnp.bfloat16)
    scale = D ** -0.5
    check(paged_decode_attention(*args, scale=scale), reference(*args, scale), args[5], jnp.bfloat16)


@pytest.mark.gpu
@pytest.mark.skipif(not any(d.platform == "gpu" for d in jax.devices()), reason="needs a GPU")
def test_padded_group_on_gpu():
    """min_rows=16: the 8-row group zero-padded to 16 rows in-kernel (the classic Triton dot minimum)."""
    S, Nq, Nkv, D, P, L, max_len = 64, 64, 8, 128, 16, 2, 2048
    MB = max_len // P
    rng = np.random.default_rng(next(_seed))
    lengths = rng.integers(1, max_len + 1, S)
    lengths[:4] = [1, P, max_len, 0]
    args = make_case(S=S, Nq=Nq, Nkv=Nkv, D=D, P=P, MB=MB, L=L, num_pages=S * MB + 7, layer=1,
                     lengths=lengths, dtype=jnp.bfloat16)
    scale = D ** -0.5
    out = paged_decode_attention(*args, scale=scale, min_rows=16)
    check(out, reference(*args, scale), args[5], jnp.bfloat16)


@pytest.mark.gpu
@pytest.mark.skipif(not any(d.platform == "gpu" for d in jax.devices()), reason="needs a GPU")
@pytest.mark.parametrize("Nq,Nkv", [(28, 4), (40, 8)])  # Qwen2.5-7B, Qwen2.5-14B: groups of 7 and 5
def test_groups_that_are_not_powers_of_two_on_gpu(Nq, Nkv):
    S, D, P, L, max_len = 32, 128, 16, 2, 1024
    MB = max_len // P
    rng = np.random.default_rng(next(_seed))
    lengths = rng.integers(1, max_len + 1, S)
    lengths[:3] = [1, max_len, 0]
    args = make_case(S=S, Nq=Nq, Nkv=Nkv, D=D, P=P, MB=MB, L=L, num_pages=S * MB + 7, layer=1,
                     lengths=lengths, dtype=jnp.bfloat16)
    scale = D ** -0.5
    out = paged_decode_attention(*args, scale=scale)
    check(out, reference(*args, scale), args[5], jnp.bfloat16)
