"""Host side of a step: scheduled chunks -> padded, bucketed numpy arrays, one row per replica.

Shapes are rounded up to powers of two (tokens T, sequence rows S, pages per row MB) so the
number of compiled step variants stays small; a mixed step's rows follow from its tokens alone.
Padding tokens write to the reserved page 0 and padding rows are greedy, penalty-free and never
read back.

A decode-only step (every chunk of every replica is one token) is laid out with token i in row i
and as many token slots as rows (T == S, one bucket), so the paged decode kernel can read the
block tables row by row (sidp_jax.kernels.attention); StepShape says so with `decode_only`.

For the Pallas kernels of a MIXED step (`tile_tokens` given) the batch also says which rows the
decode kernel takes (`decode_len`: the leading one-token rows, whose token sits at the row's own
index because decode chunks come first) and cuts every other chunk into tiles of at most
`tile_tokens` tokens (`tiles`, see kernels/paged_prefill_pallas.py). Their count is fixed by
T and S (each chunk adds at most one partial tile), so they add no compiled shapes.

StepShape declares every array of a step (name, dtype, shape, fill): build_step fills them,
and start-up compiles from the same declaration (StepShape.abstract), so no shape is restated.
A token still on the device (host overlap) has `prev_index` >= 0: its row in the previous step's
output (sidp_jax/engine/token_buffer.py).
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np

from sidp_jax.engine.sampler import SamplerFlags
from sidp_jax.engine.scheduler import ScheduledChunk

# Smallest buckets: a decode step of up to 64 rows, or a mixed step of up to 256 tokens, is bound by
# reading the weights (HBM), so padding it up costs next to nothing, while every extra variant of a
# 64-80 layer program adds a long compile on GPU (benchmarks/RESULTS.md, "Loading and start-up").
MIN_DECODE_ROWS = 64
MIN_MIXED_TOKENS = 256
EDIT_WIDTH = 16  # (token, bias) pairs per row that precompiled steps take: logit_bias, min_tokens bans


def bucket(n: int, lo: int, hi: int) -> int:
    lo = min(lo, hi)
    b = lo
    while b < n:
        b *= 2
    return max(lo, min(b, hi)) if n <= hi else n


def decode_rows(rows: int, max_tokens: int, max_rows: int) -> int:
    return bucket(rows, MIN_DECODE_ROWS, min(max_tokens, max_rows))


def mixed_tokens(tokens: int, max_tokens: int) -> int:
    return bucket(tokens, MIN_MIXED_TOKENS, max_tokens)


def mixed_rows(T: int, max_rows: int) -> int:
    """A mixed step's rows follow from its tokens (a chunk has at least one token): one compiled
    variant per token bucket; spare rows cost a few LM-head rows."""
    return bucket(min(T, max_rows), 4, max_rows)


def step_shapes(max_tokens: int, max_rows: int) -> list[tuple[bool, int, int]]:
    """Every (decode_only, T, S) a step can take: what start-up precompiles."""
    def ladder(lo, hi):
        sizes = [bucket(1, lo, hi)]
        while sizes[-1] < hi:
            sizes.append(bucket(sizes[-1] + 1, lo, hi))
        return sizes
    decode = [(True, n, n) for n in ladder(MIN_DECODE_ROWS, min(max_tokens, max_rows))]
    return decode + [(False, T, mixed_rows(T, max_rows)) for T in ladder(MIN_MIXED_TOKENS, max_tokens)]


def token_buffer_width(max_tokens: int, max_rows: int) -> int:
    """Rows of the sampled-token buffer every step returns: the most rows a step can have, so that
    the next step can read any row's token on the device (one fixed shape, no extra variants)."""
    return max(S for _, _, S in step_shapes(max_tokens, max_rows))


def num_tiles(T: int, S: int, tile_tokens: int) -> int:
    """Tiles a T-token, S-row step can need: sum(ceil(n_i / tile)) <= T // tile + rows."""
    return T // tile_tokens + min(S, T)


