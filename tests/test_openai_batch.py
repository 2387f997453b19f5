"""The offline job in the OpenAI Batch API's JSONL format (sidp_jax/jobs/openai_batch.py), through
the command line's main: against test_offline_job's fake engine, and once on the bundled model.

Every output line is checked field by field against the batch output schema (check_result /
check_error)."""

from __future__ import annotations

import json


from sidp_jax.jobs import cli, offline_job
from sidp_jax.jobs.cli import main
from sidp_jax.llm import BUNDLED_MODEL
from sidp_jax.loading.tokenizer import Tokenizer
from test_offline_job import BOS, FakeLLM, FakeTokenizer, read_records, write_lines

CHAT, COMPLETIONS = "/v1/chat/completions", "/v1/completions"
RECORD_KEYS = {"id", "custom_id", "response", "error"}


# ---------------------------------------------------------------------------------------------
# A fake engine whose tokenizer decodes and records the chat template's keyword arguments


class KwargsTokenizer(FakeTokenizer):
    def __init__(self):
        self.template_kwargs: list[dict] = []

    def apply_chat_template(self, messages, add_generation_prompt=True, tokenize=False, **kwargs):
        self.template_kwargs.append(kwargs)
        text = super().apply_chat_template(messages, add_generation_prompt, tokenize)
        return text + ("<no-think>" if kwargs.get("enable_thinking") is False else "")

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(t) for t in ids)


class Factory:
    """An llm_factory of FakeLLMs with a KwargsTokenizer; keeps the LLMs it made."""

    def __init__(self):
        self.llms: list[FakeLLM] = []

    def __call__(self, **engine_kwargs):
        llm = FakeLLM(**engine_kwargs)
        llm.tokenizer = KwargsTokenizer()
        self.llms.append(llm)
        return llm

    @property
    def params_by_prompt(self) -> dict:
        return {"".join(chr(t) for t in p if t != BOS): sp for llm in self.llms for call in llm.calls
                for p, sp in zip(*call)}

    @property
    def template_kwargs(self) -> list[dict]:
        return [kw for llm in self.llms for kw in llm.tokenizer.template_kwargs]


def chat(cid, content, **body):
    return {"custom_id": cid, "method": "POST", "url": CHAT,
            "body": {"model": "qwen3-test", "messages": [{"role": "user", "content": content}], **body}}


def completion(cid, prompt, **body):
    return {"custom_id": cid, "method": "POST", "url": COMPLETIONS, "body": {"prompt": prompt, **body}}


def run(tmp_path, lines, *extra, factory=None):
    inp = write_lines(tmp_path / "in.jsonl", lines)
    out = tmp_path / "results.jsonl"
    factory = factory if factory is not None else Factory()
    rc = main(["--input", str(inp), "--output", str(out), "--no-progress", *extra], llm_factory=factory)
    return rc, out, factory


def by_custom_id(records):
    return {r["custom_id"]: r for r in records if r["custom_id"] is not None}


# ---------------------------------------------------------------------------------------------
# The schema


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def check_result(rec: dict, custom_id, url: str, n: int = 1) -> dict:
    """A result line, field by field; returns the response body."""
    assert set(rec) == RECORD_KEYS, rec
    assert rec["custom_id"] == custom_id and rec["error"] is None
    assert isinstance(rec["id"], str) and rec["id"].startswith("batch_req_")
    resp = rec["response"]
    assert set(resp) == {"status_code", "request_id", "body"} and resp["status_code"] == 200
    assert isinstance(resp["request_id"], str) and resp["request_id"]
    body = resp["body"]
    assert set(body) == {"id", "object", "created", "model", "choices", "usage"}
    chat_ = url == CHAT
    assert body["object"] == ("chat.completion" if chat_ else "text_completion")
    assert isinstance(body["id"], str) and body["id"].startswith("chatcmpl-" if chat_ else "cmpl-")
    assert _is_int(body["created"]) and body["created"] > 1_600_000_000
    assert isinstance(body["model"], str) and body["model"]
    choices = body["choices"]
    assert isinstance(choices, list) and len(choices) == n
    assert [c["index"] for c in choices] == list(range(n))
    for c in choices:
        if chat_:
            assert set(c) == {"index", "message", "logprobs", "finish_reason"}
            assert set(c["message"]) == {"role", "content"} and c["message"]["role"] == "assistant"
            assert isinstance(c["message"]["content"], str)
        else:
            assert set(c) == {"index", "text", "logprobs", "finish_reason"} and isinstance(c["text"], str)
        assert c["finish_reason"] in ("stop", "length")
        if c["logprobs"] is not None:
            (check_chat_logprobs if chat_ else check_completion_logprobs)(c["logprobs"])
    usage = body["usage"]
    assert {"prompt_tokens", "completion_tokens", "total_tokens"} <= set(usage)
    assert all(_is_int(usage[k]) for k in ("prompt_tokens", "completion_tokens", "total_tokens"))
    assert usage["prompt_tokens"] > 0 and usage["completion_tokens"] > 0
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    return body


