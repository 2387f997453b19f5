"""The OpenAI Batch API's JSONL in the offline job (sidp_jax/jobs/offline_job.py): its lines in,
its output lines out, and how recovery reads them back.

A line in::

    {"custom_id": "q1", "method": "POST", "url": "/v1/chat/completions",
     "body": {"model": "qwen3", "messages": [...], "max_completion_tokens": 64, "temperature": 0}}

"url" is "/v1/chat/completions" (body "messages") or "/v1/completions" (body "prompt": a string,
token ids, or a list of either: a line of several prompts gets one record whose choices run over
its prompts, index = prompt * n + sample, as OpenAI's). Body fields map to SamplingParams
(vLLM's names: max_tokens, temperature, top_p, top_k, min_p, n, stop, seed, presence_penalty, frequency_penalty, repetition_penalty, stop_token_ids,
ignore_eos, min_tokens); chat also takes max_completion_tokens (= max_tokens), "logprobs": true
with "top_logprobs": k (SamplingParams.logprobs=k, 0 without top_logprobs) and
"chat_template_kwargs"; completions take "logprobs": k. "model" (and "user") are accepted and
not used: "model" is echoed in the response. A null field counts as absent. Anything else is an
error naming the field; the OpenAI fields listed in UNSUPPORTED say they are not supported.

A result out::

    {"id": "batch_req_<hash of custom_id>", "custom_id": "q1",
     "response": {"status_code": 200, "request_id": "req_<hash>", "body": <chat.completion | text_completion>},
     "error": null}

and a line that cannot run::

    {"id": "batch_req_<hash>", "custom_id": "q1" | null, "response": null,
     "error": {"code": "invalid_request" | "invalid_prompt" | "request_failed", "message": "...", "line": N}}

("line" lets a rerun key an error without a usable custom_id by its line, as the simple format's
id-less errors.)
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from typing import Any, Callable

from sidp_jax.chat_messages import check_chat_template_kwargs, normalize_messages
from sidp_jax.jobs.job_format import JobFormat
from sidp_jax.jobs.job_request import JobRequest, Key, LineError, is_valid_id, make_sampling_params

NAME = FORMAT_BATCH = "openai-batch"

URLS = {"/v1/chat/completions": "chat", "/v1/completions": "completions"}
LINE_KEYS = ("custom_id", "method", "url", "body")
SAMPLING_FIELDS = ("max_tokens", "temperature", "top_p", "top_k", "min_p", "n", "stop", "seed", "presence_penalty",
                   "frequency_penalty", "repetition_penalty", "stop_token_ids", "ignore_eos", "min_tokens",
                   "logit_bias", "allowed_token_ids", "bad_words", "include_stop_str_in_output", "skip_special_tokens",
                   "spaces_between_special_tokens", "truncate_prompt_tokens",
                   "structured_outputs")  # from allowed_token_ids on: vLLM's extra fields
IGNORED_FIELDS = ("model", "user", "metadata", "store", "service_tier")  # no effect on an offline batch
ENDPOINT_FIELDS = {
    "chat": ("messages", "max_completion_tokens", "logprobs", "top_logprobs", "chat_template_kwargs",
             "response_format"),
    "completions": ("prompt", "logprobs", "response_format"),
}
# Fields OpenAI defines that this job does not do; each is accepted only with its "off" value.
UNSUPPORTED = ("tools", "tool_choice", "functions", "function_call", "parallel_tool_calls",
               "stream", "stream_options", "echo", "best_of", "suffix", "audio", "modalities",
               "prediction", "reasoning_effort", "web_search_options")
_OFF_VALUES = {"best_of": (1,), "tool_choice": ("none",), "parallel_tool_calls": (True,)}  # tools' defaults
_UNSUPPORTED_WHY = {
    "stream": "the batch job writes whole responses", "stream_options": "the batch job writes whole responses",
    "reasoning_effort": "for Qwen3 thinking use 'chat_template_kwargs': {\"enable_thinking\": false}",
    "best_of": "use n", "echo": "the response has the completion only",
}


def _is_off(name: str, value: Any) -> bool:
    return value is False or value == [] or value == {} or value in _OFF_VALUES.get(name, ())


# ---------------------------------------------------------------------------------------------
# Lines in


def parse_batch_line(line: int, obj: dict, base_sampling: dict) -> JobRequest | LineError:
    if "custom_id" not in obj:
        return LineError(line, "missing 'custom_id'", fmt=FORMAT_BATCH)
    rid = obj["custom_id"]
    if not is_valid_id(rid):
        return LineError(line, f"invalid 'custom_id' {rid!r}: must be a non-empty string or an integer",
                         fmt=FORMAT_BATCH)
    try:
        return _parse(line, rid, obj, base_sampling)
    except ValueError as e:
        return LineError(line, str(e), id=rid, fmt=FORMAT_BATCH)


def _parse(line: int, rid, obj: dict, base_sampling: dict) -> JobRequest:
    unknown = [k for k in obj if k not in LINE_KEYS]
    if unknown:
        raise ValueError(f"unknown field(s) {', '.join(map(repr, unknown))}: a batch line has "
                         f"{', '.join(map(repr, LINE_KEYS))}")
    for key in ("method", "url", "body"):
        if key not in obj:
            raise ValueError(f"missing {key!r}")
    if obj["method"] != "POST":
        raise ValueError(f"'method' must be \"POST\", got {obj['method']!r}")
    url = obj["url"]
    if not isinstance(url, str) or url not in URLS:  # a list or an object is unhashable
        raise ValueError(f"'url' must be one of {', '.join(map(repr, URLS))}, got {url!r}")
    endpoint = URLS[url]
    if not isinstance(obj["body"], dict):
        raise ValueError(f"'body' must be an object, got {type(obj['body']).__name__}")
    body = {k: v for k, v in obj["body"].items() if v is not None}
    _check_body_fields(body, endpoint)

    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise ValueError(f"'body.model' must be a string, got {model!r}")
    overrides = {k: body[k] for k in SAMPLING_FIELDS if k in body}
    prompt = messages = template_kwargs = None
    if endpoint == "chat":
        if "messages" not in body:
            raise ValueError(f"missing 'body.messages' ({url} takes messages; /v1/completions takes a prompt)")
        messages = normalize_messages(body["messages"], "'body.messages'")
        if "max_completion_tokens" in body:
            if "max_tokens" in body:
                raise ValueError("give one of 'body.max_tokens' or 'body.max_completion_tokens', not both")
            overrides["max_tokens"] = body["max_completion_tokens"]
        if "max_tokens" not in base_sampling:  # as vLLM's chat endpoint: default the rest of the context
            overrides.setdefault("max_tokens", None)
        logprobs = body.get("logprobs", False)
        if not isinstance(logprobs, bool):
            raise ValueError(f"'body.logprobs' must be true or false for {url} (how many alternatives: "
                             f"'top_logprobs'), got {logprobs!r}")
        if logprobs:
            overrides["logprobs"] = body.get("top_logprobs", 0)
        elif "top_logprobs" in body:
            raise ValueError("'body.top_logprobs' needs 'body.logprobs': true")
        if "chat_template_kwargs" in body:
            template_kwargs = check_chat_template_kwargs(body["chat_template_kwargs"], "'body.chat_template_kwargs'")
    else:
        if "prompt" not in body:
            raise ValueError(f"missing 'body.prompt' ({url} takes a prompt; /v1/chat/completions takes messages)")
        prompt = completion_prompt(body["prompt"])
        if "logprobs" in body:
            overrides["logprobs"] = body["logprobs"]
    if "response_format" in body:
        structured = structured_outputs_of(body["response_format"])
        if structured is not None:
            if "structured_outputs" in body:
                raise ValueError("give one of 'body.response_format' or 'body.structured_outputs', not both")
            overrides["structured_outputs"] = structured
    params = make_sampling_params(base_sampling, overrides)
    several = isinstance(prompt, tuple)
    text, ids = (None, prompt) if isinstance(prompt, list) else (None if several else prompt, None)
    return JobRequest(line, rid, text, messages, params, prompt_ids=ids, fmt=FORMAT_BATCH,
                      chat_template_kwargs=template_kwargs, endpoint=endpoint, model=model,
                      given=frozenset(base_sampling) | frozenset(overrides),
                      prompt_list=list(prompt) if several else None)


def structured_outputs_of(response_format) -> dict | None:
    """OpenAI's response_format as StructuredOutputsParams fields: {"type": "text"} (none),
    {"type": "json_object"}, {"type": "json_schema", "json_schema": {"name", "schema", "strict"}}."""
    where = "'body.response_format'"
    if not isinstance(response_format, dict) or not isinstance(response_format.get("type"), str):
        raise ValueError(f"{where} must be an object with a 'type', got {json.dumps(response_format)[:60]}")
    kind = response_format["type"]
    extra = sorted(set(response_format) - {"type", "json_schema"})
    if extra:
        raise ValueError(f"unknown field(s) in {where}: {', '.join(map(repr, extra))}")
    if kind == "text":
        return None
    if kind == "json_object":
        return {"json_object": True}
    if kind != "json_schema":
        raise ValueError(f"{where}.type must be 'text', 'json_object' or 'json_schema', got {kind!r}")
    spec = response_format.get("json_schema")
    if not isinstance(spec, dict) or not isinstance(spec.get("schema"), dict):
        raise ValueError(f"{where}.json_schema must be an object with a 'schema' object")
    unknown = sorted(set(spec) - {"name", "schema", "strict", "description"})
    if unknown:
        raise ValueError(f"unknown field(s) in {where}.json_schema: {', '.join(map(repr, unknown))}")
    if "name" in spec and not isinstance(spec["name"], str):
        raise ValueError(f"{where}.json_schema.name must be a string")
    if not isinstance(spec.get("strict", False), (bool, type(None))):
        raise ValueError(f"{where}.json_schema.strict must be true or false")
    return {"json": spec["schema"]}


def _is_token_ids(x) -> bool:
    return isinstance(x, list) and bool(x) and all(isinstance(t, int) and not isinstance(t, bool) and t >= 0
                                                   for t in x)


MAX_PROMPTS_PER_LINE = 128  # a line's record waits for all of its prompts


def completion_prompt(prompt) -> str | list[int] | tuple:
    """/v1/completions' body.prompt, as OpenAI allows it: a string, token ids, or a list of
    either (a tuple of them here; a list holding one is that prompt)."""
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]
    if isinstance(prompt, str) and prompt:
        return prompt
    if _is_token_ids(prompt):
        return list(prompt)
    if isinstance(prompt, list) and len(prompt) > 1 and all(isinstance(p, list) or isinstance(p, str) for p in prompt):
        bad = next((i for i, p in enumerate(prompt) if not (p if isinstance(p, str) else _is_token_ids(p))), None)
        if bad is not None:
            raise ValueError(f"'body.prompt'[{bad}] must be a non-empty string or a non-empty list of token ids")
        if len(prompt) > MAX_PROMPTS_PER_LINE:
            raise ValueError(f"'body.prompt' holds {len(prompt)} prompts, more than {MAX_PROMPTS_PER_LINE} per line: "
                             f"split them over several lines")
        return tuple(p if isinstance(p, str) else list(p) for p in prompt)
    raise ValueError("'body.prompt' must be a non-empty string, a non-empty list of token ids (integers >= 0), "
                     "or a list of those")


def _check_body_fields(body: dict, endpoint: str) -> None:
    mine = set(SAMPLING_FIELDS) | set(IGNORED_FIELDS) | set(ENDPOINT_FIELDS[endpoint])
    other = "completions" if endpoint == "chat" else "chat"
    other_url = next(u for u, e in URLS.items() if e == other)
    for k in body:
        if k in mine:
            continue
        if k in ENDPOINT_FIELDS[other]:
            raise ValueError(f"body field {k!r} is for {other_url}, not this line's url")
        if k not in UNSUPPORTED:
            raise ValueError(f"unknown body field {k!r}")
    unsupported = [k for k in body if k in UNSUPPORTED and not _is_off(k, body[k])]
    if unsupported:
        k = unsupported[0]
        why = _UNSUPPORTED_WHY.get(k, "the batch job does plain text generation only")
        raise ValueError(f"unsupported body field {k!r} = {json.dumps(body[k])[:40]}: {why}")


# ---------------------------------------------------------------------------------------------
# Records out


def _hash(key: Key) -> str:
    """A stable id for a record's key (its custom_id, or ("line", N))."""
    return hashlib.blake2b(json.dumps(key).encode(), digest_size=12).hexdigest()


