"""Engine start-up: place the weights, size the KV cache from free memory, build runner and scheduler.

`LLM` decides once what to run (an `EngineSpec`: model, layout, dtypes, limits, settings) and
start-up returns what it built (`Started`: the runner, the scheduler, the FFN mode policy and
`KvInfo`), so neither reads nor patches the other's attributes.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import jax

from sidp_jax.engine.memory import compiled_temp_bytes, device_memory, free_bytes_for_kv
from sidp_jax.engine.model_runner import ModelRunner, kv_bytes_per_page
from sidp_jax.engine.penalty_counts import counts_bytes
from sidp_jax.engine.sampler import SamplerFlags
from sidp_jax.engine.scheduler import Scheduler
from sidp_jax.engine.step_inputs import bucket, mixed_rows, mixed_tokens, step_shapes, token_buffer_width
from sidp_jax.engine_config import EngineConfig
from sidp_jax.loading.checkpoint import load_params
from sidp_jax.loading.placed_checkpoint import is_placed_checkpoint, restore_placed
from sidp_jax.models.config import PRESETS, ModelConfig
from sidp_jax.models.params import init_params
from sidp_jax.models.registry import ffn_group
from sidp_jax.parallel.layouts import Layout, dp_comparison_line
from sidp_jax.pool.policy import ModePolicy
from sidp_jax.engine.ffn_calibration import calibrated_crossover
from sidp_jax.engine.replica_runner import replica_was_extra_bytes, uses_replica_was

CPU_DEFAULT_KV_TOKENS = 32768  # per replica, where the device reports no memory (CPU)


@dataclasses.dataclass(frozen=True)
class EngineSpec:
    """What the engine is built from, decided once by LLM."""
    model: Any  # the weights' source: a checkpoint or placed directory, a preset name, or a ModelConfig
    cfg: ModelConfig
    layout: Layout
    dtype: Any  # compute dtype
    kv_dtype: Any
    max_model_len: int
    settings: EngineConfig  # the engine's settings (`cfg` is always the model's ModelConfig)
    verbose: bool = True


@dataclasses.dataclass
class KvInfo:
    """How the KV cache and the step were sized and set up (part of LLM.stats())."""
    tokens_per_replica: int
    num_pages: int
    page_size: int
    kv_bytes_per_page_per_device: int
    kv_sizing: str  # where the size came from
    mode_crossover_tokens: int
    ffn_mode: str
    crossover_source: str
    attention: str
    attention_kernels: str | None
    was_runner: str  # "replicas" or "spmd"
    step_modes: list[str]
    precompile_seconds: float | None = None


@dataclasses.dataclass
class Started:
    runner: ModelRunner
    scheduler: Scheduler
    policy: ModePolicy
    kv: KvInfo


def check_weights_fit(spec: EngineSpec) -> None:
    """Fail early, with the numbers, when a layout's weights alone exceed the memory budget."""
    lay, utilization = spec.layout, spec.settings.gpu_memory_utilization
    mem = device_memory(lay.mesh.devices.flat[0])
    if mem is None:
        return
    need = lay.bytes_per_gpu(spec.cfg, spec.dtype)
    budget = mem["total"] * utilization
    if need > budget:
        raise MemoryError(
            f"parallel={lay.describe()} needs {need / 1e9:.1f} GB of weights "
            f"per GPU, more than gpu_memory_utilization={utilization} of {mem['total'] / 1e9:.1f} GB allows "
            f"({budget / 1e9:.1f} GB): use parallel='sidp' or 'tp', more GPUs, or a higher utilization")


def place_params(spec: EngineSpec) -> dict:
    cfg, layout = spec.cfg, spec.layout
    if isinstance(spec.model, ModelConfig) or spec.model in PRESETS:  # random weights, like vLLM's dummy load
        return init_params(layout.stored_specs(cfg), jax.random.key(spec.settings.seed), spec.dtype,
                           layout.param_shardings(cfg))
    if is_placed_checkpoint(spec.model):
        return restore_placed(spec.model, cfg, layout, spec.dtype)
    return load_params(spec.model, cfg, spec.dtype, layout)


