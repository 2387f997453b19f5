"""The offline job's own format (described in sidp_jax/jobs/offline_job.py): a line is
{"id", "prompt" | "messages", sampling fields...}, a result {"id", "text", "token_ids", ...}, an
error {"id"?, "line", "error"}."""

from __future__ import annotations

from typing import Any

from sidp_jax.chat_messages import check_chat_template_kwargs, normalize_messages
from sidp_jax.jobs.job_format import JobFormat
from sidp_jax.jobs.job_request import JobRequest, Key, LineError, is_valid_id, make_sampling_params

NAME = "simple"
PROMPT_KEYS = ("id", "prompt", "messages", "chat_template_kwargs")


# ---------------------------------------------------------------------------------------------
# Lines in


def parse_line(line: int, obj: dict, base_sampling: dict) -> JobRequest | LineError:
    """A line's object as a request, or its error."""
    if "id" not in obj:
        return LineError(line, "missing 'id'")
    rid = obj["id"]
    if not is_valid_id(rid):
        return LineError(line, f"invalid 'id' {rid!r}: must be a non-empty string or an integer")
    try:
        prompt, messages = _prompt_fields(obj)
        template_kwargs = None
        if "chat_template_kwargs" in obj:
            if messages is None:
                raise ValueError("'chat_template_kwargs' is for 'messages' lines only")
            template_kwargs = check_chat_template_kwargs(obj["chat_template_kwargs"])
        overrides = _overrides(obj)
        params = make_sampling_params(base_sampling, overrides)
    except ValueError as e:
        return LineError(line, str(e), id=rid)
    return JobRequest(line, rid, prompt, messages, params, chat_template_kwargs=template_kwargs,
                      given=frozenset(base_sampling) | frozenset(overrides))


def _prompt_fields(obj: dict) -> tuple[str | None, list[dict] | None]:
    has_prompt, has_messages = "prompt" in obj, "messages" in obj
    if has_prompt == has_messages:
        raise ValueError("need exactly one of 'prompt' or 'messages'")
    if has_prompt:
        prompt = obj["prompt"]
        if not isinstance(prompt, str) or not prompt:
            raise ValueError("'prompt' must be a non-empty string")
        return prompt, None
    return None, normalize_messages(obj["messages"])


def _overrides(obj: dict) -> dict:
    """A line's sampling fields: its own keys, and those of a "sampling_params" object (as in
    ray.data.llm's rows) under them; the same field in both is an error."""
    overrides = {k: v for k, v in obj.items() if k not in PROMPT_KEYS and k != "sampling_params"}
    if "sampling_params" in obj:
        nested = obj["sampling_params"]
        if not isinstance(nested, dict):
            raise ValueError("'sampling_params' must be an object of SamplingParams fields")
        twice = sorted(set(nested) & set(overrides))
        if twice:
            raise ValueError(f"sampling field(s) given both in 'sampling_params' and on the line: {', '.join(twice)}")
        overrides.update(nested)
    return overrides


# ---------------------------------------------------------------------------------------------
# Records out


def completion_fields(c) -> dict:
    fields = {"text": c.text, "token_ids": [int(t) for t in c.token_ids], "finish_reason": c.finish_reason}
    if c.logprobs is not None:
        fields["logprobs"] = [{str(int(t)): float(lp) for t, lp in step.items()} for step in c.logprobs]
    return fields


def result_record(req: JobRequest, out, tokenizer=None, model: str | None = None) -> dict:
    del tokenizer, model  # the simple record carries token ids, not decoded logprob tokens
    completions = sorted(out.outputs, key=lambda c: c.index)
    record = {
        "id": req.id,
        **completion_fields(completions[0]),
        "prompt_tokens": len(req.prompt_ids),
        "output_tokens": sum(len(c.token_ids) for c in completions),
    }
    if len(completions) > 1:
        record["completions"] = [completion_fields(c) for c in completions]
    return record


def error_record(err: LineError) -> dict:
    head = {} if err.id is None else {"id": err.id}
    return {**head, "line": err.line, "error": err.error}


# ---------------------------------------------------------------------------------------------
# Records read back


def record_key(rec: Any) -> tuple[str | None, Key]:
    if not isinstance(rec, dict):
        return None, None
    if "error" in rec:
        if is_valid_id(rec.get("id")):
            return "error", rec["id"]
        if isinstance(rec.get("line"), int):
            return "error", ("line", rec["line"])
        return None, None
    if is_valid_id(rec.get("id")) and "token_ids" in rec:
        return "result", rec["id"]
    return None, None


def record_tokens(rec: dict) -> tuple[int, int]:
    return rec["prompt_tokens"], rec["output_tokens"]


FORMAT = JobFormat(name=NAME, title="simple (id/prompt/messages)", id_field="id", matches=lambda obj: True,
                   parse=parse_line, result_record=result_record, error_record=error_record,
                   owns_record=lambda rec: True, record_key=record_key, record_tokens=record_tokens)
