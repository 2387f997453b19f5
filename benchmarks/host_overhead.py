"""Host time per engine step (schedule, build the batch, apply sampled tokens), no model, CPU.

The engine's own step loop with a stand-in runner that returns random tokens at once, so what is
timed is exactly the host work that `stats()["host_ms_per_step"]` reports on the GPUs (there it
sits between device steps). The workload is the KV-bound one of RESULTS.md: prompts of
--input-len tokens, --output-len outputs, D replicas with --kv-tokens each; the first
--warmup-steps fill the batch, the next --steps are timed.

  python benchmarks/host_overhead.py                    # sidp at util 0.6: 2 x 186k tokens
  python benchmarks/host_overhead.py --kv-tokens 88320  # dp at util 0.6
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np

from sidp_jax.engine import Engine, Request
from sidp_jax.sampling_params import SamplingParams
from sidp_jax.scheduler import Scheduler
from provenance import write_result  # noqa: E402  (benchmarks/ is on sys.path)


class InstantRunner:
    """What Engine needs of a ModelRunner, answering every step with random tokens at once."""

    def __init__(self, page_size: int, tile_tokens: int | None):
        self.page_size, self.tile_tokens = page_size, tile_tokens
        self.steps_per_attention: dict[str, int] = {}
        self.rng = np.random.default_rng(0)

    def run(self, batch, samp, flags, mode, decode_only):
        D, S = batch["sample_index"].shape
        return {"tokens": self.rng.integers(100, 1000, (D, S), dtype=np.int32)}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--replicas", type=int, default=2)
    ap.add_argument("--kv-tokens", type=int, default=186016, help="KV tokens per replica")
    ap.add_argument("--input-len", type=int, default=1024)
    ap.add_argument("--output-len", type=int, default=2048)
    ap.add_argument("--num-prompts", type=int, default=400)
    ap.add_argument("--max-num-seqs", type=int, default=256)
    ap.add_argument("--max-num-batched-tokens", type=int, default=2048)
    ap.add_argument("--tile-tokens", type=int, default=16, help="0: the reference attention's batch layout")
    ap.add_argument("--warmup-steps", type=int, default=300)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    P = 16
    sched = Scheduler(a.replicas, a.kv_tokens // P + 1, P, a.max_num_seqs, a.max_num_batched_tokens)
    engine = Engine(InstantRunner(P, a.tile_tokens or None), sched, tokenizer=None, eos_ids=[0],
                    max_model_len=a.input_len + a.output_len, max_num_batched_tokens=a.max_num_batched_tokens,
                    max_num_seqs=a.max_num_seqs, seed=0, mode_policy=lambda plans: "cas")
    params = SamplingParams(temperature=0, max_tokens=a.output_len, ignore_eos=True)
    rng = np.random.default_rng(0)
    for i in range(a.num_prompts):
        engine.add(Request(i, None, rng.integers(100, 1000, a.input_len).tolist(), params))
    for _ in range(a.warmup_steps):
        engine.step()
    engine.host_seconds, first = 0.0, engine.num_steps
    rows = []
    t = time.perf_counter()
    for _ in range(a.steps):
        engine.step()
        rows.append(sum(len(p) for p in sched.running))
    wall = time.perf_counter() - t
    res = {"host_ms_per_step": 1e3 * engine.host_seconds / (engine.num_steps - first),
           "wall_ms_per_step": 1e3 * wall / a.steps, "mean_running_sequences": float(np.mean(rows)),
           "args": vars(a), "argv": sys.argv[1:]}
    print(f"host {res['host_ms_per_step']:.2f} ms/step over {a.steps} steps, "
          f"{res['mean_running_sequences']:.0f} running sequences on {a.replicas} replicas")
    if a.out:
        write_result(a.out, res)


if __name__ == "__main__":
    main()
