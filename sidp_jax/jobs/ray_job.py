"""Offline inference past one host with Ray Data: one SiDP group per node, a Dataset in, a Dataset out.

    import ray
    from sidp_jax.ray import SiDPProcessorConfig, build_sidp_processor

    ray.init()
    config = SiDPProcessorConfig(
        model_source="/models/Qwen3-32B",                      # on every node
        engine_kwargs={"mesh": "dp=8", "parallel": "sidp", "ffn_mode": "auto"},
        sampling_params={"temperature": 0, "max_tokens": 256},  # defaults; a row's own fields win
        batch_size=512,
    )
    processor = build_sidp_processor(config, postprocess=lambda r: {"id": r["id"], "answer": r["text"]})
    out = processor(ray.data.read_parquet("s3://bucket/prompts/"))
    out.write_parquet("s3://bucket/answers/")

The names follow ray.data.llm's `vLLMEngineProcessorConfig` / `build_llm_processor` where they
mean the same thing (`model_source`, `engine_kwargs`, `batch_size`, `concurrency`,
`accelerator_type`, `runtime_env`, `preprocess`/`postprocess`).

How it runs: `Dataset.map_batches` over a callable class on an actor pool of `concurrency`
actors (`compute=ActorPoolStrategy(...)`: Ray >= 2.60 deprecates map_batches' `concurrency=`).
Each actor asks Ray for all of a node's GPUs (`num_gpus_per_actor`, by default the GPU count of
the cluster's nodes), so Ray places at most one actor per host and the actor's JAX sees every
device of its host (on a cluster without GPUs only Ray Data's SPREAD scheduling spreads them); it builds one `sidp_jax.LLM` over them (`engine_kwargs` pass through; without a "mesh" the
group is `dp=<all local devices>`) and runs each batch of rows through `LLM.stream`, so the
engine's continuous batching fills the whole SiDP group. `concurrency` defaults to the number of
nodes that can hold an actor: one SiDP group per node.

Rows in: those of `sidp_jax.jobs.offline_job` (see its docstring): an "id" (a non-empty string or an
integer), exactly one of "prompt" or "messages" (rendered with the checkpoint's chat template),
and optional SamplingParams fields, as columns or as one "sampling_params" object (like
ray.data.llm's rows). Null columns count as absent. `preprocess` (row -> row) runs first, in the
actor, on the row as a Python dict.

Rows out, one per row in (in any order), with offline_job's record fields and a fixed schema:
"id", "text", "token_ids", "finish_reason", "prompt_tokens", "output_tokens", "logprobs" (null
unless requested; a map token id -> logprob per generated token), "completions" (null unless
n > 1) and "error" (null, or why the row could not run; then the other fields are null), and
the same values under ray.data.llm's names: "generated_text" (= text), "num_generated_tokens"
(= output_tokens), "num_input_tokens" (= prompt_tokens).
`postprocess` (record -> row) replaces that: it gets the record as a dict shaped exactly like
an offline_job output line (an error is {"id", "error"}, "id" None when the row had no usable
one), and its rows become the output. A row in OpenAI's batch format (a "custom_id" and a
"body", as offline_job's batch lines) gives that format's output line, which only a
`postprocess` can take (the fixed schema is the simple format's).

Faults: a dead actor (lost node, OOM kill) is restarted by Ray (`max_restarts`) and its
unfinished batches are retried (`max_task_retries`); a batch's rows are output only when the whole
batch finishes, so every row comes out once. Ids are not checked for uniqueness across the
dataset (actors see only their own batches): `run_offline.py --ray` checks them on the driver.

`run_offline.py --ray [ADDRESS]` runs the JSONL/Parquet job of offline_job through this (see
`run_ray_job`), in either input format: the driver reads and checks the input, writes the error
records, ships the good lines as JSON strings, and appends the results to the output file as
batches finish, so the job resumes like the single-host one.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import sys
import time
import warnings
from typing import Any, Callable

from sidp_jax.engine.step_times import step_times
from sidp_jax.engine_config import EngineConfig
from sidp_jax.jobs.formats import error_record, format_of_record, parse_line
from sidp_jax.jobs.job_input import drop_nulls
from sidp_jax.jobs.job_output import JobOutput
from sidp_jax.jobs.job_request import LineError
from sidp_jax.jobs.offline_job import JobConfig, JobSummary, execute_job, stream_records, tokenize_requests

INSTALL_HINT = "pip install 'sidp-jax[ray]'"
Row = dict[str, Any]
RowFn = Callable[[Row], Row]


def import_ray():
    """`ray` with Ray Data, or an ImportError that says how to install it."""
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError as e:
        raise ImportError(f"Ray Data is not installed ({e}); install it with: {INSTALL_HINT}") from e
    return ray


# ---------------------------------------------------------------------------------------------
# The processor


@dataclasses.dataclass
class SiDPProcessorConfig:
    model_source: str | None = None  # checkpoint directory (on every node) or preset; None: bundled tiny model
    engine_kwargs: dict = dataclasses.field(default_factory=dict)  # LLM(...) keywords: mesh, parallel, placement, ffn_mode, ...
    sampling_params: dict = dataclasses.field(default_factory=dict)  # default SamplingParams fields; a row's own win
    batch_size: int = 512  # rows per LLM.stream call; larger keeps the group busier, smaller retries less
    concurrency: int | tuple[int, int] | None = None  # actors (SiDP groups); None: one per node that fits one
    num_gpus_per_actor: float | None = None  # None: all of a node's GPUs (0 on a cluster without GPUs)
    num_cpus_per_actor: float = 1
    accelerator_type: str | None = None  # e.g. "H100": only nodes with that accelerator
    runtime_env: dict | None = None  # the actors' runtime_env, e.g. {"env_vars": {...}}
    max_restarts: int = -1  # restarts of a dead actor (-1: always)
    max_task_retries: int = 3  # retries of a batch whose actor died
    max_tasks_in_flight_per_actor: int = 1  # batches queued at an actor (it runs one at a time)
    use_tqdm: bool = False  # the engine's progress bar in each actor's log
    ray_remote_args: dict = dataclasses.field(default_factory=dict)  # more map_batches/actor options

    def __post_init__(self):
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {self.batch_size!r}")
        c = self.concurrency
        ok = c is None or (isinstance(c, int) and c >= 1) or (
            isinstance(c, tuple) and len(c) == 2 and all(isinstance(x, int) for x in c) and 1 <= c[0] <= c[1])
        if not ok:
            raise ValueError(f"concurrency must be None, a positive integer or a (min, max) pair, got {c!r}")
        if "model" in self.engine_kwargs:
            raise ValueError("give the model as model_source, not engine_kwargs['model']")
        try:  # checked here, on the driver, not first in every actor
            EngineConfig.from_kwargs(**{k: v for k, v in self.engine_kwargs.items() if k not in ("devices", "verbose")})
        except (TypeError, ValueError) as e:
            raise ValueError(f"engine_kwargs: {e}") from None


class SiDPProcessor:
    """Maps a Ray Dataset of prompt rows to a Dataset of completion rows (lazily, like Ray Data)."""

    def __init__(self, config: SiDPProcessorConfig, preprocess: RowFn | None = None,
                 postprocess: RowFn | None = None, engine_stats: bool = False):
        """engine_stats: the first row of each output batch carries its actor's llm.stats() as
        JSON in an "engine_stats" column (empty in the other rows), for a job's summary."""
        self.config = config
        self.preprocess = preprocess
        self.postprocess = postprocess
        self.engine_stats = engine_stats

    def actor_resources(self) -> tuple[float, float]:
        """(num_gpus, num_cpus) each actor asks for; needs Ray initialized when GPUs are auto."""
        cfg = self.config
        gpus = cfg.num_gpus_per_actor
        if gpus is None:
            per_node = [n["Resources"].get("GPU", 0) for n in _alive_nodes()]
            gpus = min((g for g in per_node if g > 0), default=0)
        return float(gpus), float(cfg.num_cpus_per_actor)

    def num_actors(self) -> int | tuple[int, int]:
        if self.config.concurrency is not None:
            return self.config.concurrency
        gpus, cpus = self.actor_resources()
        fits = [n for n in _alive_nodes()
                if n["Resources"].get("GPU", 0) >= gpus and n["Resources"].get("CPU", 0) >= cpus]
        return max(1, len(fits))

    def __call__(self, ds):
        ray = import_ray()
        cfg = self.config
        gpus, cpus = self.actor_resources()
        n = self.num_actors()
        size = dict(size=n) if isinstance(n, int) else dict(min_size=n[0], max_size=n[1])
        compute = ray.data.ActorPoolStrategy(**size, max_tasks_in_flight_per_actor=cfg.max_tasks_in_flight_per_actor)
        options = dict(max_restarts=cfg.max_restarts, max_task_retries=cfg.max_task_retries)
        if cfg.accelerator_type is not None:
            options["accelerator_type"] = cfg.accelerator_type
        if cfg.runtime_env is not None:
            options["runtime_env"] = cfg.runtime_env
        options.update(cfg.ray_remote_args)
        with warnings.catch_warnings():
            # Ray >= 2.60 deprecates actor options (max_restarts, ...) as map_batches keywords
            # but has no other way to pass them yet; _supported drops them once it takes none.
            warnings.filterwarnings("ignore", message=".*ray_remote_args.* is deprecated")
            return ds.map_batches(
                SiDPWorker,
                fn_constructor_kwargs=dict(model_source=cfg.model_source, engine_kwargs=cfg.engine_kwargs,
                                           sampling_params=cfg.sampling_params, preprocess=self.preprocess,
                                           postprocess=self.postprocess, use_tqdm=cfg.use_tqdm,
                                           engine_stats=self.engine_stats),
                batch_size=cfg.batch_size,
                batch_format="pyarrow",
                compute=compute,
                num_gpus=gpus,
                num_cpus=cpus,
                **_supported(ds.map_batches, options),
            )


