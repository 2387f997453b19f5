"""The offline batch job behind `run_offline.py`: prompts in, one JSON line per result out.

Input (JSONL, one object per line; blank lines are ignored)::

    {"id": "q1", "prompt": "Tell me about JAX."}
    {"id": 7, "messages": [{"role": "user", "content": "Hi!"}], "temperature": 0, "max_tokens": 32}

* "id": a non-empty string or an integer, unique in the file.
* exactly one of "prompt" (a non-empty string, encoded with special tokens) or "messages"
  (a list of {"role": str, "content": str}, rendered with the tokenizer's chat template with
  add_generation_prompt=True, then encoded without adding special tokens). A "content" may also
  be a list of text parts, [{"type": "text", "text": ...}], joined with newlines; any other part
  is an error.
* "chat_template_kwargs" (messages only): an object of more template variables, passed to
  apply_chat_template, e.g. {"enable_thinking": false} to turn Qwen3's thinking off.
* any other key is a SamplingParams field (vLLM's names) overriding the command line's value
  for that line; an unknown key is an error. The fields may also come as one object,
  "sampling_params": {...} (the shape of ray.data.llm's rows).

Output (JSONL, appended and flushed as each request finishes, in completion order)::

    {"id": "q1", "text": "...", "token_ids": [...], "finish_reason": "stop"|"length",
     "prompt_tokens": 9, "output_tokens": 12}

* with `logprobs` requested, the completion also carries "logprobs": one {"token_id": logprob}
  object per generated token.
* with n > 1, "text"/"token_ids"/"finish_reason" (and "logprobs") are the first completion's,
  "completions" lists all n as {"text", "token_ids", "finish_reason"[, "logprobs"]} in index
  order, and "output_tokens" counts the tokens of all n.
* a line that cannot run gives {"id": ..., "line": N, "error": "..."}, where "id" is present
  only when the line had a usable id of its own. Causes: bad JSON, not an object, missing or
  invalid id, both or neither of prompt/messages, bad messages, bad sampling field, a duplicate
  id (the second occurrence gets the error; the record has no "id" so each id appears once),
  a prompt longer than the model's max_model_len. The job carries on and exits 0.

OpenAI Batch API format (sidp_jax/jobs/openai_batch.py has the details). A file whose lines
have "custom_id" or "body" is in this format; the first line that is an object decides, and a
line of the other format is an error record (a file does not mix formats)::

    {"custom_id": "q1", "method": "POST", "url": "/v1/chat/completions",
     "body": {"model": "m", "messages": [...], "max_completion_tokens": 32, "chat_template_kwargs": {...}}}
    {"custom_id": "q2", "method": "POST", "url": "/v1/completions", "body": {"prompt": "...", "max_tokens": 8}}

* "method" must be "POST", "url" one of the two above; body fields map to SamplingParams
  (vLLM's names; chat "logprobs": true + "top_logprobs": k -> logprobs=k), "model" is only
  echoed; an unknown field is an error naming it, and OpenAI fields this job does not do (tools,
  response_format, "stream": true, ...) are errors saying they are unsupported.
* "custom_id" plays the simple format's "id" (same rules, resume and duplicates).
* output, one line per request: {"id": "batch_req_...", "custom_id", "response": {"status_code":
  200, "request_id", "body": a chat.completion or text_completion object with "choices" (n of
  them, logprobs in OpenAI's shapes) and "usage"}, "error": null}; a line that cannot run gives
  {"id", "custom_id" (null without a usable one), "response": null, "error": {"code", "message",
  "line"}}. An error record is one whose "error" is not null (--retry-errors).
* the output is in the input's format: an output holding records of the other format is refused
  (exit 2).

Resuming: rerunning with the same input and output skips every record already in the output
file: results and errors with an "id" are keyed by id, id-less errors by line number (so the
input must not change between runs). At start, a last line that lacks its newline (a write torn
by kill -9 or a full disk) is truncated away and its request runs again. `--retry-errors` also
runs again every id (and id-less line) whose only records are errors, removing those records.

The output is the job's own (sidp_jax/jobs/job_output.py): a marker beside it, `<output>.sidp-job`,
says a job wrote it and holds an exclusive lock while one runs (a second job exits 2). An output
that is the input, a directory, or holds a line that is not a record is refused with exit 2 and
left untouched; a torn last line is only dropped where the marker proves the job wrote it. A
failing write (a full disk) stops the job with exit 1; rerunning resumes. The marker records the
settings the results depend on (`job_settings`); a rerun with other ones is refused with exit 2,
naming each difference, unless `--accept-new-settings`.

Reading and planning lines: sidp_jax/jobs/job_input.py; each format behind one interface:
sidp_jax/jobs/formats.py (simple_format.py, openai_batch.py); writing and recovering records:
sidp_jax/jobs/job_output.py. Input formats plug into `READERS` (file suffix -> reader yielding (line number, object)):
JSONL (.jsonl, .ndjson) and Parquet (.parquet, needs pyarrow; "line" is the row number from 1
and a row's null columns are left out).

The input is streamed: lines are parsed and tokenized one at a time as the engine takes them
(LLM.stream keeps a bounded window of requests), so memory follows what is in flight; only the
ids seen so far are kept, to find duplicates across the whole file.

`--ray [ADDRESS]` runs the same job on a Ray cluster, one SiDP group per node: see sidp_jax/jobs/ray_job.py.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from sidp_jax.jobs.formats import (FORMAT_SIMPLE, InputFormat, detect_format, error_record, record_tokens,
                                   result_record)
from sidp_jax.jobs.job_input import BYTES_PER_TOKEN, PlanCounts, plan_items, read_jsonl, reader_for, tokenize_into
from sidp_jax.jobs.job_output import JobOutput
from sidp_jax.jobs.job_request import JobRequest, LineError
from sidp_jax.jobs.openai_batch import model_name
from sidp_jax.sampling_params import SamplingParams

DEFAULT_INPUT = Path(__file__).parent.parent / "assets" / "example_prompts.jsonl"
DEFAULT_OUTPUT = Path("out") / "results.jsonl"

LLMFactory = Callable[..., Any]  # (**engine_kwargs) -> an object with the LLM interface


# ---------------------------------------------------------------------------------------------
# The job


@dataclasses.dataclass
class JobConfig:
    input: Path = DEFAULT_INPUT
    output: Path = DEFAULT_OUTPUT
    engine_kwargs: dict = dataclasses.field(default_factory=dict)  # LLM(...) keyword arguments
    sampling: dict = dataclasses.field(default_factory=dict)  # SamplingParams fields from the CLI
    progress: bool = True
    retry_errors: bool = False  # run again the ids (and id-less lines) whose only records are errors
    accept_new_settings: bool = False  # continue an output whose records were made with other settings


RESULT_ENGINE_FIELDS = ("dtype", "quantization", "kv_cache_dtype", "max_model_len", "seed")  # change the outputs


def job_settings(cfg: JobConfig) -> dict:
    """What the results depend on beyond the input, by flag name: the model, the sampling flags
    and the engine fields that change outputs (the layout and the memory limits do not). Recorded
    with the output, so that a rerun with other settings is caught rather than mixed in."""
    model = cfg.engine_kwargs.get("model")
    if isinstance(model, str) and os.path.isdir(model):
        model = os.path.realpath(model)
    settings = {"--model": model}
    settings.update({"--" + k.replace("_", "-"): v for k, v in cfg.sampling.items()})
    settings.update({"--" + k.replace("_", "-"): cfg.engine_kwargs[k] for k in RESULT_ENGINE_FIELDS
                     if cfg.engine_kwargs.get(k) is not None})
    return json.loads(json.dumps({k: v for k, v in settings.items() if v is not None}))  # as the marker keeps it


@dataclasses.dataclass
class JobSummary:
    output: str
    requests_completed: int = 0
    requests_errored: int = 0  # error records written by this run
    requests_skipped: int = 0  # records an earlier run already wrote
    errors_retryable: int = 0  # earlier error records that --retry-errors would run again
    errors_retried: int = 0  # earlier error records this run dropped to run them again
    prompt_tokens: int = 0  # of this run's completed requests
    output_tokens: int = 0
    elapsed_s: float = 0.0  # generation time, the throughput's denominator
    wall_s: float = 0.0  # the whole job, model loading included
    engine_stats: dict | None = None  # llm.stats(); None when nothing had to run
    sampling_in_force: dict | None = None  # {field: (value, where it came from)} for lines that set none
    nothing_ran: bool = False  # no request was left to run (all done earlier, or errors): no engine was built

    def count_result(self, record: dict) -> None:
        prompt_tokens, output_tokens = record_tokens(record)
        self.requests_completed += 1
        self.prompt_tokens += prompt_tokens
        self.output_tokens += output_tokens

    def rates(self) -> dict[str, float]:
        t = self.elapsed_s
        per_s = (lambda x: x / t) if t > 0 else (lambda x: 0.0)
        return {
            "requests_per_s": per_s(self.requests_completed),
            "total_tokens_per_s": per_s(self.prompt_tokens + self.output_tokens),
            "output_tokens_per_s": per_s(self.output_tokens),
        }

    def to_json(self) -> dict:
        return {**dataclasses.asdict(self), **self.rates()}


def default_llm_factory(**engine_kwargs):
    from sidp_jax.llm import LLM  # imports jax: keep it out of module import

    return LLM(**engine_kwargs)


Generate = Callable[[list[JobRequest], dict[int, Any] | None, JobOutput, JobSummary], None]


def execute_job(cfg: JobConfig, generate: Generate, *, keep_lines: bool = False) -> JobSummary:
    """The job around any engine: check the output and learn what it holds, then read the input
    line by line, writing each line's error record as it comes and handing the runnable requests
    to `generate(requests, lines, writer, summary)` as an iterator, so that host memory follows
    what is in flight, not the size of the input.
    keep_lines: read the whole input first and also hand over every line's raw object by line
    number, and the requests as a list (the Ray driver ships rows to its actors)."""
    start = time.perf_counter()
    summary = JobSummary(output=str(cfg.output))
    writer = JobOutput(cfg.output, cfg.input)
    try:
        read = reader_for(cfg.input)
        max_len = cfg.engine_kwargs.get("max_model_len")
        entries = read(cfg.input, BYTES_PER_TOKEN * max_len) if max_len and read is read_jsonl else read(cfg.input)
        lines = None
        if keep_lines:
            entries = list(entries)
            lines = dict(entries)
        fmt, entries = detect_format(entries)  # the output must be in the input's format
        recovered = writer.recover(cfg.retry_errors, fmt.name if fmt else None, job_settings(cfg),
                                   cfg.accept_new_settings)
        fmt = fmt or InputFormat(recovered.fmt or FORMAT_SIMPLE, 0)  # no line has one: for the error records
        summary.errors_retried = recovered.retried
        summary.errors_retryable = 0 if cfg.retry_errors else recovered.retryable
        if recovered.retried:
            print(f"Retrying: {recovered.retried} earlier error records removed from {cfg.output}")
        counts = PlanCounts()
        requests = errors_written(plan_items(entries, cfg.sampling, recovered.done, counts, fmt), writer, summary)
        if keep_lines:
            requests = list(requests)
            pending = bool(requests)
        else:  # peek: with nothing to run, no engine is built
            first = next(requests, None)
            pending = first is not None
            requests = itertools.chain([first], requests)
        if pending:
            generate(requests, lines, writer, summary)
        summary.nothing_ran = not pending
        summary.requests_skipped = counts.skipped
        if counts.skipped:
            print(f"Resumed: {counts.skipped} records already in {cfg.output} were skipped")
        print(f"{counts.requests} requests run, {counts.errors} input lines with errors")
    finally:
        writer.close()
    summary.wall_s = time.perf_counter() - start
    return summary


def run_job(cfg: JobConfig, llm_factory: LLMFactory = default_llm_factory) -> JobSummary:
    return execute_job(cfg, lambda requests, _lines, writer, summary:
                       _generate(requests, cfg, llm_factory, writer, summary))


def tokenize_requests(requests: list[JobRequest], tokenizer,
                      defaults: dict | None = None) -> tuple[list[JobRequest], list[LineError]]:
    """Fill in each request's prompt_ids (and the generation_config defaults, see tokenized); a
    prompt that cannot be rendered/encoded is an error."""
    runnable, errors = [], []
    for item in tokenized(requests, tokenizer, defaults):
        (errors if isinstance(item, LineError) else runnable).append(item)
    return runnable, errors


def tokenized(requests: Iterable[JobRequest], tokenizer, defaults: dict | None = None) -> Iterator[JobRequest | LineError]:
    """Each request with its prompt_ids filled in, or the LineError of a prompt that cannot be
    rendered or encoded (chat templates raise whatever they like), one at a time. defaults: the
    checkpoint's generation_config.json fields, for what neither the command line nor the line set."""
    for req in requests:
        if defaults:
            try:
                req.with_defaults(defaults)
            except ValueError as e:
                yield LineError(req.line, f"generation_config.json defaults: {e}", id=req.id, fmt=req.fmt)
                continue
        try:
            tokenize_into(req, tokenizer)
        except Exception as e:
            yield LineError(req.line, f"could not render/encode the prompt: {e}", id=req.id, fmt=req.fmt,
                            code="invalid_prompt")
            continue
        yield req


