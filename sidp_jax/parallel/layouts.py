"""Where each weight lives: the `dp`, `tp` and `sidp` layouts over a ("dp", "tp") mesh.

- dp:   every replica holds all weights (tp-sharded heads/FFN inside a replica when tp > 1).
- tp:   the whole group is ONE replica, Megatron tensor parallelism over every device.
- sidp: attention, norms, embeddings as in dp; the FFN weights are pooled over "dp":
        `striped` splits every layer's FFN 1/D over the group (intermediate axis),
        `owner` keeps layer l whole on dp-rank l mod D (groups of D consecutive layers'
        FFN stacked on an axis sharded over "dp": rank r's local view of group g is layer g*D + r).
Every weight is its own per-layer array; a layout only decides each leaf's sharding.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from sidp_jax.engine_config import Parallel, Placement, parse_mesh
from sidp_jax.models.config import ModelConfig
from sidp_jax.models.modules import FFN_LEAVES, model_specs
from sidp_jax.models.params import is_spec


def check_device_count(mesh: str, devices: list) -> None:
    """A mesh larger than the visible devices is an error that says how to get more on CPU."""
    sizes = parse_mesh(mesh)
    n = sizes["dp"] * sizes["tp"]
    if n > len(devices):
        platform = devices[0].platform if devices else "none"
        hint = (f"; on CPU, set XLA_FLAGS=--xla_force_host_platform_device_count={n} before jax starts for {n} "
                f"virtual devices" if platform == "cpu" else "")
        raise ValueError(f"mesh {mesh} needs {n} devices, but only {len(devices)} ({platform}) are visible{hint}")


@dataclasses.dataclass(frozen=True)
class ShardingRules:
    """Logical axes (the models' `logical_axes`) -> mesh axes; an axis without a rule is replicated."""
    rules: dict[str, str | tuple[str, ...]]

    def spec(self, axes: tuple[str | None, ...], name: str = "") -> P:
        """The PartitionSpec of a tensor with these logical axes. Two of its axes on one mesh axis
        would shard it twice over the same devices: an error, not a silent wrong layout."""
        mesh_axes = [self.rules.get(a) if a else None for a in axes]
        used = [m for entry in mesh_axes if entry for m in ((entry,) if isinstance(entry, str) else entry)]
        if len(used) != len(set(used)):
            raise ValueError(f"sharding rules map two logical axes of {name or 'a tensor'} {axes} onto one "
                             f"mesh axis: {mesh_axes}")
        return P(*mesh_axes)


@dataclasses.dataclass(frozen=True)
class Layout:
    parallel: str
    placement: str
    mesh: Mesh

    @property
    def platform(self) -> str:
        """The platform of the mesh's devices ("gpu", "cpu", ...): what picks kernels and collectives,
        not jax.default_backend() (an LLM on CPU devices of a GPU host runs CPU paths)."""
        return self.mesh.devices.flat[0].platform

    @property
    def num_replicas(self) -> int:
        return self.mesh.shape["dp"]

    @property
    def tp(self) -> int:
        return self.mesh.shape["tp"]

    @property
    def pooled(self) -> bool:
        return self.parallel == "sidp" and self.num_replicas > 1

    @property
    def owner_groups(self) -> bool:
        """FFN stored in groups of D layers stacked over "dp" (SiDP's owner placement)."""
        return self.pooled and self.placement == "owner"

    def ffn_groups(self, cfg: ModelConfig) -> list[tuple[int, ...]]:
        """Owner placement: the model layer in each dp-rank's row of each group (-1: padding)."""
        D = self.num_replicas
        return [tuple(g * D + r if g * D + r < cfg.num_layers else -1 for r in range(D))
                for g in range(-(-cfg.num_layers // D))]

    def sharding_rules(self) -> ShardingRules:
        rules: dict[str, str | tuple[str, ...]] = {"q_heads": "tp", "kv_heads": "tp", "ffn": "tp"}
        if self.pooled and self.placement == "striped":
            rules["ffn"] = ("dp", "tp")
        if self.owner_groups:
            rules["ffn_owner"] = "dp"
        return ShardingRules(rules)

    def stored_specs(self, cfg: ModelConfig) -> dict:
        """The model's ParamSpecs as this layout stores them: per-layer leaves, except that the
        owner placement moves each layer's FFN into `ffn_groups` (row r of group g is layer
        g*D + r), so that under shard_map every rank's local view of a group is its own layer."""
        specs = model_specs(cfg)
        if not self.owner_groups:
            return specs
        layers = [{k: v for k, v in w.items() if k not in FFN_LEAVES} for w in specs["layers"]]
        groups = []
        for rows in self.ffn_groups(cfg):
            first = specs["layers"][rows[0]]
            groups.append({k: dataclasses.replace(first[k], shape=(len(rows), *first[k].shape),
                                                  axes=("ffn_owner", *first[k].axes), layer=None, rows=rows)
                           for k in FFN_LEAVES if k in first})
        return {**specs, "layers": layers, "ffn_groups": groups}

    def ffn_weights(self, params: dict, layer: int) -> dict:
        """What layer `layer`'s FFN strategy is handed: the layer's own leaves, or (owner) its group."""
        if self.owner_groups:
            return params["ffn_groups"][layer // self.num_replicas]
        return params["layers"][layer]

    def partition_specs(self, cfg: ModelConfig) -> dict:
        rules = self.sharding_rules()
        return jax.tree.map(lambda s: rules.spec(s.axes, s.name), self.stored_specs(cfg), is_leaf=is_spec)

    def param_shardings(self, cfg: ModelConfig) -> dict:
        return jax.tree.map(lambda p: NamedSharding(self.mesh, p), self.partition_specs(cfg))

    def check(self, cfg: ModelConfig) -> None:
        for what, n in (("attention heads", cfg.num_heads), ("kv heads", cfg.num_kv_heads)):
            if n % self.tp:
                raise ValueError(f"{cfg.num_kv_heads if what == 'kv heads' else n} {what} do not split over tp={self.tp}")
        shards = self.tp * (self.num_replicas if self.pooled and self.placement == "striped" else 1)
        if cfg.intermediate_size % shards:
            raise ValueError(f"intermediate size {cfg.intermediate_size} does not split into {shards} FFN shards")


def make_layout(mesh: str, parallel: str = "sidp", placement: str = "striped", devices=None) -> Layout:
    parallel, placement = Parallel(parallel), Placement(placement)  # the choices: sidp_jax/engine_config.py
    sizes = parse_mesh(mesh)
    n = sizes["dp"] * sizes["tp"]
    devices = list(devices if devices is not None else jax.devices())
    check_device_count(mesh, devices)
    if parallel == "tp":  # the whole group becomes one tensor-parallel replica
        sizes = {"dp": 1, "tp": n}
    grid = np.array(devices[:n]).reshape(sizes["dp"], sizes["tp"])
    return Layout(parallel, placement, Mesh(grid, ("dp", "tp")))
