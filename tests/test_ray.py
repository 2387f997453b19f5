"""sidp_jax.jobs.ray_job on a local Ray cluster (CPU): 2 actors, each a dp=4 SiDP group on 4 virtual devices.

Greedy results must equal those of one LLM.generate/chat in a single process, and every id must
come out exactly once. The reference LLM runs first, in a Ray worker with the actors' 4-device
environment, and every process shares one JAX compilation cache, so the actors mostly load the
reference's compiled steps instead of compiling them again (2 cores). ffn_mode="cas" compiles
less than the other modes (the outputs are the same in every mode).
"""

from __future__ import annotations

import json
import os

import pytest

from sidp_jax.jobs.cli import main
from sidp_jax.ray import SiDPProcessorConfig, build_sidp_processor, records_table, run_rows

try:
    import ray
    import ray.data
except ImportError:  # only the tests on a Ray cluster (those using `cluster`) are skipped then
    ray = None

ENGINE = {"mesh": "dp=4", "parallel": "sidp", "ffn_mode": "cas", "verbose": False}
PROMPTS = ["The capital of France is", "Hello", "JAX is", "Once upon a time", "1 2 3 4", "Ray Data",
           "The quick brown fox"]
CHATS = [[{"role": "user", "content": "Hi!"}], [{"role": "user", "content": "What is SiDP?"}],
         [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Why?"}]]


def max_tokens(i: int) -> int:
    return 3 + i % 4


@pytest.fixture(scope="module")
def actor_env(tmp_path_factory):
    cache = tmp_path_factory.mktemp("jax_cache")
    return {"env_vars": {
        "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu",
        "JAX_COMPILATION_CACHE_DIR": str(cache), "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
        "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "-1",
    }}


@pytest.fixture(scope="module")
def cluster(actor_env):
    if ray is None:
        pytest.skip("Ray Data is not installed (pip install 'sidp-jax[ray]')")
    ray.init(num_cpus=2, include_dashboard=False, runtime_env=actor_env, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def reference(cluster):
    """Greedy token ids of one LLM in one process, per prompt (PROMPTS, then CHATS)."""
    n, prompts, chats, engine = len(PROMPTS), PROMPTS, CHATS, ENGINE

    def generate():  # nested: Ray pickles it by value (the workers cannot import this module)
        from sidp_jax import LLM, SamplingParams

        llm = LLM(**engine)
        params = [SamplingParams(temperature=0, ignore_eos=True, max_tokens=3 + i % 4) for i in range(n + len(chats))]
        outs = llm.generate(prompts, params[:n], use_tqdm=False)
        outs += [llm.chat(c, params[n + j], use_tqdm=False)[0] for j, c in enumerate(chats)]
        return [[int(t) for t in o.outputs[0].token_ids] for o in outs]

    return ray.get(ray.remote(num_cpus=1)(generate).remote())


def test_processor_matches_single_process(cluster, reference, actor_env):
    rows = [{"id": f"r{i}", "prompt": p, "messages": None, "max_tokens": max_tokens(i)} for i, p in enumerate(PROMPTS)]
    rows += [{"id": f"r{len(PROMPTS) + j}", "prompt": None, "messages": c, "max_tokens": max_tokens(len(PROMPTS) + j)}
             for j, c in enumerate(CHATS)]
    rows.append({"id": "bad", "prompt": None, "messages": None, "max_tokens": None})  # null columns: neither
    config = SiDPProcessorConfig(engine_kwargs=ENGINE, sampling_params={"temperature": 0, "ignore_eos": True},
                                 batch_size=2, concurrency=2, runtime_env=actor_env)
    processor = build_sidp_processor(config, postprocess=lambda r: {"record": json.dumps(r), "pid": os.getpid()})
    out = processor(ray.data.from_items(rows)).take_all()

    ids = [json.loads(r["record"])["id"] for r in out]
    assert sorted(ids) == sorted(r["id"] for r in rows)  # every id exactly once
    records = {json.loads(r["record"])["id"]: json.loads(r["record"]) for r in out}
    assert "exactly one" in records.pop("bad")["error"]
    for i, ref in enumerate(reference):
        rec = records[f"r{i}"]
        assert "error" not in rec, rec
        assert rec["token_ids"] == ref, i
        assert rec["output_tokens"] == max_tokens(i) and rec["finish_reason"] == "length"
    pids = {r["pid"] for r in out}
    assert 1 <= len(pids) <= 2, pids  # the pool's 2 actors (the first one ready may take every batch)
    print(f"batches ran on {len(pids)} actor(s)")


def test_dead_actor_batch_is_retried(cluster, reference, actor_env, tmp_path):
    """An actor process that dies mid-batch is restarted and its batch rerun: every row comes out once."""
    marker = str(tmp_path / "died")

    def die_once(row):  # kills its actor's process the first time it sees r3
        if row["id"] == "r3" and not os.path.exists(marker):
            open(marker, "w").close()
            os._exit(1)
        return row

    rows = [{"id": f"r{i}", "prompt": p, "max_tokens": max_tokens(i)} for i, p in enumerate(PROMPTS)]
    config = SiDPProcessorConfig(engine_kwargs=ENGINE, sampling_params={"temperature": 0, "ignore_eos": True},
                                 batch_size=2, concurrency=2, runtime_env=actor_env)
    out = build_sidp_processor(config, preprocess=die_once)(ray.data.from_items(rows)).take_all()
    assert os.path.exists(marker)  # an actor did die
    assert sorted(r["id"] for r in out) == sorted(r["id"] for r in rows)
    for r in out:
        assert r["error"] is None and r["token_ids"] == reference[int(r["id"][1:])], r


def test_run_offline_ray_job(cluster, reference, tmp_path, capsys):
    n = len(PROMPTS)
    lines = [{"id": i if i % 2 else f"s{i}", "prompt": p, "max_tokens": max_tokens(i)} for i, p in enumerate(PROMPTS)]
    lines += [{"id": f"c{j}", "messages": c, "sampling_params": {"max_tokens": max_tokens(n + j)}}
              for j, c in enumerate(CHATS)]
    lines[3:3] = ['{"id": "torn', {"id": "s0", "prompt": "duplicate id"}]  # lines 4 and 5: errors without id
    inp = tmp_path / "in.jsonl"
    inp.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    out = tmp_path / "results.jsonl"
    argv = ["--input", str(inp), "--output", str(out), "--no-progress", "--ray", "--ray-concurrency", "2",
            "--ray-batch-size", "3", "--mesh", "dp=4", "--ffn-mode", "cas", "--temperature", "0", "--ignore-eos"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "Ray: 2 SiDP group(s)" in printed and "Errors: 2" in printed
    # the actors' engine stats reach the summary: 2 groups of 4 replicas, all steps in CaS
    assert "replicas 8" in printed and "Steps per mode: cas=" in printed and "Step time: n/a" not in printed

    records = [json.loads(x) for x in out.read_text().splitlines()]
    ids = [r["id"] for r in records if "id" in r]
    want = [i if i % 2 else f"s{i}" for i in range(n)] + [f"c{j}" for j in range(len(CHATS))]
    assert sorted(map(str, ids)) == sorted(map(str, want)) and len(ids) == len(set(ids))
    assert sorted(r["line"] for r in records if "id" not in r) == [4, 5]
    by_id = {r["id"]: r for r in records if "id" in r}
    for i, ref in enumerate(reference):
        assert by_id[want[i]]["token_ids"] == ref, i

    assert main(argv) == 0  # resume: everything is written, nothing runs
    assert "0 requests run" in capsys.readouterr().out
    assert [json.loads(x) for x in out.read_text().splitlines()] == records


def test_run_offline_ray_job_openai_batch(cluster, tmp_path, capsys):
    """An OpenAI batch file through --ray: batch output lines, error records, resume."""
    lines = [{"custom_id": f"p{i}", "method": "POST", "url": "/v1/completions",
              "body": {"prompt": p, "max_tokens": 3}} for i, p in enumerate(PROMPTS[:3])]
    lines += [{"custom_id": "c0", "method": "POST", "url": "/v1/chat/completions",
               "body": {"messages": CHATS[0], "max_completion_tokens": 2, "n": 2}},
              {"custom_id": "bad", "method": "POST", "url": "/v1/completions", "body": {"prompt": "x", "tools": [{}]}},
              {"id": "simple", "prompt": "the other format"}]
    inp = tmp_path / "in.jsonl"
    inp.write_text("".join(json.dumps(x) + "\n" for x in lines))
    out = tmp_path / "results.jsonl"
    argv = ["--input", str(inp), "--output", str(out), "--no-progress", "--ray", "--ray-concurrency", "1",
            "--ray-batch-size", "2", "--mesh", "dp=4", "--ffn-mode", "cas", "--temperature", "0"]
    assert main(argv) == 0
    assert "Errors: 2" in capsys.readouterr().out
    records = [json.loads(x) for x in out.read_text().splitlines()]
    results = {r["custom_id"]: r for r in records if r["error"] is None}
    assert sorted(results) == ["c0", "p0", "p1", "p2"]
    for cid, r in results.items():
        body = r["response"]["body"]
        assert r["response"]["status_code"] == 200 and len(body["choices"]) == (2 if cid == "c0" else 1)
        assert body["object"] == ("chat.completion" if cid == "c0" else "text_completion")
        assert body["usage"]["total_tokens"] == body["usage"]["prompt_tokens"] + body["usage"]["completion_tokens"]
    errors = {r["error"]["line"]: r for r in records if r["error"] is not None}
    assert set(errors) == {5, 6} and errors[5]["custom_id"] == "bad" and errors[6]["custom_id"] is None
    assert main(argv) == 0  # resume: nothing left
    assert "Nothing to run: all 6 requests are already in" in capsys.readouterr().out


def fake_records() -> list[dict]:
    """The actor's batch function (run_rows) on a fake engine, over rows with and without errors."""
    from test_offline_job import FakeLLM

    rows = [{"id": 1, "prompt": "ab", "max_tokens": None}, {"id": None, "prompt": "x"},
            {"id": 3, "messages": [{"role": "explode", "content": "x"}]}, {"id": 4, "prompt": "y" * 100},
            {"id": 5, "prompt": "cd", "sampling_params": {"max_tokens": 1, "n": None}},
            {"id": 6, "prompt": "ef", "n": 2, "logprobs": 1}]
    return run_rows(FakeLLM(), rows, {"max_tokens": 8})


def test_run_rows_without_ray():
    """Row errors stay rows, order is kept."""
    recs = fake_records()
    assert [r["id"] for r in recs] == [1, None, 3, 4, 5, 6]
    assert recs[0]["text"] == "ba0" and recs[4]["text"] == "d"
    assert "missing 'id'" in recs[1]["error"] and "template" in recs[2]["error"]
    assert "max_model_len" in recs[3]["error"]


def test_records_table_without_ray():
    """The actor's default output: the records as one Arrow table of a fixed schema."""
    pytest.importorskip("pyarrow")  # comes with Ray Data; run_rows does not need it
    table = records_table(fake_records()).to_pylist()
    assert table[0]["text"] == "ba0" and table[0]["error"] is None and table[1]["text"] is None
    # ray.data.llm's names, alongside
    assert (table[0]["generated_text"], table[0]["num_generated_tokens"], table[0]["num_input_tokens"]) == ("ba0", 3, 3)
    assert table[1]["generated_text"] is None and table[1]["num_generated_tokens"] is None
    assert table[5]["num_generated_tokens"] == 6
    assert [c["text"] for c in table[5]["completions"]] == ["fe0", "fe1"]
    assert table[5]["logprobs"] == [[(str(ord(c)), -0.5)] for c in "fe0"]


def test_run_rows_openai_batch_lines_without_ray():
    """Rows in the OpenAI batch format (what `run_offline.py --ray` ships for such a file) give that
    format's output lines; errors stay {"id", "error"} for the driver to turn into records."""
    from test_offline_job import FakeLLM

    rows = [{"custom_id": "a", "method": "POST", "url": "/v1/completions", "body": {"prompt": "ab", "max_tokens": 8}},
            {"custom_id": "b", "method": "POST", "url": "/v1/chat/completions",
             "body": {"messages": [{"role": "user", "content": "hi"}], "n": 2, "temperature": None}},
            {"custom_id": "c", "method": "POST", "url": "/v1/completions", "body": {"prompt": "x", "tools": [{}]}}]
    recs = run_rows(FakeLLM(), rows, {"max_tokens": 4})
    assert recs[0]["custom_id"] == "a" and recs[0]["error"] is None
    assert recs[0]["response"]["body"]["choices"][0]["text"] == "ba0"
    assert [c["index"] for c in recs[1]["response"]["body"]["choices"]] == [0, 1]
    assert recs[2]["id"] == "c" and "unsupported" in recs[2]["error"]
    with pytest.raises(ValueError, match="postprocess"):
        records_table(recs)
