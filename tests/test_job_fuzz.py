"""Property-based fuzz tests of the offline job's input path (sidp_jax/jobs/offline_job.py).

Hypothesis writes input files -- raw byte lines (invalid UTF-8, NUL, BOMs, huge number literals,
deep nesting, escaped lone surrogates), arbitrary JSON values, and plausible requests of the
simple and the OpenAI batch formats with fields of random types and unknown keys -- and runs the
job on each in-process (`cli.main`) against test_offline_job's fake engine. For every input:

1. the job never raises and exits 0, bad lines becoming error records; the one exception is an
   input that looks like UTF-16/32, which is refused up front (exit 2) and gets no output;
2. every non-blank line gets exactly one record: the first line to use a valid id (custom_id in
   the batch format) gets a result or an error keyed by that id, and every other line an id-less
   error naming its line number;
3. the job changes nothing but its output and the output's marker: the input stays
   byte-identical and no other file appears or changes.

What a line should get is worked out here by a small model of the reader (lines end at b"\\n",
a UTF-8 BOM is dropped from line 1, whitespace-only lines are skipped, a line over the byte
limit is an error) and of the id rules, not by the job's own parser, so the two check each
other. Two deterministic tests add what random draws meet too rarely: every known field at every
edge value, and values nested just short of the JSON parser's limit.

Examples are derandomized so that CI is reproducible; SIDP_FUZZ_EXAMPLES=N runs N fresh random
examples per test instead, to hunt for bugs (hypothesis prints how to reproduce a failure).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import tempfile
from collections import Counter
from pathlib import Path

from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from hypothesis.control import currently_in_test_context

from sidp_jax.jobs.cli import main
from sidp_jax.jobs.job_input import BYTES_PER_TOKEN
from sidp_jax.jobs.job_output import MARKER_SUFFIX
from test_offline_job import fake_llm

_HUNT = int(os.environ.get("SIDP_FUZZ_EXAMPLES", "0"))


def fuzz_settings(examples: int) -> settings:
    return settings(max_examples=_HUNT or examples, derandomize=not _HUNT, database=None, deadline=None,
                    print_blob=True,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                           HealthCheck.data_too_large, HealthCheck.large_base_example,
                                           HealthCheck.filter_too_much])


# ---------------------------------------------------------------------------------------------
# Running the job on one input

BOM = b"\xef\xbb\xbf"
MAX_MODEL_LENS = (16, 64, 2048)  # line limits of 1 KiB, 4 KiB and 128 KiB (BYTES_PER_TOKEN per token)
SAMPLING_FLAGS = ((), ("--max-tokens", "4"), ("--temperature", "0", "--n", "2"),
                  ("--logprobs", "1", "--stop", "x", "--ignore-eos"))  # the command line's defaults for every line


def snapshot(root: Path, skip: set[Path] = frozenset()) -> dict[str, bytes | None]:
    """Every path under root with its bytes (None for a directory), but those in skip."""
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None)
            for p in sorted(root.rglob("*")) if p not in skip}


def run_job(data: bytes, max_model_len: int, flags: tuple[str, ...]) -> tuple[int, bytes | None]:
    """Run the job on `data` as its input, in a fresh directory (also its working directory) that
    holds other files too; check that nothing but the output and its marker changed there, and
    return (exit code, output bytes or None where there is no output)."""
    with tempfile.TemporaryDirectory() as d, contextlib.chdir(d):
        root = Path(d)
        inp, out = root / "in.jsonl", root / "results.jsonl"
        inp.write_bytes(data)
        (root / "notes.txt").write_bytes(b"not the job's\n")
        (root / "sub").mkdir()
        (root / "sub" / "other.jsonl").write_bytes(b'{"id": "x", "prompt": "y"}\n')
        before = snapshot(root)
        argv = ["--input", str(inp), "--output", str(out), "--no-progress", "--max-model-len", str(max_model_len),
                *flags]
        try:
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                rc = main(argv, llm_factory=fake_llm)
        except SystemExit as e:  # the argument parser's refusals
            rc = e.code
        after = snapshot(root, skip={out, out.with_name(out.name + MARKER_SUFFIX)})
        assert after == before, f"files other than the output changed: {_changed(before, after)}"
        return rc, (out.read_bytes() if out.exists() else None)


def _changed(before: dict, after: dict) -> list[str]:
    return sorted(k for k in set(before) | set(after) if before.get(k, "absent") != after.get(k, "absent"))


# ---------------------------------------------------------------------------------------------
# A model of what each line should get

MALFORMED = object()  # a line that does not decode or parse


def refused_encoding(data: bytes) -> bool:
    """An input refused before any line is read, as UTF-16 or UTF-32 (a BOM, or NUL in its first two bytes)."""
    return data.startswith((b"\xff\xfe", b"\xfe\xff", b"\x00\x00\xfe\xff")) or b"\x00" in data[:2]


def answered_lines(data: bytes, limit: int) -> list[tuple[int, object]]:
    """(line number, parsed object or MALFORMED) of every line that must get a record."""
    parts = data.split(b"\n")
    if parts[-1] == b"":  # the file's last newline ends a line; it does not start one
        parts.pop()
    lines = []
    for n, raw in enumerate(parts, 1):
        if len(raw) > limit:  # an error whatever it holds, even only whitespace
            lines.append((n, MALFORMED))
            continue
        if n == 1 and raw.startswith(BOM):
            raw = raw[len(BOM):]
        if not raw.strip():
            continue
        try:
            lines.append((n, json.loads(raw.decode("utf-8"))))
        except (ValueError, RecursionError):
            lines.append((n, MALFORMED))
    return lines


def is_batch_line(obj: dict) -> bool:
    return "custom_id" in obj or "body" in obj


def is_valid_id(rid) -> bool:
    return (isinstance(rid, int) and not isinstance(rid, bool)) or (isinstance(rid, str) and rid != "")


def id_key(rid) -> tuple:
    """A key that tells 1 from "1" (and would 1 from 1.0)."""
    return type(rid).__name__, rid


def expected_keys(lines: list[tuple[int, object]]) -> tuple[bool, Counter, dict]:
    """(the file is in the batch format, the records' keys, the line of each id's first use). The
    first object line sets the format; the first use of a valid id, on a line of that format, is
    keyed by the id; every other line by ("line", N)."""
    batch = next((is_batch_line(obj) for _, obj in lines if isinstance(obj, dict)), False)
    field = "custom_id" if batch else "id"
    keys, first = Counter(), {}
    for n, obj in lines:
        rid = obj.get(field) if isinstance(obj, dict) and is_batch_line(obj) == batch else None
        if is_valid_id(rid) and id_key(rid) not in first:
            first[id_key(rid)] = n
            keys[id_key(rid)] += 1
        else:
            keys[("line", n)] += 1
    return batch, keys, first


def record_key(rec: dict, batch: bool, first: dict) -> tuple[str, tuple]:
    """("result" | "error", key) of an output record, checking its shape; an error must name its
    line, and one keyed by an id must name the line that id was first used on."""
    assert isinstance(rec, dict), rec
    if batch:
        assert {"id", "custom_id", "response", "error"} <= set(rec), rec
        rid, err = rec["custom_id"], rec["error"]
        if err is None:
            assert is_valid_id(rid) and rec["response"]["status_code"] == 200, rec
            return "result", id_key(rid)
        line, why = err.get("line"), err.get("message")
    else:
        assert "custom_id" not in rec and "response" not in rec, rec
        rid = rec.get("id")
        if "error" not in rec:
            assert is_valid_id(rid) and isinstance(rec["text"], str), rec
            return "result", id_key(rid)
        line, why = rec.get("line"), rec["error"]
    assert isinstance(line, int) and not isinstance(line, bool) and line >= 1, f"error without its line: {rec}"
    assert isinstance(why, str) and why, rec
    if rid is None:
        return "error", ("line", line)
    assert is_valid_id(rid) and first.get(id_key(rid)) == line, f"error keyed by an id not first on its line: {rec}"
    return "error", id_key(rid)


def check_job(data: bytes, max_model_len: int = 64, flags: tuple[str, ...] = ()) -> None:
    """Run the job on `data` and check the three properties of the module docstring."""
    rc, out = run_job(data, max_model_len, flags)
    if refused_encoding(data):
        assert rc == 2 and out is None, (rc, out)
        note("refused as UTF-16/32")
        return
    assert rc == 0, f"exit {rc}"
    out = out or b""
    assert out == b"" or out.endswith(b"\n"), out[-200:]
    lines = answered_lines(data, BYTES_PER_TOKEN * max_model_len)
    batch, want, first = expected_keys(lines)
    got, kinds = Counter(), Counter()
    for raw in out.split(b"\n")[:-1]:
        kind, key = record_key(json.loads(raw.decode("utf-8")), batch, first)
        got[key] += 1
        kinds[kind] += 1
    assert got == want, (f"records per key differ from one per non-blank line: extra {dict(got - want)}, "
                         f"missing {dict(want - got)}")
    note(f"format {'batch' if batch else 'simple'}")
    for kind in ("result", "error"):
        note(f"{kind} records: {'some' if kinds[kind] else 'none'}")


def note(what: str) -> None:
    """Count `what` in hypothesis' statistics (--hypothesis-show-statistics) when under @given."""
    if currently_in_test_context():
        event(what)


