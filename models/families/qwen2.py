"""Qwen2 and Qwen2.5: Llama's layer with a bias on the q, k and v projections."""

from sidp_jax.models.family import Family
from sidp_jax.models.ffn import DenseFfn

FAMILY = Family(name="qwen2", architectures=("Qwen2ForCausalLM",), ffn=DenseFfn, qkv_bias=True)
