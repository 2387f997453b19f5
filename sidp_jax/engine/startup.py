"""Engine start-up: place the weights, size the KV cache from free memory, build runner and scheduler."""

from __future__ import annotations

import logging

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
from sidp_jax.parallel.capacity import dp_comparison_line, weight_bytes_per_gpu
from sidp_jax.pool.policy import ModePolicy
from sidp_jax.engine.ffn_calibration import calibrated_crossover
from sidp_jax.engine.replica_runner import replica_was_extra_bytes, uses_replica_was

CPU_DEFAULT_KV_TOKENS = 32768  # per replica, where the device reports no memory (CPU)


def check_weights_fit(llm, utilization: float) -> None:
    """Fail early, with the numbers, when a layout's weights alone exceed the memory budget."""
    lay = llm.layout
    mem = device_memory(lay.mesh.devices.flat[0])
    if mem is None:
        return
    need = weight_bytes_per_gpu(llm.cfg, lay.parallel, lay.num_replicas, lay.tp, lay.placement, llm.dtype,
                                include_buffer=lay.pooled)
    budget = mem["total"] * utilization
    if need > budget:
        raise MemoryError(
            f"parallel={lay.parallel} on mesh dp={lay.num_replicas},tp={lay.tp} needs {need / 1e9:.1f} GB of weights "
            f"per GPU, more than gpu_memory_utilization={utilization} of {mem['total'] / 1e9:.1f} GB allows "
            f"({budget / 1e9:.1f} GB): use parallel='sidp' or 'tp', more GPUs, or a higher utilization")


def place_params(llm, seed: int) -> dict:
    shardings = llm.layout.param_shardings(llm.cfg)
    if isinstance(llm.model, ModelConfig) or llm.model in PRESETS:  # random weights, like vLLM's dummy load
        return init_params(llm.layout.stored_specs(llm.cfg), jax.random.key(seed), llm.dtype, shardings)
    if is_placed_checkpoint(llm.model):
        return restore_placed(llm.model, llm.cfg, llm.layout, llm.dtype)
    return load_params(llm.model, llm.cfg, llm.dtype, llm.layout)


def _step_temp_bytes(runner: ModelRunner, mode: str, max_tokens: int, max_rows: int, max_pages: int) -> int:
    """Temporaries of the largest step variant, from XLA's memory analysis of its compilation.

    That is a mixed step (on the reference attention: its gathered K/V; or on the kernels):
    decode-only steps have at most as many tokens and run the decode kernel or the reference."""
    batch, samp = runner.abstract_inputs(max_tokens, max_rows, max_pages, decode_only=False)
    fn = runner.step_fn(mode, SamplerFlags())
    return compiled_temp_bytes(fn.lower(runner.params, runner.kv, runner.counts, batch, samp).compile())


