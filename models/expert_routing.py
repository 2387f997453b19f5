"""Routing tokens to their experts with static shapes and no dropped tokens.

`route` is Qwen3-MoE's router as transformers computes it: the router logits in the activation
dtype, a float32 softmax over all experts, the top k, optionally renormalised to sum to one, cast
back to the activation dtype. `plan_rows` then lays the T * k (token, expert) pairs out as rows
sorted by expert, each expert's run padded to whole blocks of `block_rows` rows, so a grouped GEMM
(kernels/grouped_matmul.py) can give every block one expert's weights.

Worst case, every expert gets a partly filled block: R = T*k + min(E, T*k) * (block_rows - 1) rows,
rounded up to a block. That bound is static, so every step shape compiles once and no token is
ever dropped (a capacity factor would drop some and change greedy outputs).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from sidp_jax.models.fp8 import linear


def route(x: jax.Array, router: jax.Array, top_k: int, normalize: bool) -> tuple[jax.Array, jax.Array]:
    """x [T, H], router [H, E] -> (weights [T, k] in x's dtype, experts [T, k] int32)."""
    logits = linear(x, router).astype(jnp.float32)
    probs = jax.nn.softmax(logits, axis=-1)
    weights, experts = jax.lax.top_k(probs, top_k)
    if normalize:
        weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
    return weights.astype(x.dtype), experts.astype(jnp.int32)


def max_rows(num_tokens: int, top_k: int, num_experts: int, block_rows: int) -> int:
    """The rows a step of num_tokens tokens can need (the module docstring's bound)."""
    pairs = num_tokens * top_k
    rows = pairs + min(num_experts, pairs) * (block_rows - 1)
    return -(-rows // block_rows) * block_rows


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class RowPlan:
    """Where each (token, expert) pair sits among the sorted, block-padded rows.
    token: [R] the token of each row (T: a padding row, zero input); weight: [R] its routing
    weight (0 for padding); block_expert: [R / block_rows] the expert of each block; rows_used:
    [] the rows up to the last expert's last block (the rest are whole padding blocks)."""
    token: jax.Array
    weight: jax.Array
    block_expert: jax.Array
    rows_used: jax.Array


def block_rows_for(num_tokens: int, top_k: int, num_experts: int) -> int:
    """Rows per grouped-GEMM block: 16 (the GPU dot's least) while experts get a few rows each
    (decode), 64 once they average 64 or more (prefill), where bigger tiles use the tensor cores."""
    return 64 if num_tokens * top_k >= 64 * num_experts else 16


def plan_rows(weights: jax.Array, experts: jax.Array, num_experts: int, block_rows: int) -> RowPlan:
    """The rows of route()'s (weights, experts) [T, k]: sorted by expert (stable, so a token's
    rows keep their order), each expert's run starting on a block boundary.

    Experts outside [0, num_experts) are not at hand (a pooled layout's other owners'): their
    pairs get no row, and the bound stays that of num_experts experts."""
    T, k = experts.shape
    R = max_rows(T, k, num_experts, block_rows)
    here = (experts >= 0) & (experts < num_experts)
    flat = jnp.where(here, experts, num_experts).reshape(-1)  # pairs not here sort last
    order = jnp.argsort(flat, stable=True)  # pair index, by expert
    sorted_expert = flat[order]
    counts = jnp.bincount(flat, length=num_experts + 1)[:num_experts]
    padded = -(-counts // block_rows) * block_rows
    start = jnp.cumsum(counts) - counts  # first sorted pair of each expert
    padded_end = jnp.cumsum(padded)
    clipped = jnp.minimum(sorted_expert, num_experts - 1)
    row = (padded_end - padded)[clipped] + jnp.arange(T * k) - start[clipped]
    row = jnp.where(sorted_expert < num_experts, row, R)  # out of bounds: dropped by the scatters
    token = jnp.full((R,), T, jnp.int32).at[row].set((order // k).astype(jnp.int32), mode="drop")
    weight = jnp.zeros((R,), weights.dtype).at[row].set(weights.reshape(-1)[order], mode="drop")
    block_start = jnp.arange(R // block_rows) * block_rows
    block_expert = jnp.minimum(jnp.searchsorted(padded_end, block_start, side="right"), num_experts - 1)
    return RowPlan(token, weight, block_expert.astype(jnp.int32), padded_end[-1].astype(jnp.int32))


def gather_rows(x: jax.Array, plan: RowPlan) -> jax.Array:
    """x [T, H] -> the plan's rows [R, H] (padding rows zero)."""
    return jnp.concatenate([x, jnp.zeros((1, x.shape[1]), x.dtype)])[plan.token]


def combine_rows(y: jax.Array, plan: RowPlan, num_tokens: int) -> jax.Array:
    """Rows' outputs y [R, H] weighted and summed back per token: float32 [T, H]."""
    weighted = y.astype(jnp.float32) * plan.weight.astype(jnp.float32)[:, None]
    return jnp.zeros((num_tokens + 1, y.shape[1]), jnp.float32).at[plan.token].add(weighted)[:num_tokens]
