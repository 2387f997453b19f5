"""Mixed-step attention (decode kernel + chunk kernel) against the pure-JAX reference.

Interpret mode on CPU; the same cases compiled on GPU under `-m gpu`. Every case draws fresh
random queries, caches and page assignments, and mixes decode rows, fresh prompt chunks and
chunks continuing an earlier prefix, with lengths that are not multiples of the tile or page.
"""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sidp_jax.engine.step_inputs import mixed_step_layout
from sidp_jax.kernels.paged_prefill_pallas import paged_prefill_attention
from sidp_jax.kernels.attention import mixed_attention
from sidp_jax.kernels.paged_attention import paged_attention_reference

_seed = itertools.count(2000)


def make_mixed_case(*, chunks, T, S, Nq, Nkv, D, P, MB, L, num_pages, layer, dtype, tile_tokens):
    """chunks: (n, p0) per row in order; decode rows (n == 1) first where wanted.

    Returns kernel inputs, reference inputs and the mask of real tokens."""
    rng = np.random.default_rng(next(_seed))
    q = jnp.asarray(2.0 * rng.standard_normal((T, Nq, D), np.float32)).astype(dtype)
    k = jnp.asarray(rng.standard_normal((L * num_pages, P, Nkv, D), np.float32)).astype(dtype)
    v = jnp.asarray(rng.standard_normal((L * num_pages, P, Nkv, D), np.float32)).astype(dtype)
    pages = 1 + rng.permutation(num_pages - 1)[: S * MB]
    block_tables = pages.reshape(S, MB).astype(np.int32)
    token_seq = np.zeros(T, np.int32)
    positions = np.zeros(T, np.int32)
    spans, t = [], 0
    for row, (n, p0) in enumerate(chunks):
        assert p0 + n <= MB * P
        token_seq[t:t + n] = row
        positions[t:t + n] = np.arange(p0, p0 + n)
        spans.append((row, t, n, p0))
        t += n
    assert t <= T
    real = np.zeros(T, bool)
    real[:t] = True
    decode_len, tiles = mixed_step_layout(spans, S, T, tile_tokens)
    return (q, k, v, jnp.int32(layer * num_pages), jnp.asarray(block_tables), jnp.asarray(token_seq),
            jnp.asarray(positions), jnp.asarray(decode_len), jnp.asarray(tiles), real)


def run_case(dtype, interpret, tile_tokens=4, f32_tol=2e-5, **kw):
    q, k, v, off, bt, token_seq, positions, decode_len, tiles, real = make_mixed_case(
        dtype=dtype, tile_tokens=tile_tokens, **kw)
    scale = kw["D"] ** -0.5
    out = mixed_attention(q, k, v, off, bt, token_seq, positions, decode_len=decode_len, tiles=tiles,
                          scale=scale, tile_tokens=tile_tokens, interpret=interpret)
    with jax.default_matmul_precision("highest"):  # GPU: no TF32 in the float32 reference
        ref = paged_attention_reference(q, k, v, off, bt, token_seq, positions, scale=scale)
    out = np.asarray(out.astype(jnp.float32))
    ref = np.asarray(ref.astype(jnp.float32))
    assert np.isfinite(out).all()
    assert (out[~real] == 0).all(), "padding tokens must stay zero"
    o, r = out[real], ref[real]
    if dtype == jnp.float32:
        np.testing.assert_allclose(o, r, rtol=f32_tol, atol=f32_tol)
    else:
        rel = np.linalg.norm(o - r) / np.linalg.norm(r)
        assert rel < 2e-2, rel
    return decode_len, tiles


# rows: (tokens, first position)
MIXED = [(1, 9), (1, 0), (1, 22), (7, 0), (9, 5), (1, 13), (4, 19)]


@pytest.mark.parametrize("Nq,Nkv,D,P,ppb", [(8, 2, 16, 4, 4), (4, 4, 16, 16, 1), (8, 1, 32, 8, 2),
                                            (28, 4, 16, 4, 4), (40, 8, 16, 8, 2)])  # groups of 7 and 5
def test_mixed_attention_matches_reference(Nq, Nkv, D, P, ppb):
    MB = 32 // P  # 32 positions per row
    decode_len, tiles = run_case(jnp.float32, True, chunks=MIXED, T=32, S=8, Nq=Nq, Nkv=Nkv, D=D, P=P, MB=MB,
                                 L=2, num_pages=8 * MB + 3, layer=1)
    # the layout under test really mixes: 3 decode-kernel rows, a 1-token row after a chunk goes to a tile
    assert (decode_len > 0).sum() == 3 and decode_len[5] == 0
    assert int(tiles[:, 2].sum()) == 7 + 9 + 1 + 4 and int(tiles[:, 2].max()) == 4