def check_chat_logprobs(lp: dict) -> None:
    assert set(lp) == {"content"} and isinstance(lp["content"], list) and lp["content"]
    for step in lp["content"]:
        assert set(step) == {"token", "logprob", "bytes", "top_logprobs"}
        assert isinstance(step["token"], str) and isinstance(step["logprob"], float)
        assert step["bytes"] == list(step["token"].encode("utf-8", errors="replace"))
        for alt in step["top_logprobs"]:
            assert set(alt) == {"token", "logprob", "bytes"} and isinstance(alt["token"], str)
            assert isinstance(alt["logprob"], float)


def check_completion_logprobs(lp: dict) -> None:
    assert set(lp) == {"tokens", "token_logprobs", "top_logprobs", "text_offset"}
    k = len(lp["tokens"])
    assert k > 0 and all(len(lp[f]) == k for f in lp)
    assert all(isinstance(t, str) for t in lp["tokens"]) and all(isinstance(x, float) for x in lp["token_logprobs"])
    assert all(isinstance(d, dict) and all(isinstance(v, float) for v in d.values()) for d in lp["top_logprobs"])
    assert lp["text_offset"] == sorted(lp["text_offset"]) and lp["text_offset"][0] == 0


def check_error(rec: dict, line: int, custom_id=None, *words: str) -> str:
    """An error line, field by field; its message must contain each of `words`."""
    assert set(rec) == RECORD_KEYS, rec
    assert rec["custom_id"] == custom_id and rec["response"] is None
    assert isinstance(rec["id"], str) and rec["id"].startswith("batch_req_")
    err = rec["error"]
    assert set(err) == {"code", "message", "line"} and isinstance(err["code"], str) and err["code"]
    assert err["line"] == line and isinstance(err["message"], str)
    for w in words:
        assert w in err["message"], (w, err)
    return err["message"]


# ---------------------------------------------------------------------------------------------
# Tests