def build_runner(llm, config: EngineConfig):
    cfg, layout = llm.cfg, llm.layout
    ffn_mode, utilization, page_size, seed = (config.ffn_mode, config.gpu_memory_utilization, config.kv_block_size,
                                              config.seed)
    max_num_seqs, max_num_batched_tokens = config.max_num_seqs, config.max_num_batched_tokens
    kv_cache_tokens, crossover_tokens = config.kv_cache_tokens, config.ffn_crossover_tokens
    attention, was_runner, was_prefetch_depth = config.attention, config.was_runner, config.was_prefetch_depth
    replicas = uses_replica_was(layout, was_runner)
    check_weights_fit(llm, utilization)
    params = place_params(llm, seed)
    fixed = "local" if not layout.pooled else None if ffn_mode == "auto" else ffn_mode
    modes = ["was", "cas"] if fixed is None else [fixed]
    crossover_source = "given" if crossover_tokens is not None else "cost model defaults"
    if fixed is None and crossover_tokens is None and layout.platform == "gpu":
        crossover_tokens, crossover_source = calibrated_crossover(layout, cfg, llm.dtype, replicas,  # before KV
                                                                  config.cache_dir)
    if fixed is None and crossover_tokens is not None:  # size the KV only for modes auto can pick
        if crossover_tokens > max_num_batched_tokens:
            modes = ["cas"]
        elif crossover_tokens <= 1:
            modes = ["was"]
    page_bytes = kv_bytes_per_page(cfg, layout, page_size, llm.kv_dtype)
    max_pages = -(-llm.max_model_len // page_size)
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
            probe = ModelRunner(cfg, layout, params, num_pages=2, page_size=page_size, kv_dtype=llm.kv_dtype,
                                was_runner="spmd")
            T = mixed_tokens(max_num_batched_tokens, max_num_batched_tokens)
            shape = (T, mixed_rows(T, max_num_seqs), bucket(max_pages, 4, max_pages))
            # per-replica WaS: the attention as in a CaS step, plus the FFN buffers
            spmd_modes = {"cas" if replicas and mode == "was" else mode for mode in modes}
            temps = {mode: _step_temp_bytes(probe, mode, *shape) for mode in spmd_modes}
            del probe
            if replicas and "was" in modes:
                extra = replica_was_extra_bytes(cfg, layout.num_replicas, shape[0], llm.dtype, was_prefetch_depth)
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
    runner = ModelRunner(cfg, layout, params, num_pages=num_pages, page_size=page_size, kv_dtype=llm.kv_dtype,
                         attention=attention, was_runner=was_runner, was_prefetch_depth=was_prefetch_depth,
                         token_buffer_width=token_buffer_width(max_num_batched_tokens, max_num_seqs),
                         max_num_seqs=max_num_seqs)

    scheduler = Scheduler(layout.num_replicas, num_pages, page_size, max_num_seqs, max_num_batched_tokens,
                          enable_prefix_caching=config.enable_prefix_caching)
    policy = ModePolicy(fixed=fixed, num_replicas=layout.num_replicas,
                        hidden=cfg.hidden_size, intermediate=cfg.intermediate_size, placement=layout.placement,
                        crossover_tokens=crossover_tokens)
    info = {"tokens_per_replica": scheduler.blocks[0].capacity_tokens, "num_pages": num_pages, "page_size": page_size,
            "kv_bytes_per_page_per_device": page_bytes, "kv_sizing": source,
            "mode_crossover_tokens": policy.crossover, "ffn_mode": ffn_mode, "crossover_source": crossover_source,
            "attention": attention, "attention_kernels": runner.kernels,
            "was_runner": "replicas" if replicas else "spmd", "step_modes": modes}
    return runner, scheduler, policy, info


def precompile_steps(llm, enabled: bool | None, max_num_batched_tokens: int, max_num_seqs: int,
                     workers: int = 1) -> float | None:
    """Compile every step variant at start-up. enabled None: on GPUs, where one
    variant of a 64-80 layer program takes 10-20 s to compile (a run would otherwise stall on each
    new batch size); with the persistent compilation cache a rerun loads them instead. Only on the
    kernel path, whose block tables are always full width, so the shapes are known up front."""
    runner = llm.engine.runner
    if enabled is None:
        enabled = llm.layout.platform != "cpu"
    if not enabled or not runner.tile_tokens:
        return None
    try:
        return runner.precompile(llm.kv_info["step_modes"], step_shapes(max_num_batched_tokens, max_num_seqs),
                                 llm.engine.max_pages, workers, progress=llm.verbose)
    except Exception as e:  # never fatal: every variant still compiles on first use
        logging.getLogger("sidp_jax").warning("precompiling the step variants failed (%s: %s); each compiles "
                                              "on first use instead", type(e).__name__, e)
        return None


def report_kv(llm, info: dict) -> str:
    lay = llm.layout
    conc = info["tokens_per_replica"] / llm.max_model_len
    lines = [f"[sidp_jax] {lay.parallel} on mesh dp={lay.num_replicas},tp={lay.tp}: KV cache "
             f"{info['tokens_per_replica']:,} tokens per replica ({info['kv_sizing']}); "
             f"max concurrency {conc:.2f}x at max_model_len {llm.max_model_len}"]
    if lay.parallel == "sidp" and lay.pooled:
        per_token = info["kv_bytes_per_page_per_device"] / info["page_size"]
        lines.append("[sidp_jax] " + dp_comparison_line(llm.cfg, lay.parallel, lay.num_replicas, lay.tp,
                                                        lay.placement, info["tokens_per_replica"], per_token,
                                                        llm.dtype))
        lines.append(f"[sidp_jax] ffn_mode: {info['ffn_mode']} (WaS from {info['mode_crossover_tokens']} "
                     f"tokens per replica step; {info['crossover_source']})")
    return "\n".join(lines)
