"""The whole engine on CPU (float32): greedy outputs equal transformers', under load and pressure."""

import json
import os
import re

import jax
import pytest

from sidp_jax import LLM, SamplingParams

from fixture_paths import REFERENCE as REFS, checkpoint

GREEDY16 = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)


def fixture_prompts(name):
    with open(os.path.join(REFS, f"{name}.json")) as f:
        meta = json.load(f)
    return [p["token_ids"] for p in meta["prompts"]], [p["greedy_token_ids"] for p in meta["prompts"]]


def make_llm(name="tiny-qwen3", **kw):
    kw.setdefault("devices", jax.devices("cpu")[:1]) if kw.get("mesh", "dp=1") == "dp=1" else None
    return LLM(checkpoint(name), dtype="float32", verbose=False, **kw)


@pytest.fixture(scope="module")
def qwen3():
    return make_llm(max_num_batched_tokens=64, max_num_seqs=16)


@pytest.mark.parametrize("name", ["tiny-llama3", "tiny-qwen2", "tiny-qwen3"])
def test_greedy_equals_transformers(name):
    prompts, want = fixture_prompts(name)
    llm = make_llm(name, max_num_batched_tokens=64)
    outs = llm.generate(prompts, GREEDY16, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == want
    assert all(o.outputs[0].finish_reason == "length" for o in outs)


def test_many_in_flight_chunked_prefill_and_preemption():
    prompts, want = fixture_prompts("tiny-qwen3")
    # 12 requests, an 8-token budget (prompts of 7-25 tokens are prefilled in chunks) and a KV
    # pool of 64 tokens (too small for all at once: sequences get preempted and recomputed).
    llm = make_llm(max_num_batched_tokens=8, max_num_seqs=8, kv_block_size=4, kv_cache_tokens=64)
    outs = llm.generate(prompts * 4, GREEDY16, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == want * 4
    assert llm.stats()["num_preemptions"] > 0
    assert sum(o.metrics.num_preemptions for o in outs) == llm.stats()["num_preemptions"]


def test_text_prompts_and_chat(qwen3):
    out = qwen3.generate("Hello, world!", SamplingParams(temperature=0, max_tokens=5), use_tqdm=False)[0]
    assert out.prompt == "Hello, world!" and out.prompt_token_ids == qwen3.tokenizer.encode("Hello, world!")
    assert len(out.outputs[0].token_ids) <= 5 and isinstance(out.outputs[0].text, str)
    chat = qwen3.chat([{"role": "user", "content": "Hi"}], SamplingParams(temperature=0, max_tokens=4),
                      use_tqdm=False)[0]
    assert chat.prompt.endswith("<|im_start|>assistant\n")
    assert chat.prompt_token_ids == qwen3.tokenizer.encode(chat.prompt, add_special_tokens=False)


def test_chat_takes_what_the_job_takes_and_names_what_it_cannot(qwen3):
    greedy = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    plain = qwen3.chat([{"role": "system", "content": ""}, {"role": "user", "content": "Hi\nthere"}], greedy,
                       use_tqdm=False)[0]
    parts = qwen3.chat([{"role": "system", "content": None},
                        {"role": "user", "content": [{"type": "text", "text": "Hi"}, {"type": "text", "text": "there"}]}],
                       greedy, use_tqdm=False)[0]
    assert parts.prompt == plain.prompt and parts.outputs[0].token_ids == plain.outputs[0].token_ids
    for conv, why in [([{"role": "user"}], r"messages\[0\] must be an object with a string 'role' and a 'content'"),
                      ([{"role": "user", "content": [{"type": "image_url"}]}], "only text content"),
                      ([{"role": "user", "content": 7}], r"messages\[0\]\['content'\] must be a string"),
                      ([], "non-empty list")]:
        with pytest.raises(ValueError, match=why):
            qwen3.chat(conv, greedy, use_tqdm=False)
    with pytest.raises(ValueError, match="conversation 1"):
        qwen3.chat([[{"role": "user", "content": "a"}], [{"content": "b"}]], greedy, use_tqdm=False)
    with pytest.raises(ValueError, match="cannot set add_generation_prompt"):
        qwen3.chat([{"role": "user", "content": "a"}], greedy, use_tqdm=False,
                   chat_template_kwargs={"add_generation_prompt": False})


def test_max_and_min_tokens_and_eos(qwen3):
    prompts, want = fixture_prompts("tiny-qwen3")
    out = qwen3.generate(prompts[0], SamplingParams(temperature=0, max_tokens=3, ignore_eos=True), use_tqdm=False)[0]
    assert out.outputs[0].token_ids == want[0][:3] and out.outputs[0].finish_reason == "length"
    # Make the 2nd greedy token an EOS via stop_token_ids; min_tokens=4 forbids stopping before 4 tokens.
    stop_tok = want[0][1]
    early = qwen3.generate(prompts[0], SamplingParams(temperature=0, max_tokens=16, stop_token_ids=[stop_tok]),
                           use_tqdm=False)[0].outputs[0]
    assert early.token_ids == want[0][:2] and early.finish_reason == "stop" and early.stop_reason == stop_tok
    held = qwen3.generate(prompts[0], SamplingParams(temperature=0, max_tokens=6, min_tokens=4,
                                                     stop_token_ids=[stop_tok]), use_tqdm=False)[0].outputs[0]
    assert len(held.token_ids) >= 4 and stop_tok not in held.token_ids[:4]


def test_stop_strings_are_cut_from_the_text(qwen3):
    prompts, _ = fixture_prompts("tiny-qwen3")
    full = qwen3.generate(prompts[1], SamplingParams(temperature=0, max_tokens=16, ignore_eos=True),
                          use_tqdm=False)[0].outputs[0]
    assert len(full.text) >= 4
    stop = full.text[2:4]
    cut = qwen3.generate(prompts[1], SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, stop=[stop]),
                         use_tqdm=False)[0].outputs[0]
    assert cut.finish_reason == "stop" and cut.stop_reason == stop
    assert cut.text == full.text[:full.text.index(stop)]
    assert stop not in cut.text and cut.token_ids == full.token_ids[:len(cut.token_ids)]


def test_stop_string_far_into_a_long_output(qwen3):
    """Past the tail window the engine decodes each step: the first occurrence still cuts exactly."""
    prompts, _ = fixture_prompts("tiny-qwen3")
    sp = dict(temperature=0, max_tokens=96, ignore_eos=True)
    full = qwen3.generate(prompts[1], SamplingParams(**sp), use_tqdm=False)[0].outputs[0]
    early = qwen3.tokenizer.decode(full.token_ids[:40])  # well past a 2-char stop's 16-token window
    stop = next((full.text[i:i + 2] for i in range(len(early), len(full.text) - 2)
                 if full.text[i:i + 2].strip() and full.text.index(full.text[i:i + 2]) >= len(early)), None)
    assert stop is not None, "no 2-char string first appears late in this output"
    cut = qwen3.generate(prompts[1], SamplingParams(**sp, stop=[stop]), use_tqdm=False)[0].outputs[0]
    assert cut.finish_reason == "stop" and cut.stop_reason == stop and len(cut.token_ids) > 40
    assert cut.text == full.text[:full.text.index(stop)]


def test_n_samples_and_seeds_reproduce_across_batches(qwen3):
    prompts, _ = fixture_prompts("tiny-qwen3")
    sp = SamplingParams(temperature=1.0, top_p=0.9, top_k=50, max_tokens=8, seed=123, n=3, ignore_eos=True)
    alone = qwen3.generate([prompts[0]], sp, use_tqdm=False)[0]
    other = SamplingParams(temperature=0.8, max_tokens=12, ignore_eos=True)
    crowd = qwen3.generate([prompts[2], prompts[0], prompts[1]], [other, sp, other], use_tqdm=False)[1]
    assert [o.index for o in alone.outputs] == [0, 1, 2]
    assert [o.token_ids for o in alone.outputs] == [o.token_ids for o in crowd.outputs]
    assert len({tuple(o.token_ids) for o in alone.outputs}) > 1  # the n samples differ


def test_logprobs_and_penalties(qwen3):
    prompts, want = fixture_prompts("tiny-qwen3")
    out = qwen3.generate(prompts[0], SamplingParams(temperature=0, max_tokens=4, logprobs=3, ignore_eos=True),
                         use_tqdm=False)[0].outputs[0]
    assert out.token_ids == want[0][:4]
    for tok, lp in zip(out.token_ids, out.logprobs):
        assert tok in lp and len(lp) == 3 and max(v.logprob for v in lp.values()) == lp[tok].logprob <= 0
    rep = qwen3.generate(prompts[0], SamplingParams(temperature=0, max_tokens=16, ignore_eos=True,
                                                    repetition_penalty=10.0), use_tqdm=False)[0].outputs[0]
    assert len(set(rep.token_ids)) == len(rep.token_ids)  # a huge penalty forbids repeats


def test_logit_bias_steers_greedy_and_bad_keys_name_the_field(qwen3):
    prompts, want = fixture_prompts("tiny-qwen3")
    forced = 7 if want[0][0] != 7 else 8
    out = qwen3.generate(prompts[0], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True,
                                                    logit_bias={str(forced): 100}), use_tqdm=False)[0]
    assert out.outputs[0].token_ids == [forced] * 4
    banned = qwen3.generate(prompts[0], SamplingParams(temperature=0, max_tokens=1, ignore_eos=True,
                                                       logit_bias={want[0][0]: -100}), use_tqdm=False)[0]
    assert banned.outputs[0].token_ids != want[0][:1]
    for bias, why in [({"x": 1}, "token id"), ({"\u00b2": 1}, "token id"), ({"\u0661": 1}, "token id"),
                      ({1: 101}, "-100"), ({1: float("nan")}, "-100"), ([1], "object")]:
        with pytest.raises(ValueError, match="logit_bias"):
            SamplingParams(logit_bias=bias)
    with pytest.raises(ValueError, match="prompt 0.*logit_bias.*vocabulary"):
        qwen3.generate(prompts[0], SamplingParams(logit_bias={10**6: 1.0}), use_tqdm=False)