def test_chat_and_completions_lines_give_batch_output(tmp_path, capsys):
    lines = [
        chat("c1", "hi", max_completion_tokens=3, temperature=0, seed=7, stop=["zz"]),
        chat("c2", "hey", n=2, logprobs=True, top_logprobs=2, top_p=0.5, stream=False),
        completion("p1", "hello", max_tokens=4, logprobs=1, stop="q", seed=None),
        completion("p2", "prompt", n=3, temperature=0.7, top_k=5, min_p=0.1, presence_penalty=0.5,
                   frequency_penalty=0.2, repetition_penalty=1.1, ignore_eos=True, min_tokens=1,
                   stop_token_ids=[9], user="someone"),
        chat(7, "int custom id"),
    ]
    rc, out, fac = run(tmp_path, lines, "--max-tokens", "6")
    assert rc == 0
    records = read_records(out)
    assert len(records) == 5
    got = by_custom_id(records)
    assert set(got) == {"c1", "c2", "p1", "p2", 7}
    assert len({r["id"] for r in records}) == 5  # ids unique

    prompts = {"c1": "<user>hi\n<assistant>", "c2": "<user>hey\n<assistant>", "p1": "hello", "p2": "prompt"}
    params = fac.params_by_prompt
    c1 = check_result(got["c1"], "c1", CHAT)
    assert c1["model"] == "qwen3-test"
    assert c1["choices"][0]["message"]["content"] == (prompts["c1"][::-1] + "0")[:3]
    assert c1["choices"][0]["finish_reason"] == "length" and c1["choices"][0]["logprobs"] is None
    assert c1["usage"]["prompt_tokens"] == len(prompts["c1"]) and c1["usage"]["completion_tokens"] == 3
    sp = params[prompts["c1"]]
    assert (sp.max_tokens, sp.temperature, sp.seed, sp.stop, sp.logprobs) == (3, 0, 7, ["zz"], None)

    c2 = check_result(got["c2"], "c2", CHAT, n=2)
    sp = params[prompts["c2"]]
    assert (sp.n, sp.logprobs, sp.top_p, sp.max_tokens) == (2, 2, 0.5, 6)  # max_tokens from the CLI
    for c in c2["choices"]:
        steps = c["logprobs"]["content"]
        assert "".join(s["token"] for s in steps) == c["message"]["content"]  # decoded with the tokenizer
        assert all(s["logprob"] == -0.5 for s in steps) and len(steps[0]["top_logprobs"]) == 1
    assert c2["usage"]["completion_tokens"] == sum(len(c["message"]["content"]) for c in c2["choices"])

    p1 = check_result(got["p1"], "p1", COMPLETIONS)
    assert p1["model"] == "sidp-jax"  # no "model" in the body, none given to the engine
    assert p1["choices"][0]["text"] == "olle" and p1["usage"] == {
        "prompt_tokens": 6, "completion_tokens": 4, "total_tokens": 10, "prompt_tokens_details": {"cached_tokens": 0}}
    lp = p1["choices"][0]["logprobs"]
    assert lp["tokens"] == list("olle") and lp["text_offset"] == [0, 1, 2, 3]
    assert lp["top_logprobs"][0] == {"o": -0.5}
    sp = params["hello"]
    assert (sp.max_tokens, sp.logprobs, sp.stop, sp.seed) == (4, 1, ["q"], None)

    p2 = check_result(got["p2"], "p2", COMPLETIONS, n=3)
    assert [c["text"] for c in p2["choices"]] == [("tpmorp" + str(i))[:6] for i in range(3)]
    sp = params["prompt"]
    assert (sp.n, sp.temperature, sp.top_k, sp.min_p, sp.presence_penalty, sp.frequency_penalty,
            sp.repetition_penalty, sp.ignore_eos, sp.min_tokens, sp.stop_token_ids) == (
        3, 0.7, 5, 0.1, 0.5, 0.2, 1.1, True, 1, [9])
    check_result(got[7], 7, CHAT)

    printed = capsys.readouterr().out
    assert "Throughput: " in printed and "Requests: 5 completed, 0 errors" in printed


