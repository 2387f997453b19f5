"""Tests of the offline job (sidp_jax/jobs/offline_job.py, run_offline.py) against a fake LLM.

The fake implements the engine's interface deterministically and finishes requests in an order
different from the input's. `run_offline.py` subprocesses reach it through the hidden
`--llm-factory test_offline_job:<factory>` option with this directory on PYTHONPATH.
"""

from __future__ import annotations

import errno
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sidp_jax.jobs import cli, offline_job
from sidp_jax.jobs.job_output import MARKER_SUFFIX, JobOutput
from sidp_jax.jobs.cli import main
from sidp_jax.jobs.offline_job import DEFAULT_INPUT
from sidp_jax.outputs import CompletionOutput, RequestOutput

REPO = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent

# ---------------------------------------------------------------------------------------------
# The fake engine

BOS = 1


class FakeTokenizer:
    """One token per character (its code point), BOS=1 when special tokens are added."""

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return ([BOS] if add_special_tokens else []) + [ord(c) for c in text]

    def apply_chat_template(self, messages, add_generation_prompt=True, tokenize=False) -> str:
        assert add_generation_prompt and not tokenize
        if any(m["role"] == "explode" for m in messages):
            raise RuntimeError("template refuses this role")
        return "".join(f"<{m['role']}>{m['content']}\n" for m in messages) + "<assistant>"


class FakeLLM:
    """Answers each prompt with its own text reversed, cut to max_tokens; longest prompt first."""

    def __init__(self, model=None, max_model_len: int = 64, delay: float = 0.0, **engine_kwargs):
        self.tokenizer = FakeTokenizer()
        self.max_model_len = max_model_len
        self.delay = delay
        self.engine_kwargs = {"model": model, **engine_kwargs}
        self.calls: list[tuple[list, list]] = []  # (prompts, sampling params) per stream()

    def _complete(self, prompt_ids, params, index) -> CompletionOutput:
        text = "".join(chr(t) for t in prompt_ids if t != BOS)[::-1] + str(index)
        limit = params.max_tokens or len(text)
        token_ids = [ord(c) for c in text[:limit]]
        logprobs = None if params.logprobs is None else [{t: -0.5} for t in token_ids]
        finish = "length" if len(text) > limit else "stop"
        return CompletionOutput(index, text[:limit], token_ids, finish, logprobs)

    def stream(self, prompts, sampling_params=None, *, use_tqdm=True, max_pending=None):
        """Reads prompts lazily in windows of `max_pending` (64), each answered longest first."""
        call = ([], [])
        self.calls.append(call)
        params_of = iter(sampling_params) if isinstance(sampling_params, list) else None
        window, base = [], 0

        def flush():
            order = sorted(range(len(window)), key=lambda i: (-len(window[i][0]), i))  # not input order
            for i in order:
                if self.delay:
                    time.sleep(self.delay)
                ids, params = window[i]
                if len(ids) > self.max_model_len:
                    err = f"prompt has {len(ids)} tokens, more than max_model_len={self.max_model_len}"
                    yield base + i, RequestOutput(str(i), None, ids, [], error=err)
                    continue
                outs = [self._complete(ids, params, j) for j in range(params.n)]
                yield base + i, RequestOutput(str(i), None, ids, outs)

        for p in prompts:
            ids, params = (p["prompt_token_ids"], p["sampling_params"]) if isinstance(p, dict) else (p, next(params_of))
            call[0].append(ids)
            call[1].append(params)
            window.append((ids, params))
            if len(window) == (max_pending or 64):
                yield from flush()
                base += len(window)
                window = []
        yield from flush()

    def stats(self) -> dict:
        return {"kv_tokens_per_replica": 4096, "max_concurrency": 64, "num_preemptions": 0,
                "steps_per_mode": {"was": 3, "cas": 5}, "num_replicas": 1}


def fake_llm(**kw):
    return FakeLLM(**kw)


def slow_fake_llm(**kw):
    return FakeLLM(delay=0.05, **kw)


class Recorder:
    """An llm_factory that keeps the LLMs it made."""

    def __init__(self, **fake_kwargs):
        self.llms: list[FakeLLM] = []
        self.fake_kwargs = fake_kwargs

    def __call__(self, **engine_kwargs):
        self.llms.append(FakeLLM(**engine_kwargs, **self.fake_kwargs))
        return self.llms[-1]

    @property
    def params_by_prompt(self) -> dict[str, object]:
        return {"".join(chr(t) for t in p if t != BOS): sp for llm in self.llms for p, sp in zip(*llm.calls[0])}


# ---------------------------------------------------------------------------------------------
# Helpers


def write_lines(path: Path, lines: list) -> Path:
    path.write_text("".join((ln if isinstance(ln, str) else json.dumps(ln)) + "\n" for ln in lines))
    return path


def read_records(path: Path) -> list[dict]:
    text = path.read_text()
    assert text == "" or text.endswith("\n")
    return [json.loads(line) for line in text.splitlines()]