def error_record(err: LineError) -> dict:
    return {"id": f"batch_req_{_hash(err.key)}", "custom_id": err.id, "response": None,
            "error": {"code": err.code, "message": err.error, "line": err.line}}


def model_name(llm) -> str:
    """The name the responses give the model when a line's body has none: the checkpoint's directory."""
    model = getattr(llm, "model", None) or getattr(llm, "engine_kwargs", {}).get("model")
    return os.path.basename(str(model).rstrip("/")) if model else "sidp-jax"


def token_decoder(tokenizer) -> Callable[[int], str]:
    """token id -> its text (special tokens included); "token_id:N" without a decode()."""
    decode = getattr(tokenizer, "decode", None)
    cache: dict[int, str] = {}

    def token_str(t: int) -> str:
        t = int(t)
        if t not in cache:
            if decode is None:
                cache[t] = f"token_id:{t}"
            else:
                try:
                    cache[t] = decode([t], skip_special_tokens=False)
                except TypeError:
                    cache[t] = decode([t])
        return cache[t]

    return token_str


def _ranked(step: dict) -> list[tuple[int, float]]:
    return sorted(((int(t), float(lp)) for t, lp in step.items()), key=lambda kv: -kv[1])


def _chat_logprobs(c, k: int, token_str) -> dict:
    def entry(t: int, lp: float) -> dict:
        s = token_str(t)
        return {"token": s, "logprob": lp, "bytes": list(s.encode("utf-8", errors="replace"))}

    content = []
    for t, step in zip(c.token_ids, c.logprobs):
        t = int(t)
        lp = float(step.get(t, next(iter(step.values()))))
        content.append({**entry(t, lp), "top_logprobs": [entry(u, v) for u, v in _ranked(step)[:k]]})
    return {"content": content}


