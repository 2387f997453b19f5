"""The sampled-token buffer: how step N+1 reads step N's tokens without a trip to the host.

Every step returns its sampled tokens padded to one width W (batch.token_buffer_width), and the
next step takes that array back as `prev_tokens` with `prev_index` [T] from build_batch: a token
whose index is >= 0 is that row of the previous step's output. So the engine can dispatch step
N+1 before it has read step N's results (host overlap, sidp_jax/engine/engine.py), and the buffer's one
shape adds no compiled variants.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp


def with_prev_tokens(batch: dict) -> dict:
    """One replica's batch with each token whose prev_index >= 0 taken from prev_tokens [W]."""
    index = batch["prev_index"]
    from_prev = jnp.take(batch["prev_tokens"], jnp.maximum(index, 0), axis=0)
    return dict(batch, tokens=jnp.where(index >= 0, from_prev, batch["tokens"]))


def pad_tokens(out, width: int):
    """A step's Sampled with its tokens [S] padded to the buffer's width W."""
    return dataclasses.replace(out, tokens=jnp.pad(out.tokens, (0, width - out.tokens.shape[0])))
