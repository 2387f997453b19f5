"""Batched sampling on device, inside the jitted step (logits never leave the GPU).

Semantics are vLLM's (v1 sampler), in its order:
  1. raw logprobs (of the logits as the model gave them) for the returned logprobs;
  2. edits: allowed_token_ids (every other token -inf), then per-row sparse (token, bias)
     pairs: logit_bias, and -inf for tokens a row may not sample (min_tokens, bad words);
  3. penalties: repetition (prompt and output tokens), frequency and presence (output tokens),
     from token counts kept on the device;
  4. greedy rows take the argmax here;
  5. temperature, then min_p (on the temperature-scaled probabilities), then top_k, then top_p
     over the distribution renormalised after min_p and top_k (transformers agrees);
  6. a Gumbel-max draw over the kept tokens.

Every filter keeps a *top set* {tokens whose scaled logit >= a row's threshold}, so the sampler
never sorts the vocabulary: min_p's threshold is closed-form (max + log min_p). A top_k up to
CANDIDATES (64) reads the k-th value off each row's exact top 64 values (`_top_values`: the 64
vocabulary blocks with the largest maxima hold them), and a top_p under such a top_k is the first
of those values whose cumulative mass reaches it. A larger top_k, or top_p alone, is found by a
search over the float32 values' bit patterns (`_threshold`): each pass over [S, V] counts (top_k)
or sums the probability mass (top_p) at 15 pivots at once, so 8 passes pin the exact 32-bit
threshold (benchmarks/RESULTS.md, "Sampling", has what each costs). Ties at top_k's k-th value
are kept, as vLLM keeps them.

The options are runtime arrays: one compiled program serves every mix of temperature, top_k,
top_p, min_p, logprobs and logit_bias, so a job never compiles mid-run when a new mix arrives.
Work that no row of a step needs is skipped by `lax.cond` (top_k search, top_p search, the top-N
logprobs and ranks), so a greedy batch pays for none of it.

A row's random draw depends only on (its seed, how many tokens it has generated), never on the
rest of the batch, so seeded requests reproduce across batch compositions and preemptions.
Penalties read token counts kept on the device (sidp_jax/engine/penalty_counts.py). Prompt
logprobs stay a static flag (`SamplerFlags`): they need every token's logits. So does a
structured-output mask (`grammar`, a packed bitmask from sidp_jax/engine/grammar_masks.py, applied
first, as vLLM applies it before its sampler): a step without constrained rows carries none.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from sidp_jax.engine.penalty_counts import penalize

NEG_INF = -jnp.inf
MAX_LOGPROBS = 20  # the top-N width every step returns (SamplingParams.MAX_LOGPROBS)
PIVOTS = 15  # thresholds tried per pass: 4 of a float32's 32 bits per pass ...
PASSES = 8  # ... so 8 passes find the exact threshold


@dataclasses.dataclass(frozen=True)
class SamplerFlags:
    prompt_logprobs: int = -1  # >= 0: every token's logprob of the next prompt token, and the top-N
    grammar: bool = False  # a row has a structured-output mask: the step's arrays carry "grammar_mask"


def apply_bitmask(logits: jax.Array, words: jax.Array) -> jax.Array:
    """logits [S, V] with every token whose bit is 0 in words [S, ceil(V / 32)] int32 (bit t % 32
    of word t // 32, least significant first: llguidance's layout) set to -inf."""
    S, V = logits.shape
    bits = (words[:, :, None] >> jnp.arange(32, dtype=jnp.int32)) & 1  # [S, W, 32]
    return jnp.where(bits.reshape(S, -1)[:, :V] > 0, logits, NEG_INF)


def ordered_keys(x: jax.Array) -> jax.Array:
    """float32 -> int32 with the same order (x < y iff key(x) < key(y); -0.0 sorts just below +0.0)."""
    bits = jax.lax.bitcast_convert_type(x.astype(jnp.float32), jnp.int32)
    return jnp.where(bits < 0, bits ^ jnp.int32(0x7FFFFFFF), bits)


def _pivots(lo: jax.Array, hi: jax.Array) -> jax.Array:
    """[S] int32 bounds (lo < hi) -> [S, PIVOTS] int32 keys in (lo, hi], at most ceil(span / 16)
    apart, computed in uint32 so that spans beyond int32's range (negative to positive) wrap right."""
    span = (hi - lo).astype(jnp.uint32)[:, None]  # wraps to the true unsigned span
    j = jnp.arange(1, PIVOTS + 1, dtype=jnp.uint32)[None, :]
    step = (span >> 4) * j + (((span & 15) * j + 15) >> 4)  # ceil(span * j / 16) without overflow
    return (lo.astype(jnp.uint32)[:, None] + step).astype(jnp.int32)


def _threshold(keys: jax.Array, weight, target: jax.Array, lo: jax.Array, hi: jax.Array) -> jax.Array:
    """Per row, the largest key t with F(t) = sum(weight over keys >= t) >= target, given F(lo) >=
    target > F(hi). weight: None (a count) or [S, V] non-negative floats. F is non-increasing and
    only steps at element keys, so t is an element's key: keeping keys >= t keeps exactly the
    elements whose F reaches the target."""
    for _ in range(PASSES):
        piv = _pivots(lo, hi)  # [S, P]
        above = keys[:, :, None] >= piv[:, None, :]  # [S, V, P], fused into the reduction
        F = jnp.sum(above, axis=1, dtype=jnp.int32) if weight is None else \
            jnp.sum(jnp.where(above, weight[:, :, None], 0.0), axis=1)
        ok = F >= target[:, None]
        lo = jnp.maximum(lo, jnp.max(jnp.where(ok, piv, jnp.iinfo(jnp.int32).min), axis=1))
        hi = jnp.min(jnp.where(~ok & (piv > lo[:, None]), piv, hi[:, None]), axis=1)
    return lo


CANDIDATES = 64  # top_k up to this takes the candidate path (_top_values); larger k, and top_p alone, search
CANDIDATE_BLOCK = 256  # vocabulary block of the candidate path


def _top_values(scaled: jax.Array, count: int) -> jax.Array:
    """Each row's `count` largest values, descending ([S, V] -> [S, count]), exact, without a
    pass over the whole vocabulary per bit: the rows are cut into blocks, and the `count` blocks
    with the largest maxima hold the `count` largest values (every other block's values are at
    most those `count` maxima, so they cannot push the count-th largest up). lax.top_k then runs on
    count * CANDIDATE_BLOCK candidates instead of V."""
    S, V = scaled.shape
    nb = -(-V // CANDIDATE_BLOCK)
    blocks = jnp.pad(scaled, ((0, 0), (0, nb * CANDIDATE_BLOCK - V)), constant_values=NEG_INF)
    blocks = blocks.reshape(S, nb, CANDIDATE_BLOCK)
    _, chosen = jax.lax.top_k(jnp.max(blocks, axis=-1), min(count, nb))
    candidates = jnp.take_along_axis(blocks, chosen[:, :, None], axis=1).reshape(S, -1)
    return jax.lax.top_k(candidates, min(count, candidates.shape[1]))[0]


def filter_threshold(scaled: jax.Array, p: dict, sampling: jax.Array, gated: bool = True) -> jax.Array:
    """Per row, the key of the lowest scaled logit that min_p, top_k and top_p keep ([S] int32).

    scaled [S, V] float32: temperature-scaled logits. sampling [S] bool: rows that draw (the rest
    are greedy; their thresholds are never read). gated: skip the searches no row needs."""
    S, V = scaled.shape
    keys = ordered_keys(scaled)
    m = jnp.max(scaled, axis=-1)
    lowest = jnp.full((S,), jnp.iinfo(jnp.int32).min, jnp.int32)
    top = ordered_keys(m) + 1  # F(top) = 0
    # min_p: prob >= min_p * max prob  <=>  scaled >= max + log(min_p)
    tau = jnp.maximum(lowest, ordered_keys(m + jnp.log(p["min_p"])))
    # top_k: the k-th largest value (ties kept); rows without top_k keep everything. k <= CANDIDATES
    # (Qwen3's 20, the usual 40-50): read off the exact top values; larger k: the bit search
    k = p["top_k"]
    wants_k = sampling & (k > 0) & (k < V)
    count = min(CANDIDATES, V)
    few = wants_k & (k <= count)
    many = wants_k & ~few
    top_vals = _when(gated, jnp.any(few), lambda: _top_values(scaled, count), jnp.full((S, count), NEG_INF))
    kth = jnp.take_along_axis(top_vals, jnp.clip(k - 1, 0, count - 1)[:, None], axis=1)[:, 0]
    search_k = lambda: _threshold(keys, None, jnp.where(many, k, 1), jnp.min(keys, axis=-1), top)
    tau_k = jnp.where(few, ordered_keys(kth), _when(gated, jnp.any(many), search_k, lowest))
    tau = jnp.maximum(tau, jnp.where(wants_k, tau_k, lowest))
    # top_p: over the tokens kept so far, renormalised; keep a token iff the mass strictly above it
    # is below top_p, i.e. keep keys >= the largest t whose mass at or above reaches top_p * kept mass.
    # Under a top_k <= CANDIDATES every kept token is among top_vals (descending): the first value
    # whose cumulative mass reaches the target is t. Otherwise the bit search over the vocabulary.
    wants_p = sampling & (p["top_p"] < 1)
    top_p = jnp.where(wants_p, p["top_p"], 1.0)

    def within_top_k():
        e = jnp.where(ordered_keys(top_vals) >= tau[:, None], jnp.exp(top_vals - m[:, None]), 0.0)
        reached = jnp.cumsum(e, axis=-1) >= (top_p * jnp.sum(e, axis=-1))[:, None]
        return ordered_keys(jnp.take_along_axis(top_vals, jnp.argmax(reached, axis=-1)[:, None], axis=1)[:, 0])

    def search_p():
        e = jnp.exp(scaled - m[:, None])
        kept_mass = jnp.sum(jnp.where(keys >= tau[:, None], e, 0.0), axis=-1)
        return _threshold(keys, e, top_p * kept_mass, tau, top)

    tau_p = jnp.where(few, _when(gated, jnp.any(wants_p & few), within_top_k, tau),
                      _when(gated, jnp.any(wants_p & ~few), search_p, tau))
    return jnp.where(wants_p, jnp.maximum(tau, tau_p), tau)


def _when(gated: bool, pred: jax.Array, fn, default: jax.Array):
    """fn() where pred holds (a runtime branch, no recompile), else default; ungated: always fn()."""
    return jax.lax.cond(pred, fn, lambda: default) if gated else fn()


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Sampled:
    """What a step returns: per row the sampled token, its logprob, its rank and the top-N ids and
    logprobs (MAX_LOGPROBS wide; computed only in steps where a row asked for logprobs, zeros
    otherwise). Rows are [S] (per replica) or [D, S] (the whole step); tokens may be padded wider
    (sidp_jax/engine/token_buffer.py)."""
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


def _apply_edits(logits: jax.Array, p: dict, gated: bool) -> jax.Array:
    """Each row's sparse edits: where a row lists allowed tokens (allowed_token_ids) every other
    token gets -inf; then each (token, bias) pair is added (logit_bias, -inf for banned tokens)."""
    S, V = logits.shape
    rows, ids = jnp.arange(S)[:, None], p["edit_ids"]  # [S, W], -1 padding
    cols = jnp.where(ids >= 0, ids, V)  # padding -> dropped
    allow = p["edit_allow"]

    def only_allowed():
        allowed = jnp.zeros((S, V), jnp.int32).at[rows, cols].max(allow.astype(jnp.int32), mode="drop") > 0
        return jnp.where(jnp.any(allow, axis=1)[:, None] & ~allowed, NEG_INF, logits)

    logits = _when(gated, jnp.any(allow), only_allowed, logits)
    return logits.at[rows, cols].add(p["edit_bias"], mode="drop")


def sample(logits: jax.Array, p: dict, gated: bool = True, counts: jax.Array | None = None) -> Sampled:
    """logits [S, V] float32 and the rows' sampling arrays (StepShape.sampling_fields) -> Sampled [S].
    counts: the replica's penalty token counts [slots, V] (None: no row has penalties)."""
    S, V = logits.shape
    if "grammar_mask" in p:  # structured outputs: as vLLM, before anything else (logprobs see it too)
        logits = apply_bitmask(logits, p["grammar_mask"])
    lse = jax.nn.logsumexp(logits, axis=-1)  # raw logprobs = logits - lse
    raw = logits
    logits = _apply_edits(logits, p, gated)
    if counts is not None:
        logits = _when(gated, jnp.any(p["penalty_slot"] > 0), lambda: penalize(logits, counts, p), logits)
    greedy = jnp.argmax(logits, axis=-1)
    temp = p["temperature"]
    sampling = temp > 0
    scaled = logits / jnp.where(sampling, temp, 1.0)[:, None]

    def draw():
        tau = filter_threshold(scaled, p, sampling, gated)
        rngs = jax.vmap(lambda s, n: jax.random.fold_in(jax.random.key(s), n))(p["seed"], p["step"])
        gumbel = jax.vmap(lambda k: jax.random.gumbel(k, (V,), jnp.float32))(rngs)
        return jnp.argmax(jnp.where(ordered_keys(scaled) >= tau[:, None], scaled + gumbel, NEG_INF), axis=-1)

    drawn = _when(gated, jnp.any(sampling), draw, greedy)
    tokens = jnp.where(sampling, drawn, greedy).astype(jnp.int32)
    chosen_logit = jnp.take_along_axis(raw, tokens[:, None], axis=-1)[:, 0]
    wants = p["num_logprobs"] >= 0

    def ranked():
        top_logits, top_ids = jax.lax.top_k(raw, MAX_LOGPROBS)
        return _rank(raw, chosen_logit), top_ids.astype(jnp.int32), top_logits - lse[:, None]

    none = (jnp.ones((S,), jnp.int32), jnp.zeros((S, MAX_LOGPROBS), jnp.int32),
            jnp.zeros((S, MAX_LOGPROBS), jnp.float32))
    rank, top_ids, top_logprobs = _when(gated, jnp.any(wants), ranked, none)
    return Sampled(tokens, chosen_logit - lse, rank, top_ids, top_logprobs)
