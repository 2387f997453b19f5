"""One step of one replica, defined once: its start (the tokens, embedded) and its end (logits,
sampling, penalty counts, prompt logprobs). Both step runners are these two stages around the
model's layers: the SPMD program (sidp_jax/engine/model_runner.py) runs begin, every layer and end
in one shard_map; the per-replica WaS runner (sidp_jax/engine/replica_runner.py) jits begin, each
layer and end as separate calls per replica. So a feature of a row (a sampling option, penalties,
prompt logprobs) is written here once and runs in both."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from sidp_jax.engine.penalty_counts import count_sampled
from sidp_jax.engine.sampler import Sampled, SamplerFlags, prompt_logprobs, sample
from sidp_jax.engine.token_buffer import pad_tokens, with_prev_tokens
from sidp_jax.models.config import ModelConfig
from sidp_jax.models.decoder import embed, head_logits


def step_begin(cfg: ModelConfig, params: dict, batch: dict):
    """(batch with this step's tokens read from the previous step's buffer, x [T, H], cos, sin)."""
    batch = with_prev_tokens(batch)
    return (batch, *embed(cfg, params, batch))


def step_end(cfg: ModelConfig, params: dict, x: jax.Array, batch: dict, samp: dict, counts: jax.Array,
             flags: SamplerFlags) -> tuple[Sampled, jax.Array]:
    """(Sampled with its tokens padded to the token buffer's width, the penalty counts updated
    with the tokens just sampled) from the final hidden states x [T, H]. counts: the replica's
    [slots, V]; flags: the step's static sampler options."""
    sampled = sample(head_logits(cfg, params, x, batch), samp, counts=counts)
    counts = jax.lax.cond(jnp.any(samp["count_slot"] > 0), lambda: count_sampled(counts, samp, sampled.tokens),
                          lambda: counts)
    out = pad_tokens(sampled, batch["prev_tokens"].shape[0])
    if flags.prompt_logprobs >= 0:  # every token's logits: only in steps that asked for them
        out.prompt = prompt_logprobs(head_logits(cfg, params, x), batch["next_token"], flags.prompt_logprobs)
    return out, counts
