"""Structured output (sidp_jax/structured_outputs.py, engine/grammar_masks.py): every output of a
constrained request parses and conforms, sampled at temperature 1 on the bundled model (random
weights: only the mask keeps it in line), through the Python API and the OpenAI batch job."""

import json
import re

import jax
import numpy as np
import pytest

from sidp_jax import LLM, SamplingParams, StructuredOutputsParams
from sidp_jax.engine.sampler import apply_bitmask
from sidp_jax.jobs.cli import main
from test_offline_job import read_records, write_lines

SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 8},
    "age": {"type": "integer", "minimum": 0, "maximum": 120},
    "color": {"enum": ["red", "green", "blue"]},
    "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 3},
    "address": {"type": "object", "properties": {"zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
                "required": ["zip"], "additionalProperties": False}},
    "required": ["name", "age", "color", "tags", "address"], "additionalProperties": False}


def conforms(obj) -> bool:
    """SCHEMA, checked by hand (no jsonschema dependency)."""
    return (isinstance(obj, dict) and list(obj) == ["name", "age", "color", "tags", "address"]
            and isinstance(obj["name"], str) and len(obj["name"]) <= 8
            and isinstance(obj["age"], int) and 0 <= obj["age"] <= 120 and obj["color"] in ("red", "green", "blue")
            and isinstance(obj["tags"], list) and len(obj["tags"]) <= 3 and set(obj["tags"]) <= {"a", "b"}
            and isinstance(obj["address"], dict) and list(obj["address"]) == ["zip"]
            and re.fullmatch(r"[0-9]{5}", obj["address"]["zip"]) is not None)


@pytest.fixture(scope="module")
def llm():
    return LLM(None, dtype="float32", verbose=False, devices=jax.devices("cpu")[:1], max_num_seqs=8,
               max_num_batched_tokens=64)


def generate(llm, so, n=8, **kw):
    sp = SamplingParams(temperature=1.0, max_tokens=kw.pop("max_tokens", 256), structured_outputs=so, **kw)
    return [o.outputs[0] for o in llm.generate([f"Prompt {i}:" for i in range(n)], sp, use_tqdm=False)]


def test_json_schema_outputs_parse_and_conform(llm):
    outs = generate(llm, StructuredOutputsParams(json=SCHEMA, disable_any_whitespace=True))
    assert all(o.finish_reason == "stop" for o in outs), [o.text for o in outs]
    assert all(conforms(json.loads(o.text)) for o in outs), [o.text for o in outs]
    assert len({o.text for o in outs}) > 1  # sampled, not one forced string


@pytest.mark.parametrize("so,check", [
    (StructuredOutputsParams(regex=r"[0-9]{3}-[a-z]{2}"), lambda t: re.fullmatch(r"[0-9]{3}-[a-z]{2}", t)),
    (StructuredOutputsParams(choice=["yes", "no", "maybe"]), lambda t: t in ("yes", "no", "maybe")),
    (StructuredOutputsParams(grammar='start: "(" NUM ("+" NUM)* ")"\nNUM: /[0-9]{1,2}/'),
     lambda t: re.fullmatch(r"\(\d{1,2}(\+\d{1,2})*\)", t)),
])
def test_regex_choice_and_grammar_outputs_conform(llm, so, check):
    outs = generate(llm, so)
    stopped = [o for o in outs if o.finish_reason == "stop"]
    assert len(stopped) >= len(outs) // 2 and all(check(o.text) for o in stopped), [o.text for o in outs]


def test_json_object_outputs_are_objects(llm):
    outs = generate(llm, StructuredOutputsParams(json_object=True, disable_any_whitespace=True), max_tokens=400)
    stopped = [o for o in outs if o.finish_reason == "stop"]
    assert stopped and all(isinstance(json.loads(o.text), dict) for o in stopped), [o.text for o in outs]
    assert all(o.text.startswith("{") for o in outs)


def test_max_tokens_mid_structure_is_length(llm):
    outs = generate(llm, StructuredOutputsParams(json=SCHEMA, disable_any_whitespace=True), max_tokens=4)
    assert all(o.finish_reason == "length" and len(o.token_ids) == 4 and o.text.startswith("{") for o in outs)


