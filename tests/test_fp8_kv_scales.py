"""The FP8 KV cache against a float one, and static FP8 KV cache scales (compressed-tensors
`kv_cache_scheme`): folded into attention, read from a checkpoint, placed by every layout."""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fixture_paths import REFERENCE, TINY_QWEN3, checkpoint
from sidp_jax import LLM, SamplingParams
from sidp_jax.kernels.paged_attention import paged_attention_reference, write_kv
from sidp_jax.loading.safetensors_io import SafetensorsCheckpoint
from sidp_jax.models.hf_config import load_config
from sidp_jax.models.decoder import with_kv_scales
from sidp_jax.models.fp8 import E4M3, E4M3_MAX
from test_fp8 import GEMM_REL_RMS as E4M3_REL_RMS, _rel_rms  # two operands each rounded by at most 2^-4

CPU = jax.devices("cpu")
SCALED = checkpoint("tiny-qwen3-fp8-channel-kv")  # per kv head scales (tools/make_fp8_fixtures.py)
UNSCALED = checkpoint("tiny-qwen3-fp8-channel")  # the same weights without them
# Prompt logprobs with an FP8 KV cache against a float cache: what the fixtures measure is in
# benchmarks/RESULTS.md, "FP8 accuracy"; the bounds leave room above it. The tiny random models'
# near-flat logits make top-1 fragile.
KV_LOGPROB_MEAN_ABS = 0.35
KV_TOP1_AGREEMENT = 0.6


