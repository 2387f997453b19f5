"""Wall-clock timing of jitted work: medians over repetitions after warm-up calls."""

from __future__ import annotations

import statistics
import time

import jax


def median_seconds(fn, *args, reps: int = 5) -> float:
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def single_and_burst_us(fn, *args, reps: int, burst: int) -> tuple[float, float]:
    """(median us of a call followed by a block, median us per call of `burst` back-to-back calls
    then one block): the second hides the Python dispatch gap between kernel launches."""
    jax.block_until_ready(fn(*args))
    single = median_seconds(fn, *args, reps=reps)
    bursts = []
    for _ in range(max(3, reps // 4)):
        t = time.perf_counter()
        outs = [fn(*args) for _ in range(burst)]
        jax.block_until_ready(outs)
        bursts.append((time.perf_counter() - t) / burst)
    return single * 1e6, statistics.median(bursts) * 1e6
