"""Continuous batching over D replicas: decode first, then chunked prefill, per replica.

One shared FIFO of waiting sequences feeds every replica; a replica takes new work only when it
has room, the emptiest replica (most free pages) first, so work balances itself and a replica
that runs dry simply takes the next queued requests. A sequence is bound to a replica from its
first prefill chunk until it finishes or is preempted (its KV lives there). When a replica runs
out of pages, its most recently started sequence is preempted by recompute: its pages are freed
and it goes back to the FRONT of the queue, to be prefilled again (prompt + tokens so far).

Admission keeps preemption from thrashing (a victim re-admitted at once, chunk by chunk, only to
be the newest sequence and the next victim, its recompute thrown away again): nothing is admitted
in a step that preempted, and a replica admits a sequence only if its WHOLE remaining prefill
fits beside a reserve of one page per running sequence (their next tokens' growth).

With host overlap (sidp_jax/engine/engine.py) the scheduler plans step N+1 while step N runs: a token
that N samples counts as known (Sequence.num_pending), so its sequence is planned one decode
token as usual; a sequence whose pending token is its last (max_tokens) is not planned again.
"""

from __future__ import annotations

import collections
import dataclasses

from sidp_jax.engine.block_manager import BlockManager
from sidp_jax.engine.sequence import Sequence, Status


@dataclasses.dataclass
class ScheduledChunk:
    seq: Sequence
    start: int  # first token position computed in this step
    num_tokens: int
    samples: bool = dataclasses.field(init=False)  # reaches the end of the known tokens: samples the next

    def __post_init__(self):  # fixed when planned: the sequence grows before the step's tokens are read
        self.samples = self.start + self.num_tokens == self.seq.num_tokens


class Scheduler:
    thrash_guard = True  # the admission rules above; False: admit whatever fits now (for comparison)

    def __init__(self, num_replicas: int, num_pages: int, page_size: int, max_num_seqs: int,
                 max_num_batched_tokens: int):
        self.blocks = [BlockManager(num_pages, page_size) for _ in range(num_replicas)]
        self.running: list[list[Sequence]] = [[] for _ in range(num_replicas)]
        self.waiting: collections.deque[Sequence] = collections.deque()
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting) or any(self.running)

    def finish(self, seq: Sequence) -> None:
        """seq is done: free its pages. It may be waiting: preempted while its last token was still
        on the device (host overlap)."""
        if seq.status is Status.RUNNING:
            self.running[seq.replica].remove(seq)
            self.blocks[seq.replica].free(seq)
        elif seq.status is Status.WAITING:
            self.waiting.remove(seq)
        seq.status = Status.FINISHED

    def abort_all(self) -> None:
        """Drop every waiting and running sequence and free its pages."""
        self.waiting.clear()
        for r, running in enumerate(self.running):
            for seq in running:
                self.blocks[r].free(seq)
                seq.status = Status.FINISHED
            running.clear()

    def _preempt(self, replica: int) -> Sequence:
        victim = self.running[replica].pop()
        self.blocks[replica].free(victim)
        victim.reset_for_recompute()
        victim.replica = None
        self.waiting.appendleft(victim)
        self.num_preemptions += 1
        return victim

    def _fits(self, r: int, seq: Sequence, first_chunk: int) -> bool:
        """Admission test: the first chunk now, and room for the rest of the prefill plus a page
        of growth per running sequence."""
        blocks = self.blocks[r]
        if not self.thrash_guard:
            return blocks.can_allocate(seq, first_chunk)
        reserve = blocks.pages_needed(seq, seq.num_uncomputed) + len(self.running[r])
        return blocks.can_allocate(seq, first_chunk) and reserve <= blocks.num_free

    def schedule(self) -> list[list[ScheduledChunk]]:
        plans: list[list[ScheduledChunk]] = [[] for _ in self.blocks]
        budgets = [self.max_num_batched_tokens] * len(self.blocks)
        preempted_before = self.num_preemptions
        for r in range(len(self.blocks)):
            self._schedule_running(r, plans[r], budgets)
        # Admit queued sequences, emptiest replica first, one at a time so replicas fill evenly;
        # none after a preemption (the pages it freed are the running sequences' growth).
        while self.waiting and (self.num_preemptions == preempted_before or not self.thrash_guard):
            open_replicas = [r for r in range(len(self.blocks))
                             if budgets[r] > 0 and len(self.running[r]) < self.max_num_seqs]
            if not open_replicas:
                break
            r = max(open_replicas, key=lambda i: (self.blocks[i].num_free, budgets[i]))
            seq = self.waiting[0]
            if seq.num_pending:  # preempted with a token still on the device: prefill it once it lands
                break
            n = min(seq.num_uncomputed, budgets[r])
            if not self._fits(r, seq, n):
                break
            self.waiting.popleft()
            self.blocks[r].allocate(seq, n)
            seq.replica, seq.status = r, Status.RUNNING
            self.running[r].append(seq)
            plans[r].append(ScheduledChunk(seq, seq.num_computed, n))
            budgets[r] -= n
        for plan in plans:  # decode tokens first, then prefill chunks
            plan.sort(key=lambda c: c.num_tokens > 1)
        return plans

    def _schedule_running(self, r: int, plan: list[ScheduledChunk], budgets: list[int]) -> None:
        blocks, running = self.blocks[r], self.running[r]
        i = 0
        while i < len(running) and budgets[r] > 0:
            seq = running[i]
            if seq.num_pending and seq.num_generated >= seq.max_tokens:  # its last token is on the device
                i += 1
                continue
            n = min(seq.num_uncomputed, budgets[r])
            while not blocks.can_allocate(seq, n):
                if self._preempt(r) is seq:
                    break
            if seq.status is not Status.RUNNING:  # preempted itself: nothing later in the list remains
                break
            blocks.allocate(seq, n)
            plan.append(ScheduledChunk(seq, seq.num_computed, n))
            budgets[r] -= n
            i += 1
