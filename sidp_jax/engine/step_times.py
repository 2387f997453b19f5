"""Per-step time figures from summed seconds: what stats(), the benchmarks' windows and the Ray
job's combined stats report (no jax here: the Ray driver imports it)."""

from __future__ import annotations


def step_times(wall_s: float, host_s: float, device_s: float, steps: int) -> dict:
    """Wall, host and device ms per step over `steps` steps, and the devices' idle share of the
    wall time (Engine.stats says how each is measured)."""
    steps = max(steps, 1)
    return {"wall_ms_per_step": 1e3 * wall_s / steps, "host_ms_per_step": 1e3 * host_s / steps,
            "device_ms_per_step": 1e3 * device_s / steps,
            "device_idle_share": max(0.0, 1 - device_s / wall_s) if wall_s else 0.0}
