"""FP8 on CPU (XLA emulates e4m3): W8A8 GEMMs against float, the fixture models' logits against
float, greedy identity across layouts in FP8, FP8 storage in placed checkpoints, the FP8 KV
cache in the reference and the Pallas kernels (interpret mode), and the capacity FP8 buys.
Greedy parity with transformers stays in float32 (test_models.py); FP8 is checked here."""

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fixture_paths import REFERENCE, TINY_QWEN3, checkpoint
from sidp_jax import LLM, SamplingParams
from sidp_jax.kernels.paged_attention import paged_attention_reference, write_kv
from sidp_jax.kernels.paged_decode_pallas import paged_decode_attention
from sidp_jax.loading.checkpoint import load_params
from sidp_jax.loading.placed_checkpoint import restore_placed
from sidp_jax.models.config import PRESETS
from sidp_jax.models.hf_config import load_config
from sidp_jax.models.decoder import dense_forward
from sidp_jax.models.fp8 import E4M3, E4M3_MAX, Quantized, linear, quantize
from sidp_jax.parallel.layouts import kv_tokens_per_gpu, weight_bytes_per_gpu
from sidp_jax.parallel.layouts import make_layout

CPU = jax.devices("cpu")
# e4m3 keeps 3 mantissa bits: a normal value is rounded by at most 2^-4 of itself. A GEMM of two
# rounded operands, with independent errors, is then off by at most sqrt(2) * 2^-4 = 0.088 in
# relative RMS (what the GEMMs measure: benchmarks/RESULTS.md, "FP8 accuracy").
GEMM_REL_RMS = np.sqrt(2) * 2.0 ** -4
# The bounds for whole models' W8A8 logits against the float model, with room above what the
# tiny fixtures measure (benchmarks/RESULTS.md, "FP8 accuracy"). The tiny random models'
# near-flat logits make their argmax fragile, hence the loose top-1 bound.
LOGIT_REL_RMS = 0.35
TOP1_AGREEMENT = 0.55
FIXTURE_MODELS = {"tiny-qwen3": TINY_QWEN3, "tiny-llama3": checkpoint("tiny-llama3"),
                  "tiny-qwen2": checkpoint("tiny-qwen2")}


def _rel_rms(got, want):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.sqrt(np.mean((got - want) ** 2) / np.mean(want ** 2)))


# (x shape [T, *in], weight shape [*in, *out]): the engine's four projections' forms
GEMMS = {"qkv": ((16, 64), (64, 2, 6, 16)), "o": ((16, 8, 16), (8, 16, 64)),
         "gate_up": ((16, 64), (64, 2, 96)), "down": ((16, 96), (96, 64))}


@pytest.mark.parametrize("kind", GEMMS)
def test_each_fp8_gemm_stays_within_e4m3_rounding(kind):
    seed = int.from_bytes(os.urandom(4), "little")  # fresh inputs every run (named on failure)
    rng = np.random.default_rng(seed)
    x_shape, w_shape = GEMMS[kind]
    x = jnp.asarray(rng.standard_normal(x_shape), jnp.float32)
    w = jnp.asarray(rng.standard_normal(w_shape) / np.sqrt(np.prod(x_shape[1:])), jnp.float32)
    k = len(x_shape) - 1
    perm = tuple(range(k, w.ndim)) + tuple(range(k))  # storage: [*out, *in]
    q, scale = quantize(jnp.transpose(w, perm), w.ndim - k)
    assert q.dtype == E4M3 and scale.shape == w_shape[k:]
    got = linear(x, Quantized(q, scale), out_dtype=jnp.float32)
    want = linear(x, w, out_dtype=jnp.float32)
    assert got.shape == want.shape
    assert _rel_rms(got, want) <= GEMM_REL_RMS, (kind, seed, _rel_rms(got, want))


def test_representable_inputs_multiply_exactly():
    """Values e4m3 holds exactly, each row and channel reaching 448: every scale is 1, so W8A8
    must equal the float GEMM bit for bit (checks the scales' plumbing, not just a tolerance)."""
    rng = np.random.default_rng(int.from_bytes(os.urandom(4), "little"))
    grid = np.array([-448, -64, -3, -0.5, 0, 0.25, 1, 2.5, 96, 448], np.float32)
    x = rng.choice(grid, (8, 32)); x[:, 0] = 448
    w = rng.choice(grid, (24, 32)); w[:, 0] = 448  # [out, in]
    q, scale = quantize(jnp.asarray(w), 1)
    np.testing.assert_array_equal(np.asarray(scale), 1.0)
    got = linear(jnp.asarray(x), Quantized(q, scale), out_dtype=jnp.float32)
    np.testing.assert_array_equal(np.asarray(got), x.astype(np.float64) @ w.T.astype(np.float64))


