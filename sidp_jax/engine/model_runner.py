"""The device side of a step: one SPMD program over the ("dp", "tp") mesh.

Each replica runs sidp_jax/engine/step.py's stages around `models.decoder.paged_layers` on its own
batch row and KV pages under `jax.shard_map`; the layout decides where weights live and the FFN
strategy (sidp_jax/pool/ffn.py) how a replica reaches pooled FFN weights. Sampling happens in the
same program, so only the sampled token ids (and requested logprobs) come back to the host. WaS
steps of a striped sidp layout instead run as per-replica programs
(sidp_jax/engine/replica_runner.py) on the same KV cache, from the same stages.

Attention: where `attention` allows the Pallas kernels ("auto": on GPU, when their constraints
hold for the model's shapes; "pallas-interpret": interpret mode on any backend, for the CPU tests
only; "reference": never), decode-only steps run the paged decode kernel and mixed steps the
decode + chunk kernels (sidp_jax/kernels/attention.py); otherwise every step runs the pure-JAX
reference. The per-replica WaS path runs the same attention.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import logging
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from sidp_jax.engine.compilation import step_compiler_options
from sidp_jax.engine.penalty_counts import init_arrays, init_lengths, row_counts
from sidp_jax.engine.replica_runner import ReplicaWaS, uses_replica_was
from sidp_jax.engine.sampler import Sampled, SamplerFlags
from sidp_jax.engine.step import step_begin, step_end
from sidp_jax.engine.step_inputs import EDIT_WIDTH, StepInputs, StepShape
from sidp_jax.engine_config import Attention, AttentionKind, KernelPath
from sidp_jax.kernels.attention import DEFAULT_TILE_TOKENS, decode_attention, kernel_unsupported_reason, mixed_attention
from sidp_jax.kernels.paged_attention import paged_attention_reference
from sidp_jax.models.config import ModelConfig
from sidp_jax.models.decoder import paged_layers
from sidp_jax.parallel.layouts import Layout

def kv_bytes_per_page(cfg: ModelConfig, layout: Layout, page_size: int, dtype) -> int:
    """Bytes one page takes on one device (kv heads split over tp)."""
    return 2 * cfg.num_layers * page_size * (cfg.num_kv_heads // layout.tp) * cfg.head_dim * jnp.dtype(dtype).itemsize


class ModelRunner:
    def __init__(self, cfg: ModelConfig, layout: Layout, params: dict, *, num_pages: int, page_size: int,
                 kv_dtype, attention: str = "auto", was_runner: str = "auto", was_prefetch_depth: int = 1,
                 token_buffer_width: int | None = None, max_num_seqs: int = 1):
        """token_buffer_width: rows of the sampled-token array every step returns (batch.
        token_buffer_width), so that the next step can read its tokens on the device whatever its
        shape; None: each step's own rows. max_num_seqs: rows of each replica's penalty counts
        (one per running sequence, plus the scratch row 0)."""
        attention = Attention(attention)  # the choices: sidp_jax/engine_config.py
        self.cfg, self.layout, self.params = cfg, layout, params
        self.num_pages, self.page_size = num_pages, page_size
        self.kv_sharding = NamedSharding(layout.mesh, layout.kv_spec)
        self.batch_sharding = NamedSharding(layout.mesh, P("dp"))
        shape = (layout.num_replicas, cfg.num_layers * num_pages, page_size, cfg.num_kv_heads, cfg.head_dim)
        zeros = jax.jit(lambda: jnp.zeros(shape, kv_dtype), out_shardings=self.kv_sharding)
        self.kv = {"k": zeros(), "v": zeros()}
        counts_shape = (layout.num_replicas, max_num_seqs + 1, cfg.vocab_size)
        self.counts = jax.jit(lambda: jnp.zeros(counts_shape, jnp.int32), out_shardings=self.batch_sharding)()
        self._init_counts = self._build_init_counts()
        self._steps: dict = {}
        self.kernels = self._kernels(attention)
        self.tile_tokens = DEFAULT_TILE_TOKENS if self.kernels else None  # build_step lays out tiles
        self.steps_per_attention: dict[str, int] = {}
        self.first_call_seconds: dict[str, float] = {}  # per step variant: compile (or cache load) + one run
        self._compiled: dict = {}  # (mode, flags, attention, input shapes) -> executable (precompile)
        self.precompiled_steps = 0  # steps that ran a precompiled executable
        self.token_buffer_width = token_buffer_width
        self._no_prev_tokens: dict[int, jax.Array] = {}
        self.replica_was = ReplicaWaS(cfg, layout, params, self.kv_sharding, self._attn_fn, was_prefetch_depth) \
            if uses_replica_was(layout, was_runner, cfg) else None

    def _kernels(self, attention: str):
        """None (reference attention everywhere) or how the Pallas kernels run."""
        if attention == Attention.REFERENCE:
            return None
        reason = kernel_unsupported_reason(self.cfg, self.layout, self.page_size)
        if reason is not None:
            if attention == Attention.AUTO and self.layout.platform == "gpu":
                _warn_once(f"attention kernels off, every step runs the reference attention (which gathers "
                           f"each token's whole context): {reason}")
            return None
        if attention == Attention.PALLAS_INTERPRET:
            return KernelPath.INTERPRET
        return KernelPath.GPU if self.layout.platform == "gpu" else None

    def _attn_fn(self, attn: str, batch: dict):
        """attn_fn of a step whose attention is "decode", "mixed" or "reference"."""
        interpret = self.kernels == KernelPath.INTERPRET
        if attn == AttentionKind.DECODE:
            return functools.partial(decode_attention, interpret=interpret)
        if attn == AttentionKind.MIXED:
            return functools.partial(mixed_attention, decode_len=batch["decode_len"], tiles=batch["tiles"],
                                     tile_tokens=self.tile_tokens, interpret=interpret)
        return paged_attention_reference

    def _ffn(self, mode: str):
        """The FFN strategy of this layout and mode ("local" where the FFN is not pooled)."""
        return self.layout.ffn_strategy(self.cfg, mode)

    def _build(self, mode: str, flags: SamplerFlags, attn: str):
        cfg, lay = self.cfg, self.layout
        tp_axis = "tp" if lay.tp > 1 else None

        def local(params, kv, counts, batch, samp):
            squeeze = functools.partial(jax.tree.map, lambda a: a[0])
            kv, counts, batch, samp = squeeze(kv), squeeze(counts), squeeze(batch), squeeze(samp)
            batch, x, cos, sin = step_begin(cfg, params, batch)
            strategy = self._ffn(mode)
            x, kv = paged_layers(cfg, params, x, cos, sin, kv, batch,
                                 ffn_for=lambda l: (strategy, lay.ffn_weights(params, l)),
                                 attn_fn=self._attn_fn(attn, batch), tp_axis=tp_axis, skip_idle=lay.num_replicas > 1)
            out, counts = step_end(cfg, params, x, batch, samp, counts, flags)
            expand = functools.partial(jax.tree.map, lambda a: a[None])
            return expand(out), expand(kv), expand(counts)

        kv_specs = {"k": lay.kv_spec, "v": lay.kv_spec}
        stepped = jax.shard_map(local, mesh=lay.mesh,
                                in_specs=(lay.partition_specs(cfg), kv_specs, P("dp"), P("dp"), P("dp")),
                                out_specs=(P("dp"), kv_specs, P("dp")), check_vma=False)
        return jax.jit(stepped, donate_argnums=(1, 2), compiler_options=step_compiler_options(lay.platform))

    def _build_init_counts(self):
        """(counts, replica, slot, ids, is_output) -> counts with that replica's row rewritten
        (penalty_counts.row_counts), each replica updating only its own shard's row."""
        def local(counts, replica, slot, ids, is_output):
            mine = jax.lax.axis_index("dp") == replica
            new = row_counts(counts.shape[-1], ids, is_output)
            return counts.at[0, slot].set(jnp.where(mine, new, counts[0, slot]))

        stepped = jax.shard_map(local, mesh=self.layout.mesh, in_specs=(P("dp"), P(), P(), P(), P()),
                                out_specs=P("dp"), check_vma=False)
        return jax.jit(stepped, donate_argnums=(0,))

    def init_penalty_counts(self, replica: int, slot: int, seq) -> None:
        """Write a sequence's row of its replica's penalty counts from its known tokens (dispatched
        asynchronously, before the step that reads it)."""
        ids, is_output = init_arrays(seq)
        self.counts = self._init_counts(self.counts, np.int32(replica), np.int32(slot), ids, is_output)

    def attention_kind(self, decode_only: bool) -> AttentionKind:
        if not self.kernels:
            return AttentionKind.REFERENCE
        return AttentionKind.DECODE if decode_only else AttentionKind.MIXED

    def step_fn(self, mode: str, flags: SamplerFlags, decode_only: bool = False):
        key = (mode, flags, self.attention_kind(decode_only))
        if key not in self._steps:
            self._steps[key] = self._build(*key)
        return self._steps[key]

    def tokens_width(self, S: int) -> int:
        W = self.token_buffer_width or S
        if W < S:
            raise ValueError(f"a step of {S} rows exceeds token_buffer_width {W}")
        return W

    def no_prev_tokens(self, W: int) -> jax.Array:
        """The token buffer of a step that reads none from the previous one: zeros [D, W]."""
        if W not in self._no_prev_tokens:
            self._no_prev_tokens[W] = jax.device_put(np.zeros((self.layout.num_replicas, W), np.int32),
                                                     self.batch_sharding)
        return self._no_prev_tokens[W]

    def dispatch(self, inputs: StepInputs, mode: str = "local", prev_tokens: jax.Array | None = None) -> Sampled:
        """Launch one step and return at once: its outputs on the devices, tokens [D, W] (padded
        to the token buffer width), logprob [D, S] and any top logprobs [D, S, k].

        A token whose `prev_index` is >= 0 is read from that row of `prev_tokens`, the previous
        step's tokens (still on the device: host overlap)."""
        shape, samp, flags = inputs.shape, inputs.sampling, inputs.flags
        if prev_tokens is None:
            prev_tokens = self.no_prev_tokens(self.tokens_width(shape.S))
        batch = dict(inputs.batch, prev_tokens=prev_tokens)
        attn = self.attention_kind(shape.decode_only)
        self.steps_per_attention[attn] = self.steps_per_attention.get(attn, 0) + 1
        variant = f"{mode}/{attn}/T={shape.T}/S={shape.S}/MB={shape.MB}" + _sampler_variant(flags, samp)
        first = variant not in self.first_call_seconds
        t0 = time.perf_counter()
        if mode == "was" and self.replica_was is not None:
            out, self.kv, self.counts = self.replica_was.run(self.kv, self.counts, batch, samp, flags, attn)
        else:
            fn = self._compiled.get((mode, flags, attn, _signature(batch, samp)))
            self.precompiled_steps += fn is not None
            fn = fn or self.step_fn(mode, flags, shape.decode_only)
            batch, samp = jax.device_put((batch, samp), self.batch_sharding)
            out, self.kv, self.counts = fn(self.params, self.kv, self.counts, batch, samp)
        if first:  # waits once per variant, to time its compilation
            jax.block_until_ready(out)
            self.first_call_seconds[variant] = time.perf_counter() - t0
        return out

    def abstract_inputs(self, T: int, S: int, MB: int, decode_only: bool):
        """(batch, samp) ShapeDtypeStructs of a step (default sampling), from StepShape's declaration."""
        shape = StepShape(self.layout.num_replicas, T, S, MB, decode_only, self.tile_tokens)
        batch = shape.abstract(shape.batch_fields(), self.batch_sharding)
        batch["prev_tokens"] = jax.ShapeDtypeStruct((shape.D, self.tokens_width(S)), np.int32,
                                                    sharding=self.batch_sharding)
        return batch, shape.abstract(shape.sampling_fields(), self.batch_sharding)

    def precompile(self, modes: list[str], shapes: list[tuple[bool, int, int]], max_pages: int,
                   workers: int = 1, progress: bool = True) -> float:
        """Compile every SPMD step variant ahead of time, so that no step of the run waits on a
        compile. shapes: batch.step_shapes. workers (EngineConfig.compile_workers): compiles at
        once. One by default: XLA autotunes each GEMM by timing it on the GPU, and
        concurrent compiles would time their candidates against each other. Returns the seconds."""
        t0 = time.perf_counter()
        for L in init_lengths(max_pages * self.page_size):  # the penalty rows' small programs, on scratch row 0
            self.counts = self._init_counts(self.counts, np.int32(0), np.int32(0), np.full(L, -1, np.int32),
                                            np.zeros(L, np.bool_))
        jobs = [(mode, decode_only, T, S) for mode in modes for decode_only, T, S in shapes
                if not (mode == "was" and self.replica_was is not None)]
        if not jobs:
            return time.perf_counter() - t0
        flags = SamplerFlags()

        def compile_one(job):
            mode, decode_only, T, S = job
            attn = self.attention_kind(decode_only)
            batch, samp = self.abstract_inputs(T, S, max_pages, decode_only)
            exe = self.step_fn(mode, flags, decode_only).lower(self.params, self.kv, self.counts, batch, samp).compile()
            return (mode, flags, attn, _signature(batch, samp)), exe

        workers = max(1, min(len(jobs), workers))
        bar = _progress(len(jobs), progress, "Compiling step variants")
        compiled = {}
        try:
            with concurrent.futures.ThreadPoolExecutor(workers) as pool:
                for key, exe in pool.map(compile_one, jobs):
                    compiled[key] = exe
                    bar.update(1)
        finally:
            bar.close()
        self._compiled.update(compiled)  # all or nothing: a failure leaves every variant to jit
        return time.perf_counter() - t0


@functools.lru_cache(maxsize=None)
def _warn_once(message: str) -> None:
    logging.getLogger("sidp_jax").warning(message)


def _sampler_variant(flags: SamplerFlags, samp: dict) -> str:
    """What, beyond the step's shape, makes a separate program: the sampler's static flags and its
    arrays' widths where they differ from what start-up compiles (first_call_seconds' keys)."""
    parts = [f"/{f.name}={getattr(flags, f.name)}" for f in dataclasses.fields(flags)
             if getattr(flags, f.name) != f.default]
    if samp["edit_ids"].shape[-1] != EDIT_WIDTH:
        parts.append(f"/edits={samp['edit_ids'].shape[-1]}")
    return "".join(parts)


def _signature(batch: dict, samp: dict) -> tuple:
    return tuple((k, tuple(v.shape)) for k, v in sorted(batch.items())) + \
        tuple((k, tuple(v.shape)) for k, v in sorted(samp.items()))


def _progress(total: int, enabled: bool, desc: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="variant", disable=not enabled, dynamic_ncols=True)
