"""Weight-as-a-Service by per-replica programs: the paper's independent replicas.

Inside one SPMD program XLA hides little of the weight fetch behind compute (0.16-0.30 overlap
efficiency for an all-gather in the layer scan on 2x H200, benchmarks/RESULTS.md) and keeps
gathered layers alive far beyond a double buffer. Here each replica instead runs its own
jitted calls per layer (attention, then FFN), and the next layer's remote FFN slices arrive by
asynchronous cross-device `device_put` (copy engines, no SMs) while the current layer computes:
0.93 overlap efficiency in the same benchmark.

Striped placement: device s holds the 1/D slice s of every layer's FFN (intermediate axis). For
layer l+1 each device cuts its slice out of its stacked pool (one on-device copy) and copies it
to every peer; replica r then runs its FFN as the sum over the D slices (no concatenation), so
each device holds at most two layers' slices in flight: the double buffer. A replica without
tokens in a step runs nothing, but still serves its slices (dummy skipping).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from sidp_jax.capacity import ffn_layer_bytes
from sidp_jax.models.decoder import attention_residual, embed, ffn_input, head_logits
from sidp_jax.sampler import SamplerFlags, sample


WAS_RUNNERS = ("auto", "replicas", "spmd")


def uses_replica_was(layout, was_runner: str) -> bool:
    """auto: per-replica WaS wherever it applies (pooled striped FFN, one GPU per replica)."""
    if was_runner not in WAS_RUNNERS:
        raise ValueError(f"was_runner must be one of {WAS_RUNNERS}, got {was_runner!r}")
    supported = layout.pooled and layout.placement == "striped" and layout.tp == 1
    if was_runner == "replicas" and not supported:
        raise ValueError("was_runner='replicas' needs parallel='sidp', placement='striped', tp=1 and dp > 1")
    return supported and was_runner != "spmd"


def replica_was_extra_bytes(cfg, num_replicas: int, max_tokens: int, dtype) -> int:
    """Memory a per-replica WaS step needs beyond a step's attention temporaries: two layers'
    FFN slices in flight (fetched + cut for peers) and the float32 gate/up activations."""
    layer = ffn_layer_bytes(cfg, dtype)
    del num_replicas  # the slices' activations may all be live at once: count the whole width
    return 2 * layer + max_tokens * 2 * cfg.intermediate_size * 4


def shard_on(array: jax.Array, device) -> jax.Array:
    """The single-device array behind `array` on `device` (no copy)."""
    return next(s.data for s in array.addressable_shards if s.device == device)


def sliced_ffn(x: jax.Array, slices: list[dict]) -> jax.Array:
    """SwiGLU over an FFN split along its intermediate axis: the sum of each slice's part."""
    out = None
    for w in slices:
        gu = jnp.einsum("th,hci->tci", x, w["gate_up"], preferred_element_type=jnp.float32)
        h = (jax.nn.silu(gu[:, 0]) * gu[:, 1]).astype(x.dtype)
        part = jnp.einsum("ti,ih->th", h, w["down"], preferred_element_type=jnp.float32)
        out = part if out is None else out + part
    return out.astype(x.dtype)


def _row(tree, layer):
    return jax.tree.map(lambda a: jax.lax.dynamic_index_in_dim(a, layer, keepdims=False), tree)


_cut = jax.jit(_row)  # a layer's slice out of a device's stacked pool (one on-device copy)


class FfnFetcher:
    """Per-layer slices of the striped FFN pool, prefetched one layer ahead to every replica."""

    def __init__(self, pools: list[dict], devices: list):
        self.pools, self.devices = pools, devices
        self._next: dict[int, list[list]] = {}

    def prefetch(self, layer: int, receivers: list[int]) -> None:
        cuts = [_cut(pool, layer) for pool in self.pools]  # each on its own device
        self._next[layer] = [[jax.device_put(cuts[s], self.devices[r]) for s in range(len(cuts)) if s != r]
                             if r in receivers else [] for r in range(len(self.devices))]

    def take(self, layer: int, replica: int) -> list:
        return self._next[layer][replica]

    def drop(self, layer: int) -> None:
        self._next.pop(layer, None)