def mixed_step_layout(chunks: list[tuple[int, int, int, int]], S: int, T: int, tile_tokens: int):
    """(decode_len [S], tiles [NT, 4]) for one replica's chunks given as (row, t0, n, p0)."""
    decode_len = np.zeros(S, np.int32)
    tiles = np.zeros((num_tiles(T, S, tile_tokens), 4), np.int32)
    i = 0
    for row, t0, n, p0 in chunks:
        if n == 1 and t0 == row:  # the decode kernel's row: token index == row index
            decode_len[row] = p0 + 1
            continue
        for k in range(0, n, tile_tokens):
            tiles[i] = (row, t0 + k, min(tile_tokens, n - k), p0 + k)
            i += 1
    return decode_len, tiles


Fields = dict[str, tuple[type, tuple[int, ...], float]]  # name -> (dtype, per-replica shape, fill)


@dataclasses.dataclass(frozen=True)
class StepShape:
    """The shapes of a step: D replicas, T token slots, S rows, MB block-table columns.
    tile_tokens: the Pallas kernels' layout (a mixed step then carries decode_len and tiles)."""
    D: int
    T: int
    S: int
    MB: int
    decode_only: bool
    tile_tokens: int | None = None

    @property
    def kernel_layout(self) -> bool:
        return bool(self.tile_tokens) and not self.decode_only

    def batch_fields(self, prompt_logprobs: bool = False) -> Fields:
        """prompt_logprobs: each token's next prompt token too ("next_token", -1: none)."""
        T, S, i32 = self.T, self.S, np.int32
        fields = {"tokens": (i32, (T,), 0), "positions": (i32, (T,), 0), "slots": (i32, (T,), 0),
                  "token_seq": (i32, (T,), 0), "prev_index": (i32, (T,), -1),
                  "block_tables": (i32, (S, self.MB), 0), "sample_index": (i32, (S,), 0), "num_tokens": (i32, (), 0)}
        if self.kernel_layout:
            fields.update(decode_len=(i32, (S,), 0), tiles=(i32, (num_tiles(T, S, self.tile_tokens), 4), 0))
        if prompt_logprobs:
            fields["next_token"] = (i32, (T,), -1)
        return fields

    def sampling_fields(self, edit_width: int = EDIT_WIDTH) -> Fields:
        """The sampler's runtime options per row (every mix runs the same program). edit_width:
        the (token, bias, allowed) triples per row (allowed_token_ids, logit_bias, banned tokens). penalty_slot: the row's
        penalty counts (0: none); count_slot: where its sampled token is counted (0: nowhere)."""
        S, f32 = self.S, np.float32
        fields = {"temperature": (f32, (S,), 0.0), "top_p": (f32, (S,), 1.0), "top_k": (np.int32, (S,), 0),
                  "min_p": (f32, (S,), 0.0), "seed": (np.uint32, (S,), 0), "step": (np.int32, (S,), 0),
                  "num_logprobs": (np.int32, (S,), -1),
                  "edit_ids": (np.int32, (S, edit_width), -1), "edit_bias": (f32, (S, edit_width), 0.0),
                  "edit_allow": (np.bool_, (S, edit_width), False),
                  "penalty_slot": (np.int32, (S,), 0), "count_slot": (np.int32, (S,), 0),
                  "presence_penalty": (f32, (S,), 0.0), "frequency_penalty": (f32, (S,), 0.0),
                  "repetition_penalty": (f32, (S,), 1.0)}
        return fields

    def arrays(self, fields: Fields) -> dict[str, np.ndarray]:
        return {k: np.full((self.D, *shape), fill, dtype) for k, (dtype, shape, fill) in fields.items()}

    def abstract(self, fields: Fields, sharding) -> dict[str, jax.ShapeDtypeStruct]:
        return {k: jax.ShapeDtypeStruct((self.D, *shape), dtype, sharding=sharding)
                for k, (dtype, shape, _) in fields.items()}


@dataclasses.dataclass
class StepInputs:
    """What the runner takes: the step's arrays [D, ...] by name, its sampler flags and shape."""
    shape: StepShape
    batch: dict[str, np.ndarray]
    sampling: dict[str, np.ndarray]
    flags: SamplerFlags