def build_sidp_processor(config: SiDPProcessorConfig, preprocess: RowFn | None = None,
                         postprocess: RowFn | None = None, engine_stats: bool = False) -> SiDPProcessor:
    """Like ray.data.llm.build_llm_processor: `processor(ds)` is the Dataset of results."""
    return SiDPProcessor(config, preprocess, postprocess, engine_stats)


def _supported(fn, options: dict) -> dict:
    """The options `fn` accepts: all of them while it takes **ray_remote_args; else its named ones
    (Ray Data's own defaults then apply: actors restarted and their tasks retried without limit)."""
    params = inspect.signature(fn).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return options
    return {k: v for k, v in options.items() if k in params}


def _alive_nodes() -> list[dict]:
    ray = import_ray()
    return [n for n in ray.nodes() if n.get("Alive")]


class SiDPWorker:
    """One actor of the pool: one LLM over all the devices its process sees."""

    def __init__(self, model_source, engine_kwargs, sampling_params, preprocess=None, postprocess=None,
                 use_tqdm=False, engine_stats=False):
        import os

        import jax

        from sidp_jax.llm import LLM

        kwargs = dict(engine_kwargs)
        kwargs.setdefault("mesh", f"dp={jax.local_device_count()}")
        self.llm = LLM(model_source, **kwargs)
        self.sampling_params = dict(sampling_params)
        self.preprocess, self.postprocess, self.use_tqdm = preprocess, postprocess, use_tqdm
        self.engine_stats = engine_stats
        self.actor = f"{os.uname().nodename}:{os.getpid()}:{id(self)}"

    def __call__(self, batch):
        import pyarrow as pa

        records = run_rows(self.llm, batch.to_pylist(), self.sampling_params, self.preprocess, self.use_tqdm)
        if self.postprocess is not None:
            rows = [self.postprocess(r) for r in records]
            if self.engine_stats:  # cumulative: the driver keeps each actor's latest
                stats = json.dumps({"actor": self.actor, **self.llm.stats()}, default=str)
                rows = [dict(row, engine_stats=stats if i == 0 else "") for i, row in enumerate(rows)]
            return pa.Table.from_pylist(rows)
        return records_table(records)


