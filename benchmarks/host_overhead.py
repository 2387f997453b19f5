"""Host time per engine step, and how much of it the host overlap hides; no model, CPU.

The engine's own step loop with a stand-in device: one worker thread that runs each dispatched
step for exactly --device-ms (a GPU stream's order: one step at a time) and answers with random
tokens. With async_scheduling off the host's work (schedule, build the batch, apply the sampled
tokens) sits between device steps; with it on (the default) the host does it while the stand-in
step runs. Both run here, on the KV-bound workload of RESULTS.md: prompts of --input-len
tokens, --output-len outputs, D replicas with --kv-tokens each; the first --warmup-steps fill the
batch, the next --steps are timed.

  python benchmarks/host_overhead.py                    # sidp at util 0.6: 2 x 186k tokens
  python benchmarks/host_overhead.py --kv-tokens 88320  # dp at util 0.6
  python benchmarks/host_overhead.py --device-ms 0      # the host work alone
"""

from __future__ import annotations

import argparse
import concurrent.futures
import time

import numpy as np

from sidp_jax.engine.engine import Engine, Request
from sidp_jax.engine.sampler import Sampled
from sidp_jax.engine.step_times import step_times
from sidp_jax.sampling_params import SamplingParams
from sidp_jax.engine.scheduler import Scheduler
from provenance import write_result  # noqa: E402  (benchmarks/ is on sys.path)


class _OnDevice:
    """One array of a stand-in step's output: ready when its worker finished (what the engine asks
    of a jax.Array)."""

    def __init__(self, future, key: str):
        self.future, self.key = future, key

    def is_ready(self) -> bool:
        return self.future.done()

    def __array__(self, dtype=None, copy=None):
        return self.future.result()[self.key]


class StandInRunner:
    """What Engine needs of a ModelRunner; every step takes `device_ms` on one worker thread."""

    def __init__(self, page_size: int, tile_tokens: int | None, device_ms: float):
        self.page_size, self.tile_tokens, self.device_s = page_size, tile_tokens, device_ms / 1e3
        self.steps_per_attention: dict[str, int] = {}
        self.precompiled_steps = 0
        self.rng = np.random.default_rng(0)
        self.device = concurrent.futures.ThreadPoolExecutor(1)

    def _run(self, D: int, S: int) -> dict[str, np.ndarray]:
        if self.device_s:
            time.sleep(self.device_s)
        return {"tokens": self.rng.integers(100, 1000, (D, S), dtype=np.int32),
                "logprob": np.zeros((D, S), np.float32), "rank": np.ones((D, S), np.int32)}

    def dispatch(self, inputs, mode, prev_tokens=None):
        shape = inputs.shape
        step = self.device.submit(self._run, shape.D, shape.S)
        return Sampled(*(_OnDevice(step, k) for k in ("tokens", "logprob", "rank")))


def run(a, async_scheduling: bool) -> dict:
    P = 16
    sched = Scheduler(a.replicas, a.kv_tokens // P + 1, P, a.max_num_seqs, a.max_num_batched_tokens)
    engine = Engine(StandInRunner(P, a.tile_tokens or None, a.device_ms), sched, tokenizer=None, eos_ids=[0],
                    max_model_len=a.input_len + a.output_len, max_num_batched_tokens=a.max_num_batched_tokens,
                    max_num_seqs=a.max_num_seqs, seed=0, mode_policy=lambda plans: "cas",
                    async_scheduling=async_scheduling)
    params = SamplingParams(temperature=0, max_tokens=a.output_len, ignore_eos=True)
    rng = np.random.default_rng(0)
    for i in range(a.num_prompts):
        engine.add(Request(i, None, rng.integers(100, 1000, a.input_len).tolist(), params))
    for _ in range(a.warmup_steps):
        engine.step()
    before = engine.stats()
    rows = []
    for _ in range(a.steps):
        engine.step()
        rows.append(sum(len(p) for p in sched.running))
    after = engine.stats()
    delta = {k: after[k] - before[k] for k in ("num_steps", "wall_seconds", "host_seconds", "device_seconds")}
    return {"async_scheduling": async_scheduling,
            **step_times(delta["wall_seconds"], delta["host_seconds"], delta["device_seconds"], delta["num_steps"]),
            "steps_found_ready": after["steps_found_ready"] - before["steps_found_ready"],
            "mean_running_sequences": float(np.mean(rows))}


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
    ap.add_argument("--device-ms", type=float, default=25.0, help="the stand-in device step's duration")
    ap.add_argument("--warmup-steps", type=int, default=300)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    rows = [run(a, False), run(a, True)]
    res = {"rows": rows, "args": vars(a)}
    print(f"{'async':>6} {'wall ms/step':>13} {'host ms/step':>13} {'device ms/step':>15} {'device idle':>12}")
    for r in rows:
        print(f"{str(r['async_scheduling']):>6} {r['wall_ms_per_step']:13.2f} {r['host_ms_per_step']:13.2f} "
              f"{r['device_ms_per_step']:15.2f} {r['device_idle_share']:12.1%}")
    print(f"{rows[0]['mean_running_sequences']:.0f} running sequences on {a.replicas} replicas, "
          f"stand-in device step {a.device_ms} ms")
    if a.out:
        write_result(a.out, res)


if __name__ == "__main__":
    main()