def step_shape(plans: list[list[ScheduledChunk]], max_tokens_bucket: int, max_rows_bucket: int,
               max_pages_bucket: int, tile_tokens: int | None) -> StepShape:
    """Bucketed shapes of the step. With the kernels (tile_tokens), block tables are always
    max_pages_bucket wide: the kernels stop at each row's length, so width costs a few KB of
    transfer, and growing contexts compile no new variants; the reference's cost grows with the
    width, so it keeps the bucketed width."""
    decode_only = all(c.num_tokens == 1 for p in plans for c in p)
    if decode_only:  # token i is row i (decode chunks come first in a plan, so fill_replica agrees)
        T = S = decode_rows(max(len(p) for p in plans), max_tokens_bucket, max_rows_bucket)
    else:
        T = mixed_tokens(max(sum(c.num_tokens for c in p) for p in plans), max_tokens_bucket)
        S = mixed_rows(T, max_rows_bucket)
    MB = max_pages_bucket if tile_tokens else bucket(max((len(c.seq.pages) for p in plans for c in p), default=1),
                                                     4, max_pages_bucket)
    return StepShape(len(plans), T, S, MB, decode_only, tile_tokens)


def wants_prompt_logprobs(c: ScheduledChunk) -> bool:
    return c.seq.params.prompt_logprobs is not None and c.start + 1 < len(c.seq.prompt_ids)


def sampler_flags(chunks: list[ScheduledChunk]) -> SamplerFlags:
    """The sampler's static options: prompt logprobs, and whether a sampling row is constrained by
    a structured output (the rest are arrays)."""
    prompt_k = max((c.seq.params.prompt_logprobs for c in chunks if wants_prompt_logprobs(c)), default=-1)
    grammar = any(c.samples and c.seq.params.structured_outputs is not None for c in chunks)
    return SamplerFlags(prompt_logprobs=bucket(prompt_k, 1, 20) if prompt_k > 0 else prompt_k, grammar=grammar)


def banned_tokens(seq, eos_ids: list[int]) -> list[int]:
    """Tokens a sequence may not sample yet (min_tokens): EOS (unless ignored) and its stop tokens."""
    if seq.num_generated >= seq.params.min_tokens:
        return []
    return ([] if seq.params.ignore_eos else list(eos_ids)) + seq.params.stop_token_ids


def bad_word_bans(seq) -> list[int]:
    """vLLM's bad words: a word's last token is banned where the output ends with the rest of it
    (a one-token word: always)."""
    out = seq.output_ids
    return [ids[-1] for ids in seq.bad_word_ids
            if len(ids) == 1 or (len(out) >= len(ids) - 1 and out[len(out) - len(ids) + 1:] == ids[:-1])]


def logit_edits(seq, eos_ids: list[int]) -> list[tuple[int, float, bool]]:
    """A row's (token, bias, allowed) triples this step: allowed_token_ids (only those may be
    sampled), its logit_bias, then -inf on the tokens it may not sample yet or must never (a bias
    plus -inf stays -inf)."""
    p = seq.params
    return ([(t, 0.0, True) for t in p.allowed_token_ids or ()] + [(t, b, False) for t, b in (p.logit_bias or {}).items()]
            + [(t, -np.inf, False) for t in banned_tokens(seq, eos_ids) + bad_word_bans(seq)])


