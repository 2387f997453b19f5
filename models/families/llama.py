"""Llama 3.x: grouped-query attention with RoPE (llama3 frequency scaling), RMSNorm, SwiGLU FFN."""

from sidp_jax.models.family import Family
from sidp_jax.models.ffn import DenseFfn

FAMILY = Family(name="llama", architectures=("LlamaForCausalLM",), ffn=DenseFfn)
