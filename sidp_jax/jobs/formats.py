"""The offline job's input/output formats (each a JobFormat, sidp_jax/jobs/job_format.py), and
what the job asks of whichever one a line or record is in. A file is in one format, told apart
by its lines' keys: the first format whose `matches` accepts a line's object is that line's
(the simple format, last, takes any object)."""

from __future__ import annotations

import dataclasses
import itertools
from typing import Any, Iterable, Iterator

from sidp_jax.jobs import openai_batch, simple_format
from sidp_jax.jobs.job_format import JobFormat
from sidp_jax.jobs.job_request import JobRequest, Key, LineError, MalformedLine

FORMATS: tuple[JobFormat, ...] = (
    openai_batch.FORMAT,
    simple_format.FORMAT,  # last: any object
)
BY_NAME: dict[str, JobFormat] = {f.name: f for f in FORMATS}
FORMAT_SIMPLE, FORMAT_BATCH = simple_format.NAME, openai_batch.NAME


def line_format(obj: Any) -> str | None:
    """The name of the format a line's object is in; None for what is not an object (bad JSON, a
    list...), which belongs to no format."""
    if not isinstance(obj, dict):
        return None
    return next(f.name for f in FORMATS if f.matches(obj))


def parse_line(line: int, obj: Any, base_sampling: dict, fmt: str | None = None) -> JobRequest | LineError:
    """A line of the format `fmt` (None: the line's own) as a request, or its error."""
    fmt = fmt or line_format(obj) or FORMAT_SIMPLE
    if isinstance(obj, MalformedLine):
        return LineError(line, obj.why, fmt=fmt)
    if not isinstance(obj, dict):
        return LineError(line, f"expected a JSON object, got {type(obj).__name__}", fmt=fmt)
    return BY_NAME[fmt].parse(line, obj, base_sampling)


def error_record(err: LineError) -> dict:
    return BY_NAME[err.fmt].error_record(err)


def result_record(req: JobRequest, out, tokenizer=None, model: str | None = None) -> dict:
    """The record of a finished request in its line's format."""
    return BY_NAME[req.fmt].result_record(req, out, tokenizer, model)


def format_of_record(rec: Any) -> JobFormat:
    """The format an output line's object was written in (the simple one, last, owns the rest)."""
    return next(f for f in FORMATS if f.owns_record(rec))


def record_of(rec: Any) -> tuple[str | None, Key, str | None]:
    """("result" | "error", key, format name) of an output line's object, or (None, None, None)."""
    fmt = format_of_record(rec)
    kind, key = fmt.record_key(rec)
    return kind, key, fmt.name if kind else None


def record_tokens(rec: dict) -> tuple[int, int]:
    """(prompt tokens, generated tokens) of a result record of any format."""
    return format_of_record(rec).record_tokens(rec)


@dataclasses.dataclass(frozen=True)
class InputFormat:
    name: str  # a format's name
    line: int  # the line that set it (0: none did; the output's format, or the simple one)


def detect_format(entries: Iterable[tuple[int, Any]]) -> tuple[InputFormat | None, Iterator[tuple[int, Any]]]:
    """The format of the first line that has one, and the entries again (those read to find it
    are put back)."""
    entries = iter(entries)
    seen = []
    for line, obj in entries:
        seen.append((line, obj))
        fmt = line_format(obj)
        if fmt is not None:
            return InputFormat(fmt, line), itertools.chain(seen, entries)
    return None, iter(seen)