def test_bad_lines_give_error_records_and_the_job_goes_on(tmp_path, capsys):
    ok = chat("ok", "fine")
    lines = [
        ok,                                                                          # 1
        '{"custom_id": "broken", "body": ',                                          # 2 bad JSON
        chat("unknown", "x", colour="red"),                                          # 3 unknown body field
        chat("tools", "x", tools=[{"type": "function"}]),                            # 4 unsupported
        chat("stream", "x", stream=True),                                            # 5 unsupported
        {**completion("url", "x"), "url": "/v1/embeddings"},                         # 6 bad url
        {**completion("method", "x"), "method": "GET"},                              # 7 bad method
        {"id": "simple", "prompt": "a simple-format line"},                          # 8 the other format
        chat("ok", "again"),                                                         # 9 duplicate custom_id
        {"custom_id": "nobody", "method": "POST", "url": CHAT},                      # 10 no body
        chat("parts", [{"type": "image_url", "image_url": {"url": "x"}}]),           # 11 non-text part
        chat("toplp", "x", top_logprobs=2),                                          # 12 top_logprobs alone
        completion("plist", ["a", ""]),                                              # 13 an empty prompt in a list
        completion("msgs", "x", messages=[]),                                        # 14 chat field, completions url
        chat("temp", "x", temperature=-1),                                           # 15 bad sampling value
        {**chat("extra", "x"), "priority": 1},                                       # 16 unknown line field
        {"custom_id": "", "method": "POST", "url": CHAT, "body": {}},                # 17 invalid custom_id
        chat("logit", "x", logit_bias={"x1": 5}),                                    # 18 a bias key not a token id
        chat("long", "y" * 100),                                                     # 19 over max_model_len
        chat("explode", "x") | {"body": {"messages": [{"role": "explode", "content": "x"}]}},  # 20 template fails
        chat("both", "x", max_tokens=2, max_completion_tokens=3),                    # 21 both max fields
        completion("ok2", "also fine", stream=False, logit_bias={"5": -100}),        # 22 "off" values, a bias: fine
        completion("plong", ["fine", "y" * 100]),                                    # 23 one prompt too long
        completion("many", ["x"] * 129),                                             # 24 too many prompts
    ]
    rc, out, fac = run(tmp_path, lines)
    assert rc == 0
    records = read_records(out)
    errors = {r["error"]["line"]: r for r in records if r["error"] is not None}
    expect = {  # line -> (custom_id or None, words the message must contain)
        2: (None, ["JSON"]), 3: ("unknown", ["unknown body field", "colour"]),
        4: ("tools", ["unsupported", "tools"]), 5: ("stream", ["unsupported", "stream"]),
        6: ("url", ["'url'", "/v1/embeddings"]), 7: ("method", ["'method'", "GET"]),
        8: (None, ["line 8", "simple", "OpenAI batch", "mix"]), 9: (None, ["duplicate custom_id 'ok'", "line 1"]),
        10: ("nobody", ["missing 'body'"]), 11: ("parts", ["image_url", "only text"]),
        12: ("toplp", ["top_logprobs", "logprobs"]), 13: ("plist", ["'body.prompt'[1]", "non-empty"]),
        14: ("msgs", ["messages", "/v1/chat/completions"]), 15: ("temp", ["temperature"]),
        16: ("extra", ["unknown field", "priority"]), 17: (None, ["custom_id"]),
        18: ("logit", ["logit_bias", "token id"]), 19: ("long", ["max_model_len"]),
        20: ("explode", ["template"]), 21: ("both", ["max_tokens", "max_completion_tokens"]),
        23: ("plong", ["prompt 1 of 2", "max_model_len"]), 24: ("many", ["129 prompts", "several lines"]),
    }
    assert set(errors) == set(expect)
    for line, (cid, words) in expect.items():
        check_error(errors[line], line, cid, *words)
    assert errors[19]["error"]["code"] == "request_failed" and errors[20]["error"]["code"] == "invalid_prompt"
    assert errors[23]["error"]["code"] == "request_failed"  # one record for the line, though "fine" ran
    results = by_custom_id([r for r in records if r["error"] is None])
    assert set(results) == {"ok", "ok2"}
    check_result(results["ok"], "ok", CHAT)
    check_result(results["ok2"], "ok2", COMPLETIONS)
    assert len({r["id"] for r in records}) == len(records)
    assert f"Errors: {len(expect)}" in capsys.readouterr().out


def test_a_batch_line_in_a_simple_file_is_an_error_record_of_the_simple_format(tmp_path):
    rc, out, _ = run(tmp_path, ['not json', {"id": "a", "prompt": "x"}, chat("b", "y")])
    assert rc == 0
    records = read_records(out)
    assert {"id": "a", "text": "x0", "token_ids": [ord("x"), ord("0")], "finish_reason": "stop",
            "prompt_tokens": 2, "output_tokens": 2} in records
    errors = {r["line"]: r["error"] for r in records if "error" in r}
    assert set(errors) == {1, 3} and "JSON" in errors[1]
    assert "line 3 is in the OpenAI batch" in errors[3] and "simple" in errors[3] and "from line 2" in errors[3]


