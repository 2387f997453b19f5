"""FFN strategies, one per (layout, mode), all called per layer inside the replica's shard_map.

Weight-as-a-Service (WaS) brings the layer's weights to every replica and runs the FFN
locally; Compute-as-a-Service (CaS) brings every replica's activations to the weights.
  striped WaS: all_gather the layer's 1/D slices over "dp" (every link equally loaded).
  striped CaS: all_gather activations, run the local 1/D slice on all D*T tokens,
               reduce-scatter the partial sums back (every GPU busy, FFN HBM reads / D).
  owner WaS:   broadcast layer l from dp-rank l mod D (the owner changes every layer, so
               consecutive fetches come from different GPUs).
  owner CaS:   all_gather activations, the owner alone computes, a reduce-scatter returns
               each replica its rows (non-owners contribute zeros and skip the GEMMs).
Each is a function ffn(x [T, H], layer, w, active) -> [T, H], where `layer` is the (static)
model layer, `w` the layer's FFN group (models/ffn.py; striped: its local 1/D slices) or, for the
owner placement, its owner group (Layout.ffn_weights: stacked over "dp", each rank's local view
its own layer, so the owner is a static root and nothing is indexed per step), and `active` is False
on a replica without tokens this step: it then skips its own GEMMs and takes part only in the
collectives (the paper's dummy skipping). Which of them a layout uses is the layout's to say
(sidp_jax/parallel/layouts.py).
"""

from __future__ import annotations

import logging

import jax
import jax.numpy as jnp

from sidp_jax.models.params import is_spec

log = logging.getLogger("sidp_jax")


def broadcast_from(x, axis: str, source: int, platform: str):
    """Broadcast x from rank `source` (static) of `axis` on a mesh of `platform` devices.

    GPU: lax.pbroadcast. Elsewhere (no CPU lowering): psum of a masked copy."""
    if platform == "gpu":
        try:
            return jax.lax.pbroadcast(x, (axis,), source)
        except (NameError, TypeError, NotImplementedError) as e:  # jax builds whose pbroadcast rejects this
            log.warning("lax.pbroadcast unavailable (%s); owner WaS falls back to a masked psum", e)
    mine = jax.lax.axis_index(axis) == source
    return jax.tree.map(lambda a: jax.lax.psum(jnp.where(mine, a, jnp.zeros_like(a)), axis), x)


def _pinned(w, x):
    """Tie weights to this layer's activations so XLA cannot hoist their fetch out of the layer
    loop (which would materialise every layer's fetched weights at once)."""
    return jax.lax.optimization_barrier((w, x))


def make_striped_ffns(gather_axes, ffn, tp_axes: tuple[str, ...] = ()):
    """Striped placement. gather_axes: per layer, the FFN group's tree with, per leaf, the axis
    split over "dp" (ffn_gather_axes: a dense group's intermediate axis, a MoE group's experts
    axis; -1: a leaf held whole, such as the router or an FP8 down projection's scales);
    ffn(x, layer, w, active, split_axes): the model's FFN on weights at hand (models/decoder.py
    own_ffn); tp_axes: ("tp",) where a replica splits the intermediate axis further over tp (FP8
    activation scales then span those axes too)."""

    def striped_was(x, layer, w, active=None):
        w, x = _pinned(w, x)
        full = jax.tree.map(lambda a, axis: a if axis < 0 else jax.lax.all_gather(a, "dp", axis=axis, tiled=True),
                            w, gather_axes[layer])
        return ffn(x, layer, full, active, split_axes=tp_axes)

    def striped_cas(x, layer, w, active=None):  # an idle replica still serves the others' tokens
        everyone = jax.lax.all_gather(x, "dp", axis=0, tiled=True)  # [D*T, H]
        partial = ffn(everyone, layer, w, split_axes=("dp", *tp_axes))  # this rank's 1/D of the FFN (or experts)
        return jax.lax.psum_scatter(partial, "dp", scatter_dimension=0, tiled=True)

    return {"was": striped_was, "cas": striped_cas}


POOLED_AXES = ("ffn", "experts")  # the logical axes a striped pool splits over "dp" (layouts.StripedSidp)


def ffn_gather_axes(ffn_specs):
    """Per leaf of an FFN group's ParamSpecs, the axis the striped pool splits over "dp": a dense
    group's intermediate axis, a MoE group's experts axis (-1: none, the leaf is whole)."""
    def axis(s):
        return next((s.axes.index(a) for a in POOLED_AXES if a in s.axes), -1)
    return jax.tree.map(axis, ffn_specs, is_leaf=is_spec)


def _own_row(group: dict) -> dict:
    """This rank's local view [1, ...] of an owner group: its own layer."""
    return jax.tree.map(lambda a: a[0], group)


def make_owner_ffns(num_replicas: int, platform: str, ffn, tp_axes: tuple[str, ...] = ()):
    """Owner placement: w is layer l's group (stacked over "dp"); layer l is static, so its
    owner l mod D is a static root. platform: the mesh's devices' (Layout.platform); ffn and
    tp_axes: as in make_striped_ffns."""
    D = num_replicas

    def owner_was(x, layer, stacked, active=None):
        row, x = _pinned(_own_row(stacked), x)
        return ffn(x, layer, broadcast_from(row, "dp", layer % D, platform), active, split_axes=tp_axes)

    def owner_cas(x, layer, stacked, active=None):  # only the owner computes, for everyone
        everyone = jax.lax.all_gather(x, "dp", axis=0, tiled=True)
        is_owner = jax.lax.axis_index("dp") == layer % D
        y = jax.lax.cond(is_owner, lambda: ffn(everyone, layer, _own_row(stacked), split_axes=tp_axes),
                         lambda: jnp.zeros_like(everyone))
        return jax.lax.psum_scatter(y, "dp", scatter_dimension=0, tiled=True)

    return {"was": owner_was, "cas": owner_cas}
