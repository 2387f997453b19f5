"""The command line of the offline job (`run_offline.py`): flags -> JobConfig, run, summary.

The job itself: sidp_jax/jobs/offline_job.py (formats, resume, error records); on a Ray cluster
(`--ray`): sidp_jax/jobs/ray_job.py.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import signal
import sys
import typing
from pathlib import Path

import sidp_jax.jobs.ray_job as sidp_ray
from sidp_jax.jobs.job_input import InputError, reader_for
from sidp_jax.jobs.job_output import OutputError, OutputWriteError, marker_path
from sidp_jax.jobs.offline_job import (DEFAULT_INPUT, DEFAULT_OUTPUT, JobConfig, JobSummary, LLMFactory,
                                       ModelLoadError, default_llm_factory, run_job)
from sidp_jax.engine_config import EngineConfig, cli_fields
from sidp_jax.parallel.layouts import check_device_count
from sidp_jax.sampling_params import SamplingParams


def format_summary(s: JobSummary) -> str:
    r = s.rates()
    stats = s.engine_stats or {}
    na = "n/a"
    steps = stats.get("steps_per_mode")
    if s.nothing_ran:  # no engine: no throughput or engine lines to show
        lines = [_nothing_to_run_line(s)]
    else:
        lines = [
            f"Throughput: {r['requests_per_s']:.2f} requests/s, {r['total_tokens_per_s']:.2f} total tokens/s, "
            f"{r['output_tokens_per_s']:.2f} output tokens/s",
            f"KV cache: {stats.get('kv_tokens_per_replica', na)} tokens per replica, "
            f"max concurrency {stats.get('max_concurrency', na)}, replicas {stats.get('num_replicas', na)}",
            f"Preemptions: {stats.get('num_preemptions', na)}",
            "Steps per mode: " + (", ".join(f"{k}={v}" for k, v in steps.items()) if steps else na),
            _step_time_line(stats),
            _prefix_cache_line(stats),
        ]
    if s.sampling_in_force:
        lines.append("Sampling (lines without their own): " + ", ".join(
            f"{name}={value} ({source})" for name, (value, source) in s.sampling_in_force.items()))
    lines += [
        f"Requests: {s.requests_completed} completed, {s.requests_errored} errors, "
        f"{s.requests_skipped} skipped (already in the output)",
        f"Errors: {s.requests_errored}" + (f" ({s.errors_retryable} earlier error records could be run again with "
                                            f"--retry-errors)" if s.errors_retryable else ""),
        f"Results written to {s.output}",
    ]
    return "\n".join(lines)


def _nothing_to_run_line(s: JobSummary) -> str:
    if s.requests_errored:
        done = f", {s.requests_skipped} already in {s.output}" if s.requests_skipped else ""
        return f"Nothing to run: {s.requests_errored} input lines with errors{done}"
    if s.requests_skipped:
        return f"Nothing to run: all {s.requests_skipped} requests are already in {s.output}"
    return "Nothing to run: the input has no requests"


def _prefix_cache_line(stats: dict) -> str:
    if not stats.get("prefix_caching"):
        return "Prefix cache: off"
    return (f"Prefix cache: {stats['prefix_cache_hit_rate']:.1%} of prefill tokens cached "
            f"({stats['prefill_tokens_computed']:,} computed of {stats['prefill_tokens_requested']:,} requested)")


def _step_time_line(stats: dict) -> str:
    if "wall_ms_per_step" not in stats:
        return "Step time: n/a"
    overlap = "on" if stats.get("async_scheduling") else "off"
    return (f"Step time: {stats['wall_ms_per_step']:.1f} ms wall, {stats['host_ms_per_step']:.1f} ms host, "
            f"{stats['device_ms_per_step']:.1f} ms device per step; device idle {stats['device_idle_share']:.1%} "
            f"(host overlap {overlap})")


# ---------------------------------------------------------------------------------------------
# Command line

SAMPLING_FLAGS = [  # (flag, type); per-line fields override these
    ("--n", int), ("--temperature", float), ("--top-p", float), ("--top-k", int), ("--min-p", float),
    ("--max-tokens", int), ("--min-tokens", int), ("--logprobs", int), ("--presence-penalty", float),
    ("--frequency-penalty", float), ("--repetition-penalty", float),
]


def _dest(flag: str) -> str:
    return flag.lstrip("-").replace("-", "_")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # the error alone, not 20 lines of usage before it
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="sidp-offline" if Path(sys.argv[0]).name == "sidp-offline" else "run_offline.py",
        description="Offline batch inference: JSONL prompts in, JSONL results out (resumable). "
        "With no arguments, runs the bundled tiny model on the bundled example prompts.",
    )
    p.add_argument("--model", default=None, help="checkpoint directory or preset name (default: bundled tiny model)")
    p.add_argument("--input", type=Path, default=DEFAULT_INPUT, help="prompts file (.jsonl or .parquet), in the simple or the OpenAI batch format "
                   "(default: the bundled example prompts)")
    p.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help="results file, appended (default out/results.jsonl)")
    engine = p.add_argument_group("engine (sidp_jax/engine_config.py; unset flags keep the defaults shown)")
    hints = typing.get_type_hints(EngineConfig)
    for f in cli_fields():
        flag, meta = "--" + f.name.replace("_", "-"), f.metadata
        help_ = meta["help"] + (f" (default {f.default})" if f.default is not None else "")
        kind = hints[f.name]
        if kind in (bool, bool | None):
            engine.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=help_)
            continue
        typ = int if kind in (int, int | None) else float if kind is float else str
        choices = [str(c) for c in meta["choices"] if c != "local"] if meta["choices"] else None
        engine.add_argument(flag, type=typ, choices=choices, default=None, help=help_)
    sampling = p.add_argument_group("sampling (defaults as vLLM's SamplingParams; a line's own fields win)")
    vllm = SamplingParams()
    for flag, typ in SAMPLING_FLAGS:  # unset: the line's field, else generation_config.json's, else vLLM's
        sampling.add_argument(flag, type=typ, default=None,
                              help=f"default: the checkpoint's generation_config.json, else {getattr(vllm, _dest(flag))}")
    sampling.add_argument("--stop", action="append", default=None, help="stop string (repeatable; default: none)")
    sampling.add_argument("--stop-token-ids", type=int, nargs="+", default=None,
                          help="token ids that end a completion besides EOS (default: none)")
    sampling.add_argument("--ignore-eos", action="store_true", default=None,
                          help="generate past EOS until max_tokens (default: stop at EOS)")
    ray = p.add_argument_group("Ray (across hosts: one SiDP group per node; needs 'sidp-jax[ray]')")
    ray.add_argument("--ray", nargs="?", const="", default=None, metavar="ADDRESS",
                     help="run on a Ray cluster: ray.init(address=ADDRESS), or RAY_ADDRESS/a local cluster without one")
    ray.add_argument("--ray-concurrency", type=int, default=None, metavar="N",
                     help="SiDP groups (Ray actors; default: one per node)")
    ray.add_argument("--ray-batch-size", type=int, default=512, metavar="ROWS",
                     help="rows per batch sent to a group (default 512)")
    ray.add_argument("--ray-num-gpus-per-actor", type=float, default=None, metavar="G",
                     help="GPUs each group takes (default: all of a node's)")
    p.add_argument("--retry-errors", action="store_true",
                   help="run again the ids whose only records in the output are errors (their error records are removed)")
    p.add_argument("--accept-new-settings", action="store_true",
                   help="continue an output whose records were made with other settings (model, sampling flags, "
                   "dtype, quantization, kv-cache-dtype, max-model-len, seed); the new ones are recorded")
    p.add_argument("--summary-json", type=Path, default=None,
                   help="also write the summary as JSON here (default: none)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--debug", action="store_true", help="show tracebacks for model-loading errors")
    p.add_argument("--llm-factory", default=None, help=argparse.SUPPRESS)  # tests: module:callable
    return p


def config_from_args(args: argparse.Namespace) -> JobConfig:
    engine = {"model": args.model}
    engine.update({f.name: getattr(args, f.name) for f in cli_fields() if getattr(args, f.name) is not None})
    sampling_names = [_dest(f) for f, _ in SAMPLING_FLAGS] + ["stop", "stop_token_ids", "ignore_eos"]
    sampling = {n: getattr(args, n) for n in sampling_names if getattr(args, n) is not None}
    return JobConfig(args.input, args.output, engine, sampling, progress=not args.no_progress,
                     retry_errors=args.retry_errors, accept_new_settings=args.accept_new_settings)


def load_factory(spec: str) -> LLMFactory:
    module, _, name = spec.partition(":")
    return getattr(importlib.import_module(module), name)


def main(argv: list[str] | None = None, llm_factory: LLMFactory | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    cfg = config_from_args(args)
    if not cfg.input.is_file():
        parser.error(f"input file not found: {cfg.input}")
    if args.summary_json and (why := summary_path_problem(args.summary_json, cfg.input, cfg.output)):
        parser.error(why)
    try:
        reader_for(cfg.input)
        SamplingParams.from_dict(cfg.sampling)
        settings = EngineConfig.from_kwargs(**{k: v for k, v in cfg.engine_kwargs.items() if k != "model"})
    except ValueError as e:
        parser.error(str(e))
    if args.ray is None and llm_factory is None and not args.llm_factory:
        try:  # before the model loads: a mesh larger than the machine is a flag mistake
            check_device_count(settings.mesh, jax_devices())
        except ValueError as e:
            parser.error(str(e))
    if args.ray_concurrency is not None and args.ray_concurrency < 1:
        parser.error("--ray-concurrency must be at least 1")
    if args.ray_batch_size < 1:
        parser.error("--ray-batch-size must be at least 1")
    if args.ray is not None:
        if llm_factory is not None or args.llm_factory:
            parser.error("--ray builds its engines in the Ray actors: no --llm-factory")
        try:
            sidp_ray.import_ray()
        except ImportError as e:
            print(f"error: --ray needs Ray Data: {e}", file=sys.stderr)
            return 2
        opts = sidp_ray.RayOptions(address=args.ray or None, concurrency=args.ray_concurrency,
                                   batch_size=args.ray_batch_size, num_gpus_per_actor=args.ray_num_gpus_per_actor)
        run = lambda: sidp_ray.run_ray_job(cfg, opts)
    else:
        if llm_factory is None:
            llm_factory = load_factory(args.llm_factory) if args.llm_factory else default_llm_factory
        run = lambda: run_job(cfg, llm_factory)
    previous = signal.signal(signal.SIGTERM, _interrupt)  # as Ctrl-C: unwind, close the output, drop the lock
    try:
        summary = run()
    except KeyboardInterrupt:
        print(f"\ninterrupted: the records written so far are in {cfg.output}; rerun the same command to "
              f"resume", file=sys.stderr)
        return 130
    except ModelLoadError as e:
        if args.debug:
            raise
        print(f"error: {e} (--debug shows the traceback)", file=sys.stderr)
        return 1
    except OutputWriteError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OutputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        signal.signal(signal.SIGTERM, previous)
    print(format_summary(summary))
    if args.summary_json:
        try:
            write_summary(args.summary_json, summary.to_json())
        except OSError as e:
            print(f"error: could not write --summary-json {args.summary_json}: {e.strerror or e} "
                  f"(the results are complete in {cfg.output})", file=sys.stderr)
            return 1
    return 0


def jax_devices() -> list:
    import jax  # only here: the Ray driver and --help need no jax

    return jax.devices()


def _interrupt(signum, frame):
    raise KeyboardInterrupt


SUMMARY_MARK = "sidp-jax offline job summary"  # a summary file says so, so a rerun may replace it


def summary_path_problem(path: Path, input_path: Path, output: Path) -> str | None:
    """Why --summary-json may not be written there: it is the input, the output or its marker
    (symlinks resolved), or an existing file that is not an earlier summary of this job."""
    real = path.resolve()
    for name, other in (("the input", input_path), ("--output", output), ("the output's marker", marker_path(output))):
        if real == Path(other).resolve():
            return f"--summary-json {path} is {name}: give it a file of its own"
    if real.exists():
        if not real.is_file():
            return f"--summary-json {path} is not a regular file"
        try:
            ours = json.loads(real.read_text(encoding="utf-8")).get("written_by") == SUMMARY_MARK
        except (OSError, UnicodeDecodeError, ValueError, AttributeError):
            ours = False
        if not ours:
            return f"--summary-json {path} exists and is not a summary this job wrote: remove it or choose another path"
    return None


def write_summary(path: Path, summary: dict) -> None:
    """Beside, then renamed over: a failed write leaves no half file."""
    real = path.resolve()
    real.parent.mkdir(parents=True, exist_ok=True)
    tmp = real.with_name(f".{real.name}.tmp")
    tmp.write_text(json.dumps({"written_by": SUMMARY_MARK, **summary}, indent=2) + "\n")
    os.replace(tmp, real)