def stream_records(llm, runnable: Iterable[JobRequest], *, use_tqdm: bool = False) -> Iterator[tuple[JobRequest, dict | LineError]]:
    """Run tokenized requests (a list, or an iterator the engine reads as it makes room); yield
    (request, result record or LineError) as each finishes. A line of several prompts runs each
    as its own engine request and gets one record when the last finishes (an error if any failed)."""
    pending: dict[int, tuple[JobRequest, int]] = {}  # engine index -> (request, its prompt number)
    outputs: dict[int, list] = {}  # id(request) -> its prompts' outputs so far
    model = model_name(llm)

    def feed():
        i = 0
        for req in runnable:
            parts = req.prompts_ids
            outputs[id(req)] = [None] * len(parts)
            for j, ids in enumerate(parts):
                pending[i] = (req, j)
                i += 1
                yield {"prompt_token_ids": ids, "sampling_params": req.params}

    for i, out in llm.stream(feed(), None, use_tqdm=use_tqdm):
        req, j = pending.pop(i)
        outs = outputs[id(req)]
        outs[j] = out
        if any(o is None for o in outs):
            continue
        del outputs[id(req)]
        failed = [(k, o) for k, o in enumerate(outs) if o.error is not None]
        if failed:
            k, o = failed[0]
            msg = o.error if len(outs) == 1 else f"prompt {k} of {len(outs)}: {o.error}"
            yield req, LineError(req.line, msg, id=req.id, fmt=req.fmt, code="request_failed")
        else:
            yield req, result_record(req, outs if req.prompt_list is not None else outs[0], llm.tokenizer, model)