def test_resume_skips_done_custom_ids_and_a_full_resume_says_so(tmp_path, capsys):
    lines = [chat(f"r{i}", f"prompt {i}") if i % 2 else completion(f"r{i}", f"prompt {i}") for i in range(6)]
    lines.insert(3, "{bad json")  # line 4: an error without a custom_id, keyed by its line
    rc, out, fac = run(tmp_path, lines[:3])
    assert rc == 0 and len(fac.params_by_prompt) == 3
    first = read_records(out)
    capsys.readouterr()

    rc, out, fac = run(tmp_path, lines)
    assert rc == 0
    assert set(fac.params_by_prompt) == {"<user>prompt 3\n<assistant>", "prompt 4", "<user>prompt 5\n<assistant>"}
    records = read_records(out)
    assert records[:3] == first
    assert sorted(by_custom_id(records)) == [f"r{i}" for i in range(6)]
    check_error([r for r in records if r["custom_id"] is None][0], 4, None, "JSON")
    assert "Resumed: 3 records already in" in capsys.readouterr().out

    rc, out, fac = run(tmp_path, lines)  # everything is done: no engine is built
    assert rc == 0 and fac.llms == [] and read_records(out) == records
    printed = capsys.readouterr().out
    assert f"Nothing to run: all 7 requests are already in {out}" in printed
    assert "Throughput" not in printed and "KV cache" not in printed


def test_nothing_to_run_summary_lines():
    s = offline_job.JobSummary(output="out/r.jsonl", requests_skipped=5, nothing_ran=True)
    assert cli.format_summary(s).splitlines()[0] == "Nothing to run: all 5 requests are already in out/r.jsonl"
    s = offline_job.JobSummary(output="o.jsonl", requests_skipped=2, requests_errored=1, nothing_ran=True)
    assert cli.format_summary(s).splitlines()[0] == "Nothing to run: 1 input lines with errors, 2 already in o.jsonl"
    s = offline_job.JobSummary(output="o.jsonl", nothing_ran=True)
    assert cli.format_summary(s).splitlines()[0] == "Nothing to run: the input has no requests"


def test_simple_format_full_resume_says_nothing_to_run(tmp_path, capsys):
    from test_offline_job import run as run_simple

    lines = [{"id": "a", "prompt": "x"}, {"id": "b", "prompt": "y"}]
    assert run_simple(tmp_path, lines)[0] == 0
    capsys.readouterr()
    rc, out, rec = run_simple(tmp_path, lines)
    assert rc == 0 and rec.llms == []
    assert capsys.readouterr().out.count(f"Nothing to run: all 2 requests are already in {out}") == 1


def test_retry_errors_reruns_error_records(tmp_path, capsys):
    lines = [chat("a", "x"), completion("b", "y"), chat("c", "z")]
    rc, out, _ = run(tmp_path, [lines[0], completion("b", "y", tools=[{"type": "function"}]), "{oops"])
    assert rc == 0
    before = read_records(out)
    assert sorted((r["custom_id"] or "", r["error"] is None) for r in before) == [("", False), ("a", True), ("b", False)]
    capsys.readouterr()

    rc, _, fac = run(tmp_path, lines)  # b stays an error; line 3 now has a custom_id and runs
    assert rc == 0 and set(fac.params_by_prompt) == {"<user>z\n<assistant>"}
    assert "2 earlier error records could be run again with --retry-errors" in capsys.readouterr().out
    rc, _, fac = run(tmp_path, lines, "--retry-errors")
    assert rc == 0 and set(fac.params_by_prompt) == {"y"}
    assert "Retrying: 2 earlier error records removed" in capsys.readouterr().out
    records = read_records(out)
    got = by_custom_id(records)
    assert all(r["error"] is None for r in records) and got["a"] == by_custom_id(before)["a"]
    assert sorted(got) == ["a", "b", "c"]
    check_result(got["b"], "b", COMPLETIONS)


