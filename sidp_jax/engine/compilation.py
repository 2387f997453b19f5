"""How the engine's programs are compiled: XLA options for its steps, and a persistent cache.

GEMMs as library calls: on GPU the step is compiled with XLA's Triton GEMM emitter off, so every
projection is one cuBLAS call reading its weight in place (4 per layer). With it on, XLA fused
half of them into other kernels and a Qwen3-32B decode step at batch 64 took 25.5 ms instead of
23.7 (benchmarks/RESULTS.md). `SIDP_JAX_TRITON_GEMM=on` keeps XLA's default.

The cache: JAX's persistent compilation cache (and with it XLA's GPU autotune cache) under
~/.cache/sidp_jax.

A step of a 64-80 layer model is one unrolled program: its first compile takes long, so a rerun
or a resumed job loads the executables instead of compiling again. JAX also keeps the per-fusion
autotune results beside them (`jax_persistent_cache_enable_xla_caches`). On by default on GPUs;
`SIDP_JAX_COMPILE_CACHE=off` turns it off, `SIDP_JAX_CACHE` moves it, and a cache directory the
user configured for JAX is left as it is. CPU compiles are quick: no cache there unless
`SIDP_JAX_COMPILE_CACHE=on`.
"""

from __future__ import annotations

import os

import jax


def cache_root() -> str:
    return os.environ.get("SIDP_JAX_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "sidp_jax"))


def enable_compile_cache(backend: str) -> str | None:
    """Point JAX's compilation cache at ~/.cache/sidp_jax/jax (must run before the first compile
    of the process to take effect); returns the directory in use, or None."""
    setting = os.environ.get("SIDP_JAX_COMPILE_CACHE", "auto").lower()
    if setting in ("off", "0", "false") or (setting == "auto" and backend == "cpu"):
        return jax.config.jax_compilation_cache_dir
    if jax.config.jax_compilation_cache_dir:
        return jax.config.jax_compilation_cache_dir
    path = os.path.join(cache_root(), "jax")
    os.makedirs(path, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
    return path


def step_compiler_options(backend: str) -> dict | None:
    """compiler_options for jax.jit of the engine's step programs on `backend`."""
    if backend != "gpu" or os.environ.get("SIDP_JAX_TRITON_GEMM", "off").lower() in ("on", "1", "true"):
        return None
    return {"xla_gpu_enable_triton_gemm": False}