# ---------------------------------------------------------------------------------------------
# Strategies

HUGE_INTS = [2**31, 2**32, 2**63, -(2**63) - 1, 10**30, 10**400, -(10**4000)]  # under Python's 4300-digit int/str limit
ints = st.one_of(st.integers(-2, 40), st.integers(), st.sampled_from(HUGE_INTS))
floats = st.one_of(st.floats(), st.sampled_from([0.0, -0.0, 0.5, 1.0, 1e-320, 1e308, 1e300 * 10]))
texts = st.text(max_size=10)  # lone surrogates included
scalars = st.one_of(st.none(), st.booleans(), ints, floats, texts)

SIMPLE_KEYS = ["id", "prompt", "messages", "chat_template_kwargs", "sampling_params"]
SAMPLING_NAMES = ["n", "temperature", "top_p", "top_k", "min_p", "max_tokens", "min_tokens", "stop",
                  "stop_token_ids", "ignore_eos", "seed", "logprobs", "prompt_logprobs", "presence_penalty",
                  "frequency_penalty", "repetition_penalty", "logit_bias", "allowed_token_ids", "bad_words",
                  "include_stop_str_in_output", "skip_special_tokens", "spaces_between_special_tokens",
                  "truncate_prompt_tokens"]
BATCH_KEYS = ["custom_id", "method", "url", "body"]
BODY_KEYS = ["model", "messages", "prompt", "max_completion_tokens", "logprobs", "top_logprobs",
             "chat_template_kwargs", "stream", "stream_options", "tools", "tool_choice", "response_format",
             "best_of", "echo", "suffix", "user", "metadata", "store", "service_tier", "parallel_tool_calls",
             "reasoning_effort"]
