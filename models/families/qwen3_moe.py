"""Qwen3-MoE (Qwen3-30B-A3B, Qwen3-235B-A22B): Qwen3's attention, and in the config's MoE layers
routed experts (models/ffn.py MoeFfn) instead of the dense SwiGLU; layers listed in
`mlp_only_layers`, or off the `decoder_sparse_step` stride, keep the dense one."""

from sidp_jax.models.family import Family
from sidp_jax.models.ffn import DenseFfn, MoeFfn

FAMILY = Family(name="qwen3_moe", architectures=("Qwen3MoeForCausalLM",), ffn=DenseFfn, moe_ffn=MoeFfn,
                qk_norm=True)
