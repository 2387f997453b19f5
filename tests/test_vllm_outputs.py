"""vLLM's output objects and defaults: Logprob entries, cumulative_logprob, prompt_logprobs (against
transformers' logits), first_token_time, generation_config defaults, dtype="auto" and the
data/tensor_parallel_size mesh."""

import json
import os

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file

from fixture_paths import REFERENCE, TINY_QWEN3 as CKPT
from sidp_jax import LLM, Logprob, SamplingParams

with open(os.path.join(REFERENCE, "tiny-qwen3.json")) as f:
    _META = json.load(f)
PROMPTS = [p["token_ids"] for p in _META["prompts"]]
WANT = [p["greedy_token_ids"] for p in _META["prompts"]]
LOGITS = load_file(os.path.join(REFERENCE, "tiny-qwen3.safetensors"))


def log_softmax(x):
    x = x.astype(np.float64) - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


@pytest.fixture(scope="module")
def llm():
    return LLM(CKPT, dtype="float32", devices=jax.devices("cpu")[:1], verbose=False, max_num_batched_tokens=8,
               kv_cache_tokens=512)


def test_logprob_entries_ranks_text_and_cumulative_logprob(llm):
    out = llm.generate(PROMPTS[1], SamplingParams(temperature=0, max_tokens=6, logprobs=3, ignore_eos=True),
                       use_tqdm=False)[0]
    c = out.outputs[0]
    assert c.token_ids == WANT[1][:6]
    for tok, entry in zip(c.token_ids, c.logprobs):
        assert isinstance(entry[tok], Logprob) and entry[tok].rank == 1  # greedy: the most likely token
        assert sorted(e.rank for e in entry.values()) == [1, 2, 3]
        assert all(e.decoded_token == llm.tokenizer.decode([t]) for t, e in entry.items())
    assert c.cumulative_logprob == pytest.approx(sum(e[t].logprob for t, e in zip(c.token_ids, c.logprobs)), abs=1e-5)
    assert out.metrics.first_token_time is not None and out.metrics.first_token_time >= out.metrics.arrival_time


def test_a_sampled_tokens_rank_counts_the_more_likely_tokens(llm):
    c = llm.generate(PROMPTS[0], SamplingParams(temperature=5.0, seed=1, max_tokens=12, logprobs=20),
                     use_tqdm=False)[0].outputs[0]
    ranks = [e[t].rank for t, e in zip(c.token_ids, c.logprobs)]
    assert any(r > 1 for r in ranks)  # a hot temperature leaves the argmax
    for t, e in zip(c.token_ids, c.logprobs):  # the rank agrees with the top-20 list when it is in it
        higher = [v for i, v in e.items() if i != t and v.logprob > e[t].logprob]
        if e[t].rank <= 20:
            assert len(higher) == e[t].rank - 1


@pytest.mark.parametrize("k", [0, 2])
def test_prompt_logprobs_equal_transformers_log_softmax(llm, k):
    outs = llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=k), use_tqdm=False)
    for i, (prompt, out) in enumerate(zip(PROMPTS, outs)):
        ref = log_softmax(LOGITS[f"logits_{i}"])  # [T, V]: row p predicts token p + 1
        got = out.prompt_logprobs
        assert len(got) == len(prompt) and got[0] is None
        for pos in range(1, len(prompt)):
            entry = got[pos]
            tok = prompt[pos]
            assert entry[tok].logprob == pytest.approx(ref[pos - 1, tok], abs=1e-4)
            assert entry[tok].rank == 1 + int((ref[pos - 1] > ref[pos - 1, tok] + 1e-6).sum())
            assert len(entry) <= k + 1 and len(entry) >= 1
            for t, e in entry.items():
                assert e.logprob == pytest.approx(ref[pos - 1, t], abs=1e-4)
        # chunked (8 tokens per step) prefill: every position filled once, whatever the chunking
        assert all(e is not None for e in got[1:])


def test_prompt_logprobs_are_computed_even_when_the_prefix_is_cached(llm):
    params = SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=0)
    first = llm.generate(PROMPTS[2], params, use_tqdm=False)[0]
    again = llm.generate(PROMPTS[2], params, use_tqdm=False)[0]
    assert again.num_cached_tokens == 0
    assert [e and {t: round(v.logprob, 5) for t, v in e.items()} for e in again.prompt_logprobs] == \
        [e and {t: round(v.logprob, 5) for t, v in e.items()} for e in first.prompt_logprobs]


def test_generation_config_fills_the_defaults_and_an_explicit_request_wins(llm):
    # the bundled checkpoint's generation_config.json: temperature 0.6, top_k 20, top_p 0.95
    d = llm.default_sampling_params()
    assert (d.temperature, d.top_k, d.top_p, d.max_tokens) == (0.6, 20, 0.95, 16)  # vLLM's max_tokens 16
    out = llm.generate(PROMPTS[0], SamplingParams(temperature=0, max_tokens=3, ignore_eos=True), use_tqdm=False)[0]
    assert out.outputs[0].token_ids == WANT[0][:3]
    assert len(llm.generate(PROMPTS[0], use_tqdm=False)[0].outputs[0].token_ids) <= 16


def test_dtype_auto_takes_the_checkpoints_and_parallel_sizes_give_the_mesh():
    from sidp_jax.engine_config import EngineConfig

    llm = LLM(CKPT, devices=jax.devices("cpu"), verbose=False, data_parallel_size=2, kv_cache_tokens=256)
    assert llm.cfg.checkpoint_dtype in ("float32", "bfloat16")
    assert np.dtype(llm.dtype) == np.dtype(llm.cfg.checkpoint_dtype)
    assert llm.layout.num_replicas == 2 and llm.layout.tp == 1
    assert EngineConfig(data_parallel_size=4, tensor_parallel_size=2).mesh == "dp=4,tp=2"
    with pytest.raises(ValueError, match="disagrees"):
        EngineConfig(mesh="dp=8", data_parallel_size=2)


def test_chat_greedy_equals_transformers(llm):
    """LLM.chat renders each fixture conversation with the checkpoint's template and continues it
    greedily as transformers does (tools/make_chat_greedy_fixture.py)."""
    with open(os.path.join(REFERENCE, "chat.json")) as f:
        conversations = {c["name"]: c for c in json.load(f)["conversations"]}
    with open(os.path.join(REFERENCE, "tiny-qwen3-chat-greedy.json")) as f:
        want = json.load(f)["conversations"]
    assert len(want) >= 4
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    outs = llm.chat([conversations[w["name"]]["messages"] for w in want], params, use_tqdm=False)
    for w, out in zip(want, outs):
        assert out.prompt_token_ids == w["prompt_token_ids"], w["name"]
        assert out.outputs[0].token_ids == w["greedy_token_ids"], w["name"]
