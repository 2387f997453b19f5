"""Automatic prefix caching: the same outputs with the cache on and off (transformers' greedy
tokens, seeded sampling), on 8 CPU devices in every layout, with pages evicted, sequences
preempted and pages freed and computed again; and the page pool's own rules."""

import json
import os

import jax
import pytest

from sidp_jax import LLM, SamplingParams
from sidp_jax.engine.block_manager import BlockManager
from sidp_jax.engine.sequence import Sequence

from fixture_paths import REFERENCE, TINY_QWEN3 as CKPT

with open(os.path.join(REFERENCE, "tiny-qwen3.json")) as f:
    _META = json.load(f)
PROMPTS = [p["token_ids"] for p in _META["prompts"]]
WANT = [p["greedy_token_ids"] for p in _META["prompts"]]
GREEDY = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)

LAYOUTS = [("dp=1", "dp", "striped", "auto"), ("dp=2", "dp", "striped", "auto"), ("dp=2", "tp", "striped", "auto"),
           ("dp=4", "sidp", "striped", "auto"), ("dp=2", "sidp", "owner", "auto"),
           ("dp=4,tp=2", "sidp", "striped", "cas")]


def make(mesh, parallel, placement, ffn_mode, caching, **kw):
    kw.setdefault("kv_cache_tokens", 256)
    kw.setdefault("max_num_batched_tokens", 16)
    kw.setdefault("max_num_seqs", 6)
    return LLM(CKPT, mesh=mesh, parallel=parallel, placement=placement, ffn_mode=ffn_mode, dtype="float32",
               kv_block_size=4, ffn_crossover_tokens=4, devices=jax.devices("cpu"),
               verbose=False, enable_prefix_caching=caching, **kw)


def completions(outs):
    return [[(c.token_ids, c.text, c.finish_reason) for c in o.outputs] for o in outs]


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda l: "-".join(l))
def test_greedy_equals_transformers_with_the_cache_on_and_off(layout):
    prompts = PROMPTS * 3  # each prompt three times: the later two share its pages
    off, on = make(*layout, False), make(*layout, True)
    got_off = off.generate(prompts, GREEDY, use_tqdm=False)
    got_on = on.generate(prompts, GREEDY, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in got_on] == WANT * 3
    assert completions(got_on) == completions(got_off)
    assert all(o.num_cached_tokens == 0 for o in got_off)
    assert sum(o.num_cached_tokens for o in got_on) > 0
    s_on, s_off = on.stats(), off.stats()
    assert s_on["prefix_cache_hit_rate"] > 0 and s_off["prefix_cache_hit_rate"] == 0
    assert s_on["prefill_tokens_computed"] < s_off["prefill_tokens_computed"]


def test_seeded_samples_are_the_same_and_n_samples_prefill_the_prompt_once():
    params = SamplingParams(temperature=0.9, top_p=0.95, seed=3, n=4, max_tokens=8, logprobs=1)
    long_prompts = [p * 3 for p in PROMPTS]  # 21-75 tokens: several pages each
    kw = dict(kv_cache_tokens=2048, max_num_batched_tokens=128, max_num_seqs=16)  # all 12 samples fit one replica
    off, on = make(*LAYOUTS[1], False, **kw), make(*LAYOUTS[1], True, **kw)
    got_off = off.generate(long_prompts, params, use_tqdm=False)
    got_on = on.generate(long_prompts, params, use_tqdm=False)
    assert completions(got_on) == completions(got_off)
    s = on.stats()
    assert s["num_preemptions"] == 0 and s["prefill_tokens_requested"] == 4 * sum(map(len, long_prompts))
    # each prompt computed once; the other 3 samples compute only past its last full page but one token
    after_shared = [n - 4 * ((n - 1) // 4) for n in map(len, long_prompts)]
    assert s["prefill_tokens_computed"] == sum(map(len, long_prompts)) + 3 * sum(after_shared)


def test_eviction_preemption_and_pages_computed_again():
    # 64 KV tokens for 12 requests of 7-25 prompt tokens + 16 out: pages are evicted, sequences
    # preempted, and freed cached pages are reused and recomputed; output stays exact.
    kw = dict(kv_cache_tokens=64, max_num_batched_tokens=8)
    on, off = make(*LAYOUTS[0], True, **kw), make(*LAYOUTS[0], False, **kw)
    got_on = on.generate(PROMPTS * 4, GREEDY, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in got_on] == WANT * 4
    assert completions(got_on) == completions(off.generate(PROMPTS * 4, GREEDY, use_tqdm=False))
    s = on.stats()
    assert s["num_preemptions"] > 0 and s["prefix_cache_evictions"] > 0 and s["prefix_cache_hit_rate"] > 0
    blocks = on.engine.scheduler.blocks[0]
    assert blocks.num_free == blocks.num_pages - 1  # every page back (cached or plain free)


def test_a_prefix_goes_to_the_replica_that_holds_it():
    on = make(*LAYOUTS[1], True, kv_cache_tokens=512)
    shared = PROMPTS[2] * 4  # 4 x 25 tokens
    on.generate([shared + [7]], GREEDY, use_tqdm=False)
    holder = [i for i, b in enumerate(on.engine.scheduler.blocks) if b.num_cached_pages][0]
    out = on.generate([shared + [9]], GREEDY, use_tqdm=False)[0]
    assert out.num_cached_tokens == 100  # every full page of the shared part
    assert on.engine.scheduler.blocks[holder].num_cached_pages > on.engine.scheduler.blocks[1 - holder].num_cached_pages


def _seq(tokens, i=0):
    return Sequence(i, i, 0, tokens, SamplingParams(max_tokens=4), 0, 4)


def test_block_manager_shares_counts_and_evicts_least_recently_freed():
    bm = BlockManager(num_pages=7, page_size=4, enable_prefix_caching=True)  # 6 usable pages
    a = _seq(list(range(1, 13)))  # 3 full pages
    bm.allocate(a, 12)
    a.num_computed = 12
    bm.register(a, 12)
    assert bm.num_cached_pages == 3 and bm.num_free == 3
    b = _seq(list(range(1, 13)) + [50])
    hit = bm.cached_prefix(b)
    assert hit == a.pages  # b's 13th token is computed, so all three pages are shared
    bm.share(b, hit)
    assert b.num_computed == 12 and bm.num_free == 3  # shared pages cost nothing
    c = _seq(list(range(1, 13)))
    assert len(bm.cached_prefix(c)) == 2  # its last token must be computed: the third page is not shared
    bm.free(a)
    assert bm.num_free == 3  # b still holds them
    bm.free(b)
    assert bm.num_free == 6 and bm.num_cached_pages == 3
    d = _seq([9] * 16)
    bm.allocate(d, 16)  # 3 plain free pages, then one eviction: a's last page (freed first) goes
    assert bm.num_evictions == 1 and bm.num_cached_pages == 2
    assert len(bm.cached_prefix(b)) == 2
    bm.drop_cache()
    assert bm.num_cached_pages == 0 and bm.cached_prefix(b) == []
