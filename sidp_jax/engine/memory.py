"""KV cache sizing: what is left on each device after weights and the step's temporaries.

usable = device memory x gpu_memory_utilization - bytes already in use (weights, buffers)
         - the compiled step's temporaries; pages = usable / bytes per page.
JAX preallocates XLA_PYTHON_CLIENT_MEM_FRACTION of the device (importing sidp_jax before jax
sets 0.95 unless the user chose); `bytes_limit` / that fraction recovers the device's size.
"""

from __future__ import annotations

import os

from sidp_jax.engine_config import XLA_MEM_FRACTION  # the fraction `import sidp_jax` sets


def device_memory(device) -> dict | None:
    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    if not stats or "bytes_limit" not in stats:
        return None
    fraction = float(os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION", XLA_MEM_FRACTION))
    return {"total": stats["bytes_limit"] / fraction, "limit": stats["bytes_limit"],
            "in_use": stats.get("bytes_in_use", 0)}


def free_bytes_for_kv(devices, utilization: float, step_temp_bytes: int) -> int | None:
    """Smallest over devices of the bytes the KV cache may take; None where unknown (CPU)."""
    free = []
    for d in devices:
        m = device_memory(d)
        if m is None:
            return None
        budget = min(m["total"] * utilization, m["limit"])
        free.append(int(budget - m["in_use"] - step_temp_bytes))
    return min(free)


def compiled_temp_bytes(compiled) -> int:
    try:
        return int(compiled.memory_analysis().temp_size_in_bytes)
    except Exception:  # some backends give no analysis
        return 0