def run_rows(llm, rows: list[Row], sampling_params: dict, preprocess: RowFn | None = None,
             use_tqdm: bool = False) -> list[dict]:
    """One record per row, in the rows' order: offline_job's result record, or {"id", "error"}."""
    out: list[dict | None] = [None] * len(rows)
    requests = []
    for i, row in enumerate(rows):
        row = drop_nulls(row)
        obj = preprocess(row) if preprocess is not None else row
        item = parse_line(i, obj, sampling_params)  # "line" = index in the batch
        if isinstance(item, LineError):
            out[i] = _error_record(item)
        else:
            requests.append(item)
    defaults = llm.generation_defaults() if hasattr(llm, "generation_defaults") else {}
    runnable, errors = tokenize_requests(requests, llm.tokenizer, defaults)
    for err in errors:
        out[err.line] = _error_record(err)
    for req, result in stream_records(llm, runnable, use_tqdm=use_tqdm):
        out[req.line] = _error_record(result) if isinstance(result, LineError) else result
    return out


def _error_record(err: LineError) -> dict:
    return {"id": err.id, "error": err.error}


def records_table(records: list[dict]):
    """The records as one Arrow table of a fixed schema (see the module docstring)."""
    import pyarrow as pa

    if any("custom_id" in r for r in records):
        raise ValueError("rows in the OpenAI batch format give batch output lines, which do not fit the fixed "
                         "schema: give build_sidp_processor a postprocess")
    logprobs = pa.list_(pa.map_(pa.string(), pa.float64()))
    completion = pa.struct([("text", pa.string()), ("token_ids", pa.list_(pa.int64())),
                            ("finish_reason", pa.string()), ("logprobs", logprobs)])
    try:
        id_type = pa.array([r.get("id") for r in records]).type
    except (pa.ArrowInvalid, pa.ArrowTypeError) as e:
        raise ValueError(f"the ids of one batch must share one type (all strings or all integers): {e}") from None
    schema = pa.schema([
        ("id", id_type), ("text", pa.string()), ("token_ids", pa.list_(pa.int64())), ("finish_reason", pa.string()),
        ("prompt_tokens", pa.int64()), ("output_tokens", pa.int64()), ("logprobs", logprobs),
        ("completions", pa.list_(completion)), ("error", pa.string()),
        ("generated_text", pa.string()), ("num_generated_tokens", pa.int64()), ("num_input_tokens", pa.int64()),
    ])
    rows = [{**r, **{name: r.get(ours) for name, ours in RAY_LLM_NAMES.items()}} for r in records]
    return pa.Table.from_pylist(rows, schema=schema)


