"""Host side of a step: scheduled chunks -> padded, bucketed numpy arrays, one row per replica.

Shapes are rounded up to powers of two (tokens T, sequence rows S, pages per row MB) so the
number of compiled step variants stays small; a mixed step's rows follow from its tokens alone.
Padding tokens write to the reserved page 0 and padding rows are greedy, penalty-free and never
read back.

A decode-only step (every chunk of every replica is one token) is laid out with token i in row i
and as many token slots as rows (T == S, one bucket), so the paged decode kernel can read the
block tables row by row (sidp_jax.kernels.attention); build_batch says so with `decode_only`.

For the Pallas kernels of a MIXED step (`tile_tokens` given) the batch also says which rows the
decode kernel takes (`decode_len`: the leading one-token rows, whose token sits at the row's own
index because decode chunks come first) and cuts every other chunk into tiles of at most
`tile_tokens` tokens (`tiles`, see kernels/paged_prefill_pallas.py). Their count is fixed by
T and S (each chunk adds at most one partial tile), so they add no compiled shapes.
"""

from __future__ import annotations

import numpy as np

from sidp_jax.engine.sampler import SamplerFlags
from sidp_jax.engine.scheduler import ScheduledChunk


# Smallest buckets: a decode step of up to 64 rows, or a mixed step of up to 256 tokens, is bound by
# reading the weights (HBM), so padding it up costs next to nothing, while every extra variant of a
# 64-80 layer program costs 10-20 s of compilation on GPU (benchmarks/RESULTS.md).
MIN_DECODE_ROWS = 64
MIN_MIXED_TOKENS = 256


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