def ffn_chain_seconds(layout, pool: dict, x: jax.Array, num_layers: int) -> float:
    """Seconds per layer of WaS FFN layers run this way (for the mode calibration)."""
    from sidp_jax.timing import median_seconds

    devices = list(layout.mesh.devices[:, 0])
    pools = [jax.tree.map(lambda a, d=d: shard_on(a, d), pool) for d in devices]
    xs = [shard_on(x, d) for d in devices]
    fetcher = FfnFetcher(pools, devices)
    ffn = jax.jit(lambda h, layer, own, fetched: h + sliced_ffn(h, [_row(own, layer), *fetched]))
    everyone = list(range(len(devices)))

    def chain():
        hs = list(xs)
        fetcher.prefetch(0, everyone)
        for layer in range(num_layers):
            if layer + 1 < num_layers:
                fetcher.prefetch(layer + 1, everyone)
            hs = [ffn(hs[r], layer, pools[r], fetcher.take(layer, r)) for r in everyone]
            fetcher.drop(layer)
        return hs

    return median_seconds(chain, reps=3) / num_layers


class ReplicaWaS:
    """Runs a WaS step as D independent per-replica programs (striped sidp layout, tp == 1)."""

    def __init__(self, cfg, layout, params: dict, kv_sharding, attn_fn_for):
        """attn_fn_for(kind, batch): the attention a step of that kind runs (ModelRunner._attn_fn)."""
        assert layout.placement == "striped" and layout.tp == 1 and layout.pooled
        self.cfg, self.kv_sharding, self.attn_fn_for = cfg, kv_sharding, attn_fn_for
        self.devices = list(layout.mesh.devices[:, 0])
        self.local = [jax.tree.map(lambda a, d=d: shard_on(a, d), params) for d in self.devices]
        self.fetcher = FfnFetcher([p["ffn"] for p in self.local], self.devices)
        self._embed = jax.jit(lambda p, b: embed(cfg, p, b))
        self._attn = jax.jit(self._attention, donate_argnums=(2,), static_argnums=(7,))
        self._ffn = jax.jit(lambda h, w_layers, layer, pool, fetched: h + sliced_ffn(
            ffn_input(cfg, _row(w_layers, layer), h), [_row(pool, layer), *fetched]))
        self._head = jax.jit(lambda p, x, b, s, flags: sample(head_logits(cfg, p, x, b), s, flags),
                             static_argnums=(4,))

    def _attention(self, w_layers, h, kv, layer, batch, cos, sin, attn: str):
        kv = jax.tree.map(lambda a: a[0], kv)
        h, kv = attention_residual(self.cfg, _row(w_layers, layer), h, kv, layer, batch, cos, sin,
                                   self.attn_fn_for(attn, batch), None, jnp.bool_(True))
        return h, jax.tree.map(lambda a: a[None], kv)

    def run(self, kv: dict, batch: dict, samp: dict, flags: SamplerFlags, attn: str = "reference"):
        """kv: the global cache; batch/samp: numpy [D, ...]; attn: the step's attention kind
        (ModelRunner.attention_kind). Returns (outputs [D, ...], kv)."""
        D, L = len(self.devices), self.cfg.num_layers
        active = [r for r in range(D) if batch["num_tokens"][r] > 0]
        kvs = [{k: shard_on(v, d) for k, v in kv.items()} for d in self.devices]
        state = {}
        for r in active:
            b = jax.device_put({k: v[r] for k, v in batch.items()}, self.devices[r])
            x, cos, sin = self._embed(self.local[r], b)
            state[r] = [x, b, cos, sin]
        self.fetcher.prefetch(0, active)
        for layer in range(L):
            if layer + 1 < L:
                self.fetcher.prefetch(layer + 1, active)  # lands while this layer computes
            for r in active:
                x, b, cos, sin = state[r]
                x, kvs[r] = self._attn(self.local[r]["layers"], x, kvs[r], layer, b, cos, sin, attn)
                state[r][0] = self._ffn(x, self.local[r]["layers"], layer, self.local[r]["ffn"],
                                        self.fetcher.take(layer, r))
            self.fetcher.drop(layer)
        outs = {}
        for r in active:
            x, b, _, _ = state[r]
            s = jax.device_put({k: v[r] for k, v in samp.items()}, self.devices[r])
            outs[r] = jax.device_get(self._head(self.local[r], x, b, s, flags))
        kv = {k: jax.make_array_from_single_device_arrays(kv[k].shape, self.kv_sharding, [c[k] for c in kvs])
              for k in kv}
        template = next(iter(outs.values()))
        stacked = {k: np.stack([outs[r][k] if r in outs else np.zeros_like(v) for r in range(D)])
                   for k, v in template.items()}
        return stacked, kv
