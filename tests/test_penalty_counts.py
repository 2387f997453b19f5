"""Penalties from device token counts against vLLM's rule on the token history (numpy reference)."""

import types

import jax.numpy as jnp
import numpy as np

from sidp_jax.engine.penalty_counts import PenaltySlots, count_sampled, init_arrays, penalize, row_counts
from sidp_jax.sampling_params import SamplingParams


def reference(logits, prompt, outputs, rep, freq, pres):
    """vLLM: repetition on every prompt or output token (divide positive logits, multiply negative),
    then frequency x output count and presence x (count > 0) subtracted."""
    out = logits.astype(np.float64).copy()
    seen = np.zeros(len(out), bool)
    seen[list(prompt) + list(outputs)] = True
    out[seen] = np.where(out[seen] > 0, out[seen] / rep, out[seen] * rep)
    counts = np.bincount(np.asarray(outputs, int), minlength=len(out))
    return out - freq * counts - pres * (counts > 0)


def fake_seq(prompt, outputs, seq_id=0):
    return types.SimpleNamespace(prompt_ids=list(prompt), output_ids=list(outputs), all_ids=list(prompt) + list(outputs),
                                 num_host_tokens=len(prompt) + len(outputs), seq_id=seq_id,
                                 params=SamplingParams(repetition_penalty=1.2), num_preemptions=0,
                                 finish_reason=None, num_pending=0, penalty_slot=0)


def test_rows_written_at_admission_then_counted_per_step_penalize_like_vllm():
    rng = np.random.default_rng(0)
    V, slots = 300, 4
    counts = jnp.zeros((slots, V), jnp.int32)
    prompts = [rng.integers(0, V, 40), rng.integers(0, V, 7)]
    readmitted_outputs = rng.integers(0, V, 9)  # a sequence re-admitted after preemption: outputs known
    counts = counts.at[3].set(7)  # a stale row a finished sequence left: rewritten whole
    counts = counts.at[1].set(row_counts(V, *map(jnp.asarray, init_arrays(fake_seq(prompts[0], [])))))
    counts = counts.at[3].set(row_counts(V, *map(jnp.asarray, init_arrays(fake_seq(prompts[1], readmitted_outputs)))))
    outputs = [[], list(readmitted_outputs)]
    p = {"count_slot": jnp.asarray([1, 0, 3]), "penalty_slot": jnp.asarray([1, 0, 3]),
         "repetition_penalty": jnp.asarray([1.3, 1.0, 0.8]), "frequency_penalty": jnp.asarray([0.5, 0.0, -0.3]),
         "presence_penalty": jnp.asarray([0.2, 0.0, 1.0])}
    for _ in range(25):  # sampled tokens, repeats likely (V small)
        tokens = rng.integers(0, 20, 3)
        counts = count_sampled(counts, p, jnp.asarray(tokens))
        outputs[0].append(tokens[0])
        outputs[1].append(tokens[2])
    logits = rng.standard_normal((3, V)).astype(np.float32) * 3
    got = np.asarray(penalize(jnp.asarray(logits), counts, p))
    for row, (k, slot) in enumerate([(0, 1), (None, 0), (1, 3)]):
        if k is None:
            np.testing.assert_array_equal(got[row], logits[row])  # slot 0 rows: untouched
            continue
        want = reference(logits[row], prompts[k], outputs[k], *(float(p[n][row]) for n in
                         ("repetition_penalty", "frequency_penalty", "presence_penalty")))
        np.testing.assert_allclose(got[row], want, rtol=1e-6, atol=1e-5)


def test_slots_are_handed_out_per_replica_and_taken_back_on_finish_and_preemption():
    slots = PenaltySlots(num_replicas=2, num_slots=3)
    a, b, c = (fake_seq([1], [], i) for i in range(3))
    plain = fake_seq([1], [], 9)
    plain.params = SamplingParams()
    plan = lambda *seqs: [types.SimpleNamespace(seq=s) for s in seqs]
    got = slots.assign([plan(a, plain), plan(b)])
    assert [(s.seq_id, r) for s, r, _ in got] == [(0, 0), (1, 1)] and plain.penalty_slot == 0
    assert a.penalty_slot > 0 and b.penalty_slot > 0
    assert slots.assign([plan(a), plan(b)]) == []  # kept while running
    a.finish_reason = "stop"
    b.num_preemptions = 1  # preempted: its row is stale, a re-admission writes a new one
    got = slots.assign([plan(c), plan(b)])
    assert a.penalty_slot == 0 and {(s.seq_id, r) for s, r, _ in got} == {(2, 0), (1, 1)}
    assert [len(free) for free in slots.free] == [1, 1]  # of 2 usable slots each (0 is scratch)