URLS = ["/v1/chat/completions", "/v1/completions"]
keys = st.one_of(texts, st.sampled_from(SIMPLE_KEYS + SAMPLING_NAMES + BATCH_KEYS + BODY_KEYS))

json_values = st.recursive(scalars, lambda kids: st.lists(kids, max_size=4) | st.dictionaries(keys, kids, max_size=4),
                           max_leaves=10)


def deep(depth: int, inner: str = "1") -> str:
    return "[" * depth + inner + "]" * depth


# byte fragments that have broken JSON readers; their nesting is either well within json's
# recursion limit or far beyond it, so that the model and the job, parsing with different stacks
# under them, agree (test_values_nested_just_short_of_the_parsers_limit covers the edge)
NASTY = [
    b"", b" ", b"\t\r", b"\r", b"\x0b\x0c", b"\x00", BOM, BOM + BOM, b"\xff\xfe", b"\xfe\xff", b"\xc3",
    b"\xed\xa0\x80", b"\x80", b"{", b"}", b"[]", b"{}", b"null", b"true", b"0", b'""', b"NaN", b"-Infinity",
    b"1e999", b"-1e999",
    b"[" * 1000, deep(1000).encode(), b'{"a":' * 3000, b"[" * 5000, b"[" * 140_000,
    b"9" * 5000, b"-" + b"1" * 4301, b"0." + b"1" * 5000, b'"\\ud800"', b'"\\udfff\\ud800"', b'"\\u0000"',
    b'{"id": "\\ud800", "prompt": "\\udc00x"}', b'{"id": 1, "prompt": "x"}',
    b'{"id": ' + b"9" * 5000 + b', "prompt": "x"}', b'{"id": ' + b"9" * 4000 + b', "prompt": "x"}',
    b'{"id": "a", "prompt": "x", "temperature": ' + b"9" * 400 + b"}",
    b'{"id": "d", "prompt": "x", "stop": ' + deep(1000, '"s"').encode() + b"}",
    b'{"id": ' + deep(1000).encode() + b', "prompt": "x"}',
    b'{"id": "a", "id": 2, "prompt": "x", "prompt": "y"}',
    b'{"custom_id": "c", "method": "POST", "url": "/v1/completions", "body": {"prompt": "p"}}',
    b'{"custom_id": ' + deep(1000).encode() + b"}",
    b'{"id": "big", "prompt": "' + b"y" * 5000 + b'"}',
]


