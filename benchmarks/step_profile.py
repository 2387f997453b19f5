"""Where one decode step's time goes on the GPU: the engine's compiled step (as roofline.py builds
it) traced with jax.profiler, its kernels summed per step by kind (GEMM library calls, Pallas
kernels, XLA fusions, copies) and by name, beside the wall-clock step (timed without the
profiler). Busy time below the wall time is launch gaps and idle streams. While a profiler is
active XLA runs the step op by op instead of as CUDA graphs (command buffers), unless
XLA_FLAGS=--xla_enable_command_buffers_during_profiling=true: the traced gaps are op-by-op's.

  python benchmarks/step_profile.py --model qwen3-32b --batch 64 --context 1024 --quantization fp8 \
      --kv-cache-dtype fp8 --out profile.json
  python benchmarks/step_profile.py --model tiny --batch 8 --context 64 --reps 2   # CPU smoke test
"""

from __future__ import annotations

import argparse
import collections
import glob
import os
import re
import sys
import tempfile
import time

os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.95")

import jax  # noqa: E402

from sidp_jax.engine.timing import median_seconds  # noqa: E402
from provenance import write_result  # noqa: E402  (benchmarks/ is on sys.path)
from roofline import engine_decode_step  # noqa: E402

KINDS = [  # first match wins; kernel names as CUDA reports them
    ("gemm", re.compile(r"gemm|nvjet|xmma|cutlass|cublas|gemv|splitk", re.I)),
    ("copy", re.compile(r"memcpy|memset|copy", re.I)),
    ("fusion", re.compile(r"fusion|reduce|transpose|convert|concat|slice|broadcast|select", re.I)),
]


def kind_of(name: str) -> str:
    return next((k for k, rx in KINDS if rx.search(name)), "other (Pallas, sort, ...)")


def device_kernels(trace_dir: str) -> tuple[list[tuple[str, int]], list[str]]:
    """(name, duration ns) of every kernel on the device planes' stream lines, and the line names seen."""
    from jax.profiler import ProfileData

    files = glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True)
    if not files:
        raise RuntimeError(f"no .xplane.pb under {trace_dir}")
    events, lines = [], []
    for plane in ProfileData.from_file(files[0]).planes:
        if not plane.name.startswith("/device:"):
            continue
        for line in plane.lines:
            lines.append(f"{plane.name} :: {line.name}")
            if line.name.startswith("Stream"):  # CUDA streams: one event per kernel
                events += [(e.name, e.duration_ns) for e in line.events]
    return events, lines


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="qwen3-32b", help="a preset name, or 'tiny' (the bundled model)")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--reps", type=int, default=5, help="steps traced (after warm-up)")
    ap.add_argument("--quantization", default="none")
    ap.add_argument("--kv-cache-dtype", default="auto")
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    from sidp_jax import LLM

    dev = jax.devices()[:1]
    S, ctx, P = a.batch, a.context, 16
    llm = LLM(None if a.model == "tiny" else a.model, mesh="dp=1", devices=dev,
              kv_cache_tokens=(S * -(-(ctx + 1) // P) + 1) * P, max_num_seqs=S, max_num_batched_tokens=S,
              kv_block_size=P, verbose=False, quantization=None if a.quantization == "none" else a.quantization,
              kv_cache_dtype=a.kv_cache_dtype, precompile=False)
    step = engine_decode_step(llm.engine.runner, S, ctx, P, llm.cfg.vocab_size)[0]
    jax.block_until_ready(step())
    step_ms = median_seconds(step, reps=max(a.reps, 5)) * 1e3
    with tempfile.TemporaryDirectory() as d:
        with jax.profiler.trace(d):
            t0 = time.perf_counter()
            for _ in range(a.reps):
                out = step()
            jax.block_until_ready(out)
            traced_ms = (time.perf_counter() - t0) * 1e3 / a.reps
        events, lines = device_kernels(d)
    if not lines:
        print("no device plane in the trace (a CPU run): no kernels to sum")

    per_name = collections.defaultdict(lambda: [0, 0])
    for name, ns in events:
        per_name[name][0] += ns
        per_name[name][1] += 1
    per_kind = collections.defaultdict(float)
    for name, (ns, _) in per_name.items():
        per_kind[kind_of(name)] += ns / 1e6 / a.reps
    busy_ms = sum(per_kind.values())
    top = sorted(per_name.items(), key=lambda kv: -kv[1][0])[:a.top]
    print(f"{dev[0].device_kind} jax {jax.__version__} {a.model} quantization={a.quantization} "
          f"kv={a.kv_cache_dtype} S={S} ctx={ctx}: step {step_ms:.2f} ms (traced {traced_ms:.2f}), "
          f"kernels busy {busy_ms:.2f} ms per step, {len(events) / a.reps:.0f} kernels per step")
    print("\n| kind | ms per step | share of busy |\n|---|---|---|")
    for k, ms in sorted(per_kind.items(), key=lambda kv: -kv[1]):
        print(f"| {k} | {ms:.2f} | {ms / max(busy_ms, 1e-9):.0%} |")
    print("\n| kernel | kind | ms per step | calls per step |\n|---|---|---|---|")
    for name, (ns, n) in top:
        print(f"| {name[:90]} | {kind_of(name)} | {ns / 1e6 / a.reps:.3f} | {n / a.reps:.0f} |")
    if a.out:
        meta = dict(device=dev[0].device_kind, jax=jax.__version__, model=a.model, argv=sys.argv[1:],
                    trace_lines=sorted(set(lines)))
        write_result(a.out, dict(meta=meta, step_ms=step_ms, traced_step_ms=traced_ms, busy_ms=busy_ms,
                                 kernels_per_step=len(events) / a.reps, per_kind_ms=dict(per_kind),
                                 kernels=[dict(name=n, kind=kind_of(n), ms_per_step=ns / 1e6 / a.reps,
                                               calls_per_step=c / a.reps)
                                          for n, (ns, c) in sorted(per_name.items(), key=lambda kv: -kv[1][0])]))


if __name__ == "__main__":
    main()