def test_the_gemm_is_one_fp8_dot():
    """What XLA is handed: a dot_general of two e4m3 operands (on Hopper: a cuBLASLt FP8 GEMM,
    checked in test_gpu.py), the weight contracting on its minor axis."""
    x = jnp.ones((4, 64), jnp.bfloat16)
    q, s = quantize(jnp.ones((32, 64)), 1)
    hlo = jax.jit(lambda x, q, s: linear(x, Quantized(q, s))).lower(x, q, s).as_text()
    dots = [line for line in hlo.splitlines() if "dot_general" in line]
    assert len(dots) == 1 and dots[0].count("f8E4M3FN") >= 2, dots
    assert "contracting_dims = [1] x [1]" in dots[0], dots


def _logits(model_dir, quantization, prompts):
    cfg = dataclasses.replace(load_config(model_dir), quantization=quantization)
    params = load_params(model_dir, cfg, jnp.float32, make_layout("dp=1", "dp", devices=CPU[:1]))
    forward = jax.jit(lambda p, ids: dense_forward(cfg, p, ids))
    return [np.asarray(forward(params, jnp.asarray(ids))) for ids in prompts]


@pytest.mark.parametrize("name", FIXTURE_MODELS)
def test_fp8_logits_stay_close_to_the_float_model(name):
    with open(os.path.join(REFERENCE, f"{name}.json")) as f:
        prompts = [p["token_ids"] for p in json.load(f)["prompts"]]
    ref, fp8 = _logits(FIXTURE_MODELS[name], None, prompts), _logits(FIXTURE_MODELS[name], "fp8", prompts)
    rel = [_rel_rms(b, a) for a, b in zip(ref, fp8)]
    agree = np.mean(np.concatenate([a.argmax(-1) == b.argmax(-1) for a, b in zip(ref, fp8)]))
    print(f"{name}: logits rel RMS {min(rel):.3f}-{max(rel):.3f}, top-1 agreement {agree:.3f} "
          f"over {sum(map(len, prompts))} positions")
    assert max(rel) <= LOGIT_REL_RMS, rel
    assert agree >= TOP1_AGREEMENT, agree


GREEDY = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
PROMPTS = ["Hello there, how are", "The quick brown fox", "1 2 3 4 5 6"]
LAYOUTS = {
    "dp": dict(mesh="dp=1", parallel="dp"),
    "tp": dict(mesh="tp=2", parallel="tp"),
    "sidp-striped-was": dict(mesh="dp=2", ffn_mode="was", was_runner="spmd"),
    "sidp-striped-was-replicas": dict(mesh="dp=2", ffn_mode="was", was_runner="replicas"),
    "sidp-striped-cas-tp": dict(mesh="dp=2,tp=2", ffn_mode="cas"),
    "sidp-owner-was": dict(mesh="dp=2", placement="owner", ffn_mode="was"),
    "sidp-owner-cas-tp": dict(mesh="dp=2,tp=2", placement="owner", ffn_mode="cas"),
}


def _greedy(**kw):
    llm = LLM(verbose=False, dtype="float32", devices=CPU, kv_cache_tokens=512, **kw)
    return [o.outputs[0].token_ids for o in llm.generate(PROMPTS, GREEDY, use_tqdm=False)], llm


def test_fp8_greedy_is_identical_in_every_layout_and_mode():
    """Activation scales span the devices a contraction is split over (tp, the striped pool),
    so every layout rounds each token alike and FP8 greedy output is the same everywhere."""
    want, llm = _greedy(quantization="fp8", **LAYOUTS["dp"])
    leaves = llm.engine.runner.params["layers"][0]
    assert isinstance(leaves["ffn"]["gate_up"], Quantized) and isinstance(leaves["qkv"], Quantized)
    assert leaves["ffn"]["gate_up"].values.dtype == E4M3 and leaves["ffn"]["gate_up"].scale.dtype == jnp.float32
    assert leaves["attn_norm"].dtype == jnp.float32 and llm.engine.runner.params["embed"].dtype == jnp.float32
    for name, kw in LAYOUTS.items():
        if name != "dp":
            assert _greedy(quantization="fp8", **kw)[0] == want, name


def test_an_fp8_checkpoint_runs_in_fp8_by_default():
    for form in ("block", "channel"):
        llm = LLM(checkpoint(f"tiny-qwen3-fp8-{form}"), verbose=False, dtype="float32", devices=CPU[:1],
                  kv_cache_tokens=256)
        assert llm.cfg.quantization == "fp8"
        assert llm.engine.runner.params["layers"][0]["ffn"]["down"].values.dtype == E4M3, form


def test_placed_fp8_weights_restore_as_saved(tmp_path):
    kw = dict(mesh="dp=2", parallel="sidp", placement="owner", ffn_mode="cas")
    want, llm = _greedy(quantization="fp8", **kw)
    llm.save_placed(str(tmp_path / "placed"))
    llm = LLM(str(tmp_path / "placed"), verbose=False, dtype="float32", devices=CPU, kv_cache_tokens=512, **kw)
    assert llm.cfg.quantization == "fp8"
    assert [o.outputs[0].token_ids for o in llm.generate(PROMPTS, GREEDY, use_tqdm=False)] == want
    with pytest.raises(ValueError, match="quantization='fp8', not None"):  # float specs never read FP8 bytes
        restore_placed(str(tmp_path / "placed"), dataclasses.replace(llm.cfg, quantization=None), llm.layout,
                       jnp.float32)