def fill_replica(r: int, plan: list[ScheduledChunk], shape: StepShape, batch: dict, samp: dict,
                 page_size: int) -> None:
    """Replica r's token, position, slot and row arrays and its rows' sampling settings. Per-row work
    is plain Python into lists, written to the arrays once: a step has hundreds of decode rows,
    and per-element numpy writes dominated the host's time per step."""
    P, t = page_size, 0
    ids, pos, slots, rows, spans, from_prev = [], [], [], [], [], []
    per_row = {k: [] for k in ("temperature", "top_p", "top_k", "min_p", "seed", "step", "num_logprobs",
                               "penalty_slot", "count_slot", "presence_penalty", "frequency_penalty",
                               "repetition_penalty")}
    for row, c in enumerate(plan):
        seq, n, start = c.seq, c.num_tokens, c.start
        pages = seq.page_array()
        if n == 1:
            if seq.num_pending:  # its token is the newest the step on the device sampled
                assert start == seq.num_tokens - 1 and seq.num_pending == 1, "a pending token must be decoded next"
                ids.append(0)
                from_prev.append((t, seq.pending_row))
            else:
                ids.append(seq.token_at(start))
            pos.append(start)
            slots.append(int(pages[start // P]) * P + start % P)
            rows.append(row)
        else:
            assert start + n <= seq.num_tokens - seq.num_pending, "a prefill chunk reached a pending token"
            ids.extend(seq.token_slice(start, n))
            at = np.arange(start, start + n)
            pos.extend(at.tolist())
            slots.extend((pages[at // P] * P + at % P).tolist())
            rows.extend([row] * n)
        batch["block_tables"][r, row, :len(pages)] = pages
        spans.append((row, t, n, start))
        t += n
        batch["sample_index"][r, row] = t - 1
        p = seq.params
        for k, v in (("temperature", p.temperature), ("top_p", p.top_p), ("top_k", p.top_k), ("min_p", p.min_p),
                     ("seed", seq.seed), ("step", seq.num_generated),
                     ("num_logprobs", -1 if p.logprobs is None else p.logprobs), ("penalty_slot", seq.penalty_slot),
                     ("count_slot", seq.penalty_slot if c.samples else 0), ("presence_penalty", p.presence_penalty),
                     ("frequency_penalty", p.frequency_penalty), ("repetition_penalty", p.repetition_penalty)):
            per_row[k].append(v)
    batch["tokens"][r, :t], batch["positions"][r, :t] = ids, pos
    batch["slots"][r, :t], batch["token_seq"][r, :t] = slots, rows
    batch["num_tokens"][r] = t
    for i, prev_row in from_prev:
        batch["prev_index"][r, i] = prev_row
    if shape.kernel_layout:
        batch["decode_len"][r], batch["tiles"][r] = mixed_step_layout(spans, shape.S, shape.T, shape.tile_tokens)
    for k, vals in per_row.items():
        samp[k][r, :len(vals)] = vals


def fill_next_tokens(r: int, plan: list[ScheduledChunk], next_token: np.ndarray) -> None:
    """For prompt logprobs: the prompt token after each token of a chunk that asked (-1: none)."""
    t = 0
    for c in plan:
        if wants_prompt_logprobs(c):
            prompt = c.seq.prompt_ids
            end = min(c.start + c.num_tokens, len(prompt) - 1)
            next_token[r, t:t + end - c.start] = prompt[c.start + 1:end + 1]
        t += c.num_tokens


def build_step(plans: list[list[ScheduledChunk]], page_size: int, eos_ids: list[int], max_tokens_bucket: int,
               max_rows_bucket: int, max_pages_bucket: int, tile_tokens: int | None = None) -> StepInputs:
    """The step's arrays for the scheduler's plans (one list of chunks per replica)."""
    shape = step_shape(plans, max_tokens_bucket, max_rows_bucket, max_pages_bucket, tile_tokens)
    chunks = [c for p in plans for c in p]
    flags = sampler_flags(chunks)
    edits = {(r, row): pairs for r, p in enumerate(plans) for row, c in enumerate(p)
             if (pairs := logit_edits(c.seq, eos_ids))}
    edit_width = bucket(max(map(len, edits.values())), EDIT_WIDTH, 1 << 16) if edits else EDIT_WIDTH
    batch = shape.arrays(shape.batch_fields(flags.prompt_logprobs >= 0))
    samp = shape.arrays(shape.sampling_fields(edit_width))
    if shape.decode_only:
        batch["token_seq"][:] = np.arange(shape.T)  # padding tokens: their own (all-zero, scratch-page) rows
    for r, plan in enumerate(plans):
        fill_replica(r, plan, shape, batch, samp, page_size)
        if flags.prompt_logprobs >= 0:
            fill_next_tokens(r, plan, batch["next_token"])
    for (r, row), pairs in edits.items():
        n = len(pairs)
        samp["edit_ids"][r, row, :n], samp["edit_bias"][r, row, :n], samp["edit_allow"][r, row, :n] = zip(*pairs)
    return StepInputs(shape, batch, samp, flags)
