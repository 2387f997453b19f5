"""Where each weight lives: one class per layout over a ("dp", "tp") mesh.

- DataParallel (`dp`): every replica holds all weights (tp-sharded heads/FFN inside a replica
  when tp > 1).
- TensorParallel (`tp`): the whole group is ONE replica, Megatron tensor parallelism over every
  device.
- StripedSidp, OwnerSidp (`sidp`): attention, norms, embeddings as in dp; the FFN groups are
  pooled over "dp": `striped` splits every layer's FFN 1/D over the group (intermediate axis),
  `owner` keeps layer l whole on dp-rank l mod D (groups of D consecutive layers' FFN stacked on
  an axis sharded over "dp": rank r's local view of group g is layer g*D + r).

A layout answers every question the engine asks of it: how it stores and shards the model's
weights, the bytes one GPU holds, which FFN modes it runs and the FFN strategy of each
(sidp_jax/pool/ffn.py), whether the per-replica WaS runner applies, and the KV cache's spec.
Adding a layout means adding one class here (and its name to `LAYOUTS`).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from sidp_jax.engine_config import Parallel, Placement, parse_mesh
from sidp_jax.models.config import ModelConfig
from sidp_jax.models.decoder import own_ffn
from sidp_jax.models.modules import model_specs
from sidp_jax.models.params import is_spec
from sidp_jax.models.registry import family_of
from sidp_jax.parallel.capacity import ffn_layer_bytes, weight_bytes
from sidp_jax.pool.ffn import ffn_gather_axes, make_owner_ffns, make_striped_ffns


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


class Layout:
    """A layout on a mesh of `mesh_axes` ("dp": replicas, "tp": GPUs of a replica). The base class
    is the dense replica: every weight in it, heads and FFN split over tp."""
    parallel: ClassVar[Parallel]
    placement: ClassVar[Placement] = Placement.STRIPED  # where pooled FFN layers live (sidp only)
    mesh_axes: ClassVar[tuple[str, str]] = ("dp", "tp")
    kv_spec: ClassVar[P] = P("dp", None, None, "tp", None)  # [replica, L*pages, page, kv_heads, head_dim]

    def __init__(self, mesh: Mesh):
        assert mesh.axis_names == self.mesh_axes, mesh.axis_names
        self.mesh = mesh

    def __repr__(self) -> str:
        return f"{type(self).__name__}(dp={self.num_replicas}, tp={self.tp})"

    # ----- the mesh -----
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

    def describe(self) -> str:
        return f"{self.parallel} on mesh dp={self.num_replicas},tp={self.tp}"

    # ----- storage and sharding -----
    @property
    def pooled(self) -> bool:
        """The replicas pool the FFN groups (SiDP over more than one replica)."""
        return False

    def sharding_rules(self) -> ShardingRules:
        return ShardingRules({"q_heads": "tp", "kv_heads": "tp", "ffn": "tp", "expert_ffn": "tp"})

    def stored_specs(self, cfg: ModelConfig) -> dict:
        """The model's ParamSpecs as this layout stores them."""
        return model_specs(cfg)

    def ffn_weights(self, params: dict, layer: int):
        """What layer `layer`'s FFN strategy is handed: its FFN group, as this layout stores it."""
        return params["layers"][layer]["ffn"]

    def partition_specs(self, cfg: ModelConfig) -> dict:
        rules = self.sharding_rules()
        return jax.tree.map(lambda s: rules.spec(s.axes, s.name), self.stored_specs(cfg), is_leaf=is_spec)

    def param_shardings(self, cfg: ModelConfig) -> dict:
        return jax.tree.map(lambda p: NamedSharding(self.mesh, p), self.partition_specs(cfg))

    @property
    def ffn_shards(self) -> int:
        """How many pieces the FFN's intermediate axis is cut into."""
        return self.tp

    def ffn_storage(self, cfg: ModelConfig) -> list | None:
        """What decides the stored arrays' shapes beyond the model: the owner groups' rows, or None
        (one array per layer). A placed checkpoint restores into any layout that stores alike."""
        return None

    def check(self, cfg: ModelConfig) -> None:
        for what, n in (("attention heads", cfg.num_heads), ("kv heads", cfg.num_kv_heads)):
            if n % self.tp:
                raise ValueError(f"{n} {what} do not split over tp={self.tp}")
        if cfg.moe_layers and self.pooled:
            self.check_expert_pool(cfg)
        sizes = [("intermediate size", cfg.intermediate_size)] if cfg.dense_layers else []
        if cfg.moe_layers:
            sizes.append(("expert intermediate size", cfg.moe_intermediate_size))
        for what, n in sizes:
            if n % self.ffn_shards:
                raise ValueError(f"{what} {n} does not split into {self.ffn_shards} FFN shards")

    def check_expert_pool(self, cfg: ModelConfig) -> None:
        """A pooled layout that can hold a mixture-of-experts model says so by overriding this."""
        raise ValueError(f"{self.describe()} does not pool experts: run a mixture-of-experts model with "
                         f"--placement striped (each GPU owns E/D experts), or --parallel dp or tp")

    # ----- memory -----
    @classmethod
    def weight_bytes(cls, cfg: ModelConfig, dp: int, tp: int = 1, dtype=jnp.bfloat16,
                     include_buffer: bool = True) -> int:
        """Bytes of weights one GPU holds with dp replicas of tp GPUs (no mesh needed: capacity
        planning for machines not at hand). include_buffer: SiDP's two-layer FFN buffer."""
        w = weight_bytes(cfg, dtype)
        return w.replicated + (w.attention + w.ffn) // tp

    def bytes_per_gpu(self, cfg: ModelConfig, dtype, include_buffer: bool | None = None) -> int:
        return type(self).weight_bytes(cfg, self.num_replicas, self.tp, dtype,
                                       self.pooled if include_buffer is None else include_buffer)

    # ----- the FFN -----
    def ffn_modes(self) -> tuple[str, ...]:
        """The FFN modes this layout can run: "local" (the FFN is not pooled), or "was" and "cas"."""
        return ("local",)

    def ffn_strategy(self, cfg: ModelConfig, mode: str):
        """ffn(x, layer, w, active) of `mode` (sidp_jax/pool/ffn.py): here the local FFN."""
        return functools.partial(own_ffn(cfg), split_axes=self._tp_axes)

    @property
    def replica_runner_applies(self) -> bool:
        """WaS steps can run as per-replica programs (sidp_jax/engine/replica_runner.py)."""
        return False

    @property
    def _tp_axes(self) -> tuple[str, ...]:
        return ("tp",) if self.tp > 1 else ()


