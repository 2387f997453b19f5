"""Qwen3 (dense): Llama's layer with an RMSNorm over each q and k head before RoPE."""

from sidp_jax.models.family import Family
from sidp_jax.models.ffn import DenseFfn

FAMILY = Family(name="qwen3", architectures=("Qwen3ForCausalLM",), ffn=DenseFfn, qk_norm=True)