def _paged_attend(T: int, P: int = 4):
    """attend() over a one-sequence paged cache (pages 1.. in order), as decoder.paged_attend."""
    bt = jnp.arange(1, 1 + -(-T // P), dtype=jnp.int32)[None]
    pos = jnp.arange(T, dtype=jnp.int32)
    slots = bt[0, pos // P] * P + pos % P

    def attend(q, k, v, kv):
        kc, vc = write_kv(kv["k"], k, jnp.int32(0), slots), write_kv(kv["v"], v, jnp.int32(0), slots)
        o = paged_attention_reference(q, kc, vc, jnp.int32(0), bt, jnp.zeros(T, jnp.int32), pos,
                                      scale=q.shape[-1] ** -0.5)
        return o, {"k": kc, "v": vc}
    return attend


def test_kv_scales_fold_into_attention_and_fit_an_e4m3_cache_to_each_head():
    seed = int.from_bytes(os.urandom(4), "little")
    rng = np.random.default_rng(seed)
    T, Nq, Nkv, D, P = 12, 8, 2, 16, 4
    # head 0 saturates e4m3 at scale 1 (at 3000x most values clip: at 300x only ~14% did, and the
    # unscaled error fell below 2x the bound for some seeds), head 1 sinks into its subnormals
    gains = np.array([3000.0, 1e-3])
    k, v = (jnp.asarray(rng.standard_normal((T, Nkv, D)) * gains[None, :, None], jnp.float32) for _ in range(2))
    q_gain = np.repeat(1 / gains, Nq // Nkv)[None, :, None]  # logits O(1): softmax as sensitive as usual
    q = jnp.asarray(rng.standard_normal((T, Nq, D)) * q_gain, jnp.float32)
    attend = _paged_attend(T, P)
    cache = lambda dtype: {n: jnp.zeros((1 + -(-T // P), P, Nkv, D), dtype) for n in ("k", "v")}
    want, _ = attend(q, k, v, cache(jnp.float32))
    # With a float cache the scales change nothing: they are folded into q and the output.
    ks, vs = (jnp.asarray(rng.uniform(0.01, 10, Nkv), jnp.float32) for _ in range(2))
    got, _ = with_kv_scales(attend, ks, vs)(q, k, v, cache(jnp.float32))
    G = Nq // Nkv
    per_head = lambda o, h: o[:, h * G:(h + 1) * G]  # each kv head's query heads (gains differ by 3e5)
    for h in range(Nkv):
        assert _rel_rms(per_head(got, h), per_head(want, h)) <= 1e-5, (seed, h)  # float32 rounding
    # e4m3: scales of each head's amax / 448 keep it within e4m3's rounding; scale 1 does not.
    amax = lambda x: jnp.max(jnp.abs(x), axis=(0, 2)) / E4M3_MAX
    scaled, kv8 = with_kv_scales(attend, amax(k), amax(v))(q, k, v, cache(E4M3))
    unscaled, _ = attend(q, k, v, cache(E4M3))
    assert kv8["k"].dtype == E4M3
    for h in range(Nkv):
        err = lambda o: _rel_rms(per_head(o, h), per_head(want, h))
        assert err(scaled) <= E4M3_REL_RMS, (seed, h, err(scaled))
        assert err(unscaled) > 2 * E4M3_REL_RMS, (seed, h, err(unscaled))


def _prompt_logprobs(model, kv_cache_dtype):
    with open(os.path.join(REFERENCE, "tiny-qwen3.json")) as f:
        prompts = [{"prompt_token_ids": p["token_ids"]} for p in json.load(f)["prompts"]]
    llm = LLM(model=model, verbose=False, dtype="float32", devices=CPU[:1], kv_cache_tokens=1024,
              kv_cache_dtype=kv_cache_dtype)
    params = SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=1)
    return [o.prompt_logprobs[1:] for o in llm.generate(prompts, params, use_tqdm=False)]


@pytest.mark.parametrize("model", [TINY_QWEN3, SCALED], ids=["scale-1", "checkpoint-scales"])
def test_an_fp8_kv_cache_stays_close_to_a_float_cache(model):
    """Teacher-forced (prompt logprobs), so one early flip does not derail the comparison."""
    diffs, agree = [], []
    for got, want in zip(_prompt_logprobs(model, "fp8"), _prompt_logprobs(model, "auto")):
        for g, w in zip(got, want):
            token = next(iter(w))  # the prompt token's own entry comes first
            diffs.append(abs(g[token].logprob - w[token].logprob))
            top = lambda p: next(t for t, lp in p.items() if lp.rank == 1)
            agree.append(top(g) == top(w))
    print(f"FP8 KV vs float KV: prompt logprob mean |diff| {np.mean(diffs):.3f} (max {np.max(diffs):.3f}), "
          f"top-1 agreement {np.mean(agree):.2f} over {len(diffs)} positions")
    assert np.mean(diffs) <= KV_LOGPROB_MEAN_ABS and np.mean(agree) >= KV_TOP1_AGREEMENT, (diffs, agree)


GREEDY = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
PROMPTS = ["Hello there, how are", "The quick brown fox", "1 2 3 4 5 6"]
LAYOUTS = {"tp": dict(mesh="tp=2", parallel="tp"), "sidp-striped-cas-tp": dict(mesh="dp=2,tp=2", ffn_mode="cas"),
           "sidp-owner-was": dict(mesh="dp=2", placement="owner", ffn_mode="was")}


def _greedy(model, **kw):
    llm = LLM(model=model, verbose=False, dtype="float32", devices=CPU, kv_cache_tokens=512, **kw)
    return [o.outputs[0].token_ids for o in llm.generate(PROMPTS, GREEDY, use_tqdm=False)], llm


def test_a_checkpoints_kv_scales_load_and_keep_greedy_in_every_layout():
    assert load_config(SCALED).kv_cache_scales == "attn_head"
    want, llm = _greedy(SCALED, kv_cache_dtype="fp8", mesh="dp=1", parallel="dp")
    layer = llm.engine.runner.params["layers"][1]
    stored = SafetensorsCheckpoint(SCALED).get("model.layers.1.self_attn.v_scale")
    assert layer["v_scale"].dtype == jnp.float32 and layer["v_scale"].shape == stored.shape
    np.testing.assert_array_equal(np.asarray(layer["v_scale"]), stored)
    assert llm.engine.runner.kv["k"].dtype == E4M3
    for name, kw in LAYOUTS.items():
        assert _greedy(SCALED, kv_cache_dtype="fp8", **kw)[0] == want, name
    # A float cache: the scales fold away, so the output is that of the same weights without them.
    assert _greedy(SCALED, mesh="dp=1", parallel="dp")[0] == _greedy(UNSCALED, mesh="dp=1", parallel="dp")[0]


@pytest.mark.parametrize("shape", [(), (1,)])
def test_a_per_tensor_scale_reads_as_every_heads(tmp_path, shape):
    """strategy "tensor": one scale per layer ([] or [1] in the file) applies to every kv head."""
    model = tmp_path / "per-tensor"
    shutil.copytree(SCALED, model)
    config = json.loads((model / "config.json").read_text())
    config["quantization_config"]["kv_cache_scheme"]["strategy"] = "tensor"
    (model / "config.json").write_text(json.dumps(config))
    src = SafetensorsCheckpoint(str(SCALED))
    tensors = {n: np.asarray(src.get(n)) for n in src.names()}
    for n in [n for n in tensors if n.endswith(("k_scale", "v_scale"))]:
        tensors[n] = np.asarray(tensors[n].max(), np.float32).reshape(shape)
    _write_like_the_fixture(model / "model.safetensors", tensors)
    llm = LLM(model=str(model), verbose=False, dtype="float32", devices=CPU[:1], kv_cache_tokens=256,
              kv_cache_dtype="fp8")
    k_scale = np.asarray(llm.engine.runner.params["layers"][0]["k_scale"])
    assert k_scale.shape == (2,) and k_scale[0] == k_scale[1] == tensors["model.layers.0.self_attn.k_scale"].item()


def _write_like_the_fixture(path, tensors):
    import importlib.util
    spec = importlib.util.spec_from_file_location(
        "make_fp8_fixtures", os.path.join(os.path.dirname(__file__), "..", "tools", "make_fp8_fixtures.py"))
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    tool.write_safetensors(path, tensors)


@pytest.mark.parametrize("scheme", [{"strategy": "channel"}, {"strategy": "tensor", "dynamic": True},
                                    {"strategy": "tensor", "num_bits": 4}, "tensor"])
def test_unsupported_kv_cache_schemes_name_the_field(tmp_path, scheme):
    model = tmp_path / "bad"
    shutil.copytree(SCALED, model)
    config = json.loads((model / "config.json").read_text())
    config["quantization_config"]["kv_cache_scheme"] = scheme
    (model / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="kv_cache_scheme"):
        load_config(str(model))