def build_batch(plans: list[list[ScheduledChunk]], page_size: int, eos_ids: list[int],
                max_tokens_bucket: int, max_rows_bucket: int, max_pages_bucket: int,
                tile_tokens: int | None = None):
    """Returns (batch arrays, sampling arrays, SamplerFlags, decode_only).

    tile_tokens: lay out the step for the Pallas kernels: a mixed step gets `decode_len` and
    `tiles`, and block tables are always max_pages_bucket wide (the kernels stop at each row's
    length, so width costs nothing but a few KB of transfer, and growing contexts compile no new
    step variants; the reference's cost grows with the width, so it keeps the bucketed width)."""
    D = len(plans)
    decode_only = all(c.num_tokens == 1 for p in plans for c in p)
    if decode_only:  # token i is row i (decode chunks come first in a plan, so the loop below agrees)
        T = S = decode_rows(max(len(p) for p in plans), max_tokens_bucket, max_rows_bucket)
    else:
        T = mixed_tokens(max(sum(c.num_tokens for c in p) for p in plans), max_tokens_bucket)
        S = mixed_rows(T, max_rows_bucket)
    MB = max_pages_bucket if tile_tokens else bucket(max((len(c.seq.pages) for p in plans for c in p), default=1),
                                                     4, max_pages_bucket)
    seqs = [c.seq for p in plans for c in p]
    flags = SamplerFlags(
        filters=any(s.params.uses_filters and not s.params.greedy for s in seqs),
        penalties=any(s.params.uses_penalties for s in seqs),
        num_logprobs=max((s.params.logprobs or 0 for s in seqs), default=0))
    if flags.num_logprobs:
        flags = SamplerFlags(flags.filters, flags.penalties, bucket(flags.num_logprobs, 1, 20))

    tokens = np.zeros((D, T), np.int32)
    positions = np.zeros((D, T), np.int32)
    slots = np.zeros((D, T), np.int32)
    token_seq = np.zeros((D, T), np.int32)
    if decode_only:
        token_seq[:] = np.arange(T)  # padding tokens: their own (all-zero, scratch-page) rows
    prev_index = np.full((D, T), -1, np.int32)  # >= 0: the token is that row of the previous step's output
    tables = np.zeros((D, S, MB), np.int32)
    sample_index = np.zeros((D, S), np.int32)
    samp = {
        "temperature": np.zeros((D, S), np.float32), "top_p": np.ones((D, S), np.float32),
        "top_k": np.zeros((D, S), np.int32), "min_p": np.zeros((D, S), np.float32),
        "seed": np.zeros((D, S), np.uint32), "step": np.zeros((D, S), np.int32),
        "banned": np.full((D, S, 1), -1, np.int32),
    }
    banned_rows: dict[tuple[int, int], list[int]] = {}
    history_rows: dict[tuple[int, int], tuple[list[int], int]] = {}
    # Per-row work is plain Python into lists, written to the arrays once per replica: a step has
    # hundreds of decode rows, and per-element numpy writes dominated the host's time per step.
    P = page_size
    mixed_layout = bool(tile_tokens) and not decode_only
    if mixed_layout:
        decode_len = np.zeros((D, S), np.int32)
        tiles = np.zeros((D, num_tiles(T, S, tile_tokens), 4), np.int32)
    for r, plan in enumerate(plans):
        t = 0
        ids_r, pos_r, slot_r, seq_r, spans, prev_r = [], [], [], [], [], []
        temperature, top_p, top_k, min_p, seed, gen_step = [], [], [], [], [], []
        for row, c in enumerate(plan):
            seq, n, start = c.seq, c.num_tokens, c.start
            pages = seq.page_array()
            if n == 1 and seq.num_pending:  # its token is the newest the step on the device sampled
                assert start == seq.num_tokens - 1 and seq.num_pending == 1, "a pending token must be decoded next"
                ids_r.append(0)
                prev_r.append((t, seq.pending_row))
                pos_r.append(start)
                slot_r.append(int(pages[start // P]) * P + start % P)
                seq_r.append(row)
            elif n == 1:
                ids_r.append(seq.token_at(start))
                pos_r.append(start)
                slot_r.append(int(pages[start // P]) * P + start % P)
                seq_r.append(row)
            else:
                assert start + n <= seq.num_tokens - seq.num_pending, "a prefill chunk reached a pending token"
                ids_r.extend(seq.token_slice(start, n))
                pos = np.arange(start, start + n)
                pos_r.extend(pos.tolist())
                slot_r.extend((pages[pos // P] * P + pos % P).tolist())
                seq_r.extend([row] * n)
            tables[r, row, :len(pages)] = pages
            spans.append((row, t, n, start))
            t += n
            sample_index[r, row] = t - 1
            p = seq.params
            temperature.append(p.temperature)
            top_p.append(p.top_p)
            top_k.append(p.top_k)
            min_p.append(p.min_p)
            seed.append(seq.seed)
            gen_step.append(seq.num_generated)
            if seq.num_generated < p.min_tokens:
                banned_rows[r, row] = ([] if p.ignore_eos else list(eos_ids)) + p.stop_token_ids
            if flags.penalties:
                assert not seq.num_pending, "penalties need every earlier token on the host"
                history_rows[r, row] = (seq.all_ids, len(seq.prompt_ids))
        tokens[r, :t], positions[r, :t], slots[r, :t], token_seq[r, :t] = ids_r, pos_r, slot_r, seq_r
        for i, prev_row in prev_r:
            prev_index[r, i] = prev_row
        if mixed_layout:
            decode_len[r], tiles[r] = mixed_step_layout(spans, S, T, tile_tokens)
        for k, vals in (("temperature", temperature), ("top_p", top_p), ("top_k", top_k), ("min_p", min_p),
                        ("seed", seed), ("step", gen_step)):
            samp[k][r, :len(vals)] = vals
    if banned_rows:
        width = bucket(max(len(v) for v in banned_rows.values()), 1, 1 << 16)
        samp["banned"] = np.full((D, S, width), -1, np.int32)
        for (r, row), ids in banned_rows.items():
            samp["banned"][r, row, :len(ids)] = ids
    if flags.penalties:
        width = bucket(max(len(h) for h, _ in history_rows.values()), 16, 1 << 20)
        samp["history"] = np.full((D, S, width), -1, np.int32)
        samp["history_is_output"] = np.zeros((D, S, width), bool)
        for name in ("presence_penalty", "frequency_penalty"):
            samp[name] = np.zeros((D, S), np.float32)
        samp["repetition_penalty"] = np.ones((D, S), np.float32)
        for r, plan in enumerate(plans):
            for row, c in enumerate(plan):
                hist, n_prompt = history_rows[r, row]
                samp["history"][r, row, :len(hist)] = hist
                samp["history_is_output"][r, row, n_prompt:len(hist)] = True
                for name in ("presence_penalty", "frequency_penalty", "repetition_penalty"):
                    samp[name][r, row] = getattr(c.seq.params, name)
    num_tokens = np.array([sum(c.num_tokens for c in p) for p in plans], np.int32)
    batch = {"tokens": tokens, "positions": positions, "slots": slots, "token_seq": token_seq,
             "block_tables": tables, "sample_index": sample_index, "num_tokens": num_tokens, "prev_index": prev_index}
    if mixed_layout:
        batch["decode_len"], batch["tiles"] = decode_len, tiles
    return batch, samp, flags, decode_only