def test_quantization_choices_are_checked():
    with pytest.raises(ValueError, match="quantization must be one of 'fp8'"):
        LLM(verbose=False, quantization="int4")
    with pytest.raises(ValueError, match="kv_cache_dtype must be one of"):
        LLM(verbose=False, kv_cache_dtype="int8")


def _random_cache(rng, shape, gain):
    return jnp.asarray(gain * rng.standard_normal(shape), jnp.float32)


def test_fp8_kv_cache_in_the_reference_and_the_decode_kernel():
    """An e4m3 cache: writes saturate instead of overflowing, the decode kernel (interpret mode)
    reads it as the reference does, and both stay within e4m3's rounding of a float cache."""
    rng = np.random.default_rng(int.from_bytes(os.urandom(4), "little"))
    S, Nq, Nkv, D, P, MB, pages = 4, 8, 2, 32, 8, 4, 20
    q = _random_cache(rng, (S, Nq, D), 1.0)
    k32, v32 = _random_cache(rng, (pages, P, Nkv, D), 1.0), _random_cache(rng, (pages, P, Nkv, D), 1.0)
    k8, v8 = k32.astype(E4M3), v32.astype(E4M3)
    bt = jnp.asarray(1 + rng.permutation(pages - 1)[:S * MB].reshape(S, MB), jnp.int32)
    lengths = jnp.asarray([1, 9, 17, MB * P], jnp.int32)
    scale = D ** -0.5
    ref = lambda k, v: paged_attention_reference(q, k, v, jnp.int32(0), bt, jnp.arange(S), lengths - 1, scale=scale)
    got = paged_decode_attention(q, k8, v8, jnp.int32(0), bt, lengths, scale=scale, interpret=True)
    np.testing.assert_allclose(np.asarray(got), np.asarray(ref(k8, v8)), rtol=1e-5, atol=1e-5)
    assert _rel_rms(ref(k8, v8), ref(k32, v32)) <= GEMM_REL_RMS
    big = write_kv(k8, jnp.full((2, Nkv, D), 1e4), jnp.int32(0), jnp.asarray([3, 4]))
    assert np.asarray(big.astype(jnp.float32)).reshape(-1, Nkv, D)[3:5].max() == E4M3_MAX


def test_fp8_kv_cache_halves_the_bytes_per_token_and_keeps_greedy_across_kernels():
    bf16 = LLM(verbose=False, devices=CPU[:1], kv_cache_tokens=256, dtype="bfloat16")
    fp8 = LLM(verbose=False, devices=CPU[:1], kv_cache_tokens=256, dtype="bfloat16", kv_cache_dtype="fp8")
    assert fp8.engine.runner.kv["k"].dtype == E4M3
    assert fp8.kv_info["kv_bytes_per_page_per_device"] * 2 == bf16.kv_info["kv_bytes_per_page_per_device"]
    want = _greedy(kv_cache_dtype="fp8", mesh="dp=1", parallel="dp")[0]
    assert _greedy(kv_cache_dtype="fp8", mesh="dp=1", parallel="dp", attention="pallas-interpret")[0] == want


def test_fp8_capacity_on_an_h200():
    """The analytic bounds with FP8 sizes: Qwen3-32B's projections take one byte a weight, and
    the FP8 KV cache holds at least 1.95x the bf16 cache's tokens (the issue's target)."""
    cfg = PRESETS["qwen3-32b"]
    fp8 = dataclasses.replace(cfg, quantization="fp8")
    bf16_bytes, fp8_bytes = weight_bytes_per_gpu(cfg, "dp", 1), weight_bytes_per_gpu(fp8, "dp", 1)
    embeddings = 2 * cfg.vocab_size * cfg.hidden_size * 2
    assert fp8_bytes - embeddings == pytest.approx((bf16_bytes - embeddings) / 2, rel=0.01)
    h200 = 143.8e9
    tokens = {kv: kv_tokens_per_gpu(fp8, "dp", 1, h200, 0.9, kv_dtype=kv) for kv in (jnp.bfloat16, E4M3)}
    assert tokens[E4M3] >= 1.95 * tokens[jnp.bfloat16]
    assert kv_tokens_per_gpu(fp8, "dp", 1, h200, 0.9) > kv_tokens_per_gpu(cfg, "dp", 1, h200, 0.9)
    llama = dataclasses.replace(PRESETS["llama3.1-70b"], quantization="fp8")
    assert weight_bytes_per_gpu(llama, "dp", 1) < 0.9 * h200 - 3e9  # 70B in FP8 fits one H200