def test_constrained_rows_leave_the_others_alone(llm):
    """Seeded unconstrained requests draw the same tokens beside constrained ones as alone."""
    free = SamplingParams(temperature=1.0, max_tokens=12, seed=7, ignore_eos=True)
    tied = SamplingParams(temperature=1.0, max_tokens=12, seed=8, structured_outputs={"regex": "[a-z]{5}"})
    alone = [o.outputs[0].token_ids for o in llm.generate(["a b", "c d"], free, use_tqdm=False)]
    mixed = llm.generate(["a b", "x", "c d"], [free, tied, free], use_tqdm=False)
    assert [mixed[0].outputs[0].token_ids, mixed[2].outputs[0].token_ids] == alone
    assert re.fullmatch("[a-z]{5}", mixed[1].outputs[0].text)


@pytest.mark.parametrize("fields,why", [
    ({}, "exactly one of"),
    ({"regex": "a", "choice": ["b"]}, "exactly one of"),
    ({"json": {"type": "objectx"}}, r"structured_outputs\.json does not compile"),
    ({"regex": "(("}, r"structured_outputs\.regex does not compile"),
    ({"grammar": "start: foo"}, r"structured_outputs\.grammar does not compile"),
    ({"choice": []}, "non-empty list"),
    ({"json": "{not json"}, "not valid JSON"),
    ({"jsn": {}}, "unknown structured_outputs field"),
])
def test_bad_constraints_name_the_field(fields, why):
    with pytest.raises(ValueError, match=why):
        SamplingParams(structured_outputs=fields)


def test_the_bitmask_keeps_exactly_the_set_bits():
    rng = np.random.default_rng(0)
    V = 70
    words = rng.integers(-2**31, 2**31 - 1, size=(3, (V + 31) // 32), dtype=np.int64).astype(np.int32)
    got = np.asarray(apply_bitmask(jax.numpy.zeros((3, V)), jax.numpy.asarray(words)))
    want = np.array([[(int(words[s, t // 32]) >> (t % 32)) & 1 for t in range(V)] for s in range(3)])
    assert np.array_equal(np.isfinite(got), want == 1)


def test_openai_batch_response_format_returns_conforming_content(tmp_path):
    body = lambda **kw: {"messages": [{"role": "user", "content": "Describe a person."}], "temperature": 1.0,
                         "max_tokens": 400, **kw}  # room for the whitespace a random model picks between tokens
    line = lambda cid, **kw: {"custom_id": cid, "method": "POST", "url": "/v1/chat/completions", "body": body(**kw)}
    small = {"type": "object", "properties": {"color": SCHEMA["properties"]["color"], "n": {"type": "integer",
             "minimum": 0, "maximum": 9}}, "required": ["color", "n"], "additionalProperties": False}
    schema_format = {"type": "json_schema", "json_schema": {"name": "pick", "strict": True, "schema": small}}
    lines = [line(f"schema-{i}", response_format=schema_format) for i in range(4)] + [
        line("text", response_format={"type": "text"}, max_tokens=5),
        line("bad-schema", response_format={"type": "json_schema", "json_schema": {"name": "x",
                                                                                   "schema": {"type": "nope"}}}),
        line("bad-type", response_format={"type": "yaml"}),
    ]
    inp, out = write_lines(tmp_path / "in.jsonl", lines), tmp_path / "out.jsonl"
    assert main(["--input", str(inp), "--output", str(out), "--no-progress"]) == 0
    got = {r["custom_id"]: r for r in read_records(out)}
    assert set(got) == {line["custom_id"] for line in lines}
    for i in range(4):
        choice = got[f"schema-{i}"]["response"]["body"]["choices"][0]
        assert choice["finish_reason"] == "stop"
        obj = json.loads(choice["message"]["content"])  # whitespace between tokens allowed, as OpenAI's
        assert list(obj) == ["color", "n"] and obj["color"] in ("red", "green", "blue") and obj["n"] in range(10)
    assert got["text"]["error"] is None
    assert "structured_outputs.json does not compile" in got["bad-schema"]["error"]["message"]
    assert "'body.response_format'.type must be" in got["bad-type"]["error"]["message"]
