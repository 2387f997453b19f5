"""The FFN of a decoder layer as a typed group of weights: what SiDP pools.

A family's layer declares its FFN as one of these classes: `DenseFfn`, or `MoeFfn` (routed
experts) in a mixture-of-experts model's MoE layers. The class is the one place that knows the
group: its weights (declared with their Hugging Face names), its bytes and FLOPs per layer (for
capacity, the WaS/CaS cost model and the roofline), and its math. In the engine's weight pytree the group is the subtree
`layers[l]["ffn"]`; the pool's strategies (sidp_jax/pool/ffn.py) move or split that subtree whole.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from sidp_jax.kernels.grouped_matmul import grouped_matmul
from sidp_jax.models import expert_routing
from sidp_jax.models.config import ModelConfig
from sidp_jax.models.fp8 import amax_over, linear
from sidp_jax.models.params import Convert, declare

_LAYER = "model.layers.{l}"


def swiglu(gate_up: jax.Array, dtype) -> jax.Array:
    """silu(gate) * up in dtype, from gate_up [..., 2, I] (computed in float32)."""
    return (jax.nn.silu(gate_up[..., 0, :].astype(jnp.float32)) * gate_up[..., 1, :].astype(jnp.float32)).astype(dtype)


class DenseFfn(nnx.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)), with gate and up fused on one axis (one GEMM, and one
    transfer per layer for SiDP's pool): gate_up [H, 2, I], down [I, H]."""

    def __init__(self, cfg: ModelConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
        H, I = cfg.hidden_size, cfg.intermediate_size
        self.gate_up = declare(rngs, dtype, (H, 2, I), ("embed", None, "ffn"), "normal",
                               [f"{_LAYER}.mlp.gate_proj.weight", f"{_LAYER}.mlp.up_proj.weight"], [(I, H), (I, H)],
                               Convert("gate_up"))
        self.down = declare(rngs, dtype, (I, H), ("ffn", "embed"), "normal", [f"{_LAYER}.mlp.down_proj.weight"],
                            [(H, I)], Convert("T"))

    @staticmethod
    def num_params(cfg: ModelConfig) -> int:
        return 3 * cfg.hidden_size * cfg.intermediate_size

    @staticmethod
    def bytes_per_layer(cfg: ModelConfig, item: int) -> int:
        """Bytes of one layer's group with `item` bytes per weight (FP8: 1, plus the float32
        scales per output channel of gate_up and down)."""
        scales = 4 * (2 * cfg.intermediate_size + cfg.hidden_size) if cfg.quantization == "fp8" else 0
        return DenseFfn.num_params(cfg) * item + scales

    @staticmethod
    def flops_per_token(cfg: ModelConfig) -> int:
        return 2 * DenseFfn.num_params(cfg)

    @staticmethod
    def hidden(x: jax.Array, w: dict) -> jax.Array:
        """silu(gate) * up [T, I] (or a slice of I) in x's dtype."""
        return swiglu(linear(x, w["gate_up"]), x.dtype)

    @staticmethod
    def down_proj(h: jax.Array, w: dict, reduce_amax=None) -> jax.Array:
        """float32 [T, H]: down [I, H] (or a slice of I, summed by the caller) applied to h."""
        return linear(h, w["down"], out_dtype=jnp.float32, reduce_amax=reduce_amax)

    @staticmethod
    def apply(cfg: ModelConfig, x: jax.Array, w: dict, split_axes: tuple[str, ...] = ()) -> jax.Array:
        """float32 [T, H] over w's slice of the intermediate axis, split over mesh `split_axes`
        (the caller sums the slices; FP8 activation scales then span those axes)."""
        del cfg
        return DenseFfn.down_proj(DenseFfn.hidden(x, w), w, amax_over(split_axes))


class MoeFfn(nnx.Module):
    """Routed experts (Qwen3-MoE): a router [H, E] picks each token's top k of E SwiGLU experts,
    whose outputs are summed with the routing weights (models/expert_routing.py). The experts are
    stacked as they load: gate_up [E, H, 2, I], down [E, I, H] (I: moe_intermediate_size). Their
    intermediate axis ("expert_ffn") splits over tp as the dense FFN's does; SiDP pools the
    experts axis itself over "dp" (each GPU owns E/D whole experts)."""

    OWNER_AXIS = "dp"  # the mesh axis a pooled layout splits the experts axis over

    def __init__(self, cfg: ModelConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
        H, I, E = cfg.hidden_size, cfg.moe_intermediate_size, cfg.num_experts
        expert = lambda proj: [f"{_LAYER}.mlp.experts.{e}.{proj}.weight" for e in range(E)]
        self.router = declare(rngs, dtype, (H, E), ("embed", None), "normal", [f"{_LAYER}.mlp.gate.weight"], [(E, H)],
                              Convert("T"))
        self.experts_gate_up = declare(rngs, dtype, (E, H, 2, I), ("experts", "embed", None, "expert_ffn"), "normal",
                                       expert("gate_proj") + expert("up_proj"), [(I, H)] * (2 * E),
                                       Convert("experts_gate_up", (E,)))
        self.experts_down = declare(rngs, dtype, (E, I, H), ("experts", "expert_ffn", "embed"), "normal",
                                    expert("down_proj"), [(H, I)] * E, Convert("experts_down", (E,)))

    @staticmethod
    def num_params(cfg: ModelConfig) -> int:
        return cfg.num_experts * (3 * cfg.hidden_size * cfg.moe_intermediate_size + cfg.hidden_size)

    @staticmethod
    def bytes_per_layer(cfg: ModelConfig, item: int) -> int:
        return MoeFfn.num_params(cfg) * item

    @staticmethod
    def flops_per_token(cfg: ModelConfig) -> int:
        """The router and the k experts a token reaches."""
        H = cfg.hidden_size
        return 2 * (cfg.num_experts * H + cfg.num_experts_per_tok * 3 * H * cfg.moe_intermediate_size)

    @staticmethod
    def apply(cfg: ModelConfig, x: jax.Array, w: dict, split_axes: tuple[str, ...] = ()) -> jax.Array:
        """float32 [T, H]: the experts at hand (w) applied to the tokens routed to them, over w's
        slice of their intermediate axis (the caller sums the slices and the owners' parts).

        Routing is computed whole on every device (the router is small and replicated), so it is
        the same in every layout. Where the experts axis is split over "dp" (split_axes has it: a
        pooled layout's CaS), this GPU holds experts [r * E/D, (r + 1) * E/D) and runs only the
        pairs routed to them. Experts are not FP8 yet (models/modules.py refuses FP8 MoE)."""
        gate_up, down = w["experts_gate_up"], w["experts_down"]
        E, H, _, I = gate_up.shape  # E: the experts at hand
        first = jax.lax.axis_index(MoeFfn.OWNER_AXIS) * E if MoeFfn.OWNER_AXIS in split_axes else 0
        B = expert_routing.block_rows_for(x.shape[0], cfg.num_experts_per_tok, E)
        weights, experts = expert_routing.route(x, w["router"], cfg.num_experts_per_tok, cfg.norm_topk_prob)
        plan = expert_routing.plan_rows(weights, experts - first, E, B)
        rows = expert_routing.gather_rows(x, plan)
        gemm = lambda a, b, **kw: grouped_matmul(a, b, plan.block_expert, B, rows_used=plan.rows_used, **kw)
        h = swiglu(gemm(rows, gate_up.reshape(E, H, 2 * I)).reshape(-1, 2, I), x.dtype)
        y = gemm(h, down, out_dtype=jnp.float32)
        return expert_routing.combine_rows(y, plan, x.shape[0])


def local_ffn(x: jax.Array, layer, w: dict, active=None, split_axes: tuple[str, ...] = (), *,
              cfg: ModelConfig, group: type) -> jax.Array:
    """The FFN group `w` (of class `group`, models/ffn.py) run where it is: the layer's own
    weights, or what a strategy gathered.

    active: this replica has tokens this step; when False the GEMMs are skipped (the paper's
    dummy skipping: an idle replica only takes part in the collectives). None: always run.
    split_axes: the mesh axes the group is split over here (models/ffn.py: each group's apply)."""
    del layer
    run = lambda: group.apply(cfg, x, w, split_axes).astype(x.dtype)
    return run() if active is None else jax.lax.cond(active, run, lambda: jnp.zeros_like(x))
