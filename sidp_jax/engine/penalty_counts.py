"""Repetition, frequency and presence penalties from token counts kept on the device.

Each replica keeps a table counts [slots, V] int32: row s belongs to one running sequence that
uses penalties (slot 0 is scratch for every other row). An entry holds how many times the token
was sampled (frequency and presence penalties) plus PROMPT_BIT if the token is in the prompt (the
repetition penalty covers prompt and output, as vLLM's does). A row is written at admission from
the sequence's known tokens (`row_counts`, in a small program of its own), then every step adds the
tokens it samples (`count_sampled`, inside the step). So a penalty row needs nothing from the host
per step: the host overlap holds, and the step's shapes never depend on a sequence's length.

The host side (`PenaltySlots`) hands out slots per replica and takes them back when a sequence
finishes or is preempted; a re-admitted sequence gets a fresh row, written again from its prompt
and the outputs generated so far.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

PROMPT_BIT = 1 << 24  # counts below this are output occurrences
INIT_MIN_LEN = 256  # init_arrays' token arrays are padded to powers of two from here


def counts_bytes(cfg, max_num_seqs: int) -> int:
    """Device bytes of one replica's counts table (one row per running sequence, plus scratch)."""
    return (max_num_seqs + 1) * cfg.vocab_size * 4


def penalize(logits: jax.Array, counts: jax.Array, p: dict) -> jax.Array:
    """vLLM's penalties on logits [S, V] for the rows whose penalty_slot > 0 (counts: [slots, V])."""
    rows = counts[p["penalty_slot"]]  # [S, V]
    out = (rows & (PROMPT_BIT - 1)).astype(jnp.float32)
    rp = p["repetition_penalty"][:, None]
    logits = jnp.where(rows != 0, jnp.where(logits > 0, logits / rp, logits * rp), logits)
    logits = logits - p["frequency_penalty"][:, None] * out
    return logits - p["presence_penalty"][:, None] * (out > 0)


def count_sampled(counts: jax.Array, p: dict, tokens: jax.Array) -> jax.Array:
    """Add each row's sampled token to its count_slot's row (0: scratch, never read)."""
    return counts.at[p["count_slot"], tokens].add(1)


def row_counts(vocab_size: int, ids: jax.Array, is_output: jax.Array) -> jax.Array:
    """A counts row [V] from a sequence's known tokens ids [L] (-1 padding): PROMPT_BIT for prompt
    tokens, +1 per output token (init_arrays makes the inputs)."""
    where = jnp.where(ids >= 0, ids, vocab_size)  # padding -> dropped
    row = jnp.zeros((vocab_size,), jnp.int32).at[where].max(jnp.where(is_output, 0, PROMPT_BIT), mode="drop")
    return row.at[where].add(is_output.astype(jnp.int32), mode="drop")


def init_lengths(max_len: int) -> list[int]:
    """The padded lengths init_arrays makes for sequences of up to max_len tokens."""
    lengths = [INIT_MIN_LEN]
    while lengths[-1] < max_len:
        lengths.append(2 * lengths[-1])
    return lengths


def init_arrays(seq) -> tuple[np.ndarray, np.ndarray]:
    """The sequence's known tokens (prompt, then outputs) padded to a power of two >= INIT_MIN_LEN."""
    n = seq.num_host_tokens
    L = init_lengths(n)[-1]
    ids = np.full(L, -1, np.int32)
    ids[:n] = seq.all_ids
    is_output = np.zeros(L, np.bool_)
    is_output[len(seq.prompt_ids):n] = True
    return ids, is_output


class PenaltySlots:
    """Which row of its replica's counts table each running penalty sequence owns."""

    def __init__(self, num_replicas: int, num_slots: int):
        self.free = [list(range(num_slots - 1, 0, -1)) for _ in range(num_replicas)]  # slot 0: scratch
        self.owner: dict[int, tuple[object, int, int, int]] = {}  # seq_id -> (seq, replica, slot, admission)
        # a sequence's slot is also on it (seq.penalty_slot), where build_step reads it

    def assign(self, plans) -> list[tuple[object, int, int]]:
        """Give a slot to every planned penalty sequence that has none for its current admission;
        returns (seq, replica, slot) of the rows to write before the step runs."""
        self.release_stale()
        new = []
        for r, plan in enumerate(plans):
            for c in plan:
                seq = c.seq
                if not seq.params.uses_penalties or seq.seq_id in self.owner:
                    continue
                if not self.free[r]:
                    raise RuntimeError(f"replica {r} has no free penalty slot (more running sequences than max_num_seqs?)")
                slot = seq.penalty_slot = self.free[r].pop()
                self.owner[seq.seq_id] = (seq, r, slot, seq.num_preemptions)
                new.append((seq, r, slot))
        return new

    def waits_for_host_tokens(self, plans) -> bool:
        """A penalty sequence about to get a row with a token still on the device (re-admitted
        while its last step is in flight): its row is written from the host's tokens, so the
        engine reads that step first. Rare: re-admission comes a step after preemption."""
        self.release_stale()
        return any(c.seq.params.uses_penalties and c.seq.seq_id not in self.owner and c.seq.num_pending
                   for plan in plans for c in plan)

    def release_stale(self) -> None:
        """Take back the slots of sequences that finished or were preempted since they got them. A
        step still in flight may add a discarded token to such a row: its next owner's row is
        written whole (row_counts)."""
        for seq_id, (seq, r, slot, admission) in list(self.owner.items()):
            if seq.finish_reason is not None or seq.num_preemptions != admission:
                self._release(seq_id)

    def clear(self) -> None:
        for seq_id in list(self.owner):
            self._release(seq_id)

    def _release(self, seq_id: int) -> None:
        seq, r, slot, _ = self.owner.pop(seq_id)
        seq.penalty_slot = 0
        self.free[r].append(slot)