class DataParallel(Layout):
    parallel = Parallel.DP


class TensorParallel(Layout):
    """One replica over the whole group (make_layout reshapes the mesh to dp=1)."""
    parallel = Parallel.TP


class SidpLayout(Layout):
    """Replicas that pool the FFN groups over "dp"; with one replica, a dense replica."""
    parallel = Parallel.SIDP

    @property
    def pooled(self) -> bool:
        return self.num_replicas > 1

    def describe(self) -> str:
        return f"{super().describe()} ({self.placement})"

    def ffn_modes(self) -> tuple[str, ...]:
        return ("was", "cas") if self.pooled else ("local",)

    @classmethod
    def weight_bytes(cls, cfg: ModelConfig, dp: int, tp: int = 1, dtype=jnp.bfloat16,
                     include_buffer: bool = True) -> int:
        if dp == 1:
            return super().weight_bytes(cfg, dp, tp, dtype, include_buffer)
        w = weight_bytes(cfg, dtype)
        buffer = 2 * w.ffn_layer // tp if include_buffer else 0  # the layer in use and the one arriving
        return w.replicated + w.attention // tp + cls.local_ffn_bytes(cfg, dp, tp, dtype) + buffer

    @classmethod
    def local_ffn_bytes(cls, cfg: ModelConfig, dp: int, tp: int, dtype) -> int:
        raise NotImplementedError