def _completion_logprobs(c, token_str) -> dict:
    """The legacy shape; top_logprobs also holds the sampled token (up to logprobs+1 entries, as OpenAI)."""
    tokens, token_logprobs, top, offsets, offset = [], [], [], [], 0
    for t, step in zip(c.token_ids, c.logprobs):
        s = token_str(t)
        tokens.append(s)
        token_logprobs.append(float(step.get(int(t), next(iter(step.values())))))
        top.append({token_str(u): v for u, v in _ranked(step)})
        offsets.append(offset)
        offset += len(s)
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top, "text_offset": offsets}


def result_record(req: JobRequest, out, tokenizer=None, model: str | None = None) -> dict:
    """The batch output line of a finished request: a chat.completion or text_completion body.
    out: its RequestOutput, or a list of them for a line of several prompts (choice index =
    prompt * n + sample, and usage summed, as OpenAI reports a prompt list)."""
    outs = out if isinstance(out, list) else [out]
    n = req.params.n
    completions = [(j * n + c.index, c) for j, o in enumerate(outs) for c in sorted(o.outputs, key=lambda c: c.index)]
    token_str = token_decoder(tokenizer)
    k = req.params.logprobs or 0
    choices = []
    for index, c in completions:
        if req.endpoint == "chat":
            lp = None if c.logprobs is None else _chat_logprobs(c, k, token_str)
            choices.append({"index": index, "message": {"role": "assistant", "content": c.text},
                            "logprobs": lp, "finish_reason": c.finish_reason})
        else:
            lp = None if c.logprobs is None else _completion_logprobs(c, token_str)
            choices.append({"index": index, "text": c.text, "logprobs": lp, "finish_reason": c.finish_reason})
    prompt_tokens = sum(map(len, req.prompts_ids))
    completion_tokens = sum(len(c.token_ids) for _, c in completions)
    cached = sum(int(getattr(o, "num_cached_tokens", 0) or 0) for o in outs)
    h = _hash(req.id)
    body = {
        "id": f"chatcmpl-{h}" if req.endpoint == "chat" else f"cmpl-{h}",
        "object": "chat.completion" if req.endpoint == "chat" else "text_completion",
        "created": int(time.time()),
        "model": req.model or model or "sidp-jax",
        "choices": choices,
        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                  "total_tokens": prompt_tokens + completion_tokens,
                  "prompt_tokens_details": {"cached_tokens": cached}},
    }
    return {"id": f"batch_req_{h}", "custom_id": req.id,
            "response": {"status_code": 200, "request_id": f"req_{h}", "body": body}, "error": None}


