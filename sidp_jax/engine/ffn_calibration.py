"""Measure where WaS starts to beat CaS on this machine, once, and cache it.

Rather than trusting a model of link bandwidth and overlap, time the engine's own FFN strategies
(the layout's, sidp_jax/pool/ffn.py) on a few layers of the model's real shape at a few tokens-per-replica sizes,
and take the crossover from the timings. Cached per (device kind, mesh, placement, shape) under
the engine's cache directory (EngineConfig.cache_dir). Runs on GPUs only; elsewhere the cost model's defaults.
"""

from __future__ import annotations

import json
import logging
import os

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P

from sidp_jax.engine.timing import median_seconds
from sidp_jax.engine_config import cache_root
from sidp_jax.models.params import init_params
from sidp_jax.engine.replica_runner import ffn_chain_seconds

log = logging.getLogger("sidp_jax")
TOKENS = (128, 512, 2048, 8192)
LAYERS = 4


def _cache_path(layout, cfg, dtype, replicas: bool, cache_dir: str | None) -> str:
    root = cache_root(cache_dir)
    kind = layout.mesh.devices.flat[0].device_kind.replace(" ", "_")
    name = (f"crossover-{kind}-dp{layout.num_replicas}-tp{layout.tp}-{layout.placement}-"
            f"{cfg.hidden_size}x{cfg.intermediate_size}-{jnp.dtype(dtype).name}{'-fp8' if cfg.quantization else ''}"
            f"{'-replicas' if replicas else ''}.json")
    return os.path.join(root, name)


def measure(layout, cfg, dtype, replicas: bool = False) -> dict:
    """Seconds per FFN layer for each mode at each size in TOKENS (tokens per replica), on LAYERS
    layers of the model's FFN shape stored as the layout stores them and walked in a Python loop."""
    mesh, D, H = layout.mesh, layout.num_replicas, cfg.hidden_size
    owner = layout.ffn_storage(cfg) is not None  # groups of D layers stacked over "dp"
    L = -(-LAYERS // D) * D  # owner: whole groups (which layer sits where does not matter here)
    specs, pspecs = layout.stored_specs(cfg), layout.partition_specs(cfg)
    if owner:
        leaf_specs, w_spec, n = specs["ffn_groups"][0], pspecs["ffn_groups"][0], L // D
    else:
        leaf_specs, w_spec, n = specs["layers"][0]["ffn"], pspecs["layers"][0]["ffn"], L
    shardings = jax.tree.map(lambda p: NamedSharding(mesh, p), w_spec)
    # the model's FFN leaves as the layout stores them (FP8 ones too), n distinct copies
    ws = [init_params(leaf_specs, jax.random.key(i), dtype, shardings) for i in range(n)]
    tp_axis = "tp" if layout.tp > 1 else None

    def body(mode):
        fn = layout.ffn_strategy(cfg, mode)

        def local(x, ws):
            for l in range(L):
                # owner: layer l's root is l mod D; striped: every copy is stored as layer 0's group
                f = fn(x, l, ws[l // D]) if owner else fn(x, 0, ws[l])
                x = x + (jax.lax.psum(f, tp_axis) if tp_axis else f)
            return x
        return jax.jit(jax.shard_map(local, mesh=mesh, in_specs=(P("dp"), [w_spec] * n), out_specs=P("dp"),
                                     check_vma=False))

    fns = {m: body(m) for m in ("was", "cas")}
    result = {}
    for T in TOKENS:
        x = jax.device_put(jnp.ones((D * T, H), dtype), NamedSharding(mesh, P("dp")))
        result[T] = {m: median_seconds(fns[m], x, ws, reps=3) / L for m in fns}
        if replicas:  # the engine runs WaS as per-replica programs: time that instead
            result[T]["was"] = ffn_chain_seconds(layout, ws, x)
    return result


def crossover_from(timings: dict) -> int:
    """Smallest measured size where WaS is faster (geometric midpoint to the last CaS win)."""
    sizes = sorted(int(t) for t in timings)
    prev = None
    for t in sizes:
        row = timings[t] if t in timings else timings[str(t)]
        if row["was"] < row["cas"]:
            return t if prev is None else int((prev * t) ** 0.5)
        prev = t
    return 1 << 30  # WaS never won: always CaS


def calibrated_crossover(layout, cfg, dtype, replicas: bool = False, cache_dir: str | None = None) -> tuple[int, str]:
    """(crossover tokens, where it came from); measures and caches on GPUs.
    replicas: WaS runs as per-replica programs (sidp_jax/engine/replica_runner.py), not in the SPMD
    step; cache_dir: EngineConfig.cache_dir."""
    path = _cache_path(layout, cfg, dtype, replicas, cache_dir)
    if os.path.isfile(path):
        with open(path) as f:
            data = json.load(f)
        return data["crossover"], f"cached calibration {path}"
    timings = measure(layout, cfg, dtype, replicas)
    crossover = crossover_from(timings)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump({"crossover": crossover, "seconds_per_layer": timings}, f, indent=1)
    summary = ", ".join(f"T={t}: was {1e3 * r['was']:.2f} / cas {1e3 * r['cas']:.2f} ms" for t, r in timings.items())
    return crossover, f"measured now ({summary}); cached in {path}"