RAY_LLM_NAMES = {"generated_text": "text", "num_generated_tokens": "output_tokens", "num_input_tokens": "prompt_tokens"}


# ---------------------------------------------------------------------------------------------
# run_offline.py --ray


def combined_stats(per_actor: list[dict]) -> dict:
    """The actors' llm.stats() as one: counts and seconds summed, per-step times and rates
    recomputed, KV per replica and the rest from the first actor; "actors" says how many."""
    out = dict(per_actor[0])
    for key in ("num_steps", "num_preemptions", "num_replicas", "wall_seconds", "host_seconds", "device_seconds",
                "prefill_tokens_requested", "prefill_tokens_computed", "prefix_cache_evictions"):
        if all(key in s for s in per_actor):
            out[key] = sum(s[key] for s in per_actor)
    out["steps_per_mode"] = {}
    for s in per_actor:
        for mode, n in s.get("steps_per_mode", {}).items():
            out["steps_per_mode"][mode] = out["steps_per_mode"].get(mode, 0) + n
    if all(f"{k}_seconds" in out for k in ("wall", "host", "device")):
        out.update(step_times(out["wall_seconds"], out["host_seconds"], out["device_seconds"], out.get("num_steps", 0)))
    if out.get("prefill_tokens_requested"):
        cached = out["prefill_tokens_requested"] - out["prefill_tokens_computed"]
        out["prefix_cache_hit_rate"] = cached / out["prefill_tokens_requested"]
    out["actors"] = len(per_actor)
    return out


