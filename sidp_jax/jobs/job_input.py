"""Input of the offline job: reading JSONL/Parquet lines, and planning them: each line a request
or an error record, in its format (sidp_jax/jobs/formats.py), duplicates and what an earlier run
wrote taken out; then the requests' prompts tokenized."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from sidp_jax.jobs.formats import BY_NAME, FORMAT_SIMPLE, InputFormat, line_format, parse_line
from sidp_jax.jobs.job_request import JobRequest, Key, LineError, MalformedLine, is_valid_id

BYTES_PER_TOKEN = 64  # a line may hold this many bytes per token of max_model_len (JSON escapes included)
DEFAULT_MAX_LINE_BYTES = BYTES_PER_TOKEN * 131072  # 8 MiB: when max_model_len is not known yet


def read_jsonl(path: Path, max_line_bytes: int = DEFAULT_MAX_LINE_BYTES) -> Iterator[tuple[int, Any]]:
    """(line number, object) per non-blank line. A line longer than max_line_bytes is skipped
    unread (its error names the limit), and no line can end the job: JSON nested too deep for the
    parser or a number too long for Python becomes that line's error. A UTF-8 byte-order mark
    is dropped."""
    with open(path, "rb") as f:
        for line_no, raw in enumerate(_bounded_lines(f, max_line_bytes), 1):
            if isinstance(raw, int):
                yield line_no, MalformedLine(f"line is {raw:,} bytes, over the limit of {max_line_bytes:,} "
                                             f"({BYTES_PER_TOKEN} bytes per token of max_model_len)")
                continue
            if line_no == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]
            if not raw.strip():
                continue
            try:
                yield line_no, json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError as e:
                yield line_no, MalformedLine(f"not UTF-8: {e}")
            except RecursionError:
                yield line_no, MalformedLine("invalid JSON: nested too deeply to parse")
            except ValueError as e:  # JSONDecodeError, or an integer literal beyond Python's digit limit
                yield line_no, MalformedLine(f"invalid JSON: {e}")


def _bounded_lines(f, limit: int) -> Iterator[bytes | int]:
    """The file's lines, or for a line over `limit` bytes its length (read in pieces, never held)."""
    while True:
        raw = f.readline(limit + 1)
        if not raw:
            return
        if raw.endswith(b"\n") or len(raw) <= limit:  # whole (a newline or the file's end within the limit)
            yield raw
            continue
        size = len(raw)
        while not raw.endswith(b"\n"):
            raw = f.readline(1 << 20)
            if not raw:
                break
            size += len(raw)
        yield size


def check_encoding(path: Path) -> None:
    """Refuse UTF-16 and UTF-32 input up front, naming the encoding and the fix: read as UTF-8,
    every line would be an error."""
    with open(path, "rb") as f:
        head = f.read(4)
    boms = [(b"\xff\xfe\x00\x00", "UTF-32LE"), (b"\x00\x00\xfe\xff", "UTF-32BE"), (b"\xff\xfe", "UTF-16LE"),
            (b"\xfe\xff", "UTF-16BE")]
    found = next((name for bom, name in boms if head.startswith(bom)), None)
    if found is None and b"\x00" in head:  # no BOM, but NUL bytes where JSON text has none
        found = "UTF-16" if head[1:2] == b"\x00" or head[0:1] == b"\x00" else None
    if found:
        raise ValueError(f"{path} is {found}, not UTF-8: convert it first, e.g. "
                         f"iconv -f {found} -t UTF-8 {path} > {path.stem}.utf8.jsonl")


class InputError(ValueError):
    """The input file as a whole cannot be read (not one line of it): the job stops, exit 2."""


def read_parquet(path: Path) -> Iterator[tuple[int, Any]]:
    """Rows of a Parquet file as objects, numbered from 1; null fields are left out (a column a
    row does not use reads as null). A file that is not Parquet, or whose data is cut or corrupt,
    is an InputError naming the file (and the row reached)."""
    row_no = 0
    try:
        for batch in open_parquet(path).iter_batches():
            for row in batch.to_pylist():
                row_no += 1
                yield row_no, drop_nulls(row)
    except (OSError, ValueError) as e:  # pyarrow's ArrowInvalid and ArrowIOError derive from these
        if isinstance(e, InputError):
            raise
        raise InputError(f"{path}: cannot read the Parquet data after row {row_no} ({e}); the rows "
                         f"before it ran") from None


def open_parquet(path: Path):
    """The pyarrow ParquetFile, or an InputError that names the file and why."""
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise InputError("reading Parquet needs pyarrow: pip install pyarrow (or 'sidp-jax[ray]')") from None
    try:
        return pq.ParquetFile(path)
    except (OSError, ValueError) as e:
        raise InputError(f"{path} is not a readable Parquet file (truncated, or another format?): {e}") from None