def test_vllm_text_and_prompt_fields(qwen3):
    prompts, want = fixture_prompts("tiny-qwen3")
    tok = qwen3.tokenizer
    full = qwen3.generate(prompts[0], SamplingParams(temperature=0, max_tokens=16, ignore_eos=True), use_tqdm=False)[0]
    text = full.outputs[0].text
    stop = text[len(text) // 2:len(text) // 2 + 2]
    kept = qwen3.generate(prompts[0], SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, stop=[stop],
                                                     include_stop_str_in_output=True), use_tqdm=False)[0].outputs[0]
    assert kept.text == text[:text.index(stop) + len(stop)] and kept.stop_reason == stop
    # truncate_prompt_tokens keeps the prompt's last k tokens: the same as sending only those
    k = len(prompts[1]) // 2
    cut = qwen3.generate(prompts[1], SamplingParams(temperature=0, max_tokens=6, ignore_eos=True,
                                                    truncate_prompt_tokens=k), use_tqdm=False)[0]
    tail = qwen3.generate(prompts[1][-k:], SamplingParams(temperature=0, max_tokens=6, ignore_eos=True),
                          use_tqdm=False)[0]
    assert cut.prompt_token_ids == prompts[1][-k:] and cut.outputs[0].token_ids == tail.outputs[0].token_ids
    # skip_special_tokens=False keeps a special token's text
    special = tok.encode("<|im_end|>", add_special_tokens=False)
    assert len(special) == 1
    forced = SamplingParams(temperature=0, max_tokens=2, ignore_eos=True, logit_bias={special[0]: 100})
    shown = qwen3.generate(prompts[0], forced.replace(skip_special_tokens=False), use_tqdm=False)[0].outputs[0]
    hidden = qwen3.generate(prompts[0], forced, use_tqdm=False)[0].outputs[0]
    assert "<|im_end|>" in shown.text and "<|im_end|>" not in hidden.text