class ModelLoadError(Exception):
    """The engine could not be built (bad checkpoint, config, tokenizer, memory): exit 1."""


def errors_written(items: Iterable, writer: JobOutput, summary: JobSummary) -> Iterator:
    """Everything among `items` but the LineErrors, whose records are written (and counted) as they
    pass: requests of the input, or the result records of the engine."""
    for item in items:
        if isinstance(item, LineError):
            writer.write(error_record(item))
            summary.requests_errored += 1
        else:
            yield item


def build_llm(llm_factory: LLMFactory, engine_kwargs: dict):
    try:
        llm = llm_factory(**engine_kwargs)
    except Exception as e:
        raise ModelLoadError(f"could not load the model {engine_kwargs.get('model') or '(bundled)'}: "
                             f"{type(e).__name__}: {e}") from e
    if getattr(llm, "tokenizer", None) is None:
        raise ModelLoadError(f"the model {engine_kwargs.get('model')} has no tokenizer.json: the job needs one to "
                             f"encode its prompts")
    defaults = llm.generation_defaults() if hasattr(llm, "generation_defaults") else {}
    try:  # checked once here, naming the file, rather than failing every line that takes a default
        SamplingParams.from_dict(defaults)
    except (TypeError, ValueError) as e:
        raise ModelLoadError(f"the model {engine_kwargs.get('model') or '(bundled)'}'s generation_config.json "
                             f"holds invalid sampling defaults: {e}") from None
    return llm


