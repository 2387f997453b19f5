"""SiDP and the baselines on 8 virtual CPU devices: same greedy tokens in every layout and mode."""

import dataclasses
import json
import math
import os
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sidp_jax import LLM, SamplingParams
from sidp_jax.loading.checkpoint import load_params
from sidp_jax.models.config import PRESETS, ModelConfig
from sidp_jax.models.hf_config import load_config
from sidp_jax.parallel.layouts import kv_tokens_per_gpu, make_layout, weight_bytes_per_gpu
from sidp_jax.pool.policy import ModePolicy

from fixture_paths import REFERENCE, TINY_QWEN3 as CKPT
GREEDY = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)

with open(os.path.join(REFERENCE, "tiny-qwen3.json")) as f:
    _META = json.load(f)
PROMPTS = [p["token_ids"] for p in _META["prompts"]]
WANT = [p["greedy_token_ids"][:10] for p in _META["prompts"]]

# (parallel, placement, ffn_mode); "auto" with a crossover of 8 tokens mixes WaS (prefill) and CaS (decode).
SIDP_VARIANTS = [("sidp", "striped", "was"), ("sidp", "striped", "cas"), ("sidp", "owner", "was"),
                 ("sidp", "owner", "cas"), ("sidp", "striped", "auto"), ("sidp", "owner", "auto")]


def run(model, mesh, parallel, placement="striped", ffn_mode="auto", prompts=PROMPTS, **kw):
    kw.setdefault("devices", jax.devices("cpu"))
    llm = LLM(model, mesh=mesh, parallel=parallel, placement=placement, ffn_mode=ffn_mode, dtype="float32",
              max_num_batched_tokens=16, max_num_seqs=4, kv_cache_tokens=256, ffn_crossover_tokens=8,
              verbose=False, **kw)
    outs = llm.generate(prompts, GREEDY, use_tqdm=False)
    return [o.outputs[0].token_ids for o in outs], llm.stats()


@pytest.mark.parametrize("mesh", ["dp=2", "dp=4", "dp=8", "dp=4,tp=2"])
@pytest.mark.parametrize("parallel,placement,ffn_mode", [("dp", "striped", "auto")] + SIDP_VARIANTS)
def test_every_layout_matches_transformers(mesh, parallel, placement, ffn_mode):
    # 3 prompts on up to 8 replicas: most replicas have no work in most steps.
    got, stats = run(CKPT, mesh, parallel, placement, ffn_mode)
    assert got == WANT
    if ffn_mode == "auto" and parallel == "sidp":
        assert set(stats["steps_per_mode"]) == {"was", "cas"}, stats["steps_per_mode"]


@pytest.mark.parametrize("mesh", ["dp=2", "dp=4,tp=2"])
def test_tp_baseline_matches(mesh):
    # tiny-qwen3 has 2 kv heads: the tp layout over the whole group fits up to tp=2 ...
    if mesh == "dp=2":
        assert run(CKPT, mesh, "tp")[0] == WANT
        return
    # ... so tp=8 runs on a random model with 8 kv heads, against that model's dp=1 output.
    cfg = ModelConfig(family="llama", vocab_size=320, hidden_size=64, intermediate_size=128, num_layers=3,
                      num_heads=8, num_kv_heads=8, head_dim=16, rms_norm_eps=1e-5, rope_theta=1e4,
                      rope_scaling=None, max_position_embeddings=256, tie_word_embeddings=False,
                      qkv_bias=True, qk_norm=False)
    prompts = [list(range(3, 3 + n)) for n in (5, 11, 19)]
    base, _ = run(cfg, "dp=1", "dp", prompts=prompts)
    assert run(cfg, mesh, "tp", prompts=prompts)[0] == base
    assert run(cfg, "dp=8", "sidp", "owner", "cas", prompts=prompts)[0] == base
    assert len({t for seq in base for t in seq}) > 3  # outputs are not degenerate


@pytest.mark.parametrize("parallel,placement", [("dp", "striped"), ("sidp", "striped"), ("sidp", "owner"),
                                                ("tp", "striped")])
