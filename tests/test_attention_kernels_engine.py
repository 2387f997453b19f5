"""The engine on the Pallas attention kernels (interpret mode on CPU): decode-only and mixed steps."""

import dataclasses
import json
import os

import jax
import pytest

from sidp_jax import LLM, SamplingParams
from sidp_jax.models.hf_config import load_config
from sidp_jax.kernels.attention import kernel_unsupported_reason
from sidp_jax.parallel.layouts import make_layout

from fixture_paths import REFERENCE, TINY_QWEN3 as CKPT

GREEDY16 = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)

with open(os.path.join(REFERENCE, "tiny-qwen3.json")) as f:
    _META = json.load(f)
PROMPTS = [p["token_ids"] for p in _META["prompts"]]
WANT = [p["greedy_token_ids"] for p in _META["prompts"]]


@pytest.mark.parametrize("layout", [
    dict(mesh="dp=1", devices=jax.devices("cpu")[:1]),
    dict(mesh="dp=1", devices=jax.devices("cpu")[:1], max_num_batched_tokens=8),  # chunks continuing a prefix
    dict(mesh="dp=2", parallel="sidp", placement="striped", ffn_mode="cas", devices=jax.devices("cpu")),
    dict(mesh="dp=2", parallel="sidp", placement="striped", ffn_mode="was", devices=jax.devices("cpu")),
], ids=["dp1", "dp1-chunked", "sidp-dp2-cas", "sidp-dp2-was-replicas"])
def test_kernels_greedy_equal_transformers(layout):
    layout = {"max_num_batched_tokens": 64, **layout}
    llm = LLM(CKPT, attention="pallas-interpret", dtype="float32", kv_cache_tokens=512, verbose=False, **layout)
    outs = llm.generate(PROMPTS, GREEDY16, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == WANT
    steps = llm.stats()["steps_per_attention"]
    assert steps.get("decode", 0) > 0 and steps.get("mixed", 0) > 0 and "reference" not in steps, steps


def test_reference_option_and_cpu_auto_never_use_the_kernel():
    for attention in ("reference", "auto"):  # auto: the kernel is GPU-only
        llm = LLM(CKPT, attention=attention, dtype="float32", max_num_batched_tokens=64, kv_cache_tokens=512,
                  devices=jax.devices("cpu")[:1], verbose=False)
        outs = llm.generate(PROMPTS[:1], GREEDY16, use_tqdm=False)
        assert outs[0].outputs[0].token_ids == WANT[0]
        assert set(llm.stats()["steps_per_attention"]) == {"reference"}
    with pytest.raises(ValueError, match="attention"):
        LLM(CKPT, attention="triton", dtype="float32", devices=jax.devices("cpu")[:1], verbose=False)


def test_kernel_constraints():
    cfg = load_config(CKPT)  # head_dim 32, 4 q heads / 2 kv heads
    lay = make_layout("dp=1", devices=jax.devices("cpu")[:1])
    assert kernel_unsupported_reason(cfg, lay, 16) is None
    assert kernel_unsupported_reason(dataclasses.replace(cfg, num_heads=6), lay, 16) is None  # group of 3: to 4
    qwen25_7b = dataclasses.replace(cfg, num_heads=28, num_kv_heads=4)
    assert kernel_unsupported_reason(qwen25_7b, lay, 16) is None
    # the reason the engine logs (once) when it falls back to the reference on GPU
    # (64 // 24 = 2 pages of 24: 48-token blocks)
    assert "page size 24" in kernel_unsupported_reason(cfg, lay, 24)
    assert "head_dim 8" in kernel_unsupported_reason(dataclasses.replace(cfg, head_dim=8), lay, 16)


@pytest.mark.parametrize("heads,kv_heads", [(28, 4), (10, 2)])  # query groups of 7 and 5
def test_kernels_run_query_groups_that_are_not_powers_of_two(heads, kv_heads):
    from sidp_jax.models.config import ModelConfig

    cfg = ModelConfig(family="qwen2", vocab_size=256, hidden_size=64, intermediate_size=96, num_layers=2,
                      num_heads=heads, num_kv_heads=kv_heads, head_dim=16, rms_norm_eps=1e-6, rope_theta=1e4,
                      rope_scaling=None, max_position_embeddings=256, tie_word_embeddings=False, qkv_bias=True,
                      qk_norm=False)
    prompts = [list(range(3, 3 + n)) for n in (5, 19, 11)]
    outs = {}
    for attention in ("reference", "pallas-interpret"):
        llm = LLM(cfg, attention=attention, dtype="float32", kv_cache_tokens=512, max_num_batched_tokens=16,
                  devices=jax.devices("cpu")[:1], verbose=False)
        outs[attention] = [o.outputs[0].token_ids for o in llm.generate(prompts, GREEDY16, use_tqdm=False)]
        steps = llm.stats()["steps_per_attention"]
    assert outs["pallas-interpret"] == outs["reference"]
    assert steps.get("decode", 0) > 0 and steps.get("mixed", 0) > 0 and "reference" not in steps, steps
    assert len({t for seq in outs["reference"] for t in seq}) > 3


@pytest.mark.parametrize("layout", [
    dict(mesh="dp=1", devices=jax.devices("cpu")[:1]),
    dict(mesh="dp=2", parallel="sidp", placement="owner", ffn_mode="auto", ffn_crossover_tokens=8,
         devices=jax.devices("cpu")),
], ids=["dp1", "sidp-dp2-owner-auto"])
def test_precompiled_step_variants_serve_every_step(layout, monkeypatch):
    """precompile=True compiles every (mode, step shape) up front (here two at a time); the run then
    never compiles a step of default sampling, and its greedy output is unchanged."""
    from sidp_jax.engine.step_inputs import step_shapes

    llm = LLM(CKPT, attention="pallas-interpret", dtype="float32", kv_cache_tokens=512, verbose=False,
              max_num_batched_tokens=16, max_num_seqs=4, precompile=True, compile_workers=2, **layout)
    stats = llm.stats()
    modes = stats["step_modes"]
    assert len(llm.engine.runner._compiled) == len(modes) * len(step_shapes(16, 4)) and stats["precompile_seconds"] > 0
    outs = llm.generate(PROMPTS, GREEDY16, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == WANT
    stats = llm.stats()
    assert stats["precompiled_steps"] == stats["num_steps"] > 0, stats


def test_shapes_a_step_can_take_are_all_precompiled():
    from sidp_jax.engine.step_inputs import decode_rows, mixed_rows, mixed_tokens, step_shapes

    for max_tokens, max_rows in [(4096, 512), (2048, 256), (16, 4), (3000, 100)]:
        shapes = set(step_shapes(max_tokens, max_rows))
        for n in range(1, min(max_tokens, max_rows) + 1):
            rows = decode_rows(n, max_tokens, max_rows)
            assert rows >= n and (True, rows, rows) in shapes
        for t in range(1, max_tokens + 1, 7):
            T = mixed_tokens(t, max_tokens)
            assert T >= t and (False, T, mixed_rows(T, max_rows)) in shapes
        assert len(shapes) <= 12  # a handful of variants, each 10-20 s to compile on GPU


def test_a_failing_precompile_is_not_fatal(monkeypatch):
    from sidp_jax.engine.model_runner import ModelRunner

    def broken(self, *a, **k):
        raise RuntimeError("compiler crashed")

    monkeypatch.setattr(ModelRunner, "precompile", broken)
    llm = LLM(CKPT, attention="pallas-interpret", dtype="float32", kv_cache_tokens=512, verbose=False,
              max_num_batched_tokens=16, max_num_seqs=4, precompile=True, devices=jax.devices("cpu")[:1])
    assert llm.stats()["precompile_seconds"] is None
    outs = llm.generate(PROMPTS, GREEDY16, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == WANT and llm.stats()["precompiled_steps"] == 0