# ---------------------------------------------------------------------------------------------
# Records read back


def is_batch_record(rec: Any) -> bool:
    return isinstance(rec, dict) and "custom_id" in rec and "response" in rec and "error" in rec


def record_key(rec: dict) -> tuple[str | None, Key]:
    """("result" | "error", key) of a batch output line, or (None, None) if it is not one."""
    cid, err = rec.get("custom_id"), rec.get("error")
    if err is not None:
        if not isinstance(err, dict):
            return None, None
        if is_valid_id(cid):
            return "error", cid
        line = err.get("line")
        if isinstance(line, int) and not isinstance(line, bool):
            return "error", ("line", line)
        return None, None
    if is_valid_id(cid) and isinstance(rec.get("response"), dict):
        return "result", cid
    return None, None


def record_tokens(rec: dict) -> tuple[int, int]:
    """(prompt tokens, generated tokens) of a result line."""
    usage = rec["response"]["body"]["usage"]
    return usage["prompt_tokens"], usage["completion_tokens"]


FORMAT = JobFormat(name=NAME, title="OpenAI batch (custom_id/body)", id_field="custom_id",
                   matches=lambda obj: "custom_id" in obj or "body" in obj, parse=parse_batch_line,
                   result_record=result_record, error_record=error_record, owns_record=is_batch_record,
                   record_key=record_key, record_tokens=record_tokens)