def test_bytes_held_per_device_equal_the_formula(parallel, placement):
    cfg = load_config(CKPT)
    mesh = "dp=2" if parallel == "tp" else "dp=4"  # 2 kv heads: tp at most 2
    layout = make_layout(mesh, parallel, placement, devices=jax.devices("cpu"))
    params = load_params(CKPT, cfg, jnp.float32, layout)
    per_device = {}
    for leaf in jax.tree.leaves(params):
        for shard in leaf.addressable_shards:
            per_device[shard.device] = per_device.get(shard.device, 0) + shard.data.nbytes
    D = layout.num_replicas if parallel != "tp" else 1
    want = weight_bytes_per_gpu(cfg, parallel, D if parallel != "tp" else 1, layout.tp, placement,
                                dtype=jnp.float32, include_buffer=False)
    assert set(per_device.values()) == {want}
    if parallel == "sidp":  # nobody holds the whole FFN
        full_ffn = 3 * cfg.hidden_size * cfg.intermediate_size * cfg.num_layers * 4
        held = {d: sum(s.data.nbytes for leaf in ffn_leaves(layout, params) for s in leaf.addressable_shards
                       if s.device == d) for d in per_device}
        assert max(held.values()) < full_ffn


def test_kv_capacity_ratios_match_the_design_bounds():
    # The design card's capacity table (its targets are quoted in benchmarks/RESULTS.md) comes out
    # ~1.3 GB per GPU tighter than this first-principles formula
    # (same slope in memory): ratios agree within 5%, absolute capacities within 7%.
    q = PRESETS["qwen3-32b"]
    mem = 150e9
    for util, D, ratio in [(0.9, 2, 1.36), (0.9, 4, 1.55), (0.9, 8, 1.65), (0.6, 2, 2.17), (0.6, 8, 3.10)]:
        dp = kv_tokens_per_gpu(q, "dp", D, mem, util)
        sidp = kv_tokens_per_gpu(q, "sidp", D, mem, util)
        assert sidp / dp == pytest.approx(ratio, rel=0.05), (util, D)
    assert kv_tokens_per_gpu(PRESETS["llama3.1-70b"], "dp", 2, mem, 0.9) == 0  # does not fit
    assert kv_tokens_per_gpu(PRESETS["llama3.1-70b"], "sidp", 2, mem, 0.9) == pytest.approx(128e3, rel=0.07)


