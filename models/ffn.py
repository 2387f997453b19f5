"""The FFN of a decoder layer as a typed group of weights: what SiDP pools.

A family's layer declares its FFN as one of these classes (today `DenseFfn`; a mixture-of-experts
group is the next). The class is the one place that knows the group: its weights (declared with
their Hugging Face names), its bytes and FLOPs per layer (for capacity, the WaS/CaS cost model and
the roofline), and its math. In the engine's weight pytree the group is the subtree
`layers[l]["ffn"]`; the pool's strategies (sidp_jax/pool/ffn.py) move or split that subtree whole.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from sidp_jax.models.config import ModelConfig
from sidp_jax.models.fp8 import amax_over, linear
from sidp_jax.models.params import Convert, declare

_LAYER = "model.layers.{l}"


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
        gu = linear(x, w["gate_up"])
        return (jax.nn.silu(gu[:, 0].astype(jnp.float32)) * gu[:, 1].astype(jnp.float32)).astype(x.dtype)

    @staticmethod
    def down_proj(h: jax.Array, w: dict, reduce_amax=None) -> jax.Array:
        """float32 [T, H]: down [I, H] (or a slice of I, summed by the caller) applied to h."""
        return linear(h, w["down"], out_dtype=jnp.float32, reduce_amax=reduce_amax)

    @staticmethod
    def apply(x: jax.Array, w: dict, reduce_amax=None) -> jax.Array:
        """float32 [T, H] over w's slice of the intermediate axis (summed by the caller, who passes
        reduce_amax when the layer is FP8 and the slices must share one activation scale)."""
        return DenseFfn.down_proj(DenseFfn.hidden(x, w), w, reduce_amax)


def local_ffn(x: jax.Array, layer, w: dict, active=None, split_axes: tuple[str, ...] = (),
              group: type = DenseFfn) -> jax.Array:
    """The FFN group `w` (of type `group`, the family's) run where it is: the layer's own weights,
    or what a strategy gathered.

    active: this replica has tokens this step; when False the GEMMs are skipped (the paper's
    dummy skipping: an idle replica only takes part in the collectives). None: always run.
    split_axes: the mesh axes the intermediate axis is split over here (FP8 scales span them)."""
    del layer
    run = lambda: group.apply(x, w, amax_over(split_axes)).astype(x.dtype)
    return run() if active is None else jax.lax.cond(active, run, lambda: jnp.zeros_like(x))