def run(tmp_path, lines, *extra, factory=None):
    inp = write_lines(tmp_path / "in.jsonl", lines)
    out = tmp_path / "results.jsonl"
    factory = factory or Recorder()
    rc = main(["--input", str(inp), "--output", str(out), "--no-progress", *extra], llm_factory=factory)
    return rc, out, factory


def by_id(records):
    return {r["id"]: r for r in records if "id" in r}


# ---------------------------------------------------------------------------------------------
# Tests


def test_happy_path(tmp_path, capsys):
    lines = [
        {"id": "a", "prompt": "hello"},
        {"id": 2, "messages": [{"role": "user", "content": "hi"}]},
        {"id": "c", "prompt": "a longer prompt here", "max_tokens": 5},
    ]
    summary_path = tmp_path / "summary.json"
    rc, out, rec = run(tmp_path, lines, "--mesh", "dp=2", "--max-num-seqs", "8", "--summary-json", str(summary_path))
    assert rc == 0
    records = read_records(out)
    assert [r["id"] for r in records] != ["a", 2, "c"]  # completion order, not input order
    got = by_id(records)
    assert set(got) == {"a", 2, "c"}
    assert got["a"] == {"id": "a", "text": "olleh0", "token_ids": [ord(c) for c in "olleh0"],
                        "finish_reason": "stop", "prompt_tokens": 6, "output_tokens": 6}
    assert got["c"]["finish_reason"] == "length" and got["c"]["output_tokens"] == 5

    llm = rec.llms[0]
    assert llm.engine_kwargs == {"model": None, "mesh": "dp=2", "max_num_seqs": 8}
    chat = "<user>hi\n<assistant>"
    assert [ord(c) for c in chat] in llm.calls[0][0]  # chat template, no BOS added
    assert got[2]["prompt_tokens"] == len(chat)

    printed = capsys.readouterr().out
    assert "Throughput: " in printed and " requests/s, " in printed and " output tokens/s" in printed
    assert "KV cache: 4096 tokens per replica" in printed and "max concurrency 64" in printed
    assert "Steps per mode: was=3, cas=5" in printed and "Errors: 0" in printed
    summary = json.loads(summary_path.read_text())
    assert summary["requests_completed"] == 3 and summary["requests_errored"] == 0
    assert summary["output_tokens"] == sum(r["output_tokens"] for r in records)
    assert summary["engine_stats"]["max_concurrency"] == 64 and summary["elapsed_s"] >= 0


def test_throughput_line_format():
    s = offline_job.JobSummary(output="x", requests_completed=10, prompt_tokens=300, output_tokens=100, elapsed_s=2.0)
    first = cli.format_summary(s).splitlines()[0]
    assert first == "Throughput: 5.00 requests/s, 200.00 total tokens/s, 50.00 output tokens/s"


def test_bad_inputs_give_error_records_and_exit_0(tmp_path, capsys):
    lines = [
        {"id": "ok", "prompt": "fine"},                                   # 1
        '{"id": "broken", "prompt": ',                                    # 2 bad JSON
        '["a", "list"]',                                                  # 3 not an object
        {"prompt": "no id"},                                              # 4 missing id
        {"id": 1.5, "prompt": "float id"},                                # 5 invalid id
        {"id": True, "prompt": "bool id"},                                # 6 invalid id
        {"id": "", "prompt": "empty id"},                                 # 7 invalid id
        {"id": "both", "prompt": "x", "messages": [{"role": "user", "content": "y"}]},  # 8
        {"id": "neither"},                                                # 9
        {"id": "badmsg", "messages": [{"role": "user"}]},                 # 10
        {"id": "neg-temp", "prompt": "x", "temperature": -1},             # 11 invalid value
        {"id": "str-temp", "prompt": "x", "temperature": "hot"},          # 12 invalid type
        {"id": "unknown", "prompt": "x", "colour": "red"},                # 13 unknown field
        {"id": "ok", "prompt": "second ok"},                              # 14 duplicate id
        {"id": "long", "prompt": "x" * 100},                              # 15 over max_model_len
        {"id": "tmpl", "messages": [{"role": "explode", "content": "x"}]},  # 16 template fails
        "",                                                               # 17 blank: ignored
        {"id": "ok2", "prompt": "also fine"},                             # 18
    ]
    rc, out, _ = run(tmp_path, lines)
    assert rc == 0
    records = read_records(out)
    errors = {r["line"]: r for r in records if "error" in r}
    expect = {  # line -> (id or None, a word the message must contain)
        2: (None, "JSON"), 3: (None, "object"), 4: (None, "id"), 5: (None, "id"), 6: (None, "id"),
        7: (None, "id"), 8: ("both", "exactly one"), 9: ("neither", "exactly one"), 10: ("badmsg", "messages"),
        11: ("neg-temp", "temperature"), 12: ("str-temp", "temperature"), 13: ("unknown", "colour"),
        14: (None, "duplicate"), 15: ("long", "max_model_len"), 16: ("tmpl", "template"),
    }
    assert set(errors) == set(expect)
    for line, (rid, word) in expect.items():
        assert errors[line].get("id") == rid, line
        assert word in errors[line]["error"], (line, errors[line])
    assert "first on line 1" in errors[14]["error"]
    ok = [r for r in records if "error" not in r]
    assert sorted(r["id"] for r in ok) == ["ok", "ok2"] and by_id(ok)["ok"]["text"] == "enif0"
    ids = [r["id"] for r in records if "id" in r]
    assert len(ids) == len(set(ids))
    assert f"Errors: {len(expect)}" in capsys.readouterr().out


