"""Host overlap (async_scheduling): the same outputs with the host one step ahead as without it,
on 8 CPU devices, under preemption, chunked prefill, stop strings, n > 1, seeded sampling,
penalties, logprobs and per-step WaS/CaS switching."""

import json
import os

import jax
import pytest

from sidp_jax import LLM, SamplingParams

from fixture_paths import REFERENCE, TINY_QWEN3 as CKPT

with open(os.path.join(REFERENCE, "tiny-qwen3.json")) as f:
    _META = json.load(f)
PROMPTS = [p["token_ids"] for p in _META["prompts"]]
WANT = [p["greedy_token_ids"] for p in _META["prompts"]]

LAYOUTS = [("dp=2", "dp", "striped", "auto"), ("dp=4", "sidp", "striped", "auto"),
           ("dp=2", "sidp", "owner", "auto"), ("dp=4,tp=2", "sidp", "striped", "cas")]


def make(mesh, parallel, placement, ffn_mode, async_scheduling, **kw):
    kw.setdefault("kv_cache_tokens", 64)  # small: sequences are preempted and recomputed
    return LLM(CKPT, mesh=mesh, parallel=parallel, placement=placement, ffn_mode=ffn_mode, dtype="float32",
               max_num_batched_tokens=8, max_num_seqs=6, kv_block_size=4, ffn_crossover_tokens=4,
               devices=jax.devices("cpu"), verbose=False, async_scheduling=async_scheduling, **kw)


def outputs(llm, prompts, params):
    return [[(c.token_ids, c.text, c.finish_reason, c.stop_reason, c.logprobs) for c in o.outputs]
            for o in llm.generate(prompts, params, use_tqdm=False)]


def assert_same(ahead, sync):
    """Tokens, text and finish reasons exactly; logprobs to float32 rounding: the batches differ
    (a finished sequence's discarded row, admissions a step later), and so do reduction orders."""
    assert [[c[:4] for c in o] for o in ahead] == [[c[:4] for c in o] for o in sync]
    for o_a, o_s in zip(ahead, sync):
        for c_a, c_s in zip(o_a, o_s):
            assert (c_a[4] is None) == (c_s[4] is None)
            for lp_a, lp_s in zip(c_a[4] or [], c_s[4] or []):
                assert lp_a.keys() == lp_s.keys()
                assert all(abs(lp_a[k].logprob - lp_s[k].logprob) <= 1e-5 for k in lp_a), (lp_a, lp_s)


def both(layout, prompts, params, **kw):
    """(outputs with the overlap off, outputs with it on, the overlapped run's stats)."""
    sync, ahead = make(*layout, False, **kw), make(*layout, True, **kw)
    got = outputs(sync, prompts, params), outputs(ahead, prompts, params)
    for llm in (sync, ahead):  # every page is back, no sequence left behind
        assert not llm.engine.has_work()
        assert all(b.num_free == b.num_pages - 1 for b in llm.engine.scheduler.blocks)
    return *got, sync.stats(), ahead.stats()


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda l: "-".join(l))
def test_greedy_is_the_same_and_equals_transformers_under_preemption(layout):
    greedy = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    sync, ahead, s_stats, a_stats = both(layout, PROMPTS * 3, greedy)
    assert_same(ahead, sync)
    assert [o[0][0] for o in ahead] == WANT * 3
    assert a_stats["num_preemptions"] > 0
    assert a_stats["device_fed_tokens"] > 0 and s_stats["device_fed_tokens"] == 0  # the overlap ran
    if layout[3] == "auto" and layout[1] == "sidp":
        assert set(a_stats["steps_per_mode"]) == {"was", "cas"}


@pytest.mark.parametrize("layout", LAYOUTS[:3], ids=lambda l: "-".join(l))
def test_seeded_sampling_stop_strings_and_the_rest_are_the_same(layout):
    probe = outputs(make(*layout, False), PROMPTS, SamplingParams(temperature=0, max_tokens=12))
    stops = sorted({text[len(text) // 2:len(text) // 2 + 2] for (_, text, *_), in probe if len(text) > 4})
    assert stops, "the fixture outputs should decode to text"
    params = [
        SamplingParams(temperature=0.9, top_p=0.9, top_k=50, seed=7, n=2, max_tokens=14, logprobs=2),
        SamplingParams(temperature=0, max_tokens=12, stop=stops),  # stop strings end sequences early
        SamplingParams(temperature=0.7, seed=3, max_tokens=10, min_tokens=6, stop_token_ids=list(range(50))),
        SamplingParams(temperature=0.8, seed=11, max_tokens=10, repetition_penalty=1.3, presence_penalty=0.5,
                       frequency_penalty=0.4),
    ]
    prompts = [p for p in PROMPTS for _ in params]
    sync, ahead, _, a_stats = both(layout, prompts, params * len(PROMPTS))
    assert_same(ahead, sync)
    assert any(c[2] == "stop" and isinstance(c[3], str) for o in ahead for c in o), "no stop string was hit"
    assert a_stats["num_preemptions"] > 0 and a_stats["device_fed_tokens"] > 0


def test_a_finished_sequence_never_emits_the_token_it_had_in_flight():
    # eos-like stop tokens end sequences at unknown steps, while their next token is already in flight
    params = SamplingParams(temperature=1.0, seed=5, max_tokens=20, stop_token_ids=list(range(0, 300)))
    sync, ahead, _, _ = both(LAYOUTS[0], PROMPTS * 2, params, kv_cache_tokens=512)
    assert_same(ahead, sync)
    ended = [c for o in ahead for c in o if c[2] == "stop"]
    assert ended and all(c[0][-1] == c[3] for c in ended)  # the stop token is the last one


def test_stats_report_wall_host_and_device_time():
    llm = make(*LAYOUTS[0], True, kv_cache_tokens=512)
    llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=8), use_tqdm=False)
    s = llm.stats()
    assert s["async_scheduling"] is True
    for k in ("wall_ms_per_step", "host_ms_per_step", "device_ms_per_step"):
        assert s[k] > 0, k
    assert s["host_ms_per_step"] <= s["wall_ms_per_step"]
    assert 0 <= s["device_idle_share"] < 1


def test_seeded_samples_are_the_same_across_layouts():
    """Qwen3's default mix (temperature 0.6, top_k 20, top_p 0.95), penalties and logit_bias, seeded:
    dp, tp, and sidp striped / owner / over tp=2 draw the same tokens (float32: the layouts' logits
    differ by rounding only)."""
    params = [SamplingParams(temperature=0.6, top_k=20, top_p=0.95, seed=21, max_tokens=10, ignore_eos=True),
              SamplingParams(temperature=1.0, min_p=0.1, seed=22, max_tokens=10, ignore_eos=True,
                             frequency_penalty=0.7, logit_bias={5: 1.5})]
    prompts = [p for p in PROMPTS for _ in params]
    layouts = [*LAYOUTS, ("dp=2", "tp", "striped", "auto")]  # tp: one replica over 2 devices
    got = [outputs(make(*layout, True, kv_cache_tokens=256), prompts, params * len(PROMPTS)) for layout in layouts]
    tokens = [[[c[0] for c in o] for o in run] for run in got]
    assert all(t == tokens[0] for t in tokens[1:])
    assert len({tuple(o[0]) for o in tokens[0]}) > 1