def test_bad_words_are_never_generated(qwen3):
    prompts, want = fixture_prompts("tiny-qwen3")
    text = qwen3.generate(prompts[0], SamplingParams(temperature=0, max_tokens=16, ignore_eos=True),
                          use_tqdm=False)[0].outputs[0]
    first = qwen3.tokenizer.decode(text.token_ids[:2])  # a two-token "word" the model says at once
    assert len(qwen3.tokenizer.encode(first.lstrip())) >= 1
    for words in ([qwen3.tokenizer.decode(text.token_ids[:1])], [first]):
        out = qwen3.generate(prompts[0], SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, bad_words=words),
                             use_tqdm=False)[0].outputs[0]
        for ids in qwen3._bad_word_ids(words):
            n = len(ids)
            assert all(out.token_ids[i:i + n] != ids for i in range(len(out.token_ids))), (words, ids, out.token_ids)
        assert out.token_ids != text.token_ids


def test_every_sampling_mix_runs_the_programs_greedy_compiled():
    """The sampler's options are runtime arrays: after a greedy run, mixes of temperature, top_k,
    top_p, min_p, logprobs and logit_bias compile no new step program."""
    llm = make_llm(max_num_batched_tokens=64, max_num_seqs=4)
    prompts, _ = fixture_prompts("tiny-qwen3")
    prompts = (prompts * 2)[:4]
    llm.generate(prompts, GREEDY16, use_tqdm=False)
    programs = set(llm.engine.runner._steps)
    variants = set(llm.engine.runner.first_call_seconds)
    mixes = [SamplingParams(temperature=0.6, top_k=20, top_p=0.95, max_tokens=16, ignore_eos=True, seed=1),
             SamplingParams(temperature=1.0, top_p=0.9, max_tokens=16, ignore_eos=True, seed=2),
             SamplingParams(temperature=0.7, min_p=0.05, logprobs=5, max_tokens=16, ignore_eos=True, seed=3),
             SamplingParams(temperature=0.0, logit_bias={3: 2.5}, max_tokens=16, ignore_eos=True)]
    outs = llm.generate(prompts, mixes, use_tqdm=False)
    assert all(len(o.outputs[0].token_ids) == 16 for o in outs)
    assert all(len(lp) >= 5 for lp in outs[2].outputs[0].logprobs)
    assert set(llm.engine.runner._steps) == programs
    assert set(llm.engine.runner.first_call_seconds) == variants


