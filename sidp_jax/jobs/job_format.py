"""The interface every input/output format of the offline job provides (sidp_jax/jobs/formats.py
lists them): how its lines become requests, how results and errors become its records, and how
a rerun reads those records back. Adding a format: a module that builds one JobFormat, and a line
in formats.py."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

from sidp_jax.jobs.job_request import JobRequest, Key, LineError


@dataclasses.dataclass(frozen=True)
class JobFormat:
    name: str  # what a JobRequest's / LineError's `fmt` holds
    title: str  # in messages: "simple (id/prompt/messages)"
    id_field: str  # the line's id key: "id", "custom_id"
    matches: Callable[[dict], bool]  # a line's object is in this format
    parse: Callable[[int, dict, dict], JobRequest | LineError]  # (line, object, CLI sampling fields)
    result_record: Callable[..., dict]  # (request, RequestOutput(s), tokenizer, model name) -> record
    error_record: Callable[[LineError], dict]
    owns_record: Callable[[Any], bool]  # an output line's object was written in this format
    record_key: Callable[[dict], tuple[str | None, Key]]  # ("result" | "error", key), or (None, None)
    record_tokens: Callable[[dict], tuple[int, int]]  # a result record's (prompt, generated) tokens
