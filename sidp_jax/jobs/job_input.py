"""Input of the offline job: reading JSONL/Parquet lines and turning each into a request or an
error record (the formats are described in sidp_jax/jobs/offline_job.py). A file is in one of two
formats, told apart by its lines' keys (`line_format`): the simple one (parsed here) or the OpenAI
Batch API's (sidp_jax/jobs/openai_batch.py)."""

from __future__ import annotations

import dataclasses
import itertools
import json
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from sidp_jax.chat_messages import check_chat_template_kwargs, normalize_messages
from sidp_jax.sampling_params import SamplingParams

PROMPT_KEYS = ("id", "prompt", "messages", "chat_template_kwargs")
Key = Any  # a record's resume key: its id, or ("line", N) for an error without a usable id

FORMAT_SIMPLE = "simple"  # {"id", "prompt" | "messages", sampling fields...}
FORMAT_BATCH = "openai-batch"  # {"custom_id", "method", "url", "body"}
FORMAT_NAMES = {FORMAT_SIMPLE: "simple (id/prompt/messages)", FORMAT_BATCH: "OpenAI batch (custom_id/body)"}


class MalformedLine:
    """Stands in for a line's object when the reader could not decode it."""

    def __init__(self, why: str):
        self.why = why


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
class JobRequest:
    line: int
    id: str | int  # the simple format's "id", the batch format's "custom_id"
    prompt: str | None
    messages: list[dict] | None  # contents are strings (text parts joined)
    params: SamplingParams
    prompt_ids: list[int] | None = None  # filled in by tokenize_into() (a one-prompt line)
    fmt: str = FORMAT_SIMPLE  # the format of its line, and so of its record
    chat_template_kwargs: dict | None = None  # more apply_chat_template arguments (messages only)
    endpoint: str | None = None  # batch format: "chat" or "completions"
    model: str | None = None  # batch format: the body's "model" (only echoed in the response)
    given: frozenset = frozenset()  # SamplingParams fields the command line or the line set
    # batch format /v1/completions with a list of prompts: each a string or token ids; the line's
    # one record answers them all (choices index = prompt * n + sample, as OpenAI numbers them)
    prompt_list: list | None = None
    prompt_ids_list: list[list[int]] | None = None  # filled in by tokenize_into()

    @property
    def prompts_ids(self) -> list[list[int]]:
        """The token ids of every prompt the line runs (one, or each of its prompt list)."""
        return self.prompt_ids_list if self.prompt_ids_list is not None else [self.prompt_ids]

    def with_defaults(self, defaults: dict) -> None:
        """Fill the fields nobody set from the checkpoint's generation_config.json (LLM.generation_defaults)."""
        unset = {k: v for k, v in defaults.items() if k not in self.given}
        if unset:
            self.params = self.params.replace(**unset)

    @property
    def key(self) -> Key:
        return self.id


@dataclasses.dataclass
class LineError:
    line: int
    error: str
    id: str | int | None = None  # the line's own id, when it had a usable one
    fmt: str = FORMAT_SIMPLE  # the format of the record
    code: str = "invalid_request"  # the batch format's error code

    @property
    def key(self) -> Key:
        return self.id if self.id is not None else ("line", self.line)

    def record(self) -> dict:
        if self.fmt == FORMAT_BATCH:
            from sidp_jax.jobs.openai_batch import error_record

            return error_record(self)
        head = {} if self.id is None else {"id": self.id}
        return {**head, "line": self.line, "error": self.error}


def is_valid_id(rid: Any) -> bool:
    if isinstance(rid, bool):
        return False
    return isinstance(rid, int) or (isinstance(rid, str) and rid != "")


def line_format(obj: Any) -> str | None:
    """The format a line's object is in: the batch one if it has "custom_id" or "body"; None for
    what is not an object (bad JSON, a list...), which belongs to no format."""
    if not isinstance(obj, dict):
        return None
    return FORMAT_BATCH if ("custom_id" in obj or "body" in obj) else FORMAT_SIMPLE


@dataclasses.dataclass(frozen=True)
class InputFormat:
    name: str  # FORMAT_SIMPLE or FORMAT_BATCH
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


def parse_line(line: int, obj: Any, base_sampling: dict, fmt: str | None = None) -> JobRequest | LineError:
    """A line of the format `fmt` (None: the line's own, see line_format) as a request, or its error."""
    fmt = fmt or line_format(obj) or FORMAT_SIMPLE
    if isinstance(obj, MalformedLine):
        return LineError(line, obj.why, fmt=fmt)
    if not isinstance(obj, dict):
        return LineError(line, f"expected a JSON object, got {type(obj).__name__}", fmt=fmt)
    if fmt == FORMAT_BATCH:
        from sidp_jax.jobs.openai_batch import parse_batch_line

        return parse_batch_line(line, obj, base_sampling)
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


def make_sampling_params(base: dict, overrides: dict) -> SamplingParams:
    """SamplingParams from the CLI's fields updated by a line's; errors are ValueErrors naming a field."""
    merged = {**base, **overrides}
    try:
        return SamplingParams.from_dict(merged)
    except (TypeError, OverflowError):  # "temperature": "hot" fails a comparison, a 400-digit integer the
        # conversion to float: find the field to blame
        for name, value in overrides.items():
            try:
                SamplingParams.from_dict({**base, name: value})
            except OverflowError:
                raise ValueError(f"SamplingParams.{name} is out of range, got {value!r}") from None
            except (TypeError, ValueError):
                raise ValueError(f"SamplingParams.{name} has an invalid type, got {value!r}") from None
        raise ValueError(f"invalid sampling fields {sorted(merged)}") from None


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
            item = LineError(line, f"line {line} is in the {FORMAT_NAMES[shape]} format, but this file is in the "
                                   f"{FORMAT_NAMES[fmt.name]} format (from line {fmt.line}): a file must not mix "
                                   f"formats", fmt=fmt.name)
        else:
            item = parse_line(line, obj, base_sampling, fmt.name if fmt else None)
        if item.id is not None:
            if item.id in first_line_of:
                name = "custom_id" if item.fmt == FORMAT_BATCH else "id"
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