def dump(value, ascii_only: bool) -> bytes:
    """A line of JSON; without ascii_only, a lone surrogate is written as invalid UTF-8."""
    return json.dumps(value, ensure_ascii=ascii_only).encode("utf-8", "surrogatepass")


def json_lines(objects) -> st.SearchStrategy[bytes]:
    return st.builds(dump, objects, st.booleans())


byte_lines = st.lists(st.one_of(st.sampled_from(NASTY), st.binary(max_size=12), json_lines(json_values)),
                      min_size=1, max_size=3).map(b"".join)


def files(lines: st.SearchStrategy[bytes], first: st.SearchStrategy[bytes] | None = None) -> st.SearchStrategy[bytes]:
    """Input files: a BOM or not, the lines (after `first`, if given), a final newline or not."""
    body = st.lists(lines, max_size=12)
    if first is not None:
        body = st.builds(lambda head, rest: [head, *rest], first, body)
    return st.builds(lambda bom, body, end: bom + b"\n".join(body) + end,
                     st.sampled_from([b"", BOM]), body, st.sampled_from([b"\n", b""]))


def merged(*parts) -> st.SearchStrategy[dict]:
    """Dicts merging one dict from each strategy (later keys win)."""
    return st.builds(lambda *ds: {k: v for d in ds for k, v in d.items()}, *parts)


# Well-formed requests, which mostly reach the engine (ids from a small pool, so some repeat)

good_ids = st.one_of(st.sampled_from(["a", "b", "1", 1, 2, 0, -1, 2**63]), st.text(min_size=1, max_size=6),
                     st.integers())
good_texts = st.text(min_size=1, max_size=30)
good_messages = st.lists(st.fixed_dictionaries({
    "role": st.sampled_from(["user", "assistant", "system"]),
    "content": st.one_of(texts, st.lists(st.fixed_dictionaries({"type": st.just("text"), "text": texts}),
                                         min_size=1, max_size=2))}), min_size=1, max_size=3)
good_sampling = st.fixed_dictionaries({}, optional={
    "temperature": st.floats(0, 2), "top_p": st.floats(0.01, 1), "top_k": st.integers(-1, 50),
    "min_p": st.floats(0, 1), "max_tokens": st.integers(1, 20), "min_tokens": st.integers(0, 3),
    "n": st.integers(1, 3), "stop": st.one_of(good_texts, st.lists(good_texts, max_size=2)),
    "stop_token_ids": st.lists(st.integers(0, 300), max_size=2), "seed": st.integers(0, 2**32 - 1),
    "presence_penalty": st.floats(-2, 2), "repetition_penalty": st.floats(0.5, 2), "ignore_eos": st.booleans(),
    "logit_bias": st.dictionaries(st.integers(0, 300).map(str), st.floats(-100, 100), max_size=2)})
