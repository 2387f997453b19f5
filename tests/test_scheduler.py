"""The scheduler alone: admission that keeps preemption from thrashing."""

from sidp_jax.sampling_params import SamplingParams
from sidp_jax.engine.scheduler import Scheduler
from sidp_jax.engine.sequence import Sequence

P = 16


def make_seqs(n, prompt_len, max_tokens):
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    return [Sequence(i, i, 0, [1] * prompt_len, params, 0, max_tokens) for i in range(n)]


def step(sched):
    """One engine step without a model: compute every chunk, sample where a chunk ends the
    known tokens, finish at max_tokens. Returns (replica 0's scheduled sequences, tokens computed)."""
    plans = sched.schedule()
    computed = 0
    for plan in plans:
        for c in plan:
            c.seq.num_computed += c.num_tokens
            computed += c.num_tokens
            if c.samples:
                c.seq.output_ids.append(1)
                if len(c.seq.output_ids) >= c.seq.max_tokens:
                    sched.finish(c.seq)
    return [c.seq for c in plans[0]], computed


def run(sched, seqs):
    for s in seqs:
        sched.add(s)
    computed = 0
    while sched.has_work():
        computed += step(sched)[1]
    return computed


def test_guard_recomputes_less_and_finishes_everything():
    n, prompt, out = 40, 100, 300
    needed = n * (prompt + out - 1)
    results = {}
    for guard in (False, True):
        sched = Scheduler(2, 1000 // P + 1, P, 64, 256, thrash_guard=guard)  # ~1000 tokens a replica: 2-3 sequences
        seqs = make_seqs(n, prompt, out)
        computed = run(sched, seqs)
        assert all(len(s.output_ids) == out for s in seqs)
        results[guard] = (computed - needed, sched.num_preemptions)
    (waste_off, pre_off), (waste_on, pre_on) = results[False], results[True]
    assert pre_on < pre_off and waste_on < waste_off / 2, results


def readmitted_victims(guard: bool) -> int:
    """Steps in which a sequence preempted in that very step was admitted again."""
    sched = Scheduler(1, 12 + 1, P, 16, 24, thrash_guard=guard)  # 12 pages; 24-token chunks fit in freed pages
    for s in make_seqs(6, 40, 60):
        sched.add(s)
    events = 0
    while sched.has_work():
        before = {id(s): s.num_preemptions for s in sched.running[0]}
        step(sched)
        events += any(s.num_preemptions > before.get(id(s), s.num_preemptions) for s in sched.running[0])
    return events


def test_no_admission_in_a_step_that_preempted():
    assert readmitted_victims(False) > 0  # the thrash the rule prevents does happen without it
    assert readmitted_victims(True) == 0


def test_admission_needs_the_whole_prefill_plus_a_page_per_running_sequence():
    sched = Scheduler(1, 10 + 1, P, 8, 32)  # 10 pages, 32-token chunks
    (a,) = make_seqs(1, 20, 10)
    sched.add(a)
    step(sched)  # a: 2 pages, decoding from now on
    (b,) = make_seqs(1, 8 * P, 10)  # 8 pages of prompt: 8 + 1 (a's growth) > 8 free
    sched.add(b)
    assert step(sched)[0] == [a] and list(sched.waiting) == [b]
    (b2,) = make_seqs(1, 7 * P, 10)  # 7 + 1 <= 8: admitted, its first chunk now
    sched.waiting[0] = b2
    scheduled, computed = step(sched)
    assert scheduled == [a, b2] and computed == 32 and not sched.waiting
