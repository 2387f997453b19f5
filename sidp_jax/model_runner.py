"""The device side of a step: one SPMD program over the ("dp", "tp") mesh.

Each replica runs `models.decoder.forward` on its own batch row and KV pages under
`jax.shard_map`; the layout decides where weights live and the FFN strategy (sidp_jax.pool)
how a replica reaches pooled FFN weights. Sampling happens in the same program, so only the
sampled token ids (and requested logprobs) come back to the host.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P

from sidp_jax.config import ModelConfig
from sidp_jax.layouts import Layout
from sidp_jax.models.decoder import dense_ffn, forward
from sidp_jax.pool import ffn as pool_ffn
from sidp_jax.sampler import SamplerFlags, sample

KV_SPEC = P("dp", None, None, "tp", None)  # [replica, L*pages, page, kv_heads, head_dim]


def kv_bytes_per_page(cfg: ModelConfig, layout: Layout, page_size: int, dtype) -> int:
    """Bytes one page takes on one device (kv heads split over tp)."""
    return 2 * cfg.num_layers * page_size * (cfg.num_kv_heads // layout.tp) * cfg.head_dim * jnp.dtype(dtype).itemsize


class ModelRunner:
    def __init__(self, cfg: ModelConfig, layout: Layout, params: dict, *, num_pages: int, page_size: int,
                 kv_dtype):
        self.cfg, self.layout, self.params = cfg, layout, params
        self.num_pages, self.page_size = num_pages, page_size
        self.kv_sharding = NamedSharding(layout.mesh, KV_SPEC)
        self.batch_sharding = NamedSharding(layout.mesh, P("dp"))
        shape = (layout.num_replicas, cfg.num_layers * num_pages, page_size, cfg.num_kv_heads, cfg.head_dim)
        zeros = jax.jit(lambda: jnp.zeros(shape, kv_dtype), out_shardings=self.kv_sharding)
        self.kv = {"k": zeros(), "v": zeros()}
        self._steps: dict = {}

    def _ffn(self, mode: str, local_params: dict):
        """(ffn_fn, ffn_in_scan) for this layout and mode ("local" where the FFN is not pooled)."""
        lay = self.layout
        if not lay.pooled:
            return dense_ffn, True
        if lay.placement == "striped":
            return {"was": pool_ffn.striped_was, "cas": pool_ffn.striped_cas}[mode], True
        return pool_ffn.make_owner_ffns(local_params["ffn"], lay.num_replicas)[mode], False

    def _build(self, mode: str, flags: SamplerFlags):
        cfg, lay = self.cfg, self.layout
        tp_axis = "tp" if lay.tp > 1 else None

        def local(params, kv, batch, samp):
            squeeze = functools.partial(jax.tree.map, lambda a: a[0])
            kv, batch, samp = squeeze(kv), squeeze(batch), squeeze(samp)
            ffn_fn, in_scan = self._ffn(mode, params)
            logits, kv = forward(cfg, params, kv, batch, ffn_fn=ffn_fn, tp_axis=tp_axis, ffn_in_scan=in_scan)
            out = sample(logits, samp, flags)
            expand = functools.partial(jax.tree.map, lambda a: a[None])
            return expand(out), expand(kv)

        kv_specs = {"k": KV_SPEC, "v": KV_SPEC}
        stepped = jax.shard_map(local, mesh=lay.mesh, in_specs=(lay.param_pspecs(cfg), kv_specs, P("dp"), P("dp")),
                                out_specs=(P("dp"), kv_specs), check_vma=False)
        return jax.jit(stepped, donate_argnums=(1,))

    def step_fn(self, mode: str, flags: SamplerFlags):
        key = (mode, flags)
        if key not in self._steps:
            self._steps[key] = self._build(mode, flags)
        return self._steps[key]

    def run(self, batch: dict, samp: dict, flags: SamplerFlags, mode: str = "local") -> dict:
        """Run one step; returns numpy arrays [D, S, ...] of sampled tokens and logprobs."""
        batch, samp = jax.device_put((batch, samp), self.batch_sharding)
        out, self.kv = self.step_fn(mode, flags)(self.params, self.kv, batch, samp)
        return jax.device_get(out)
