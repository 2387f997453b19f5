"""Input of the offline job: reading JSONL/Parquet lines and turning each into a request or an
error record (the formats are described in sidp_jax/jobs/offline_job.py)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Callable, Iterator

from sidp_jax.sampling_params import SamplingParams

PROMPT_KEYS = ("id", "prompt", "messages")
Key = Any  # a record's resume key: its id, or ("line", N) for an error without a usable id



class MalformedLine:
    """Stands in for a line's object when the reader could not decode it."""

    def __init__(self, why: str):
        self.why = why


def read_jsonl(path: Path) -> Iterator[tuple[int, Any]]:
    with open(path, "rb") as f:
        for line_no, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                yield line_no, json.loads(raw.decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                yield line_no, MalformedLine(f"invalid JSON: {e}")


def read_parquet(path: Path) -> Iterator[tuple[int, Any]]:
    """Rows of a Parquet file as objects, numbered from 1; null fields are left out (a column a
    row does not use reads as null)."""
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ValueError("reading Parquet needs pyarrow: pip install pyarrow (or 'sidp-jax[ray]')") from None
    row_no = 0
    for batch in pq.ParquetFile(path).iter_batches():
        for row in batch.to_pylist():
            row_no += 1
            yield row_no, drop_nulls(row)


def drop_nulls(row: dict) -> dict:
    """A row from a columnar source without its null fields (and a null-free "sampling_params")."""
    out = {k: v for k, v in row.items() if v is not None}
    if isinstance(out.get("sampling_params"), dict):
        out["sampling_params"] = {k: v for k, v in out["sampling_params"].items() if v is not None}
    return out


READERS: dict[str, Callable[[Path], Iterator[tuple[int, Any]]]] = {
    ".jsonl": read_jsonl,
    ".ndjson": read_jsonl,
    ".parquet": read_parquet,
}


def reader_for(path: Path) -> Callable[[Path], Iterator[tuple[int, Any]]]:
    try:
        return READERS[path.suffix.lower()]
    except KeyError:
        raise ValueError(
            f"unsupported input format {path.suffix or path.name!r}; supported: {', '.join(READERS)}"
        ) from None


# ---------------------------------------------------------------------------------------------
# Turning lines into requests or error records


@dataclasses.dataclass
class JobRequest:
    line: int
    id: str | int
    prompt: str | None
    messages: list[dict] | None
    params: SamplingParams
    prompt_ids: list[int] | None = None  # filled in by tokenize()

    @property
    def key(self) -> Key:
        return self.id


@dataclasses.dataclass
class LineError:
    line: int
    error: str
    id: str | int | None = None  # the line's own id, when it had a usable one

    @property
    def key(self) -> Key:
        return self.id if self.id is not None else ("line", self.line)

    def record(self) -> dict:
        head = {} if self.id is None else {"id": self.id}
        return {**head, "line": self.line, "error": self.error}


def is_valid_id(rid: Any) -> bool:
    if isinstance(rid, bool):
        return False
    return isinstance(rid, int) or (isinstance(rid, str) and rid != "")


def parse_line(line: int, obj: Any, base_sampling: dict) -> JobRequest | LineError:
    if isinstance(obj, MalformedLine):
        return LineError(line, obj.why)
    if not isinstance(obj, dict):
        return LineError(line, f"expected a JSON object, got {type(obj).__name__}")
    if "id" not in obj:
        return LineError(line, "missing 'id'")
    rid = obj["id"]
    if not is_valid_id(rid):
        return LineError(line, f"invalid 'id' {rid!r}: must be a non-empty string or an integer")
    try:
        prompt, messages = _prompt_fields(obj)
        params = make_sampling_params(base_sampling, _overrides(obj))
    except ValueError as e:
        return LineError(line, str(e), id=rid)
    return JobRequest(line, rid, prompt, messages, params)


def _prompt_fields(obj: dict) -> tuple[str | None, list[dict] | None]:
    has_prompt, has_messages = "prompt" in obj, "messages" in obj
    if has_prompt == has_messages:
        raise ValueError("need exactly one of 'prompt' or 'messages'")
    if has_prompt:
        prompt = obj["prompt"]
        if not isinstance(prompt, str) or not prompt:
            raise ValueError("'prompt' must be a non-empty string")
        return prompt, None
    messages = obj["messages"]
    if not isinstance(messages, list) or not messages:
        raise ValueError("'messages' must be a non-empty list")
    for i, m in enumerate(messages):
        if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
            raise ValueError(f"'messages'[{i}] must be an object with string 'role' and 'content'")
    return None, messages


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


def make_sampling_params(base: dict, overrides: dict) -> SamplingParams:
    """SamplingParams from the CLI's fields updated by a line's; errors are ValueErrors naming a field."""
    merged = {**base, **overrides}
    try:
        return SamplingParams.from_dict(merged)
    except TypeError:  # e.g. "temperature": "hot" fails a comparison; find the field to blame
        for name, value in overrides.items():
            try:
                SamplingParams.from_dict({**base, name: value})
            except (TypeError, ValueError):
                raise ValueError(f"SamplingParams.{name} has an invalid type, got {value!r}") from None
        raise ValueError(f"invalid sampling fields {sorted(merged)}") from None


@dataclasses.dataclass
class PlanCounts:
    requests: int = 0
    errors: int = 0
    skipped: int = 0


def plan_items(entries: Iterator[tuple[int, Any]], base_sampling: dict, done: set[Key],
               counts: PlanCounts | None = None) -> Iterator[JobRequest | LineError]:
    """Parse lines one at a time: each runnable JobRequest or new LineError, in input order, marking
    duplicate ids across the whole file and leaving out what an earlier run already wrote. Memory:
    the ids seen so far, not the lines."""
    counts = counts if counts is not None else PlanCounts()
    first_line_of: dict[str | int, int] = {}
    for line, obj in entries:
        item = parse_line(line, obj, base_sampling)
        if item.id is not None:
            if item.id in first_line_of:
                item = LineError(line, f"duplicate id {item.id!r} (first on line {first_line_of[item.id]})")
            else:
                first_line_of[item.id] = line
        if item.key in done:
            counts.skipped += 1
            continue
        if isinstance(item, JobRequest):
            counts.requests += 1
        else:
            counts.errors += 1
        yield item


def tokenize(req: JobRequest, tokenizer) -> list[int]:
    if req.messages is not None:
        text = tokenizer.apply_chat_template(req.messages, add_generation_prompt=True, tokenize=False)
        return list(tokenizer.encode(text, add_special_tokens=False))
    return list(tokenizer.encode(req.prompt, add_special_tokens=True))