def _decode_line(row: Row) -> Row:
    return json.loads(row["json"])


def _encode_record(record: dict) -> Row:
    return {"record": json.dumps(record, ensure_ascii=False)}


@dataclasses.dataclass
class RayOptions:
    address: str | None = None  # ray.init(address=...); None: RAY_ADDRESS or a local cluster
    concurrency: int | None = None  # None: one actor per node
    batch_size: int = 512
    num_gpus_per_actor: float | None = None


def run_ray_job(cfg: JobConfig, opts: RayOptions) -> JobSummary:
    """offline_job.run_job on a Ray cluster: same input, output, resume and error records."""
    ray = import_ray()
    return execute_job(cfg, lambda requests, lines, writer, summary:
                       _run_on_ray(ray, lines, requests, cfg, opts, writer, summary), keep_lines=True)


def _run_on_ray(ray, objs: dict[int, Any], requests, cfg: JobConfig, opts: RayOptions, writer: JobOutput,
                summary: JobSummary) -> None:
    if not ray.is_initialized():
        ray.init(address=opts.address or None)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = cfg.progress
    request_of = {r.id: r for r in requests}
    engine = dict(cfg.engine_kwargs)
    model = engine.pop("model", None)
    processor = build_sidp_processor(
        SiDPProcessorConfig(model_source=model, engine_kwargs=engine, sampling_params=cfg.sampling,
                            batch_size=opts.batch_size, concurrency=opts.concurrency,
                            num_gpus_per_actor=opts.num_gpus_per_actor),
        preprocess=_decode_line, postprocess=_encode_record, engine_stats=True)
    print(f"Ray: {processor.num_actors()} SiDP group(s), {processor.actor_resources()[0]:g} GPU(s) each, "
          f"batches of {opts.batch_size} rows")
    rows = [{"json": json.dumps(objs[r.line], ensure_ascii=False, default=str)} for r in requests]
    ds = ray.data.from_items(rows)

    start = time.perf_counter()
    written: set = set()
    per_actor: dict[str, dict] = {}
    for row in processor(ds).iter_rows():
        if row.get("engine_stats"):
            stats = json.loads(row["engine_stats"])
            per_actor[stats.pop("actor")] = stats
        record = json.loads(row["record"])
        failed = isinstance(record.get("error"), str)  # the actor's {"id", "error"}, in either format
        rid = record.get(format_of_record(record).id_field)
        if rid not in request_of or rid in written:  # cannot happen: every row is output once
            print(f"warning: dropped an unexpected or repeated record for id {rid!r}", file=sys.stderr)
            continue
        written.add(rid)
        req = request_of[rid]
        if failed:
            writer.write(error_record(LineError(req.line, record["error"], id=rid, fmt=req.fmt)))
            summary.requests_errored += 1
        else:
            writer.write(record)
            summary.count_result(record)
    summary.elapsed_s = time.perf_counter() - start
    summary.engine_stats = combined_stats(list(per_actor.values())) if per_actor else None
    missing = [rid for rid in request_of if rid not in written]
    if missing:  # cannot happen either; a rerun would run them
        raise RuntimeError(f"the Ray job returned no record for {len(missing)} id(s), e.g. {missing[:5]}; rerun to resume")