def stream_all(llm, prompts, params) -> list:
    """stream()'s outputs in prompt order."""
    got = dict(llm.stream(prompts, params, use_tqdm=False))
    return [got[i] for i in range(len(prompts))]


@pytest.mark.parametrize("bad,why", [("too long", "prompt 1: prompt has .* tokens; max_model_len is"),
                                     ("empty", "prompt 1: empty prompt")])
def test_a_prompt_that_cannot_run_raises_in_generate_and_errors_alone_in_stream(qwen3, bad, why):
    prompts, want = fixture_prompts("tiny-qwen3")
    bad_prompt = [5] * (qwen3.max_model_len + 1) if bad == "too long" else []
    asked = [prompts[0], bad_prompt, prompts[1]]
    with pytest.raises(ValueError, match=why):  # as vLLM: before anything runs
        qwen3.generate(asked, GREEDY16, use_tqdm=False)
    outs = stream_all(qwen3, asked, GREEDY16)
    assert re.search(why.partition(": ")[2], outs[1].error) and outs[1].outputs == []
    assert [outs[0].outputs[0].token_ids, outs[2].outputs[0].token_ids] == want[:2]


def test_bad_sampling_params_name_the_field():
    for field, value in [("temperature", -1), ("top_p", 0), ("top_k", -3), ("max_tokens", 0), ("n", 0),
                         ("min_p", 2), ("logprobs", 99), ("repetition_penalty", 0), ("stop", [""])]:
        with pytest.raises(ValueError, match=f"SamplingParams.{field}"):
            SamplingParams(**{field: value})
    with pytest.raises(ValueError, match="min_tokens"):
        SamplingParams(min_tokens=5, max_tokens=2)


