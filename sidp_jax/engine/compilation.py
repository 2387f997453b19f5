"""How the engine's programs are compiled: XLA options for its steps, and a persistent cache.

GEMMs as library calls: on GPU the step is compiled with XLA's Triton GEMM emitter off, so every
projection is one cuBLAS call reading its weight in place (4 per layer). With it on, XLA fuses
about half of them into other kernels and the decode step is slower (benchmarks/RESULTS.md,
"Decode step against its roofline, bf16").

The cache: JAX's persistent compilation cache (and with it XLA's GPU autotune cache) under the
engine's cache directory (EngineConfig.cache_dir). A step of a 64-80 layer model is one unrolled
program: its first compile takes long, so a rerun or a resumed job loads the executables instead
of compiling again. On by default on GPUs (EngineConfig.compile_cache); a cache directory the user
configured for JAX is left as it is. CPU compiles are quick: no cache there unless asked.
"""

from __future__ import annotations

import os

import jax

from sidp_jax.engine_config import cache_root


def enable_compile_cache(backend: str, enabled: bool | None, cache_dir: str | None) -> str | None:
    """Point JAX's compilation cache at <cache_root>/jax (must run before the first compile of the
    process to take effect). enabled None: on GPUs only. Returns the directory in use, or None."""
    if not (enabled if enabled is not None else backend != "cpu") or jax.config.jax_compilation_cache_dir:
        return jax.config.jax_compilation_cache_dir
    path = os.path.join(cache_root(cache_dir), "jax")
    os.makedirs(path, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
    return path


def step_compiler_options(backend: str) -> dict | None:
    """compiler_options for jax.jit of the engine's step programs on `backend`."""
    return {"xla_gpu_enable_triton_gemm": False} if backend == "gpu" else None
