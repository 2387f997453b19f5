"""Weight-as-a-Service by per-replica programs: the paper's independent replicas.

Inside one SPMD program XLA hides little of the weight fetch behind compute and keeps gathered
layers alive far beyond a double buffer (benchmarks/RESULTS.md, "WaS overlap"). Here each replica
instead runs the step's stages (sidp_jax/engine/step.py: begin, then one jitted call per layer,
models.decoder.layer, then end) as its own programs, and the next layer's remote FFN slices
arrive by asynchronous cross-device `device_put` (copy engines, no SMs) while the current layer
computes.

Striped placement: device s holds the 1/D slice s of every layer's FFN (intermediate axis), each
layer its own array. `prefetch_depth` layers ahead, each device copies its slice of that layer
whole to every peer; replica r then runs its FFN as the sum over the D slices (no
concatenation), so each device holds at most depth + 1 layers' slices: with depth 1, the double
buffer. A replica without tokens in a step runs nothing, but still serves its slices (dummy
skipping).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from sidp_jax.engine.compilation import step_compiler_options
from sidp_jax.engine.step import step_begin, step_end
from sidp_jax.engine.timing import median_seconds
from sidp_jax.engine_config import WasRunner
from sidp_jax.models.decoder import layer, paged_attend
from sidp_jax.models.ffn import DenseFfn
from sidp_jax.parallel.capacity import ffn_layer_bytes


def uses_replica_was(layout, was_runner: str, cfg) -> bool:
    """auto: per-replica WaS wherever it applies (pooled striped dense FFN, one GPU per replica;
    a mixture-of-experts model's WaS runs as one SPMD program that gathers the experts)."""
    was_runner = WasRunner(was_runner)  # the choices: sidp_jax/engine_config.py
    if was_runner == "replicas" and cfg.moe_layers:
        raise ValueError("was_runner='replicas' does not fetch experts yet: a mixture-of-experts model's WaS "
                         "runs as one SPMD program (was_runner='spmd' or 'auto')")
    supported = layout.replica_runner_applies and not cfg.moe_layers
    if was_runner == "replicas" and not supported:
        raise ValueError("was_runner='replicas' needs parallel='sidp', placement='striped', tp=1 and dp > 1")
    return supported and was_runner != "spmd"


def replica_was_extra_bytes(cfg, num_replicas: int, max_tokens: int, dtype, prefetch_depth: int = 1) -> int:
    """Memory a per-replica WaS step needs beyond a step's attention temporaries: the layers'
    FFN slices in flight (the one in use and `prefetch_depth` ahead) and the gate/up activations."""
    del num_replicas  # the slices' activations may all be live at once: count the whole width
    return (prefetch_depth + 1) * ffn_layer_bytes(cfg, dtype) + max_tokens * 2 * cfg.intermediate_size * 4


def shard_on(array: jax.Array, device) -> jax.Array:
    """The single-device array behind `array` on `device` (no copy)."""
    return next(s.data for s in array.addressable_shards if s.device == device)


def sliced_ffn(x: jax.Array, slices: list[dict]) -> jax.Array:
    """A dense FFN group (models/ffn.py DenseFfn) split along its intermediate axis: the sum of
    each slice's part (FP8: each token's activation scale taken over all slices, as a whole-FFN
    layout takes it)."""
    hs = [DenseFfn.hidden(x, w) for w in slices]
    row_max = functools.reduce(jnp.maximum, [jnp.max(jnp.abs(h.astype(jnp.float32)), axis=1) for h in hs])
    out = sum(DenseFfn.down_proj(h, w, reduce_amax=lambda _: row_max) for h, w in zip(hs, slices))
    return out.astype(x.dtype)


class FfnFetcher:
    """Per-layer slices of the striped FFN pool, copied `depth` layers ahead to every replica.

    slices[s][l]: device s's own slice of layer l (whole single-device arrays: nothing is cut)."""

    def __init__(self, slices: list[list[dict]], devices: list, depth: int = 1):
        if depth < 1:
            raise ValueError(f"prefetch depth must be at least 1, got {depth}")
        self.slices, self.devices, self.depth = slices, devices, depth
        self.num_layers = len(slices[0])
        self._next: dict[int, list[list]] = {}

    def prefetch(self, layer: int, receivers: list[int]) -> None:
        if layer >= self.num_layers or layer in self._next:
            return
        D = len(self.devices)
        self._next[layer] = [[jax.device_put(self.slices[s][layer], self.devices[r]) for s in range(D) if s != r]
                             if r in receivers else [] for r in range(D)]

    def start(self, receivers: list[int]) -> None:
        for l in range(self.depth):
            self.prefetch(l, receivers)

    def advance(self, layer: int, receivers: list[int]) -> None:
        """Layer `layer` is about to run: keep `depth` layers in flight beyond it."""
        self.prefetch(layer + self.depth, receivers)

    def take(self, layer: int, replica: int) -> list:
        return self._next[layer][replica]

    def drop(self, layer: int) -> None:
        self._next.pop(layer, None)


def local_views(tree, devices: list) -> list:
    return [jax.tree.map(lambda a, d=d: shard_on(a, d), tree) for d in devices]


def ffn_chain_seconds(layout, layers: list[dict], x: jax.Array, depth: int = 1) -> float:
    """Seconds per layer of striped WaS FFN layers run this way (for the mode calibration).
    layers: per-layer FFN groups sharded as the striped layout stores them."""
    devices = list(layout.mesh.devices[:, 0])
    local = local_views(layers, devices)
    xs = [shard_on(x, d) for d in devices]
    fetcher = FfnFetcher(local, devices, depth)
    ffn = jax.jit(lambda h, own, fetched: h + sliced_ffn(h, [own, *fetched]))
    everyone = list(range(len(devices)))

    def chain():
        hs = list(xs)
        fetcher.start(everyone)
        for l in range(len(layers)):
            fetcher.advance(l, everyone)
            hs = [ffn(hs[r], local[r][l], fetcher.take(l, r)) for r in everyone]
            fetcher.drop(l)
        return hs

    return median_seconds(chain, reps=3) / len(layers)


class ReplicaWaS:
    """Runs a WaS step as D independent per-replica programs (striped sidp layout, tp == 1):
    per replica one jitted call per layer (models.decoder.layer), the FFN over its own slice and
    the slices its peers copied over."""

    def __init__(self, cfg, layout, params: dict, kv_sharding, attn_fn_for, prefetch_depth: int = 1):
        """attn_fn_for(kind, batch): the attention a step of that kind runs (ModelRunner._attn_fn)."""
        assert layout.replica_runner_applies
        self.cfg, self.kv_sharding, self.attn_fn_for = cfg, kv_sharding, attn_fn_for
        self.devices = list(layout.mesh.devices[:, 0])
        self.local = local_views(params, self.devices)
        self.fetcher = FfnFetcher([[w["ffn"] for w in p["layers"]] for p in self.local], self.devices,
                                  prefetch_depth)
        self.batch_sharding = NamedSharding(layout.mesh, P("dp"))
        self._begin = jax.jit(lambda p, b, prev: step_begin(cfg, p, dict(b, prev_tokens=prev[0])))
        self._layer = jax.jit(self._one_layer, donate_argnums=(3,), static_argnums=(8,),
                              compiler_options=step_compiler_options(layout.platform))
        self._end = jax.jit(self._one_end, donate_argnums=(4,), static_argnums=(5,))

    def _one_layer(self, w, fetched, h, kv, layer_index, batch, cos, sin, attn: str):
        kv = jax.tree.map(lambda a: a[0], kv)
        ffn = lambda x, active: sliced_ffn(x, [w["ffn"], *fetched])
        h, kv = layer(self.cfg, w, h, kv, cos, sin, ffn=ffn,
                      attend=paged_attend(self.cfg, layer_index, batch, self.attn_fn_for(attn, batch)))
        return h, jax.tree.map(lambda a: a[None], kv)

    def _one_end(self, p, x, b, s, counts, flags):
        """The step's end (sidp_jax/engine/step.py) on one replica: its outputs and penalty counts
        with the replica axis put back."""
        out, counts = step_end(self.cfg, p, x, b, s, counts[0], flags)
        return jax.tree.map(lambda a: a[None], out), counts[None]

    def run(self, kv: dict, counts: jax.Array, batch: dict, samp: dict, flags, attn: str = "reference"):
        """kv: the global cache; counts: the penalty counts [D, slots, V]; batch/samp: numpy
        [D, ...], but batch["prev_tokens"]: the previous step's tokens [D, W] on the devices;
        flags: the step's SamplerFlags; attn: the step's attention kind (ModelRunner.attention_kind).
        Returns (outputs [D, ...] on the devices, kv, counts); nothing waits."""
        D, L = len(self.devices), self.cfg.num_layers
        prev = batch["prev_tokens"]
        batch = {k: v for k, v in batch.items() if k != "prev_tokens"}
        active = [r for r in range(D) if batch["num_tokens"][r] > 0]
        kvs = [{k: shard_on(v, d) for k, v in kv.items()} for d in self.devices]
        count_rows = [shard_on(counts, d) for d in self.devices]
        state = {}
        for r in active:
            b = jax.device_put({k: v[r] for k, v in batch.items()}, self.devices[r])
            b, x, cos, sin = self._begin(self.local[r], b, shard_on(prev, self.devices[r]))
            state[r] = [x, b, cos, sin]
        self.fetcher.start(active)
        for l in range(L):
            self.fetcher.advance(l, active)  # lands while this layer computes
            for r in active:
                x, b, cos, sin = state[r]
                state[r][0], kvs[r] = self._layer(self.local[r]["layers"][l], self.fetcher.take(l, r), x, kvs[r],
                                                  np.int32(l), b, cos, sin, attn)
            self.fetcher.drop(l)
        outs = {}
        for r in active:
            x, b, _, _ = state[r]
            s = jax.device_put({k: v[r] for k, v in samp.items()}, self.devices[r])
            outs[r], count_rows[r] = self._end(self.local[r], x, b, s, count_rows[r], flags)
        kv = {k: jax.make_array_from_single_device_arrays(kv[k].shape, self.kv_sharding, [c[k] for c in kvs])
              for k in kv}
        counts = jax.make_array_from_single_device_arrays(counts.shape, self.batch_sharding, count_rows)
        template = next(iter(outs.values()))
        for r in set(range(D)) - set(active):  # an idle replica's rows are never read: zeros
            outs[r] = jax.tree.map(lambda a, d=self.devices[r]: jax.device_put(np.zeros(a.shape, a.dtype), d), template)
        stacked = jax.tree.map(lambda *per_replica: jax.make_array_from_single_device_arrays(
            (D, *per_replica[0].shape[1:]), self.batch_sharding, list(per_replica)), *[outs[r] for r in range(D)])
        return stacked, kv, counts
