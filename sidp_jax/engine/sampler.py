"""Batched sampling on device, inside the jitted step (logits never leave the GPU).

A row's random draw depends only on (its seed, how many tokens it has generated), never on the
rest of the batch, so seeded requests reproduce across batch compositions and preemptions.
Static flags select the (rarely needed) sorting filters, penalties and logprobs so the common
case stays cheap; each combination compiles once.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

NEG_INF = -jnp.inf


@dataclasses.dataclass(frozen=True)
class SamplerFlags:
    filters: bool = False  # any top_k / top_p / min_p in the batch
    penalties: bool = False  # any presence / frequency / repetition penalty
    num_logprobs: int = 0  # top-N logprobs to return (0: only the sampled token's)
    prompt_logprobs: int = -1  # >= 0: every token's logprob of the next prompt token, and the top-N


def _apply_penalties(logits, p):
    S, V = logits.shape
    hist = p["history"]  # [S, Lh] token ids, -1 padding
    valid = hist >= 0
    idx = jnp.where(valid, hist, V)  # out of range -> dropped
    rows = jnp.arange(S)[:, None]
    out_counts = jnp.zeros((S, V), jnp.float32).at[rows, idx].add(
        (valid & p["history_is_output"]).astype(jnp.float32), mode="drop")
    seen = jnp.zeros((S, V), jnp.bool_).at[rows, idx].set(True, mode="drop")
    rp = p["repetition_penalty"][:, None]
    logits = jnp.where(seen, jnp.where(logits > 0, logits / rp, logits * rp), logits)
    logits = logits - p["frequency_penalty"][:, None] * out_counts
    return logits - p["presence_penalty"][:, None] * (out_counts > 0)


def _filter(scaled, p):
    """top_k, top_p, min_p on temperature-scaled logits (sorted once)."""
    V = scaled.shape[-1]
    order = jnp.argsort(-scaled, axis=-1)
    sorted_logits = jnp.take_along_axis(scaled, order, axis=-1)
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    rank = jnp.arange(V)[None, :]
    k = p["top_k"][:, None]
    keep = (k <= 0) | (rank < k)
    cum_before = jnp.cumsum(probs, axis=-1) - probs
    keep &= cum_before < p["top_p"][:, None]
    keep &= probs >= p["min_p"][:, None] * probs[:, :1]
    keep = keep.at[:, 0].set(True)
    filtered_sorted = jnp.where(keep, sorted_logits, NEG_INF)
    inverse = jnp.argsort(order, axis=-1)
    return jnp.take_along_axis(filtered_sorted, inverse, axis=-1)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Sampled:
    """What a step returns: per row the sampled token, its logprob and, with logprobs requested,
    the top-k ids and logprobs. Rows are [S] (per replica) or [D, S] (the whole step); tokens may
    be padded wider (sidp_jax/engine/token_buffer.py)."""
    tokens: jax.Array
    logprob: jax.Array
    rank: jax.Array  # of the sampled token among the vocabulary (1: the most likely)
    top_ids: jax.Array | None = None
    top_logprobs: jax.Array | None = None
    prompt: "PromptLogprobs | None" = None  # per token [T] (SamplerFlags.prompt_logprobs >= 0)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class PromptLogprobs:
    """Per token of the step: the logprob and rank of the prompt token that follows it (batch
    "next_token"; rows with none are garbage, never read) and the top-N."""
    logprob: jax.Array
    rank: jax.Array
    top_ids: jax.Array | None = None
    top_logprobs: jax.Array | None = None


def _rank(logprobs: jax.Array, chosen: jax.Array) -> jax.Array:
    """1 + how many tokens are more likely than `chosen` ([..., V] and [...] -> [...])."""
    return 1 + jnp.sum(logprobs > chosen[..., None], axis=-1, dtype=jnp.int32)


def prompt_logprobs(all_logits: jax.Array, next_token: jax.Array, k: int) -> PromptLogprobs:
    """all_logits [T, V] float32 of every token; next_token [T] (-1: none)."""
    lp = jax.nn.log_softmax(all_logits, axis=-1)
    chosen = jnp.take_along_axis(lp, jnp.maximum(next_token, 0)[:, None], axis=-1)[:, 0]
    out = PromptLogprobs(chosen, _rank(lp, chosen))
    if k:
        out.top_logprobs, out.top_ids = jax.lax.top_k(lp, k)
    return out


def sample(logits: jax.Array, p: dict, flags: SamplerFlags) -> Sampled:
    """logits [S, V] float32 and the rows' sampling arrays -> Sampled [S]."""
    raw_logprobs = jax.nn.log_softmax(logits, axis=-1)
    if flags.penalties:
        logits = _apply_penalties(logits, p)
    banned = p["banned"]  # [S, NB] tokens forbidden this step (min_tokens), -1 padding
    S, V = logits.shape
    logits = logits.at[jnp.arange(S)[:, None], jnp.where(banned >= 0, banned, V)].set(NEG_INF, mode="drop")
    greedy = jnp.argmax(logits, axis=-1)
    temp = p["temperature"]
    scaled = logits / jnp.where(temp > 0, temp, 1.0)[:, None]
    if flags.filters:
        scaled = _filter(scaled, p)
    keys = jax.vmap(lambda s, n: jax.random.fold_in(jax.random.key(s), n))(p["seed"], p["step"])
    gumbel = jax.vmap(lambda k: jax.random.gumbel(k, (V,), jnp.float32))(keys)
    drawn = jnp.argmax(scaled + gumbel, axis=-1)
    tokens = jnp.where(temp > 0, drawn, greedy).astype(jnp.int32)
    chosen = jnp.take_along_axis(raw_logprobs, tokens[:, None], axis=-1)[:, 0]
    out = Sampled(tokens, chosen, _rank(raw_logprobs, chosen))
    if flags.num_logprobs:
        out.top_logprobs, out.top_ids = jax.lax.top_k(raw_logprobs, flags.num_logprobs)
    return out