def test_per_line_sampling_overrides_cli(tmp_path):
    lines = [
        {"id": "cli", "prompt": "p1"},
        {"id": "line", "prompt": "p2", "temperature": 0, "stop": ["x"], "max_tokens": 3, "seed": 5},
        {"id": "two", "prompt": "p3", "n": 2, "logprobs": 1},
    ]
    rc, out, rec = run(tmp_path, lines, "--temperature", "0.5", "--top-p", "0.9", "--max-tokens", "8",
                       "--stop", "a", "--stop", "b", "--ignore-eos")
    assert rc == 0
    params = rec.params_by_prompt
    cli, line = params["p1"], params["p2"]
    assert (cli.temperature, cli.top_p, cli.max_tokens, cli.stop, cli.ignore_eos) == (0.5, 0.9, 8, ["a", "b"], True)
    assert (line.temperature, line.top_p, line.max_tokens, line.stop, line.seed) == (0, 0.9, 3, ["x"], 5)

    two = by_id(read_records(out))["two"]  # n=2: first completion flat, all in "completions"
    assert two["text"] == "3p0" and [c["text"] for c in two["completions"]] == ["3p0", "3p1"]
    assert two["output_tokens"] == 6 and two["logprobs"] == [{str(ord(c)): -0.5} for c in "3p0"]


def test_resume_skips_written_records(tmp_path):
    lines = [{"id": f"r{i}", "prompt": f"prompt {i}"} for i in range(6)] + ['{"bad json', {"id": "r0", "prompt": "dup"}]
    out = tmp_path / "results.jsonl"
    write_lines(out, [{"id": "r1", "text": "earlier", "token_ids": [], "finish_reason": "stop",
                       "prompt_tokens": 1, "output_tokens": 0},
                      {"id": "r4", "line": 5, "error": "earlier error"},
                      {"line": 7, "error": "invalid JSON: earlier"}])
    rc, out, rec = run(tmp_path, lines)
    assert rc == 0
    prompts_run = set(rec.params_by_prompt)
    assert prompts_run == {"prompt 0", "prompt 2", "prompt 3", "prompt 5"}
    records = read_records(out)
    assert sorted(r["id"] for r in records if "id" in r) == [f"r{i}" for i in range(6)]
    assert [r["line"] for r in records if "id" not in r] == [7, 8]  # line 8: the new duplicate error
    assert by_id(records)["r1"]["text"] == "earlier"

    rc, _, rec2 = run(tmp_path, lines)  # all done: nothing runs, no engine is even built
    assert rc == 0 and rec2.llms == [] and read_records(out) == records


DONE = {"id": "r0", "text": "x", "token_ids": [1], "finish_reason": "stop", "prompt_tokens": 1, "output_tokens": 1}


def mark_as_written_by_a_job(out: Path) -> None:
    """What a job leaves beside its output: the marker that says it wrote the file."""
    Path(str(out) + MARKER_SUFFIX).write_text('{"written_by": "sidp-jax offline job"}\n')


@pytest.mark.parametrize("tail", ['{"id": "r2", "text": "tor', '{"id": "r2"}'])
def test_torn_last_line_of_a_jobs_own_output_is_truncated_and_rerun(tmp_path, tail):
    lines = [{"id": f"r{i}", "prompt": f"prompt {i}"} for i in range(3)]
    out = tmp_path / "results.jsonl"
    out.write_text(json.dumps(DONE) + "\n" + tail)  # no newline: torn
    mark_as_written_by_a_job(out)
    rc, out, rec = run(tmp_path, lines)
    assert rc == 0
    assert set(rec.params_by_prompt) == {"prompt 1", "prompt 2"}
    records = read_records(out)
    assert sorted(r["id"] for r in records) == ["r0", "r1", "r2"] and records[0] == DONE


@pytest.mark.parametrize("content,why", [
    (json.dumps(DONE) + '\n{"id": "r2", "text": "tor', "incomplete line that no sidp-jax job wrote"),  # no marker
    (json.dumps(DONE) + "\nnot json at all\n", "line 2 of .* is not a result or error record"),
    ((REPO / "README.md").read_text(), "line 1 of .* is not a result or error record"),
])
def test_an_output_that_is_not_this_jobs_is_refused_untouched(tmp_path, capsys, content, why):
    out = tmp_path / "results.jsonl"
    out.write_text(content)
    rc, out, rec = run(tmp_path, [{"id": "a", "prompt": "x"}])
    assert rc == 2 and rec.llms == []
    assert out.read_text() == content
    assert re.search(why, capsys.readouterr().err)