def test_chat_template_kwargs_reach_apply_chat_template(tmp_path):
    lines = [
        chat("off", "q", chat_template_kwargs={"enable_thinking": False}),
        chat("on", "q", chat_template_kwargs={"enable_thinking": True, "custom_var": 3}),
        chat("none", "q"),
        chat("bad", "q", chat_template_kwargs=["enable_thinking"]),
        chat("reserved", "q", chat_template_kwargs={"tokenize": True}),
        completion("compl", "q", chat_template_kwargs={"enable_thinking": False}),
    ]
    rc, out, fac = run(tmp_path, lines)
    assert rc == 0
    assert sorted(fac.template_kwargs, key=str) == sorted(
        [{"enable_thinking": False}, {"enable_thinking": True, "custom_var": 3}, {}], key=str)
    got = by_custom_id(read_records(out))
    usage = {cid: check_result(got[cid], cid, CHAT)["usage"]["prompt_tokens"] for cid in ("off", "on", "none")}
    assert usage["off"] == usage["none"] + len("<no-think>") and usage["on"] == usage["none"]
    check_error(got["bad"], 4, "bad", "chat_template_kwargs", "object")
    check_error(got["reserved"], 5, "reserved", "chat_template_kwargs", "tokenize")
    check_error(got["compl"], 6, "compl", "chat_template_kwargs", "/v1/chat/completions")


def test_chat_template_kwargs_in_the_simple_format(tmp_path):
    from test_offline_job import by_id

    lines = [{"id": "off", "messages": [{"role": "user", "content": "q"}], "chat_template_kwargs": {"enable_thinking": False}},
             {"id": "p", "prompt": "q", "chat_template_kwargs": {"enable_thinking": False}}]
    rc, out, fac = run(tmp_path, lines)
    assert rc == 0 and fac.template_kwargs == [{"enable_thinking": False}]
    got = by_id(read_records(out))
    assert got["off"]["prompt_tokens"] == len("<user>q\n<assistant><no-think>")
    assert "messages" in got["p"]["error"] and "chat_template_kwargs" in got["p"]["error"]


def test_content_as_a_list_of_text_parts(tmp_path):
    from test_offline_job import by_id

    parts = [{"type": "text", "text": "first"}, {"type": "text", "text": "second"}]
    lines = [chat("parts", parts), chat("one", [{"type": "text", "text": "only"}]),
             chat("empty", []), chat("notext", [{"type": "text"}])]
    rc, out, fac = run(tmp_path, lines)
    assert rc == 0
    assert {"<user>first\nsecond\n<assistant>", "<user>only\n<assistant>"} == set(fac.params_by_prompt)
    got = by_custom_id(read_records(out))
    check_result(got["parts"], "parts", CHAT)
    check_error(got["empty"], 3, "empty", "content")
    check_error(got["notext"], 4, "notext", "text")

    simple = tmp_path / "simple"
    simple.mkdir()
    rc, out, fac = run(simple, [{"id": 1, "messages": [{"role": "user", "content": parts}]},
                                {"id": 2, "messages": [{"role": "user", "content": [{"type": "input_audio"}]}]}])
    assert rc == 0 and set(fac.params_by_prompt) == {"<user>first\nsecond\n<assistant>"}
    got = by_id(read_records(out))
    assert "token_ids" in got[1] and "only text" in got[2]["error"] and "input_audio" in got[2]["error"]


def test_an_output_of_the_other_format_is_refused_untouched(tmp_path, capsys):
    out = tmp_path / "results.jsonl"
    simple = {"id": "a", "text": "x", "token_ids": [1], "finish_reason": "stop", "prompt_tokens": 1, "output_tokens": 1}
    out.write_text(json.dumps(simple) + "\n")
    rc, _, fac = run(tmp_path, [chat("a", "x")])
    assert rc == 2 and fac.llms == [] and out.read_text() == json.dumps(simple) + "\n"
    err = capsys.readouterr().err
    assert "line 1 of" in err and "simple" in err and "OpenAI batch" in err

    batch_out = tmp_path / "b" / "results.jsonl"
    batch_out.parent.mkdir()
    assert run(batch_out.parent, [chat("a", "x")])[0] == 0
    before = batch_out.read_text()
    rc, _, fac = run(batch_out.parent, [{"id": "a", "prompt": "x"}])  # a simple input onto a batch output
    assert rc == 2 and fac.llms == [] and batch_out.read_text() == before


