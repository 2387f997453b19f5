"""JAX's persistent compilation cache (and with it XLA's GPU autotune cache) under ~/.cache/sidp_jax.

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