@pytest.mark.parametrize("field,value", [
    ("seed", 2**32), ("seed", -1), ("top_k", 2**31), ("stop_token_ids", [2**31]), ("max_tokens", 2**31),
    ("min_tokens", 2**31), ("temperature", float("nan")), ("top_p", float("inf")), ("presence_penalty", float("nan")),
    ("n", True), ("max_tokens", 3.0), ("seed", "7"), ("stop", 5), ("stop", ["ok", 3]), ("stop_token_ids", 5),
    ("ignore_eos", "yes"), ("temperature", True),
])
def test_values_that_would_overflow_or_mislead_are_refused_naming_the_field(field, value):
    with pytest.raises(ValueError, match=f"SamplingParams.{field}"):
        SamplingParams(**{field: value})


def test_a_stop_token_outside_the_vocabulary_fails_that_request_alone(qwen3):
    prompts, want = fixture_prompts("tiny-qwen3")
    bad = SamplingParams(temperature=0, max_tokens=4, min_tokens=1, stop_token_ids=[qwen3.cfg.vocab_size])
    outs = stream_all(qwen3, prompts[:2], [GREEDY16, bad])
    assert outs[0].outputs[0].token_ids == want[0]
    assert outs[1].error and "stop_token_ids" in outs[1].error and "vocabulary" in outs[1].error
    with pytest.raises(ValueError, match="prompt 1.*stop_token_ids"):
        qwen3.generate(prompts[:2], [GREEDY16, bad], use_tqdm=False)


def test_the_llm_stays_usable_after_a_step_fails(qwen3, monkeypatch):
    prompts, want = fixture_prompts("tiny-qwen3")
    runner = qwen3.engine.runner
    real_dispatch = runner.dispatch

    def failing_run(*a, **k):
        raise RuntimeError("device error in the middle of a step")

    monkeypatch.setattr(runner, "dispatch", failing_run)
    with pytest.raises(RuntimeError, match="middle of a step"):
        qwen3.generate(prompts, GREEDY16, use_tqdm=False)
    assert not qwen3.engine.scheduler.has_work()  # nothing left behind ...
    monkeypatch.setattr(runner, "dispatch", real_dispatch)
    free = [b.num_free for b in qwen3.engine.scheduler.blocks]
    outs = qwen3.generate(prompts, GREEDY16, use_tqdm=False)  # ... and the next call is exact
    assert [o.outputs[0].token_ids for o in outs] == want
    assert [b.num_free for b in qwen3.engine.scheduler.blocks] == free


def test_sampling_params_as_a_dict_of_vllm_fields(qwen3):
    prompts, want = fixture_prompts("tiny-qwen3")
    out = qwen3.generate(prompts[0], {"temperature": 0, "max_tokens": 4, "ignore_eos": True}, use_tqdm=False)[0]
    assert out.outputs[0].token_ids == want[0][:4]
    with pytest.raises(ValueError, match="temperature"):
        qwen3.generate(prompts[0], {"temperature": -1}, use_tqdm=False)
    with pytest.raises(TypeError, match="SamplingParams or a dict"):
        qwen3.generate(prompts[0], 0.5, use_tqdm=False)


def test_prompt_token_ids_outside_the_vocabulary_fail_in_dict_form_too(qwen3):
    prompts, want = fixture_prompts("tiny-qwen3")
    bad = [0, qwen3.cfg.vocab_size]
    for form in (bad, {"prompt_token_ids": bad}):
        with pytest.raises(ValueError, match="prompt 0: prompt token ids must be in"):
            qwen3.generate([form], GREEDY16, use_tqdm=False)
        outs = stream_all(qwen3, [form, prompts[0]], GREEDY16)
        assert outs[0].error and "prompt token ids must be in" in outs[0].error
        assert outs[1].outputs[0].token_ids == want[0]
    for not_ids in ([1.5, 2], "12", [True]):
        with pytest.raises(ValueError, match="list of integers"):
            qwen3.generate({"prompt_token_ids": not_ids}, GREEDY16, use_tqdm=False)