class StripedSidp(SidpLayout):
    placement = Placement.STRIPED

    def sharding_rules(self) -> ShardingRules:
        """Pooled: dense FFN groups split their intermediate axis over the whole group, and
        each GPU owns E/D whole experts of every MoE layer (the experts axis over "dp")."""
        rules = super().sharding_rules()
        return ShardingRules({**rules.rules, "ffn": ("dp", "tp"), "experts": "dp"}) if self.pooled else rules

    def check_expert_pool(self, cfg: ModelConfig) -> None:
        if cfg.num_experts % self.num_replicas:
            raise ValueError(f"{cfg.num_experts} experts do not split over dp={self.num_replicas} owners")

    @property
    def ffn_shards(self) -> int:
        return self.tp * (self.num_replicas if self.pooled else 1)

    @classmethod
    def local_ffn_bytes(cls, cfg: ModelConfig, dp: int, tp: int, dtype) -> int:
        return weight_bytes(cfg, dtype).ffn // (dp * tp)

    def ffn_strategy(self, cfg: ModelConfig, mode: str):
        if not self.pooled:
            return super().ffn_strategy(cfg, mode)
        gather_axes = [ffn_gather_axes(w["ffn"]) for w in self.stored_specs(cfg)["layers"]]
        return make_striped_ffns(gather_axes, own_ffn(cfg), self._tp_axes)[mode]

    @property
    def replica_runner_applies(self) -> bool:
        return self.pooled and self.tp == 1