SHOWN_SAMPLING = ("max_tokens", "temperature", "top_p", "top_k", "min_p")


def sampling_in_force(cli: dict, checkpoint: dict) -> dict[str, tuple[Any, str]]:
    """The value of each field in SHOWN_SAMPLING that a line without its own gets, and its source:
    the command line, else the checkpoint's generation_config.json, else vLLM's default."""
    vllm = SamplingParams()
    return {name: (cli[name], "command line") if name in cli else
            (checkpoint[name], "generation_config.json") if name in checkpoint else
            (getattr(vllm, name), "vLLM default") for name in SHOWN_SAMPLING}


def _generate(requests: Iterable[JobRequest], cfg: JobConfig, llm_factory: LLMFactory, writer: JobOutput,
              summary: JobSummary) -> None:
    llm = build_llm(llm_factory, cfg.engine_kwargs)
    start = time.perf_counter()
    defaults = llm.generation_defaults() if hasattr(llm, "generation_defaults") else {}
    summary.sampling_in_force = sampling_in_force(cfg.sampling, defaults)
    runnable = errors_written(tokenized(requests, llm.tokenizer, defaults), writer, summary)
    results = errors_written((result for _, result in stream_records(llm, runnable, use_tqdm=cfg.progress)),
                             writer, summary)
    for result in results:
        writer.write(result)
        summary.count_result(result)
    summary.elapsed_s = time.perf_counter() - start
    summary.engine_stats = llm.stats()