good_simple_requests = merged(
    st.fixed_dictionaries({"id": good_ids}),
    st.one_of(st.fixed_dictionaries({"prompt": good_texts}), st.fixed_dictionaries({"messages": good_messages})),
    st.fixed_dictionaries({}, optional={"logprobs": st.integers(0, 5)}),
    st.one_of(good_sampling, st.fixed_dictionaries({"sampling_params": good_sampling})))
good_chat_bodies = merged(
    st.fixed_dictionaries({"messages": good_messages}, optional={"model": texts,
                                                                  "max_completion_tokens": st.integers(1, 20)}),
    st.one_of(st.just({}),
              st.fixed_dictionaries({"logprobs": st.just(True)}, optional={"top_logprobs": st.integers(0, 5)})),
    good_sampling.map(lambda d: {k: v for k, v in d.items() if k != "max_tokens"}))
good_completion_bodies = merged(
    st.fixed_dictionaries({"prompt": st.one_of(good_texts, st.lists(good_texts, min_size=1, max_size=3))},
                          optional={"logprobs": st.integers(0, 5), "model": texts}),
    good_sampling)
good_batch_requests = st.one_of(
    st.fixed_dictionaries({"custom_id": good_ids, "method": st.just("POST"), "url": st.just(URLS[0]),
                           "body": good_chat_bodies}),
    st.fixed_dictionaries({"custom_id": good_ids, "method": st.just("POST"), "url": st.just(URLS[1]),
                           "body": good_completion_bodies}))

# Requests with fields of random types and values, and keys that do not belong

ids = st.one_of(good_ids, st.sampled_from(["", " "]), texts, ints, st.booleans(), st.none(), floats,
                st.lists(scalars, max_size=2))
content_parts = st.lists(st.one_of(
    st.fixed_dictionaries({"type": st.just("text"), "text": texts}),
    st.fixed_dictionaries({}, optional={"type": st.sampled_from(["text", "image_url", "input_audio"]) | json_values,
                                        "text": json_values})), max_size=3)
messages = st.one_of(good_messages, st.lists(st.one_of(
    st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant", "system", "explode"]),
                           "content": st.one_of(texts, content_parts)}),
    st.fixed_dictionaries({}, optional={"role": json_values, "content": st.one_of(content_parts, json_values),
                                        "name": texts})), max_size=3), json_values)
template_kwargs = st.one_of(st.dictionaries(st.sampled_from(["enable_thinking", "tools", "messages"]) | texts,
                                            json_values, max_size=2), json_values)
EDGE_VALUES = [float("nan"), float("inf"), float("-inf"), -1, 0, 1, 4097, 2**31, 2**32, 10**400, -0.0, 1e-320,
               "", "1", [], [""], [-1], {}, {"1": float("nan")}, {"99999999999": 1}, None, True, False]
sampling_values = st.one_of(
    st.sampled_from(EDGE_VALUES), ints, floats, st.booleans(), st.none(), texts,
    st.lists(st.one_of(texts, ints), max_size=3),
    st.dictionaries(st.sampled_from(["0", "5", "-1", "x", "\u00b2", "\u0661", "99999999999", "01"]) | texts,
                    st.one_of(ints, floats, texts), max_size=3),
    json_values)
sampling = st.one_of(good_sampling, st.dictionaries(st.sampled_from(SAMPLING_NAMES), sampling_values, max_size=3),
                     st.dictionaries(st.sampled_from(SAMPLING_NAMES) | texts, sampling_values, max_size=3))
unknown = st.dictionaries(st.one_of(texts, st.sampled_from(["custom_id", "body", "model"])), json_values, max_size=1)

simple_requests = merged(
    st.fixed_dictionaries({}, optional={"id": ids}),
    st.one_of(st.fixed_dictionaries({"prompt": st.one_of(st.text(min_size=1, max_size=80), json_values)}),
              st.fixed_dictionaries({"messages": messages}),
              st.fixed_dictionaries({"prompt": texts, "messages": messages}),
              st.just({})),
    st.fixed_dictionaries({}, optional={"chat_template_kwargs": template_kwargs,
                                        "sampling_params": st.one_of(sampling, json_values)}),
    sampling, unknown)