def drop_nulls(row: dict) -> dict:
    """A row from a columnar source without its null fields (and a null-free "sampling_params", or
    OpenAI batch "body")."""
    out = {k: v for k, v in row.items() if v is not None}
    for nested in ("sampling_params", "body"):
        if isinstance(out.get(nested), dict):
            out[nested] = {k: v for k, v in out[nested].items() if v is not None}
    return out


READERS: dict[str, Callable[[Path], Iterator[tuple[int, Any]]]] = {
    ".jsonl": read_jsonl,
    ".ndjson": read_jsonl,
    ".parquet": read_parquet,
}


def reader_for(path: Path) -> Callable[[Path], Iterator[tuple[int, Any]]]:
    try:
        reader = READERS[path.suffix.lower()]
    except KeyError:
        raise ValueError(
            f"unsupported input format {path.suffix or path.name!r}; supported: {', '.join(READERS)}"
        ) from None
    if reader is read_jsonl and path.is_file():
        check_encoding(path)
    if reader is read_parquet and path.is_file():
        open_parquet(path)  # its footer read now: a bad file is a usage error before any model loads
    return reader


# ---------------------------------------------------------------------------------------------
# Turning lines into requests or error records


@dataclasses.dataclass
class PlanCounts:
    requests: int = 0
    errors: int = 0
    skipped: int = 0


def plan_items(entries: Iterator[tuple[int, Any]], base_sampling: dict, done: set[Key],
               counts: PlanCounts | None = None, fmt: InputFormat | None = None) -> Iterator[JobRequest | LineError]:
    """Parse lines one at a time: each runnable JobRequest or new LineError, in input order, marking
    duplicate ids across the whole file and leaving out what an earlier run already wrote. Memory:
    the ids seen so far, not the lines.
    fmt: the file's format (see detect_format); None: the first line that has one sets it. A line
    of the other format is an error: a file does not mix them."""
    counts = counts if counts is not None else PlanCounts()
    first_line_of: dict[str | int, int] = {}
    for line, obj in entries:
        shape = line_format(obj)
        if fmt is None and shape is not None:
            fmt = InputFormat(shape, line)
        if shape is not None and shape != fmt.name:
            item = LineError(line, f"line {line} is in the {BY_NAME[shape].title} format, but this file is in the "
                                   f"{BY_NAME[fmt.name].title} format (from line {fmt.line}): a file must not mix "
                                   f"formats", fmt=fmt.name)
        else:
            try:
                item = parse_line(line, obj, base_sampling, fmt.name if fmt else None)
            except RecursionError:  # a value the parser just managed, too deep to quote in the line's error
                item = _too_deep(line, obj, fmt.name if fmt else FORMAT_SIMPLE)
        if item.id is not None:
            if item.id in first_line_of:
                name = BY_NAME[item.fmt].id_field
                item = LineError(line, f"duplicate {name} {item.id!r} (first on line {first_line_of[item.id]})",
                                 fmt=item.fmt)
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


def _too_deep(line: int, obj: Any, fmt: str) -> LineError:
    rid = obj.get(BY_NAME[fmt].id_field) if isinstance(obj, dict) else None
    return LineError(line, "a value is nested too deeply", id=rid if is_valid_id(rid) else None, fmt=fmt)


def _completion_ids(prompt: str | list[int], tokenizer) -> list[int]:
    """A completions prompt's token ids: text encoded with special tokens, or ids checked."""
    if isinstance(prompt, str):
        return list(tokenizer.encode(prompt, add_special_tokens=True))
    size = tokenizer.vocab_size
    bad = next((t for t in prompt if t >= size), None)
    if bad is not None:
        raise ValueError(f"prompt token id {bad} is outside the tokenizer's vocabulary of {size}")
    return list(prompt)


def tokenize(req: JobRequest, tokenizer) -> list[int]:
    """The token ids of a request of one prompt (chat messages, text, or ids given)."""
    if req.messages is not None:
        text = tokenizer.apply_chat_template(req.messages, add_generation_prompt=True, tokenize=False,
                                             **(req.chat_template_kwargs or {}))
        return list(tokenizer.encode(text, add_special_tokens=False))
    return _completion_ids(req.prompt if req.prompt is not None else req.prompt_ids, tokenizer)


def tokenize_into(req: JobRequest, tokenizer) -> None:
    """Fill in prompt_ids, or for a line of several prompts prompt_ids_list (see prompts_ids)."""
    if req.prompt_list is not None:
        req.prompt_ids_list = [_completion_ids(p, tokenizer) for p in req.prompt_list]
    else:
        req.prompt_ids = tokenize(req, tokenizer)
