"""Pre-quantized FP8 checkpoints (both published forms) load, dequantized within e4m3's rounding,
and the model's logits stay close to the unquantized model's (tools/make_fp8_fixtures.py)."""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from fixture_paths import FIXTURES, REFERENCE, TINY_QWEN3
from sidp_jax.loading.checkpoint import from_pretrained
from sidp_jax.loading.fp8_checkpoint import dequantize, fp8_scheme, open_checkpoint
from sidp_jax.loading.safetensors_io import CheckpointError, SafetensorsCheckpoint

FORMS = ["block", "channel"]
# What these fixtures measure is in benchmarks/RESULTS.md, "FP8 accuracy". The bounds follow from
# e4m3: each weight carries ~2^-4/sqrt(3) = 3.6% relative rounding, and the tiny random model's 12
# GEMMs add it up (sqrt(12) x 3.6% = 12.5%); its near-flat logits (top-2 gaps down to 0.01) let
# that flip the argmax at some positions.
LOGIT_REL_RMS = 0.2
TOP1_AGREEMENT = 0.75


def fixture(form):
    return os.path.join(FIXTURES, "checkpoints", f"tiny-qwen3-fp8-{form}")


@pytest.mark.parametrize("form", FORMS)
def test_weights_dequantize_within_e4m3_rounding(form):
    fp8, orig = open_checkpoint(fixture(form)), SafetensorsCheckpoint(TINY_QWEN3)
    raw = SafetensorsCheckpoint(fixture(form))
    assert fp8.names() == orig.names()  # the scales are consumed, nothing else appears or goes
    quantized = [n for n in raw.names() if raw.get(n).dtype == ml_dtypes.float8_e4m3fn]
    assert len(quantized) == 7 * 3  # q/k/v/o/gate/up/down of 3 layers
    for name in quantized:
        w, got = np.asarray(orig.get(name), np.float64), fp8.get(name).astype(np.float64)
        # e4m3: 3 mantissa bits, so half an ulp is 2^-4 of a normal value; subnormals step 2^-9 x scale
        scale = np.abs(w).max() / 448
        assert np.all(np.abs(got - w) <= np.maximum(2.0 ** -4 * np.abs(w), 2.0 ** -10 * scale) * 1.001), name


def test_dequantize_forms():
    rng = np.random.default_rng(0)
    q = rng.normal(size=(5, 7)).astype(ml_dtypes.float8_e4m3fn)
    blocks = rng.uniform(0.5, 2, size=(3, 2)).astype(np.float32)  # blocks of 2 x 4: the last ones partial
    want = q.astype(np.float32) * np.repeat(np.repeat(blocks, 2, 0), 4, 1)[:5, :7]
    np.testing.assert_array_equal(dequantize(q, blocks, (2, 4)), want)
    per_channel = rng.uniform(0.5, 2, size=(5, 1)).astype(np.float32)
    np.testing.assert_array_equal(dequantize(q, per_channel, None), q.astype(np.float32) * per_channel)
    np.testing.assert_array_equal(dequantize(q, np.float32(3.0), None), q.astype(np.float32) * 3)
    with pytest.raises(CheckpointError, match="does not fit"):
        dequantize(q, blocks, (4, 4))


@pytest.mark.parametrize("form", FORMS)
def test_logits_stay_close_to_the_unquantized_model(form):
    with open(os.path.join(REFERENCE, "tiny-qwen3.json")) as f:
        prompts = [p["token_ids"] for p in json.load(f)["prompts"]]
    cpu = jax.devices("cpu")[0]
    ref, fp8 = from_pretrained(TINY_QWEN3, jnp.float32, cpu), from_pretrained(fixture(form), jnp.float32, cpu)
    rel, agree = [], []
    for ids in prompts:
        a, b = np.asarray(ref(jnp.array([ids]))[0]), np.asarray(fp8(jnp.array([ids]))[0])
        rel.append(np.sqrt(np.mean((a - b) ** 2) / np.mean(a ** 2)))
        agree.extend(a.argmax(-1) == b.argmax(-1))
    assert max(rel) <= LOGIT_REL_RMS, rel
    assert np.mean(agree) >= TOP1_AGREEMENT, np.mean(agree)


@pytest.mark.parametrize("form", FORMS)
def test_the_engine_runs_an_fp8_checkpoint(form):
    from sidp_jax import LLM, SamplingParams

    llm = LLM(fixture(form), dtype="float32", devices=jax.devices("cpu")[:1], verbose=False, kv_cache_tokens=256)
    out = llm.generate("Hello", SamplingParams(temperature=0, max_tokens=4, ignore_eos=True), use_tqdm=False)[0]
    assert len(out.outputs[0].token_ids) == 4


def test_unsupported_quantization_configs_name_the_field(tmp_path):
    d = tmp_path / "ckpt"
    shutil.copytree(fixture("block"), d)
    config = json.loads((d / "config.json").read_text())
    for q, field in [({"quant_method": "gptq"}, "quant_method"), ({"quant_method": "fp8", "fmt": "e5m2"}, "fmt"),
                     ({"quant_method": "compressed-tensors", "format": "int-quantized"}, "format"),
                     ({"quant_method": "fp8", "weight_block_size": [128]}, "weight_block_size")]:
        (d / "config.json").write_text(json.dumps({**config, "quantization_config": q}))
        with pytest.raises(CheckpointError, match=f"quantization_config.{field}"):
            fp8_scheme(str(d))