completion_prompts = st.one_of(
    st.text(min_size=1, max_size=40), st.lists(st.integers(-1, 300), max_size=4),
    st.lists(st.one_of(texts, st.lists(st.one_of(st.integers(0, 2**40), json_values), max_size=3)), max_size=4),
    st.lists(st.just("p"), min_size=128, max_size=130), json_values)
off_or_not = st.one_of(st.sampled_from([False, True, [], {}, None, 1, "none", {"type": "text"}]), json_values)
bodies = st.one_of(merged(
    st.fixed_dictionaries({}, optional={"model": st.one_of(texts, json_values), "messages": messages,
                                        "prompt": completion_prompts,
                                        "max_completion_tokens": st.one_of(ints, json_values),
                                        "logprobs": st.one_of(st.booleans(), ints, json_values),
                                        "top_logprobs": st.one_of(ints, json_values),
                                        "chat_template_kwargs": template_kwargs}),
    st.dictionaries(st.sampled_from(BODY_KEYS[6:]), off_or_not, max_size=2),
    sampling, unknown), json_values)
batch_requests = merged(
    st.fixed_dictionaries({}, optional={"custom_id": ids, "method": st.one_of(st.just("POST"), json_values),
                                        "url": st.one_of(st.sampled_from(URLS), json_values), "body": bodies}),
    st.dictionaries(st.one_of(texts, st.sampled_from(SIMPLE_KEYS)), json_values, max_size=1))

# Well-formed requests with one or two fields set to random values (or left out), so that each
# odd value meets the check it is meant for rather than an earlier error on the same line


def mutated(request: dict, changes: list[tuple[str, str, object]], drops: list[str]) -> dict:
    """`request` with each (where, key, value) of changes set, where is "line" or the key of an
    object within it ("body", "sampling_params") if it has one, and the keys in drops removed."""
    out = {**request}
    for where, key, value in changes:
        target = out
        if where != "line" and isinstance(out.get(where), dict):
            target = out[where] = {**out[where]}
        target[key] = value
    for key in drops:
        out.pop(key, None)
    return out


odd_values = st.one_of(st.sampled_from(EDGE_VALUES), st.sampled_from(EDGE_VALUES), sampling_values, messages,
                       content_parts, completion_prompts, template_kwargs)
simple_keys = st.one_of(st.sampled_from(SIMPLE_KEYS + SAMPLING_NAMES), texts)
body_keys = st.one_of(st.sampled_from(BODY_KEYS + SAMPLING_NAMES), texts)
mutated_simple_requests = st.builds(
    mutated, good_simple_requests,
    st.lists(st.one_of(st.tuples(st.just("line"), simple_keys, odd_values),
                       st.tuples(st.just("sampling_params"), st.sampled_from(SAMPLING_NAMES), odd_values)),
             min_size=1, max_size=2),
    st.lists(st.sampled_from(SIMPLE_KEYS), max_size=1))
mutated_batch_requests = st.builds(
    mutated, good_batch_requests,
    st.lists(st.one_of(st.tuples(st.just("body"), body_keys, odd_values),
                       st.tuples(st.just("line"), st.sampled_from(BATCH_KEYS) | texts, odd_values)),
             min_size=1, max_size=2),
    st.lists(st.sampled_from(BATCH_KEYS), max_size=1))

# mostly requests, some blank or broken lines among them
simple_lines = st.one_of(json_lines(good_simple_requests), json_lines(mutated_simple_requests),
                         json_lines(mutated_simple_requests), json_lines(simple_requests), byte_lines)
batch_lines = st.one_of(json_lines(good_batch_requests), json_lines(mutated_batch_requests),
                        json_lines(mutated_batch_requests), json_lines(batch_requests), json_lines(simple_requests),
                        byte_lines)
job_settings = st.tuples(st.sampled_from(MAX_MODEL_LENS), st.sampled_from(SAMPLING_FLAGS))


# ---------------------------------------------------------------------------------------------
# Tests


@fuzz_settings(200)
@given(files(byte_lines), job_settings)
def test_random_byte_lines(data, job):
    check_job(data, *job)


