"""Wall-clock timing of jitted work: median over repetitions after one warm-up call."""

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
