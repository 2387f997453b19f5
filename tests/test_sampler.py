"""The sampler against an independent, sort-based reference of vLLM's semantics (float64 numpy),
and its draws against the renormalised distribution."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from sidp_jax.engine.sampler import MAX_LOGPROBS, filter_threshold, ordered_keys, sample


def reference_kept(logits: np.ndarray, temperature: float, top_k: int, top_p: float, min_p: float) -> np.ndarray:
    """vLLM v1's order, written from its description: temperature, min_p on the scaled probabilities,
    top_k (ties at the k-th value kept), then top_p over the renormalised survivors: sort ascending,
    drop tokens whose cumulative probability is <= 1 - top_p, always keep the most likely."""
    s = logits.astype(np.float64) / temperature
    probs = np.exp(s - s.max())
    probs /= probs.sum()
    s = np.where(probs < min_p * probs.max(), -np.inf, s)
    if 0 < top_k < len(s):
        s = np.where(s < np.sort(s)[::-1][top_k - 1], -np.inf, s)
    if top_p < 1:
        order = np.argsort(s, kind="stable")
        p = np.exp(s[order] - s.max())
        p /= p.sum()
        drop = np.cumsum(p) <= 1 - top_p
        drop[-1] = False
        s[order[drop]] = -np.inf
    return np.isfinite(s)


def top_p_margin(logits, temperature, top_k, top_p, min_p) -> float:
    """How far the nearest cumulative sum sits from 1 - top_p (a boundary this close is a float32 tie)."""
    if top_p >= 1:
        return np.inf
    kept = reference_kept(logits, temperature, top_k, 1.0, min_p)
    s = np.sort(logits[kept].astype(np.float64) / temperature)
    p = np.exp(s - s.max())
    return float(np.min(np.abs(np.cumsum(p / p.sum()) - (1 - top_p))))


def rows_params(S: int, rng, **fixed) -> dict:
    p = {"temperature": rng.choice([0.3, 0.6, 1.0, 1.7], S), "top_k": rng.choice([0, 1, 5, 20, 50, 300], S),
         "top_p": rng.choice([1.0, 0.95, 0.9, 0.5, 0.2], S), "min_p": rng.choice([0.0, 0.0, 0.05, 0.3], S)}
    p.update({k: np.full(S, v) for k, v in fixed.items()})
    return p


def device_params(p: dict, S: int, W: int = 2) -> dict:
    return {"temperature": jnp.asarray(p["temperature"], jnp.float32), "top_k": jnp.asarray(p["top_k"], jnp.int32),
            "top_p": jnp.asarray(p["top_p"], jnp.float32), "min_p": jnp.asarray(p["min_p"], jnp.float32),
            "seed": jnp.asarray(p.get("seed", np.arange(S)), jnp.uint32),
            "step": jnp.asarray(p.get("step", np.zeros(S)), jnp.int32),
            "num_logprobs": jnp.asarray(p.get("num_logprobs", np.full(S, -1)), jnp.int32),
            "edit_ids": jnp.asarray(p.get("edit_ids", np.full((S, W), -1)), jnp.int32),
            "edit_bias": jnp.asarray(p.get("edit_bias", np.zeros((S, W))), jnp.float32),
            "edit_allow": jnp.asarray(p.get("edit_allow", np.zeros((S, W), bool)))}


def kept_by_sampler(logits: np.ndarray, p: dict, gated: bool = True) -> np.ndarray:
    scaled = jnp.asarray(logits) / jnp.asarray(p["temperature"], jnp.float32)[:, None]
    dp = device_params(p, len(logits))
    tau = jax.jit(filter_threshold, static_argnums=3)(scaled, dp, jnp.ones(len(logits), bool), gated)
    return np.asarray(ordered_keys(scaled) >= tau[:, None])


def test_ordered_keys_sort_like_the_floats():
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.standard_normal(5000) * 10.0 ** rng.integers(-30, 30, 5000),
                        [0.0, -np.inf, np.inf, 1e-45, -1e-45, 3.4e38, -3.4e38]]).astype(np.float32)
    keys = np.asarray(ordered_keys(jnp.asarray(x)))
    assert np.array_equal(np.argsort(x, kind="stable"), np.argsort(keys, kind="stable"))


@pytest.mark.parametrize("spread", [1.0, 4.0, 0.05])  # typical, peaked, near-flat (a huge nucleus)
def test_kept_sets_equal_the_reference(spread):
    rng = np.random.default_rng(int(spread * 100))
    S, V = 96, 3000
    logits = (rng.standard_normal((S, V)) * spread).astype(np.float32)
    p = rows_params(S, rng)
    got = kept_by_sampler(logits, p)
    compared = 0
    for i in range(S):
        args = (logits[i], p["temperature"][i], p["top_k"][i], p["top_p"][i], p["min_p"][i])
        if top_p_margin(*args) < 1e-5:  # a float32 tie between the two programs' sums
            continue
        want = reference_kept(*args)
        assert np.array_equal(got[i], want), (i, args[1:], got[i].sum(), want.sum())
        compared += 1
    assert compared > S * 0.9


def test_top_k_keeps_ties_at_the_kth_value_and_min_p_then_top_k_compose():
    logits = np.array([[5.0, 3.0, 3.0, 3.0, 1.0, 0.0],
                       [5.0, 4.9, 1.0, 0.5, 0.2, 0.0]], np.float32)
    p = {"temperature": np.array([1.0, 1.0]), "top_k": np.array([2, 4]), "top_p": np.array([1.0, 1.0]),
         "min_p": np.array([0.0, 0.5])}
    got = kept_by_sampler(logits, p)
    assert got[0].tolist() == [True, True, True, True, False, False]  # 3.0 tied at k=2: all kept
    assert got[1].tolist() == [True, True, False, False, False, False]  # min_p leaves 2 of the top 4


def test_top_p_is_over_the_distribution_renormalised_after_top_k():
    """Qwen3's defaults (top_k 20, top_p 0.95) on a flat-ish tail: top_p over all 1000 tokens would
    keep hundreds; over the renormalised top 20 it keeps at most 20, as vLLM and transformers do."""
    rng = np.random.default_rng(1)
    logits = (rng.standard_normal((4, 1000)) * 0.3).astype(np.float32)
    p = rows_params(4, rng, temperature=0.6, top_k=20, top_p=0.35, min_p=0.0)
    got = kept_by_sampler(logits, p)
    for i in range(4):
        assert np.array_equal(got[i], reference_kept(logits[i], 0.6, 20, 0.35, 0.0))
        assert 1 <= got[i].sum() <= 20


def test_gated_and_ungated_programs_agree():
    rng = np.random.default_rng(2)
    logits = rng.standard_normal((32, 500)).astype(np.float32)
    p = rows_params(32, rng)
    assert np.array_equal(kept_by_sampler(logits, p, gated=True), kept_by_sampler(logits, p, gated=False))
    dp = device_params(p, 32)
    a, b = (jax.jit(sample, static_argnums=2)(jnp.asarray(logits), dp, g) for g in (True, False))
    assert np.array_equal(np.asarray(a.tokens), np.asarray(b.tokens))


def test_draws_follow_the_renormalised_distribution():
    """20,000 seeded draws from one row under top_k 20 + top_p 0.8 + temperature 0.7: every draw in
    the reference's kept set, and a chi-square test against the kept set's renormalised
    probabilities at a 0.1% false-alarm rate (fixed seeds: the test is deterministic)."""
    V, N = 200, 20000
    rng = np.random.default_rng(3)
    row = (rng.standard_normal(V) * 1.5).astype(np.float32)
    kept = reference_kept(row, 0.7, 20, 0.8, 0.0)
    q = np.exp(row[kept].astype(np.float64) / 0.7)
    q /= q.sum()
    p = rows_params(N, rng, temperature=0.7, top_k=20, top_p=0.8, min_p=0.0)
    p["seed"] = np.arange(N)
    out = jax.jit(sample)(jnp.asarray(np.tile(row, (N, 1))), device_params(p, N))
    tokens = np.asarray(out.tokens)
    assert kept[tokens].all()
    counts = np.bincount(tokens, minlength=V)[kept]
    assert stats.chisquare(counts, q * N).pvalue > 1e-3
    assert kept.sum() >= 3  # the test means something: several tokens share the mass


def test_logit_bias_and_bans_apply_before_greedy_and_the_logprobs_are_raw():
    rng = np.random.default_rng(4)
    logits = rng.standard_normal((3, 50)).astype(np.float32)
    top = logits.argmax(-1)
    p = rows_params(3, rng, temperature=0.0, top_k=0, top_p=1.0, min_p=0.0)
    p["edit_ids"] = np.array([[7, -1], [top[1], -1], [-1, -1]])
    p["edit_bias"] = np.array([[100.0, 0.0], [-np.inf, 0.0], [0.0, 0.0]])
    p["num_logprobs"] = np.array([3, 0, -1])
    out = jax.jit(sample)(jnp.asarray(logits), device_params(p, 3))
    tokens = np.asarray(out.tokens)
    assert tokens[0] == 7 and tokens[1] == np.argsort(logits[1])[-2] and tokens[2] == top[2]
    lp = np.asarray(jax.nn.log_softmax(jnp.asarray(logits)))
    np.testing.assert_allclose(np.asarray(out.logprob), lp[np.arange(3), tokens], rtol=1e-5, atol=1e-6)
    assert np.asarray(out.rank)[0] == 1 + (lp[0] > lp[0, 7]).sum()
    assert np.array_equal(np.asarray(out.top_ids)[0, :3], np.argsort(-lp[0])[:3])
    np.testing.assert_allclose(np.asarray(out.top_logprobs)[0], np.sort(lp[0])[::-1][:MAX_LOGPROBS], rtol=1e-5)


def test_allowed_token_ids_restrict_greedy_and_sampled_rows_alike():
    rng = np.random.default_rng(6)
    logits = rng.standard_normal((4, 60)).astype(np.float32)
    p = rows_params(4, rng, top_k=0, top_p=1.0, min_p=0.0)
    p["temperature"] = np.array([0.0, 1.0, 1.0, 0.0])
    p["edit_ids"] = np.array([[3, 9, 9], [3, 9, 17], [-1, -1, -1], [5, 5, -1]])
    p["edit_bias"] = np.array([[0.0, 0.0, 4.0], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0], [0.0, 50.0, 0.0]])
    p["edit_allow"] = np.array([[True, True, False], [True, True, True], [False] * 3, [False, False, False]])
    out = jax.jit(sample)(jnp.asarray(logits), device_params(p, 4, W=3))
    tokens = np.asarray(out.tokens)
    assert tokens[0] in (3, 9) and tokens[0] == (9 if logits[0, 9] + 4 > logits[0, 3] else 3)  # bias on an allowed id
    assert tokens[1] in (3, 9, 17)
    assert tokens[3] == 5  # a bias alone restricts nothing; +50 wins
    draws = jax.jit(sample)(jnp.asarray(np.tile(logits[1], (400, 1))),
                            device_params({**{k: np.repeat(v[1:2], 400, axis=0) for k, v in p.items()},
                                           "seed": np.arange(400)}, 400, W=3)).tokens
    assert set(np.asarray(draws).tolist()) == {3, 9, 17}


def test_a_batch_with_no_logprobs_returns_zero_top_arrays():
    logits = jnp.asarray(np.random.default_rng(5).standard_normal((2, 40)), jnp.float32)
    p = rows_params(2, np.random.default_rng(5), temperature=1.0, top_k=0, top_p=1.0, min_p=0.0)
    out = jax.jit(sample)(logits, device_params(p, 2))
    assert not np.asarray(out.top_ids).any() and np.asarray(out.rank).tolist() == [1, 1]