def _step_temp_bytes(runner: ModelRunner, mode: str, max_tokens: int, max_rows: int, max_pages: int) -> int:
    """Temporaries of the largest step variant, from XLA's memory analysis of its compilation.

    That is a mixed step (on the reference attention: its gathered K/V; or on the kernels):
    decode-only steps have at most as many tokens and run the decode kernel or the reference."""
    batch, samp = runner.abstract_inputs(max_tokens, max_rows, max_pages, decode_only=False)
    fn = runner.step_fn(mode, SamplerFlags())
    return compiled_temp_bytes(fn.lower(runner.params, runner.kv, runner.counts, batch, samp).compile())


def _largest_ffn(cfg):
    """The FFN group class of the model's largest layer (what the WaS/CaS cost model prices)."""
    return max((ffn_group(cfg, l) for l in range(cfg.num_layers)), key=lambda g: g.num_params(cfg))


def start(spec: EngineSpec) -> Started:
    """Place the weights, size the KV cache, build the runner, the scheduler and the mode policy."""
    cfg, layout, settings = spec.cfg, spec.layout, spec.settings
    ffn_mode, utilization, page_size = settings.ffn_mode, settings.gpu_memory_utilization, settings.kv_block_size
    max_num_seqs, max_num_batched_tokens = settings.max_num_seqs, settings.max_num_batched_tokens
    kv_cache_tokens, crossover_tokens = settings.kv_cache_tokens, settings.ffn_crossover_tokens
    attention, was_runner, was_prefetch_depth = settings.attention, settings.was_runner, settings.was_prefetch_depth
    replicas = uses_replica_was(layout, was_runner, cfg)
    check_weights_fit(spec)
    params = place_params(spec)
    layout_modes = layout.ffn_modes()
    fixed = layout_modes[0] if len(layout_modes) == 1 else None if ffn_mode == "auto" else ffn_mode
    modes = list(layout_modes) if fixed is None else [fixed]
    crossover_source = "given" if crossover_tokens is not None else "cost model defaults"
    if fixed is None and crossover_tokens is None and layout.platform == "gpu" and not cfg.moe_layers:
        # (a mixture-of-experts model's crossover comes from the cost model: the calibration times dense layers)
        crossover_tokens, crossover_source = calibrated_crossover(layout, cfg, spec.dtype, replicas,  # before KV
                                                                  settings.cache_dir)
    if fixed is None and crossover_tokens is not None:  # size the KV only for modes auto can pick
        if crossover_tokens > max_num_batched_tokens:
            modes = ["cas"]
        elif crossover_tokens <= 1:
            modes = ["was"]
    page_bytes = kv_bytes_per_page(cfg, layout, page_size, spec.kv_dtype)
    max_pages = -(-spec.max_model_len // page_size)
    if kv_cache_tokens is not None:
        num_pages = -(-kv_cache_tokens // page_size) + 1
        source = "kv_cache_tokens"
    else:
        devices = layout.mesh.devices.flatten()
        free = free_bytes_for_kv(devices, utilization, 0)
        if free is None:
            num_pages = CPU_DEFAULT_KV_TOKENS // page_size + 1
            source = "CPU default"
        else:  # compile the largest step on a 2-page cache to learn its temporaries
            probe = ModelRunner(cfg, layout, params, num_pages=2, page_size=page_size, kv_dtype=spec.kv_dtype,
                                was_runner="spmd")
            T = mixed_tokens(max_num_batched_tokens, max_num_batched_tokens)
            shape = (T, mixed_rows(T, max_num_seqs), bucket(max_pages, 4, max_pages))
            # per-replica WaS: the attention as in a CaS step, plus the FFN buffers
            spmd_modes = {"cas" if replicas and mode == "was" else mode for mode in modes}
            temps = {mode: _step_temp_bytes(probe, mode, *shape) for mode in spmd_modes}
            del probe
            if replicas and "was" in modes:
                extra = replica_was_extra_bytes(cfg, layout.num_replicas, shape[0], spec.dtype, was_prefetch_depth)
                temps["was"] = temps["cas"] + extra
            temp = max(temps.values()) + counts_bytes(cfg, max_num_seqs)  # the real runner's penalty counts
            step_temps = {m: round(t / 2**30, 2) for m, t in temps.items() if m in modes}
            free = free_bytes_for_kv(devices, utilization, temp)
            if free < 2 * page_bytes:
                raise MemoryError(f"no room for the KV cache: {free / 2**30:.2f} GiB free per device after weights "
                                  f"and {temp / 2**30:.2f} GiB of step temporaries at gpu_memory_utilization="
                                  f"{utilization}")
            num_pages = free // page_bytes
            source = f"free memory (step temporaries {temp / 2**30:.2f} GiB: {step_temps})"
    runner = ModelRunner(cfg, layout, params, num_pages=num_pages, page_size=page_size, kv_dtype=spec.kv_dtype,
                         attention=attention, was_runner=was_runner, was_prefetch_depth=was_prefetch_depth,
                         token_buffer_width=token_buffer_width(max_num_batched_tokens, max_num_seqs),
                         max_num_seqs=max_num_seqs)

    scheduler = Scheduler(layout.num_replicas, num_pages, page_size, max_num_seqs, max_num_batched_tokens,
                          enable_prefix_caching=settings.enable_prefix_caching)
    largest = _largest_ffn(cfg)
    policy = ModePolicy(fixed=fixed, num_replicas=layout.num_replicas,
                        hidden=cfg.hidden_size, ffn_params=largest.num_params(cfg),
                        active_params=largest.flops_per_token(cfg) // 2, placement=layout.placement,
                        crossover_tokens=crossover_tokens)
    kv = KvInfo(tokens_per_replica=scheduler.blocks[0].capacity_tokens, num_pages=num_pages, page_size=page_size,
                kv_bytes_per_page_per_device=page_bytes, kv_sizing=source, mode_crossover_tokens=policy.crossover,
                ffn_mode=ffn_mode, crossover_source=crossover_source, attention=attention,
                attention_kernels=runner.kernels, was_runner="replicas" if replicas else "spmd", step_modes=modes)
    return Started(runner, scheduler, policy, kv)


def precompile_steps(spec: EngineSpec, started: Started, max_pages: int) -> float | None:
    """Compile every step variant at start-up. EngineConfig.precompile None: on GPUs, where one
    variant of a 64-80 layer program takes long to compile (a run would otherwise stall on each
    new batch size); with the persistent compilation cache a rerun loads them instead. Only on the
    kernel path, whose block tables are always full width, so the shapes are known up front."""
    runner, settings = started.runner, spec.settings
    enabled = settings.precompile if settings.precompile is not None else spec.layout.platform != "cpu"
    if not enabled or not runner.tile_tokens:
        return None
    try:
        return runner.precompile(started.kv.step_modes, step_shapes(settings.max_num_batched_tokens, settings.max_num_seqs),
                                 max_pages, settings.compile_workers, progress=spec.verbose)
    except Exception as e:  # never fatal: every variant still compiles on first use
        logging.getLogger("sidp_jax").warning("precompiling the step variants failed (%s: %s); each compiles "
                                              "on first use instead", type(e).__name__, e)
        return None


def report_kv(spec: EngineSpec, kv: KvInfo, max_model_len: int) -> str:
    lay = spec.layout
    conc = kv.tokens_per_replica / max_model_len
    lines = [f"[sidp_jax] {lay.describe()}: KV cache {kv.tokens_per_replica:,} tokens per replica ({kv.kv_sizing}); "
             f"max concurrency {conc:.2f}x at max_model_len {max_model_len}"]
    if lay.pooled:
        per_token = kv.kv_bytes_per_page_per_device / kv.page_size
        lines.append("[sidp_jax] " + dp_comparison_line(spec.cfg, lay, kv.tokens_per_replica, per_token, spec.dtype))
        lines.append(f"[sidp_jax] ffn_mode: {kv.ffn_mode} (WaS from {kv.mode_crossover_tokens} "
                     f"tokens per replica step; {kv.crossover_source})")
    return "\n".join(lines)
