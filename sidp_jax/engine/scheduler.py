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

Prefix caching (sidp_jax/engine/block_manager.py): an admitted sequence starts after the pages
its replica already holds for its prompt's prefix, and the replica is chosen for that prefix
unless it is much fuller than the emptiest (Scheduler._route); the n samples of a request,
admitted one after another, share the first one's prompt pages.

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


AFFINITY_FREE_SHARE = 0.5  # prefix affinity wins while its replica has half the emptiest one's free pages


class Scheduler:
    def __init__(self, num_replicas: int, num_pages: int, page_size: int, max_num_seqs: int,
                 max_num_batched_tokens: int, enable_prefix_caching: bool = False, thrash_guard: bool = True):
        """thrash_guard: the admission rules above; False admits whatever fits now (for comparison)."""
        self.thrash_guard = thrash_guard
        self.blocks = [BlockManager(num_pages, page_size, enable_prefix_caching) for _ in range(num_replicas)]
        self.prefill_tokens_requested = 0  # tokens to prefill at admission (prompts, recomputes)
        self.prefill_tokens_cached = 0  # of which the prefix cache held
        self._prefilling: dict[int, Sequence] = {}  # request -> its sample still prefilling the prompt (n > 1)
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

    def prefix_cache_stats(self) -> dict:
        """Prefill tokens requested at admission (prompts and recomputes), how many the prefix cache
        held (computed = requested - cached), its hit rate and evictions."""
        requested, cached = self.prefill_tokens_requested, self.prefill_tokens_cached
        return {"prefix_caching": self.blocks[0].enable_prefix_caching, "prefill_tokens_requested": requested,
                "prefill_tokens_computed": requested - cached,
                "prefix_cache_hit_rate": cached / requested if requested else 0.0,
                "prefix_cache_evictions": sum(b.num_evictions for b in self.blocks)}

    def abort_all(self) -> None:
        """Drop every waiting and running sequence and free its pages (their cached pages stay:
        every planned step was dispatched; see drop_prefix_cache)."""
        self.waiting.clear()
        self._prefilling.clear()
        for r, running in enumerate(self.running):
            for seq in running:
                self.blocks[r].free(seq)
                seq.status = Status.FINISHED
            running.clear()

    def drop_prefix_cache(self) -> None:
        """Forget every cached page: a step failed, so pages it registered may never be written."""
        for blocks in self.blocks:
            blocks.drop_cache()

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
            seq = self.waiting[0]
            if seq.num_pending:  # preempted with a token still on the device: prefill it once it lands
                break
            if self._sibling_prefilling(seq):  # its prompt's pages are on their way: share them whole
                break
            route = self._route(seq, open_replicas, budgets)
            if route is None:  # the replica holding its prefix has spent this step's tokens
                break
            r, cached = route
            blocks = self.blocks[r]
            blocks.share(seq, cached)
            n = min(seq.num_uncomputed, budgets[r])
            if not self._fits(r, seq, n):
                blocks.free(seq)  # the cached pages go back to the cache
                seq.num_computed = 0
                break
            self.waiting.popleft()
            self.prefill_tokens_requested += seq.num_tokens
            self.prefill_tokens_cached += seq.num_computed
            if seq.num_preemptions == 0:
                seq.num_cached_tokens = seq.num_computed
            self._plan(r, seq, n, plans[r], budgets)
            seq.replica, seq.status = r, Status.RUNNING
            self.running[r].append(seq)
            if seq.params.n > 1 and blocks.enable_prefix_caching and seq.num_computed + n < len(seq.prompt_ids):
                self._prefilling[seq.request_index] = seq
        for plan in plans:  # decode tokens first, then prefill chunks
            plan.sort(key=lambda c: c.num_tokens > 1)
        return plans

    def _plan(self, r: int, seq: Sequence, n: int, plan: list[ScheduledChunk], budgets: list[int]) -> None:
        """Give seq the pages for its next n tokens and plan them; the pages they fill are cached."""
        self.blocks[r].allocate(seq, n)
        plan.append(ScheduledChunk(seq, seq.num_computed, n))
        self.blocks[r].register(seq, seq.num_computed + n)
        budgets[r] -= n

    def _sibling_prefilling(self, seq: Sequence) -> bool:
        """Another sample of seq's request is still prefilling the same prompt (n > 1)."""
        lead = self._prefilling.get(seq.request_index)
        if lead is None:
            return False
        if lead.status is not Status.RUNNING or lead.num_computed >= len(lead.prompt_ids):
            del self._prefilling[seq.request_index]
            return False
        return lead is not seq and seq.num_computed == 0

    def _route(self, seq: Sequence, open_replicas: list[int], budgets: list[int]) -> tuple[int, list[int]] | None:
        """(replica, its cached prefix pages for seq). The emptiest replica (most free pages), unless
        another holds a longer cached prefix of seq and has at least AFFINITY_FREE_SHARE of the
        emptiest one's free pages: affinity saves the prefix's compute, balance keeps one replica
        from filling (and preempting) while others idle. None: that replica has spent this step's
        token budget, so seq waits a step for it (not for one that is full of sequences)."""
        free = lambda i: self.blocks[i].num_free
        emptiest = max(open_replicas, key=lambda i: (free(i), budgets[i]))
        if not self.blocks[emptiest].enable_prefix_caching:
            return emptiest, []
        # replicas with room for one more sequence, open this step or once their token budget renews
        roomy = [i for i in range(len(self.blocks)) if len(self.running[i]) < self.max_num_seqs]
        cached = {i: self.blocks[i].cached_prefix(seq) for i in roomy}
        best = max(roomy, key=lambda i: (len(cached[i]), i in open_replicas, free(i)))
        if len(cached[best]) > len(cached[emptiest]) and free(best) >= AFFINITY_FREE_SHARE * free(emptiest):
            return (best, cached[best]) if best in open_replicas else None  # None: wait a step for it
        return emptiest, cached[emptiest]

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
            self._plan(r, seq, n, plan, budgets)
            i += 1