def test_mode_policy_picks_cas_for_small_steps_and_was_for_large():
    q = PRESETS["qwen3-32b"]
    shape = dict(num_replicas=2, hidden=q.hidden_size, ffn_params=3 * q.hidden_size * q.intermediate_size)
    policy = ModePolicy(fixed=None, placement="striped", **shape)
    c = policy.crossover
    assert 256 <= c <= 16384
    # The crossover is the first power of two at which the cost model has WaS faster than CaS.
    sizes = [1 << k for k in range(21)]
    assert c in sizes
    assert all(policy.layer_seconds("cas", t) <= policy.layer_seconds("was", t) for t in sizes if t < c)
    assert policy.layer_seconds("was", c) < policy.layer_seconds("cas", c)
    # Neither mode gets cheaper with more tokens.
    for mode in ("was", "cas"):
        seconds = [policy.layer_seconds(mode, t) for t in sizes]
        assert seconds == sorted(seconds), mode
    # choose() switches exactly at the crossover; a step is sized by its busiest replica.
    assert policy.choose(16) == "cas" and policy.choose(c - 1) == "cas"
    assert policy.choose(c) == "was" and policy.choose(4 * c) == "was"
    chunks = lambda *n: [SimpleNamespace(num_tokens=k) for k in n]
    assert policy([chunks(c // 2, c // 2), chunks(1)]) == "was"
    assert policy([chunks(c // 2, c // 2 - 1), chunks(c - 1)]) == "cas"
    assert policy.layer_seconds("cas", 1) < policy.layer_seconds("was", 1)
    # Owner CaS runs every replica's tokens on one GPU: WaS pays off sooner than when striped.
    assert ModePolicy(fixed=None, placement="owner", **shape).crossover < c
    # A measured crossover is used as given, and a fixed mode ignores the step size.
    given = ModePolicy(fixed=None, placement="striped", crossover_tokens=100, **shape)
    assert given.crossover == 100 and given.choose(99) == "cas" and given.choose(100) == "was"
    assert ModePolicy(fixed="cas", placement="striped", **shape).choose(1 << 20) == "cas"
    assert ModePolicy(fixed="was", placement="striped", **shape).choose(1) == "was"


def ffn_leaves(layout, params):
    if layout.ffn_storage(load_config(CKPT)) is not None:
        return jax.tree.leaves(params["ffn_groups"])
    return jax.tree.leaves([w["ffn"] for w in params["layers"]])


def test_every_weight_is_its_own_per_layer_array():
    cfg = load_config(CKPT)
    layout = make_layout("dp=4", "sidp", "striped", devices=jax.devices("cpu"))
    params = load_params(CKPT, cfg, jnp.float32, layout)
    assert len(params["layers"]) == cfg.num_layers
    H, I = cfg.hidden_size, cfg.intermediate_size
    for w in params["layers"]:
        ffn = w["ffn"]
        assert ffn["gate_up"].shape == (H, 2, I) and ffn["down"].shape == (I, H)
        assert {s.data.shape for s in ffn["gate_up"].addressable_shards} == {(H, 2, I // 4)}


def test_owner_placement_puts_layer_l_on_rank_l_mod_d():
    cfg = load_config(CKPT)  # 3 layers on 2 ranks: groups (0, 1) and (2, padding)
    layout = make_layout("dp=2", "sidp", "owner", devices=jax.devices("cpu"))
    assert layout.ffn_groups(cfg) == [(0, 1), (2, -1)]
    params = load_params(CKPT, cfg, jnp.float32, layout)
    ref = load_params(CKPT, cfg, jnp.float32, make_layout("dp=1", "dp", devices=jax.devices("cpu")))
    d0, d1 = layout.mesh.devices.flatten()
    for g, rows in enumerate(layout.ffn_groups(cfg)):
        shards = {s.device: np.asarray(s.data) for s in params["ffn_groups"][g]["down"].addressable_shards}
        for device, layer in zip((d0, d1), rows):
            assert shards[device].shape[0] == 1  # each rank's local view: exactly its own layer
            if layer >= 0:
                np.testing.assert_array_equal(shards[device][0], np.asarray(ref["layers"][layer]["ffn"]["down"]))
            else:
                assert not shards[device].any()
    assert all("ffn" not in w for w in params["layers"])


def test_placed_weights_restore_from_orbax_into_the_mesh(tmp_path):
    kw = dict(mesh="dp=2", parallel="sidp", placement="owner", dtype="float32", verbose=False,
              devices=jax.devices("cpu"), kv_cache_tokens=256)
    llm = LLM(CKPT, **kw)
    llm.save_placed(str(tmp_path / "placed"))
    restored = LLM(str(tmp_path / "placed"), **kw)
    for a, b in zip(jax.tree.leaves(llm.engine.runner.params), jax.tree.leaves(restored.engine.runner.params)):
        assert a.sharding == b.sharding
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    outs = restored.generate(PROMPTS, GREEDY, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == WANT
    with pytest.raises(ValueError, match="re-place it"):
        LLM(str(tmp_path / "placed"), **{**kw, "placement": "striped"})


@pytest.mark.parametrize("written_by", ["v1", "v2"])
def test_a_placed_checkpoint_in_an_older_form_is_refused(tmp_path, written_by):
    kw = dict(mesh="dp=2", parallel="sidp", placement="striped", dtype="float32", verbose=False,
              devices=jax.devices("cpu"), kv_cache_tokens=256)
    LLM(CKPT, **kw).save_placed(str(tmp_path / "placed"))
    record = tmp_path / "placed" / "sidp_layout.json"
    old = json.loads(record.read_text())
    if written_by == "v1":
        old.pop("format"), old.pop("ffn_groups")
        record.write_text(json.dumps({**old, "ffn_layer_order": [0, 1, 2]}))
    else:  # flat FFN leaves and "<name>_scale" keys
        record.write_text(json.dumps({**old, "format": "per-layer-v2"}))
    with pytest.raises(ValueError, match=r"older form.*save_placed"):
        LLM(str(tmp_path / "placed"), **kw)


@pytest.mark.parametrize("placement,quantization,replicas", [("striped", None, False), ("owner", None, False),
                                                              ("striped", "fp8", True), ("owner", "fp8", False)])
def test_calibration_times_both_modes_and_caches(tmp_path, monkeypatch, placement, quantization, replicas):
    """It times the FFN leaves as the layout stores them (FP8 ones too) with the engine's own
    strategies, and WaS as per-replica programs where the engine runs it that way."""
    from sidp_jax.engine import ffn_calibration as calibrate

    monkeypatch.setenv("SIDP_JAX_CACHE", str(tmp_path))
    monkeypatch.setattr(calibrate, "TOKENS", (8, 32))
    cfg = dataclasses.replace(load_config(CKPT), quantization=quantization)
    layout = make_layout("dp=2", "sidp", placement, devices=jax.devices("cpu"))
    crossover, source = calibrate.calibrated_crossover(layout, cfg, jnp.float32, replicas)
    assert "measured now" in source
    [path] = tmp_path.glob("crossover-*.json")
    assert ("-fp8" in path.name) == (quantization == "fp8") and ("-replicas" in path.name) == replicas
    saved = json.loads(path.read_text())
    timings = saved["seconds_per_layer"]
    assert sorted(map(int, timings)) == [8, 32] and all(set(row) == {"was", "cas"} for row in timings.values())
    # what it returns, what it cached and what crossover_from makes of the cached timings agree:
    # WaS first faster at 8 -> 8, at 32 -> sqrt(8 * 32) = 16, never -> 1 << 30 (always CaS)
    assert crossover == saved["crossover"] == calibrate.crossover_from(timings)
    assert crossover in (8, 16, 1 << 30)
    assert f"T=8: was {1e3 * timings['8']['was']:.2f} / cas {1e3 * timings['8']['cas']:.2f} ms" in source
    monkeypatch.setattr(calibrate, "measure", lambda *a, **k: pytest.fail("measured again despite the cache"))
    again, source2 = calibrate.calibrated_crossover(layout, cfg, jnp.float32, replicas)
    assert again == crossover and "cached" in source2 and str(path) in source2


def test_crossover_from_timings():
    from sidp_jax.engine.ffn_calibration import crossover_from

    t = {128: {"was": 3.0, "cas": 1.0}, 512: {"was": 3.0, "cas": 2.0}, 2048: {"was": 4.0, "cas": 5.0}}
    assert crossover_from(t) == 1024
    assert crossover_from({128: {"was": 1.0, "cas": 2.0}}) == 128
    assert crossover_from({128: {"was": 3.0, "cas": 2.0}}) > 1 << 20


def test_a_layout_whose_weights_do_not_fit_fails_early_with_numbers(monkeypatch):
    import sidp_jax.engine.startup as startup

    monkeypatch.setattr(startup, "device_memory", lambda d: {"total": 150e9, "limit": 142e9, "in_use": 0})
    with pytest.raises(MemoryError, match=r"parallel=dp on mesh dp=2,tp=1 needs 141\.\d GB of weights"):
        LLM("llama3.1-70b", mesh="dp=2", parallel="dp", verbose=False, devices=jax.devices("cpu"))


@pytest.mark.parametrize("mesh", ["dp=2", "dp=8"])
@pytest.mark.parametrize("was_runner", ["replicas", "spmd"])
def test_both_was_runners_match(mesh, was_runner):
    got, stats = run(CKPT, mesh, "sidp", "striped", "was", was_runner=was_runner)
    assert got == WANT and stats["was_runner"] == was_runner


def test_both_was_runners_serve_every_per_row_feature_alike():
    """Penalties, seeded sampling, logprobs and prompt logprobs run in the per-replica WaS runner
    as in the SPMD step (one step definition, sidp_jax/engine/step.py): the same outputs."""
    mixes = [SamplingParams(temperature=1.0, top_k=20, top_p=0.9, seed=7, max_tokens=8, ignore_eos=True, logprobs=3),
             SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, repetition_penalty=1.5,
                            presence_penalty=0.5, frequency_penalty=0.5),  # its greedy output repeats 111
             SamplingParams(temperature=0, max_tokens=4, ignore_eos=True, prompt_logprobs=2)]
    outs, steps = {}, {}
    for was_runner in ("replicas", "spmd"):
        llm = LLM(CKPT, mesh="dp=2", parallel="sidp", placement="striped", ffn_mode="was", dtype="float32",
                  max_num_batched_tokens=16, max_num_seqs=4, kv_cache_tokens=256, verbose=False,
                  devices=jax.devices("cpu"), was_runner=was_runner)
        replica_runs = []
        if was_runner == "replicas":  # every step must take the per-replica path: no fallback
            runner = llm.engine.runner.replica_was
            run_replicas = runner.run
            runner.run = lambda *a, **k: replica_runs.append(1) or run_replicas(*a, **k)
        got = llm.generate(PROMPTS, mixes, use_tqdm=False)
        outs[was_runner] = [(o.outputs[0].token_ids, o.outputs[0].logprobs, o.prompt_logprobs) for o in got]
        steps[was_runner] = llm.stats()["steps_per_mode"]
        if was_runner == "replicas":
            assert len(replica_runs) == steps[was_runner]["was"] > 0
    assert steps["replicas"] == steps["spmd"] == {"was": steps["spmd"]["was"]}
    for (ids_r, lp_r, plp_r), (ids_s, lp_s, plp_s) in zip(outs["replicas"], outs["spmd"]):
        assert ids_r == ids_s
        if lp_s is not None:
            assert [sorted(a) for a in lp_r] == [sorted(b) for b in lp_s]
            np.testing.assert_allclose([v.logprob for a in lp_r for v in a.values()],
                                       [v.logprob for b in lp_s for v in b.values()], rtol=1e-5, atol=1e-6)
        assert (plp_r is None) == (plp_s is None)
        if plp_s is not None:
            assert [None if a is None else sorted(a) for a in plp_r] == [None if b is None else sorted(b) for b in plp_s]
    assert outs["spmd"][1][0] != WANT[1][:8]  # the penalties changed the greedy tokens: they ran


def test_replica_was_two_layers_ahead_matches():
    got, stats = run(CKPT, "dp=4", "sidp", "striped", "was", was_runner="replicas", was_prefetch_depth=2)
    assert got == WANT and stats["steps_per_mode"] == {"was": stats["num_steps"]}


def test_replica_was_is_refused_where_it_does_not_apply():
    with pytest.raises(ValueError, match="was_runner='replicas' needs"):
        run(CKPT, "dp=2", "sidp", "owner", "was", was_runner="replicas")


def test_calibration_of_replica_was(tmp_path, monkeypatch):
    from sidp_jax.engine import ffn_calibration as calibrate

    monkeypatch.setenv("SIDP_JAX_CACHE", str(tmp_path))
    monkeypatch.setattr(calibrate, "TOKENS", (8, 32))
    chain = []  # what the per-replica WaS timer returned, per size

    def spy(*args, **kw):
        chain.append(real(*args, **kw))
        return chain[-1]

    real = calibrate.ffn_chain_seconds
    monkeypatch.setattr(calibrate, "ffn_chain_seconds", spy)
    layout = make_layout("dp=2", "sidp", "striped", devices=jax.devices("cpu"))
    timings = calibrate.measure(layout, load_config(CKPT), jnp.float32, replicas=True)
    assert sorted(timings) == [8, 32]
    # WaS is the per-replica chain's time, once per size; CaS is still the SPMD program's.
    assert [timings[t]["was"] for t in (8, 32)] == chain
    assert all(0 < row[m] and math.isfinite(row[m]) for row in timings.values() for m in ("was", "cas"))


def test_sharding_rules_refuse_two_logical_axes_on_one_mesh_axis():
    from sidp_jax.parallel.layouts import ShardingRules

    rules = ShardingRules({"q_heads": "tp", "ffn": ("dp", "tp"), "ffn_owner": "dp"})
    assert rules.spec(("embed", "q_heads")) == jax.sharding.PartitionSpec(None, "tp")
    with pytest.raises(ValueError, match="onto one mesh axis"):
        rules.spec(("ffn_owner", "ffn"), "gate_up")  # "dp" twice
    for layout in [make_layout("dp=4", "sidp", p, devices=jax.devices("cpu")) for p in ("striped", "owner")]:
        layout.partition_specs(load_config(CKPT))  # the real layouts pass the check