def test_output_that_is_the_input_or_a_directory_is_refused(tmp_path, capsys):
    inp = write_lines(tmp_path / "in.jsonl", [{"id": "a", "prompt": "x"}, {"id": "b", "prompt": "y"}])
    before = inp.read_text()
    assert main(["--input", str(inp), "--output", str(tmp_path / "." / "in.jsonl"), "--no-progress"],
                llm_factory=Recorder()) == 2
    assert inp.read_text() == before and "is the input file" in capsys.readouterr().err
    (tmp_path / "outdir").mkdir()
    assert main(["--input", str(inp), "--output", str(tmp_path / "outdir"), "--no-progress"],
                llm_factory=Recorder()) == 2
    assert "is a directory" in capsys.readouterr().err


def test_a_second_job_on_the_same_output_is_refused_naming_the_lock(tmp_path, capsys):
    out = tmp_path / "results.jsonl"
    holder = JobOutput(out)  # what a running job holds
    try:
        rc, _, rec = run(tmp_path, [{"id": "a", "prompt": "x"}])
        assert rc == 2 and rec.llms == []
        assert f"holds the lock on {out}{MARKER_SUFFIX}" in capsys.readouterr().err
    finally:
        holder.close()
    assert run(tmp_path, [{"id": "a", "prompt": "x"}])[0] == 0  # released: the job runs


def test_retry_errors_reruns_ids_whose_only_records_are_errors(tmp_path, capsys):
    lines = [{"id": "a", "prompt": "x"}, {"id": "b", "prompt": "y"}, {"id": "c", "prompt": "z"}]
    out = write_lines(tmp_path / "results.jsonl", [
        DONE | {"id": "a"}, {"id": "b", "line": 2, "error": "prompt has 9 tokens; max_model_len is 4"},
        {"line": 3, "error": "invalid JSON: (since fixed)"}])
    rc, _, rec = run(tmp_path, lines)  # line 3 was fixed and now has an id: it runs; b stays an error ...
    assert rc == 0 and set(rec.params_by_prompt) == {"z"}
    assert "2 earlier error records could be run again with --retry-errors" in capsys.readouterr().out
    rc, _, rec = run(tmp_path, lines, "--retry-errors")
    assert rc == 0 and set(rec.params_by_prompt) == {"y"}  # ... until asked
    records = read_records(out)
    assert sorted(r["id"] for r in records) == ["a", "b", "c"] and not [r for r in records if "error" in r]
    assert records[0] == DONE | {"id": "a"}