class OwnerSidp(SidpLayout):
    placement = Placement.OWNER

    def sharding_rules(self) -> ShardingRules:
        rules = super().sharding_rules()
        return ShardingRules({**rules.rules, "ffn_owner": "dp"}) if self.pooled else rules

    def ffn_groups(self, cfg: ModelConfig) -> list[tuple[int, ...]]:
        """The model layer in each dp-rank's row of each owner group (-1: padding)."""
        D = self.num_replicas
        return [tuple(g * D + r if g * D + r < cfg.num_layers else -1 for r in range(D))
                for g in range(-(-cfg.num_layers // D))]

    def stored_specs(self, cfg: ModelConfig) -> dict:
        """Per-layer leaves, except that each layer's FFN group moves into `ffn_groups` (row r of
        group g is layer g*D + r), so that under shard_map every rank's local view of a group is
        its own layer."""
        specs = model_specs(cfg)
        if not self.pooled:
            return specs
        layers = [{k: v for k, v in w.items() if k != "ffn"} for w in specs["layers"]]
        groups = []
        for rows in self.ffn_groups(cfg):
            first = specs["layers"][rows[0]]["ffn"]
            groups.append(jax.tree.map(
                lambda s, rows=rows: dataclasses.replace(s, shape=(len(rows), *s.shape), axes=("ffn_owner", *s.axes),
                                                         layer=None, rows=rows), first, is_leaf=is_spec))
        return {**specs, "layers": layers, "ffn_groups": groups}

    def ffn_storage(self, cfg: ModelConfig) -> list | None:
        return [list(g) for g in self.ffn_groups(cfg)] if self.pooled else None

    def ffn_weights(self, params: dict, layer: int):
        if self.pooled:
            return params["ffn_groups"][layer // self.num_replicas]
        return super().ffn_weights(params, layer)

    @classmethod
    def local_ffn_bytes(cls, cfg: ModelConfig, dp: int, tp: int, dtype) -> int:
        return math.ceil(cfg.num_layers / dp) * ffn_layer_bytes(cfg, dtype) // tp

    def ffn_strategy(self, cfg: ModelConfig, mode: str):
        if not self.pooled:
            return super().ffn_strategy(cfg, mode)
        return make_owner_ffns(self.num_replicas, self.platform, own_ffn(cfg), self._tp_axes)[mode]


# (parallel, placement) -> the layout's class; placement only tells sidp layouts apart
LAYOUTS: dict[tuple[Parallel, Placement | None], type[Layout]] = {
    (Parallel.DP, None): DataParallel,
    (Parallel.TP, None): TensorParallel,
    (Parallel.SIDP, Placement.STRIPED): StripedSidp,
    (Parallel.SIDP, Placement.OWNER): OwnerSidp,
}


def layout_class(parallel: str, placement: str = "striped") -> type[Layout]:
    parallel, placement = Parallel(parallel), Placement(placement)  # the choices: sidp_jax/engine_config.py
    return LAYOUTS.get((parallel, placement)) or LAYOUTS[(parallel, None)]


def make_layout(mesh: str, parallel: str = "sidp", placement: str = "striped", devices=None) -> Layout:
    cls = layout_class(parallel, placement)
    sizes = parse_mesh(mesh)
    n = sizes["dp"] * sizes["tp"]
    devices = list(devices if devices is not None else jax.devices())
    check_device_count(mesh, devices)
    if cls is TensorParallel:  # the whole group becomes one tensor-parallel replica
        sizes = {"dp": 1, "tp": n}
    grid = np.array(devices[:n]).reshape(sizes["dp"], sizes["tp"])
    return cls(Mesh(grid, Layout.mesh_axes))


def weight_bytes_per_gpu(cfg: ModelConfig, parallel: str, dp: int, tp: int = 1, placement: str = "striped",
                         dtype=jnp.bfloat16, include_buffer: bool = True) -> int:
    """Bytes of weights one GPU holds under the layout these options name (the FFN buffer counted
    for sidp; FP8 projections at one byte per weight plus their scales)."""
    return layout_class(parallel, placement).weight_bytes(cfg, dp, tp, dtype, include_buffer)


def kv_tokens_per_gpu(cfg: ModelConfig, parallel: str, dp: int, memory_bytes: float, utilization: float,
                      workspace_bytes: float = 3e9, tp: int = 1, placement: str = "striped",
                      count_ffn_buffer: bool = True, dtype=jnp.bfloat16, kv_dtype=None) -> int:
    """Analytic bound: KV tokens one GPU can hold (tp: tokens of the whole tp group per GPU).
    count_ffn_buffer=False when the workspace already includes it (measured step temporaries).
    dtype: the compute dtype (cfg.quantization sizes the projections); kv_dtype: the cache's
    (default: dtype)."""
    free = memory_bytes * utilization - workspace_bytes - weight_bytes_per_gpu(
        cfg, parallel, dp, tp, placement, dtype=dtype, include_buffer=count_ffn_buffer)
    shards = dp * tp if Parallel(parallel) == Parallel.TP else tp
    return max(0, int(free // (cfg.kv_bytes_per_token(kv_dtype or dtype) / shards)))


def dp_comparison_line(cfg: ModelConfig, layout: Layout, tokens_per_gpu: int, kv_bytes_per_token_per_gpu: float,
                       dtype=jnp.bfloat16) -> str:
    """'KV cache: 391,000 tokens/GPU (dp would have 223,000: 1.75x)' from a measured capacity."""
    dp, tp = layout.num_replicas, layout.tp
    saved = DataParallel.weight_bytes(cfg, dp, tp, dtype) - type(layout).weight_bytes(cfg, dp, tp, dtype)
    dp_tokens = max(0, int(tokens_per_gpu - saved / kv_bytes_per_token_per_gpu))
    if dp_tokens <= 0:
        return f"KV cache: {tokens_per_gpu:,} tokens/GPU (dp would not fit a replica per GPU)"
    return (f"KV cache: {tokens_per_gpu:,} tokens/GPU (dp would have {dp_tokens:,}: "
            f"{tokens_per_gpu / dp_tokens:.2f}x)")
