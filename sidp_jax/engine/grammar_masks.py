"""Per-token masks of structured-output requests (sidp_jax/structured_outputs.py), on the host.

Each constrained sequence carries an llguidance matcher over its grammar. Before a step that
samples for constrained rows, the matchers consume the tokens their sequences gained since, and
fill their rows of a packed bitmask [S, ceil(V / 32)] int32 (bit t % 32 of word t // 32: token t
allowed) in parallel threads (llguidance's LLExecutor, which drops the GIL); the sampler applies it
on the device (sampler.py). Rows without a grammar are all ones, and a step with no constrained row
sends no mask at all, so unconstrained work pays nothing.

The mask allows EOS only where the grammar accepts the text so far; a matcher that has reached the
end of its grammar (nothing more can follow) finishes its sequence with finish_reason "stop".
"""

from __future__ import annotations

import numpy as np

from sidp_jax.structured_outputs import _llguidance, limits


class GrammarMasks:
    """The model's tokenizer for llguidance (built once: ~0.5 s on a 150k vocabulary) and the
    matchers of the constrained sequences."""

    def __init__(self, tokenizer_json: str, vocab_size: int, eos_ids: list[int]):
        llg = _llguidance()
        self.words = (vocab_size + 31) // 32
        self.tokenizer = llg.LLTokenizer(tokenizer_json, n_vocab=vocab_size, eos_token=list(eos_ids) or None)
        self.executor = llg.LLExecutor()

    def start(self, seq) -> None:
        """Give a constrained sequence its matcher (again from the start after a preemption, then
        fed its output so far)."""
        llg = _llguidance()
        seq.matcher = llg.LLMatcher(self.tokenizer, seq.params.structured_outputs.grammar_text(), limits=limits(),
                                    log_level=0)
        seq.matcher_fed = 0
        if seq.matcher.is_error():
            raise ValueError(f"structured_outputs: {seq.matcher.get_error()}")

    def catch_up(self, seq) -> None:
        """Feed the matcher the sequence's output tokens it has not seen (starting it if needed)."""
        if getattr(seq, "matcher", None) is None:
            self.start(seq)
        _feed(seq)

    def fill(self, rows: list[tuple[int, int, object]], num_replicas: int, num_rows: int) -> np.ndarray:
        """The step's bitmask [D, S, words]: all ones but at rows (replica, row, seq), which get their
        sequence's allowed tokens (computed in parallel)."""
        mask = np.full((num_replicas, num_rows, self.words), -1, np.int32)
        matchers = []
        for r, row, seq in rows:
            self.catch_up(seq)
            matchers.append((seq.matcher, r * num_rows + row))
        if matchers:
            self.executor.unsafe_compute_mask_ptr(matchers, mask.ctypes.data, self.words * 4, num_replicas * num_rows)
        return mask

    @staticmethod
    def done(seq) -> bool:
        """The grammar is complete after this sequence's newest token (nothing more may follow)."""
        if getattr(seq, "matcher", None) is None:
            return False
        _feed(seq)
        return seq.matcher.is_stopped()


def _feed(seq) -> None:
    """Consume the output tokens the sequence's matcher has not seen yet."""
    ids = seq.output_ids[seq.matcher_fed:]
    if ids:
        seq.matcher.consume_tokens(ids)
        seq.matcher_fed = len(seq.output_ids)