@fuzz_settings(120)
@given(files(json_lines(json_values)), job_settings)
def test_random_json_values(data, job):
    check_job(data, *job)


@fuzz_settings(300)
@given(files(simple_lines), job_settings)
def test_simple_format_requests_with_random_fields(data, job):
    check_job(data, *job)


@fuzz_settings(300)
@given(files(batch_lines, first=st.one_of(json_lines(good_batch_requests), json_lines(mutated_batch_requests),
                                              batch_lines)),
       job_settings)
def test_openai_batch_requests_with_random_fields(data, job):
    check_job(data, *job)


def edge_value_lines(base: dict, where: str, fields: list[str], tag: str = "") -> list[bytes]:
    """One line per (field, edge value): `base` under an id of its own (tag tells bases apart), with
    that field set to that value (see mutated)."""
    id_field = "custom_id" if "custom_id" in base else "id"
    return [dump(mutated({**base, id_field: f"{tag}{where}.{field}={value!r}"}, [(where, field, value)], []),
                 ascii_only=True)
            for field in fields for value in EDGE_VALUES]


def test_every_field_with_every_edge_value():
    """Each known field at each edge value, a line each, in a file of each format and under each
    of the command line's sampling defaults: too many pairs for the random tests to meet them all."""
    message = {"role": "user", "content": "x"}
    simple_lines = (edge_value_lines({"id": 1, "prompt": "x"}, "line", SIMPLE_KEYS + SAMPLING_NAMES)
                    + edge_value_lines({"id": 1, "prompt": "x", "sampling_params": {}}, "sampling_params",
                                       SAMPLING_NAMES)
                    + edge_value_lines({"id": 1, "messages": [message]}, "line", ["chat_template_kwargs"], "chat "))
    chat = {"custom_id": 1, "method": "POST", "url": URLS[0], "body": {"messages": [message]}}
    completion = {"custom_id": 1, "method": "POST", "url": URLS[1], "body": {"prompt": "x"}}
    batch_lines = [line for request in (chat, completion)
                   for line in edge_value_lines(request, "body", BODY_KEYS + SAMPLING_NAMES, request["url"])
                   + edge_value_lines(request, "line", BATCH_KEYS, request["url"])]
    for flags in SAMPLING_FLAGS:
        for lines in (simple_lines, batch_lines):
            check_job(b"\n".join(lines) + b"\n", 64, flags)


def json_depth_limit() -> int:
    """The deepest list nesting json.loads parses here (it depends on the interpreter and its stack)."""
    lo, hi = 1, 100_000
    while lo < hi:
        mid = (lo + hi + 1) // 2
        try:
            json.loads(deep(mid))
            lo = mid
        except RecursionError:
            hi = mid - 1
    return lo


def test_values_nested_just_short_of_the_parsers_limit():
    """A value the parser just manages to read may still be too deep for the repr or json.dumps
    of the line's error message, which run further down the stack: a file of one line, nested
    from a little short of the parser's limit to a little past it in a field whose error quotes
    it, gets its one record. Where the job's parser gives up depends on its stack, which the
    model above cannot know, so the record is checked against the line's own id here."""
    chat = {"custom_id": "c", "method": "POST", "url": URLS[0],
            "body": {"messages": [{"role": "user", "content": "x"}]}}
    requests = [({"id": "s", "prompt": "x", "stop": None}, "id"), ({"id": None, "prompt": "x"}, "id"),
                ({**chat, "method": None}, "custom_id"),
                ({**chat, "body": {**chat["body"], "tools": None}}, "custom_id")]
    limit = json_depth_limit()
    for request, id_field in requests:
        for depth in range(limit - 40, limit + 3):
            line = json.dumps(request).replace("null", deep(depth), 1).encode() + b"\n"
            rc, out = run_job(line, max_model_len=2 * limit, flags=())
            assert rc == 0, (id_field, depth)
            [rec] = map(json.loads, out.splitlines())
            rid = rec.get(id_field)
            assert rid in (None, request[id_field]), rec
            assert (rec["error"]["line"] if isinstance(rec.get("error"), dict) else rec["line"]) == 1, rec