class _DiskFillsUp:
    """A file that takes `room` more bytes, writes part of the next line, then fails as a full disk."""

    def __init__(self, f, room: int):
        self.f, self.room = f, room

    def write(self, s: str):
        if len(s) > self.room:
            self.f.write(s[:self.room // 2])
            self.f.flush()
            raise OSError(errno.ENOSPC, "No space left on device")
        self.room -= len(s)
        return self.f.write(s)

    def __getattr__(self, name):
        return getattr(self.f, name)


def test_a_full_disk_stops_the_job_clearly_and_a_rerun_resumes(tmp_path, monkeypatch, capsys):
    lines = [{"id": f"r{i}", "prompt": f"prompt {i}"} for i in range(12)]
    real_write = JobOutput.write

    def write(self, record):
        if self._f is None:
            self._f = _DiskFillsUp(open(self.path, "a", encoding="utf-8"), room=400)
        return real_write(self, record)

    monkeypatch.setattr(JobOutput, "write", write)
    rc, out, _ = run(tmp_path, lines)
    assert rc == 1
    err = capsys.readouterr().err
    assert "No space left on device" in err and "rerun the same command to resume" in err
    assert not out.read_text().endswith("\n")  # a torn record was left behind
    monkeypatch.setattr(JobOutput, "write", real_write)
    rc, out, rec = run(tmp_path, lines)
    assert rc == 0
    ids = [r["id"] for r in read_records(out)]
    assert sorted(ids) == sorted(f"r{i}" for i in range(12))  # nothing lost, nothing twice


def test_no_arguments_runs_bundled_examples(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    args = cli.build_parser().parse_args([])
    assert args.model is None and args.input == DEFAULT_INPUT and str(args.output) == "out/results.jsonl"
    rec = Recorder(max_model_len=10_000)
    assert main(["--no-progress"], llm_factory=rec) == 0
    records = read_records(tmp_path / "out" / "results.jsonl")
    n_lines = len(DEFAULT_INPUT.read_text().splitlines())
    assert n_lines >= 10 and len(records) == n_lines and not [r for r in records if "error" in r]
    assert rec.llms[0].engine_kwargs == {"model": None}
    assert "Results written to out/results.jsonl" in capsys.readouterr().out


def test_bad_cli_sampling_flag_is_a_usage_error(tmp_path):
    inp = write_lines(tmp_path / "in.jsonl", [{"id": 1, "prompt": "x"}])
    with pytest.raises(SystemExit) as e:
        main(["--input", str(inp), "--output", str(tmp_path / "o.jsonl"), "--temperature", "-1"], llm_factory=Recorder())
    assert e.value.code == 2


def _cli(inp: Path, out: Path, factory: str) -> list[str]:
    return [sys.executable, str(REPO / "run_offline.py"), "--input", str(inp), "--output", str(out),
            "--no-progress", "--llm-factory", f"test_offline_job:{factory}"]


def test_kill_9_and_resume(tmp_path):
    n_valid = 40
    lines = [{"id": f"r{i}", "prompt": f"prompt number {i}"} for i in range(n_valid)]
    lines[10:10] = ["{oops", {"id": "r3", "prompt": "duplicate"}]  # two id-less errors, lines 11 and 12
    inp = write_lines(tmp_path / "in.jsonl", lines)
    out = tmp_path / "results.jsonl"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}

    proc = subprocess.Popen(_cli(inp, out, "slow_fake_llm"), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and proc.poll() is None:
        if out.exists() and out.read_text().count("\n") >= 8:
            break
        time.sleep(0.01)
    assert proc.poll() is None, proc.stderr.read().decode()
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc.stderr.close()
    written = out.read_text().count("\n")
    assert 8 <= written < n_valid + 2  # killed mid-run

    done = subprocess.run(_cli(inp, out, "fake_llm"), env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "Errors: 0" in done.stdout  # the errors were already written by the killed run
    records = read_records(out)  # every line parses
    ids = [r["id"] for r in records if "id" in r]
    assert sorted(ids) == sorted(f"r{i}" for i in range(n_valid))  # each exactly once
    assert sorted(r["line"] for r in records if "id" not in r) == [11, 12]


def test_real_engine_end_to_end(tmp_path):
    import sidp_jax.llm  # noqa: F401  (the real engine: an import error fails this test)
    lines = [
        {"id": "p", "prompt": "The capital of France is"},
        {"id": "m", "messages": [{"role": "user", "content": "Hi"}], "temperature": 0},
        {"id": "two", "prompt": "Hello", "n": 2},
    ]
    inp = write_lines(tmp_path / "in.jsonl", lines)
    out = tmp_path / "results.jsonl"
    rc = main(["--input", str(inp), "--output", str(out), "--max-tokens", "4", "--no-progress"])
    assert rc == 0
    records = by_id(read_records(out))
    assert set(records) == {"p", "m", "two"}
    for r in records.values():
        assert "error" not in r, r
        assert 1 <= len(r["token_ids"]) <= 4 and r["finish_reason"] in ("stop", "length")
    assert len(records["two"]["completions"]) == 2


def test_ray_flag_without_ray_says_how_to_install(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    inp = write_lines(tmp_path / "in.jsonl", [{"id": 1, "prompt": "x"}])
    rc = main(["--input", str(inp), "--output", str(tmp_path / "o.jsonl"), "--ray"])
    assert rc == 2
    assert "pip install 'sidp-jax[ray]'" in capsys.readouterr().err
    assert not (tmp_path / "o.jsonl").exists()


def test_parquet_input(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    table = pa.Table.from_pylist([  # a column a row does not use is null there: left out
        {"id": "a", "prompt": "hello", "messages": None, "max_tokens": None},
        {"id": "b", "prompt": None, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3},
        {"id": "c", "prompt": None, "messages": None, "max_tokens": None},
    ])
    inp = tmp_path / "in.parquet"
    pq.write_table(table, inp)
    out = tmp_path / "results.jsonl"
    rec = Recorder()
    assert main(["--input", str(inp), "--output", str(out), "--no-progress"], llm_factory=rec) == 0
    records = read_records(out)
    got = by_id(records)
    assert got["a"]["text"] == "olleh0" and got["b"]["output_tokens"] == 3
    assert got["c"]["line"] == 3 and "exactly one" in got["c"]["error"]


def test_values_that_would_overflow_are_error_records_and_the_job_goes_on(tmp_path):
    lines = [{"id": "a", "prompt": "one"}, {"id": "b", "prompt": "two", "seed": 4294967296},
             {"id": "c", "prompt": "three", "top_k": 2147483648},
             {"id": "d", "prompt": "four", "stop_token_ids": [2147483648], "min_tokens": 1},
             {"id": "e", "prompt": "five", "temperature": float("nan")}, {"id": "f", "prompt": "six", "n": True},
             {"id": "g", "prompt": "seven"}]
    rc, out, rec = run(tmp_path, lines)
    assert rc == 0
    records = by_id(read_records(out))
    assert set(rec.params_by_prompt) == {"one", "seven"}
    for rid, field in [("b", "seed"), ("c", "top_k"), ("d", "stop_token_ids"), ("e", "temperature"), ("f", "n")]:
        assert f"SamplingParams.{field}" in records[rid]["error"], records[rid]


def test_a_model_that_fails_to_load_prints_one_line_and_exits_1(tmp_path, capsys):
    inp = write_lines(tmp_path / "in.jsonl", [{"id": "a", "prompt": "x"}])
    args = ["--input", str(inp), "--output", str(tmp_path / "o.jsonl"), "--no-progress", "--model", str(tmp_path / "nope")]
    assert main(args) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "could not load the model" in err and "Traceback" not in err
    with pytest.raises(offline_job.ModelLoadError) as e:  # --debug: the traceback, with its cause
        main(args + ["--debug"])
    assert isinstance(e.value.__cause__, FileNotFoundError)


def test_a_model_without_a_tokenizer_is_refused_before_any_line_runs(tmp_path, capsys):
    class NoTokenizer(FakeLLM):
        def __init__(self, **kw):
            super().__init__(**kw)
            self.tokenizer = None

    rc, out, _ = run(tmp_path, [{"id": "a", "prompt": "x"}, {"id": "b", "prompt": "y"}],
                     factory=lambda **kw: NoTokenizer(**kw))
    assert rc == 1 and "has no tokenizer.json" in capsys.readouterr().err
    assert not out.exists() or read_records(out) == []  # no error record per line


def test_argument_errors_come_without_the_usage_text(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["--input", str(tmp_path / "missing.jsonl")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "input file not found" in err and "usage:" not in err


def test_kill_9_at_random_points_never_loses_or_duplicates_a_record(tmp_path):
    """Fault injection: kill -9 a job with n=2 and logprobs at random moments, rerun, repeat; the
    output always parses line by line (a torn line only at the very end, which the next run drops)
    and, at the end, every valid id appears exactly once."""
    import random

    rng = random.Random(0)
    n_valid = 150
    lines = [{"id": f"r{i}", "prompt": f"prompt number {i}"} for i in range(n_valid)]
    lines[20:20] = ["{oops", {"id": "r3", "prompt": "duplicate"}]
    inp = write_lines(tmp_path / "in.jsonl", lines)
    out = tmp_path / "results.jsonl"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    cmd = _cli(inp, out, "slow_fake_llm") + ["--n", "2", "--logprobs", "1"]
    kills = 0
    for _ in range(6):
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(0.5, 1.8))
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            kills += 1
        proc.wait()
        text = out.read_text() if out.exists() else ""
        complete = text[:text.rfind("\n") + 1]
        for line in complete.splitlines():
            json.loads(line)  # every whole line is a record
    assert kills >= 3
    done = subprocess.run(_cli(inp, out, "fake_llm") + ["--n", "2", "--logprobs", "1"], env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    records = read_records(out)
    ids = [r["id"] for r in records if "id" in r]
    assert sorted(ids) == sorted(f"r{i}" for i in range(n_valid))
    assert sorted(r["line"] for r in records if "id" not in r) == [21, 22]
    assert all(len(r["completions"]) == 2 and "logprobs" in r for r in records if "id" in r)


def test_generation_config_defaults_fill_only_what_neither_the_command_line_nor_the_line_set():
    from sidp_jax.jobs.formats import parse_line
    from sidp_jax.jobs.offline_job import tokenized
    from sidp_jax.jobs.openai_batch import parse_batch_line

    class Tok:
        def encode(self, text, add_special_tokens=True):
            return [1, 2]

        def apply_chat_template(self, messages, **kw):
            return "x"

    cli = {"top_p": 0.5}
    a = parse_line(1, {"id": "a", "prompt": "x"}, cli)
    b = parse_line(2, {"id": "b", "prompt": "x", "temperature": 1.0}, cli)
    c = parse_batch_line(3, {"custom_id": "c", "method": "POST", "url": "/v1/chat/completions",
                             "body": {"messages": [{"role": "user", "content": "hi"}]}}, {})
    defaults = {"temperature": 0.6, "top_p": 0.95, "top_k": 20, "max_tokens": 99}
    a, b, c = tokenized([a, b, c], Tok(), defaults)
    assert (a.params.temperature, a.params.top_p, a.params.top_k, a.params.max_tokens) == (0.6, 0.5, 20, 99)
    assert (b.params.temperature, b.params.top_k) == (1.0, 20)  # the line's explicit 1.0 wins
    assert c.params.max_tokens is None  # a batch chat line without max_tokens: the rest of the context
    assert (c.params.temperature, c.params.top_p) == (0.6, 0.95)


# ---------------------------------------------------------------------------------------------
# No byte the job does not own; no line that ends the job


def test_summary_json_never_lands_on_the_input_the_output_or_a_stranger(tmp_path, capsys):
    rc, out, _ = run(tmp_path, [{"id": "a", "prompt": "x"}])
    inp, results = tmp_path / "in.jsonl", out.read_text()
    stranger = tmp_path / "notes.json"
    stranger.write_text('{"mine": true}\n')
    for target, why in ((out, "is --output"), (inp, "is the input"), (stranger, "not a summary this job wrote")):
        with pytest.raises(SystemExit) as e:
            main(["--input", str(inp), "--output", str(out), "--no-progress", "--summary-json", str(target)],
                 llm_factory=Recorder())
        assert e.value.code == 2 and why in capsys.readouterr().err
    assert out.read_text() == results and stranger.read_text() == '{"mine": true}\n'
    summary = tmp_path / "summary.json"
    for _ in range(2):  # its own summary is replaced on a rerun
        assert main(["--input", str(inp), "--output", str(out), "--no-progress", "--summary-json", str(summary)],
                    llm_factory=Recorder()) == 0
    assert json.loads(summary.read_text())["written_by"] == cli.SUMMARY_MARK


def test_a_job_through_a_symlink_takes_the_running_jobs_lock(tmp_path, capsys):
    out = tmp_path / "results.jsonl"
    holder = JobOutput(out)
    link = tmp_path / "link.jsonl"
    link.symlink_to(out)
    try:
        inp = write_lines(tmp_path / "in.jsonl", [{"id": "a", "prompt": "x"}])
        rc = main(["--input", str(inp), "--output", str(link), "--no-progress"], llm_factory=Recorder())
        assert rc == 2 and "holds the lock" in capsys.readouterr().err
    finally:
        holder.close()


def test_outputs_that_are_not_files_or_not_writable_are_one_line_errors(tmp_path, capsys):
    inp = write_lines(tmp_path / "in.jsonl", [{"id": "a", "prompt": "x"}])
    assert main(["--input", str(inp), "--output", "/dev/null", "--no-progress"], llm_factory=Recorder()) == 2
    assert "not a regular file" in capsys.readouterr().err and not Path("/dev/null" + MARKER_SUFFIX).exists()
    locked = tmp_path / "ro"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        if os.access(locked, os.W_OK):
            pytest.skip("running as a user that writes anywhere (root)")
        assert main(["--input", str(inp), "--output", str(locked / "r.jsonl"), "--no-progress"],
                    llm_factory=Recorder()) == 2
        assert "cannot write beside --output" in capsys.readouterr().err
    finally:
        locked.chmod(0o700)


def test_lines_that_would_crash_a_parser_are_error_records_and_the_rest_run(tmp_path):
    inp = tmp_path / "in.jsonl"
    inp.write_bytes(b'\xef\xbb\xbf{"id": "bom", "prompt": "x"}\n' + b"[" * 100_000 + b"\n"
                    + b'{"id": ' + b"9" * 5000 + b"}\n" + b'{"id": "big", "prompt": "' + b"y" * 300_000 + b'"}\n'
                    + b'{"id": "ok", "prompt": "z"}\n')
    out = tmp_path / "results.jsonl"
    assert main(["--input", str(inp), "--output", str(out), "--no-progress", "--max-model-len", "4096"],
                llm_factory=Recorder()) == 0
    recs = read_records(out)
    assert {r["id"] for r in recs if "text" in r} == {"bom", "ok"}
    errors = {r["line"]: r["error"] for r in recs if "error" in r}
    assert "nested too deeply" in errors[2] and "digits" in errors[3] and "over the limit of 262,144" in errors[4]


def test_a_utf16_input_is_refused_naming_the_encoding(tmp_path, capsys):
    inp = tmp_path / "in.jsonl"
    inp.write_bytes('{"id": "a", "prompt": "x"}\n'.encode("utf-16"))
    with pytest.raises(SystemExit) as e:
        main(["--input", str(inp), "--output", str(tmp_path / "r.jsonl"), "--no-progress"], llm_factory=Recorder())
    assert e.value.code == 2 and "UTF-16LE, not UTF-8" in capsys.readouterr().err


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_ends_the_job_in_one_line_and_a_rerun_resumes(tmp_path, sig):
    lines = [{"id": f"r{i}", "prompt": f"prompt number {i}"} for i in range(40)]
    inp = write_lines(tmp_path / "in.jsonl", lines)
    out = tmp_path / "results.jsonl"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen(_cli(inp, out, "slow_fake_llm"), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and not (out.exists() and out.read_text().count("\n") >= 5):
        time.sleep(0.01)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 130, err
    assert err.strip().splitlines()[-1].startswith("interrupted:") and "Traceback" not in err
    with open(out.with_name(out.name + MARKER_SUFFIX)) as marker:  # the lock is free again
        import fcntl
        fcntl.flock(marker, fcntl.LOCK_EX | fcntl.LOCK_NB)
    done = subprocess.run(_cli(inp, out, "fake_llm"), env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert sorted(r["id"] for r in read_records(out)) == sorted(f"r{i}" for i in range(40))


def test_openai_fields_at_their_defaults_and_bookkeeping_fields_are_accepted(tmp_path):
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "response_format": {"type": "text"},
            "metadata": {"run": "7"}, "store": False, "service_tier": "auto", "parallel_tool_calls": True}
    lines = [{"custom_id": "a", "method": "POST", "url": "/v1/chat/completions", "body": body}]
    rc, out, _ = run(tmp_path, lines)
    rec = read_records(out)[0]
    assert rc == 0 and rec["error"] is None and rec["response"]["status_code"] == 200


def test_invalid_generation_config_is_refused_at_load_naming_the_file(tmp_path, capsys):
    class BadDefaults(FakeLLM):
        def generation_defaults(self):
            return {"temperature": -1}

    rc, out, _ = run(tmp_path, [{"id": "a", "prompt": "x"}], factory=lambda **kw: BadDefaults(**kw))
    err = capsys.readouterr().err
    assert rc == 1 and "generation_config.json" in err and "temperature" in err


def test_a_rerun_with_other_settings_is_refused_naming_them_unless_accepted(tmp_path, capsys):
    lines = [{"id": "a", "prompt": "hello"}, {"id": "b", "prompt": "world"}]
    rc, out, _ = run(tmp_path, lines[:1], "--max-tokens", "3")
    assert rc == 0
    before = out.read_bytes()
    capsys.readouterr()
    rc, _, rec = run(tmp_path, lines, "--max-tokens", "4", "--temperature", "0.5")
    err = capsys.readouterr().err
    assert rc == 2 and not rec.llms and out.read_bytes() == before  # nothing ran, nothing written
    assert err.count("\n") == 1 and "--max-tokens: 3 -> 4" in err and "--temperature: unset -> 0.5" in err
    assert "--accept-new-settings" in err
    rc, _, rec = run(tmp_path, lines, "--max-tokens", "3")  # the same settings: resumes
    assert rc == 0 and set(rec.params_by_prompt) == {"world"}
    rc, _, rec = run(tmp_path, lines + [{"id": "c", "prompt": "again"}], "--max-tokens", "4", "--accept-new-settings")
    assert rc == 0 and set(rec.params_by_prompt) == {"again"} and by_id(read_records(out))["c"]["output_tokens"] == 4
    marker = json.loads((tmp_path / ("results.jsonl" + MARKER_SUFFIX)).read_text())
    assert marker["settings"]["--max-tokens"] == 4  # the new settings are the ones recorded


def test_an_output_from_before_settings_were_recorded_resumes(tmp_path):
    rc, out, _ = run(tmp_path, [{"id": "a", "prompt": "hello"}])
    marker = tmp_path / ("results.jsonl" + MARKER_SUFFIX)
    marker.write_text(json.dumps({"written_by": "sidp-jax offline job", "output": out.name}) + "\n")
    rc, _, rec = run(tmp_path, [{"id": "a", "prompt": "hello"}, {"id": "b", "prompt": "x"}], "--max-tokens", "5")
    assert rc == 0 and set(rec.params_by_prompt) == {"x"}


def test_the_summary_states_the_sampling_in_force_and_its_source(tmp_path, capsys):
    class WithDefaults(FakeLLM):
        def generation_defaults(self):
            return {"temperature": 0.6, "top_k": 20}

    rc, _, _ = run(tmp_path, [{"id": "a", "prompt": "hi"}], "--top-p", "0.9", factory=lambda **kw: WithDefaults(**kw))
    line = next(ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("Sampling"))
    assert rc == 0
    for part in ("max_tokens=16 (vLLM default)", "temperature=0.6 (generation_config.json)",
                 "top_k=20 (generation_config.json)", "top_p=0.9 (command line)"):
        assert part in line, line


@pytest.mark.parametrize("content", [b"PAR1 not really parquet", b"", "cut"])
def test_a_parquet_file_that_is_not_one_or_is_cut_is_one_line(tmp_path, capsys, content):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    inp = tmp_path / "in.parquet"
    if content == "cut":
        pq.write_table(pa.Table.from_pylist([{"id": str(i), "prompt": "p" * 50} for i in range(100)]), inp)
        inp.write_bytes(inp.read_bytes()[:-30])
    else:
        inp.write_bytes(content)
    with pytest.raises(SystemExit) as e:
        main(["--input", str(inp), "--output", str(tmp_path / "o.jsonl"), "--no-progress"], llm_factory=Recorder())
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and "not a readable Parquet file" in err and str(inp) in err


def test_flag_mistakes_are_usage_errors_and_a_cpu_mesh_says_how_to_get_devices(tmp_path, capsys):
    inp = write_lines(tmp_path / "in.jsonl", [{"id": "a", "prompt": "x"}])
    base = ["--input", str(inp), "--output", str(tmp_path / "o.jsonl"), "--no-progress"]
    with pytest.raises(SystemExit) as e:
        main(base + ["--mesh", "dp=eight"], llm_factory=Recorder())
    err = capsys.readouterr().err
    assert e.value.code == 2 and "mesh must look like 'dp=8'" in err and "could not load" not in err
    with pytest.raises(SystemExit) as e:
        main(base + ["--mesh", "dp=64"])  # more than the 8 virtual CPU devices: refused before any model loads
    err = capsys.readouterr().err
    assert e.value.code == 2 and "needs 64 devices" in err and "xla_force_host_platform_device_count=64" in err
    assert not (tmp_path / "o.jsonl").exists()
