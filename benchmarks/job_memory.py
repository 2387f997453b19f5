"""Host memory and time to first output of `run_offline.py` against the input's size (CPU, tiny model).

The job reads, parses and tokenizes its input lazily, keeping a bounded window of requests ahead
of the engine, so peak RSS should not grow with the number of lines (beyond the ids it keeps to
find duplicates and resume) and the first result should appear within seconds. For each size it
writes an input of that many 25-token prompts, runs the job in a child process for --window
seconds (or to the end), and reads the child's peak RSS (VmHWM) and the time its output file got
its first record.

  python benchmarks/job_memory.py --lines 10000,1000000 --out benchmarks/results/<date>-cpu-job-memory.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from provenance import write_result  # noqa: E402  (benchmarks/ is on sys.path)

REPO = Path(__file__).resolve().parent.parent
WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho".split()


def write_input(path: Path, n: int) -> None:
    with open(path, "w") as f:
        for i in range(n):
            words = " ".join(WORDS[(i + k) % len(WORDS)] for k in range(20))
            f.write(json.dumps({"id": i, "prompt": f"{i} {words}"}) + "\n")


def peak_rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return 0


def run_one(n: int, window: float, max_tokens: int, workdir: Path) -> dict:
    inp, out = workdir / f"in-{n}.jsonl", workdir / f"out-{n}.jsonl"
    t0 = time.perf_counter()
    write_input(inp, n)
    write_s = time.perf_counter() - t0
    cmd = [sys.executable, str(REPO / "run_offline.py"), "--input", str(inp), "--output", str(out),
           "--max-tokens", str(max_tokens), "--no-progress"]
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    first, peak = None, 0
    while proc.poll() is None and time.perf_counter() - start < window:
        try:
            peak = max(peak, peak_rss_kib(proc.pid))
        except OSError:
            break
        if first is None and out.exists() and out.stat().st_size > 0:
            first = time.perf_counter() - start
        time.sleep(0.05)
    finished = proc.poll() is not None
    if not finished:
        proc.kill()
    proc.wait()
    records = sum(1 for _ in open(out)) if out.exists() else 0
    return {"lines": n, "input_bytes": inp.stat().st_size, "write_input_s": write_s, "peak_rss_MiB": peak / 1024,
            "first_output_s": first, "records_written": records, "finished": finished,
            "seconds_run": time.perf_counter() - start}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lines", default="10000,1000000")
    ap.add_argument("--window", type=float, default=60.0, help="seconds each job runs at most")
    ap.add_argument("--max-tokens", type=int, default=4)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as d:
        for n in (int(x) for x in a.lines.split(",")):
            rows.append(run_one(n, a.window, a.max_tokens, Path(d)))
            print(json.dumps(rows[-1]), flush=True)
    print("\n| lines | input MB | peak RSS MiB | first output s | records in the window |")
    print("|---|---|---|---|---|")
    for r in rows:
        first = f"{r['first_output_s']:.1f}" if r["first_output_s"] is not None else "none"
        print(f"| {r['lines']:,} | {r['input_bytes'] / 1e6:.1f} | {r['peak_rss_MiB']:.0f} | {first} | "
              f"{r['records_written']:,} |")
    if len(rows) >= 2:
        print(f"peak RSS ratio largest/smallest: {rows[-1]['peak_rss_MiB'] / rows[0]['peak_rss_MiB']:.2f}x")
    if a.out:
        write_result(a.out, {"rows": rows})


if __name__ == "__main__":
    main()