def test_torn_last_batch_record_is_dropped_and_rerun(tmp_path):
    lines = [chat("a", "x"), completion("b", "y")]
    rc, out, _ = run(tmp_path, lines)
    assert rc == 0
    text = out.read_text()
    keep, torn = text.splitlines(keepends=True)
    out.write_text(keep + torn[:25])  # the last write cut short
    rc, out, fac = run(tmp_path, lines)
    assert rc == 0 and len(fac.params_by_prompt) == 1
    records = read_records(out)
    assert sorted(by_custom_id(records)) == ["a", "b"]


def test_real_engine_batch_job(tmp_path):
    """The bundled tiny model through the default factory: chat and completions lines."""
    lines = [
        chat("chat-1", "Hi", max_completion_tokens=3, temperature=0, logprobs=True, top_logprobs=2),
        chat("chat-2", [{"type": "text", "text": "Tell me"}, {"type": "text", "text": "a joke"}], max_tokens=2, n=2,
             chat_template_kwargs={"enable_thinking": False}),
        completion("compl-1", "The capital of France is", max_tokens=3, logprobs=1, temperature=0, ignore_eos=True),
        completion("compl-2", "Hello", max_tokens=2, n=2, seed=1),
        # OpenAI's other prompt forms: token ids, and a list holding one prompt
        completion("compl-ids", Tokenizer.from_dir(BUNDLED_MODEL).encode("The capital of France is", True),
                   max_tokens=3, temperature=0, ignore_eos=True),
        completion("compl-list", ["The capital of France is"], max_tokens=3, temperature=0, ignore_eos=True),
        completion("bad-id", [5, 10 ** 9], max_tokens=2),
        completion("compl-multi", ["The capital of France is", [5, 6, 7]], max_tokens=3, n=2, temperature=0,
                   ignore_eos=True),
    ]
    inp = write_lines(tmp_path / "in.jsonl", lines)
    out = tmp_path / "results.jsonl"
    assert main(["--input", str(inp), "--output", str(out), "--no-progress"]) == 0
    records = read_records(out)
    bad = next(r for r in records if r["custom_id"] == "bad-id")
    assert bad["response"] is None and "outside the tokenizer's vocabulary" in bad["error"]["message"]
    got = by_custom_id([r for r in records if r["custom_id"] != "bad-id"])
    assert set(got) == {"chat-1", "chat-2", "compl-1", "compl-2", "compl-ids", "compl-list", "compl-multi"}
    same = [check_result(got[c], c, COMPLETIONS)["choices"][0]["text"] for c in ("compl-1", "compl-ids", "compl-list")]
    assert same[0] == same[1] == same[2]
    # a prompt list: choices run prompt by prompt, n each (index = prompt * n + sample), usage summed
    multi = check_result(got["compl-multi"], "compl-multi", COMPLETIONS, n=4)
    assert [c["index"] for c in multi["choices"]] == [0, 1, 2, 3]
    assert multi["choices"][0]["text"] == multi["choices"][1]["text"] == same[0]
    first = got["compl-ids"]["response"]["body"]["usage"]["prompt_tokens"]
    assert multi["usage"]["prompt_tokens"] == first + 3 and multi["usage"]["completion_tokens"] == 12
    c1 = check_result(got["chat-1"], "chat-1", CHAT)
    assert c1["model"] == "qwen3-test"
    steps = c1["choices"][0]["logprobs"]["content"]
    assert len(steps) == c1["usage"]["completion_tokens"] <= 3
    assert all(len(s["top_logprobs"]) == 2 and s["top_logprobs"][0]["logprob"] >= s["logprob"] - 1e-6 for s in steps)
    c2 = check_result(got["chat-2"], "chat-2", CHAT, n=2)
    assert c2["usage"]["completion_tokens"] <= 4
    p1 = check_result(got["compl-1"], "compl-1", COMPLETIONS)
    assert p1["model"] == "tiny-qwen3" and p1["choices"][0]["finish_reason"] == "length"
    lp = p1["choices"][0]["logprobs"]
    assert len(lp["tokens"]) == 3 and all(len(d) >= 1 for d in lp["top_logprobs"])  # the sampled token's at least
    check_result(got["compl-2"], "compl-2", COMPLETIONS, n=2)