def test_prefill_only_long_chunks_bf16():
    run_case(jnp.bfloat16, True, tile_tokens=8, chunks=[(40, 0), (17, 30), (3, 61)], T=64, S=4,
             Nq=8, Nkv=2, D=32, P=8, MB=8, L=3, num_pages=40, layer=2)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_chunk_kernel_flat_loads_give_the_same_answer(dtype):
    """flat_loads (per-token page ids, [block tokens, D] gathers; the default) computes exactly what
    the reshaped loads (flat_loads=False) do (held to the reference above), on chunks that span
    pages and blocks."""
    q, k, v, off, bt, _, _, _, tiles, real = make_mixed_case(
        dtype=dtype, tile_tokens=4, chunks=MIXED, T=32, S=8, Nq=8, Nkv=2, D=16, P=4, MB=8, L=2,
        num_pages=8 * 8 + 3, layer=1)
    kw = dict(scale=0.25, tile_tokens=4, pages_per_block=2, interpret=True)
    init = jnp.zeros_like(q)
    want = np.asarray(paged_prefill_attention(q, k, v, off, bt, tiles, init, flat_loads=False, **kw)
                      .astype(jnp.float32))
    got = np.asarray(paged_prefill_attention(q, k, v, off, bt, tiles, init, flat_loads=True, **kw)
                     .astype(jnp.float32))
    assert np.abs(want[real]).max() > 0
    np.testing.assert_array_equal(got, want)


@pytest.mark.gpu
def test_chunk_kernel_flat_loads_on_gpu():
    if jax.default_backend() != "gpu":
        pytest.skip("needs a GPU")
    rng = np.random.default_rng(11)
    chunks = [(300, 0), (200, 700), (33, 100)] + [(1, int(p)) for p in rng.integers(0, 900, 8)]
    q, k, v, off, bt, _, _, _, tiles, real = make_mixed_case(
        dtype=jnp.bfloat16, tile_tokens=16, chunks=chunks, T=1024, S=16, Nq=64, Nkv=8, D=128, P=16, MB=64, L=2,
        num_pages=16 * 64 + 1, layer=1)
    kw = dict(scale=128 ** -0.5, tile_tokens=16)
    init = jnp.zeros_like(q)
    want = np.asarray(paged_prefill_attention(q, k, v, off, bt, tiles, init, flat_loads=False, **kw)
                      .astype(jnp.float32))[real]
    got = np.asarray(paged_prefill_attention(q, k, v, off, bt, tiles, init, flat_loads=True, **kw)
                     .astype(jnp.float32))[real]
    assert np.linalg.norm(got - want) / np.linalg.norm(want) < 1e-2


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_mixed_attention_gpu(dtype):
    if jax.default_backend() != "gpu":
        pytest.skip("needs a GPU")
    rng = np.random.default_rng(7)
    chunks = [(1, int(p)) for p in rng.integers(0, 900, 48)] + [(300, 0), (200, 700), (33, 100), (1, 5)]
    # float32 on GPU: exact (IEEE) dots, but the GPU's exp2 is an approximation: 1e-4
    run_case(dtype, False, tile_tokens=16, f32_tol=1e-4, chunks=chunks, T=1024, S=64, Nq=64, Nkv=8, D=128, P=16, MB=64,
             L=2, num_pages=64 * 64 + 1, layer=1)


@pytest.mark.gpu
@pytest.mark.parametrize("Nq,Nkv", [(28, 4), (40, 8)])  # groups of 7 and 5, padded to 8
def test_mixed_attention_odd_groups_gpu(Nq, Nkv):
    if jax.default_backend() != "gpu":
        pytest.skip("needs a GPU")
    rng = np.random.default_rng(11)
    chunks = [(1, int(p)) for p in rng.integers(0, 400, 24)] + [(200, 0), (57, 300), (1, 5)]
    run_case(jnp.bfloat16, False, tile_tokens=16, chunks=chunks, T=512, S=32, Nq=Nq, Nkv=Nkv, D=128, P=16, MB=32,
             L=2, num_pages=32 * 32 + 1, layer=1)
