"""The step loop: schedule, build the batch, run it on the devices, apply the sampled tokens."""

from __future__ import annotations

import dataclasses
import time

import jax
import numpy as np

from sidp_jax.engine.grammar_masks import GrammarMasks
from sidp_jax.engine.model_runner import ModelRunner
from sidp_jax.engine.penalty_counts import PenaltySlots
from sidp_jax.engine.sampler import Sampled
from sidp_jax.engine.scheduler import ScheduledChunk, Scheduler
from sidp_jax.engine.sequence import Sequence
from sidp_jax.engine.step_inputs import build_step, wants_prompt_logprobs
from sidp_jax.engine.step_times import step_times
from sidp_jax.engine.stop import Stop, check_stop
from sidp_jax.outputs import CompletionOutput, Logprob, RequestMetrics, RequestOutput
from sidp_jax.sampling_params import SamplingParams


class Request:
    def __init__(self, index: int, prompt: str | None, prompt_ids: list[int], params: SamplingParams):
        self.index, self.prompt, self.prompt_ids, self.params = index, prompt, prompt_ids, params
        self.seqs: list[Sequence] = []
        self.bad_word_ids: list[list[int]] = []  # SamplingParams.bad_words as token ids (LLM._bad_word_ids)
        self.metrics = RequestMetrics(arrival_time=time.time())

    @property
    def finished(self) -> bool:
        return all(s.finish_reason is not None for s in self.seqs)

    def output(self) -> RequestOutput:
        outs = [CompletionOutput(s.sample_index, s.text, list(s.output_ids), s.finish_reason,
                                 s.output_logprobs if self.params.logprobs is not None else None, s.stop_reason,
                                 s.cumulative_logprob)
                for s in self.seqs]
        self.metrics.num_preemptions = sum(s.num_preemptions for s in self.seqs)
        firsts = [s.first_token_time for s in self.seqs if s.first_token_time is not None]
        self.metrics.first_token_time = min(firsts) if firsts else None
        first = self.seqs[0] if self.seqs else None
        return RequestOutput(str(self.index), self.prompt, self.prompt_ids, outs, True, self.metrics,
                             num_cached_tokens=first.num_cached_tokens if first else 0,
                             prompt_logprobs=first.prompt_logprobs if first else None)


@dataclasses.dataclass
class _InFlight:
    """A dispatched step whose results the host has not read yet."""
    plans: list[list[ScheduledChunk]]
    out: Sampled  # its outputs, on the devices
    dispatched_at: float  # perf_counter


class Engine:
    """Runs steps over every replica. With async_scheduling (the default) the host works one step
    ahead: it schedules, builds and dispatches step N+1 while step N runs, then reads N's tokens
    and applies them (stop checks, detokenization) while N+1 runs. A token N sampled reaches N+1
    on the device (sidp_jax/engine/token_buffer.py); a sequence that N finished may have a token in flight
    in N+1, which is discarded. Penalties read token counts kept on the device
    (sidp_jax/engine/penalty_counts.py), so they need no host tokens either: outputs are identical
    with the overlap on or off."""

    def __init__(self, runner: ModelRunner, scheduler: Scheduler, *, tokenizer, eos_ids: list[int],
                 max_model_len: int, max_num_batched_tokens: int, max_num_seqs: int, seed: int, mode_policy,
                 async_scheduling: bool = True):
        self.runner, self.scheduler, self.tokenizer = runner, scheduler, tokenizer
        self.eos_ids = eos_ids
        self.max_model_len = max_model_len
        self.max_num_batched_tokens, self.max_num_seqs = max_num_batched_tokens, max_num_seqs
        self.max_pages = -(-max_model_len // runner.page_size)
        self.rng = np.random.default_rng(seed)
        self.mode_policy = mode_policy
        self.async_scheduling = async_scheduling
        self.steps_per_mode: dict[str, int] = {}
        self.wall_seconds = 0.0  # inside step()
        self.wait_seconds = 0.0  # of which blocked on the devices' results
        self.device_seconds = 0.0  # device busy, as the host sees it (see _read)
        self.steps_found_ready = 0  # steps whose results were ready before the host asked
        self.device_fed_tokens = 0  # tokens a step read from the previous step's output on the device
        self.num_steps = 0
        self._next_seq_id = 0
        self._inflight: _InFlight | None = None
        self._last_ready = 0.0
        self.penalty_slots = PenaltySlots(runner.layout.num_replicas, runner.counts.shape[1])
        self._grammar_masks: GrammarMasks | None = None  # built at the first structured-output request

    def add(self, req: Request) -> None:
        p = req.params
        for i in range(p.n):
            seed = (p.seed + i) if p.seed is not None else int(self.rng.integers(0, 2**31 - 1))
            budget = self.max_model_len - len(req.prompt_ids)
            max_tokens = budget if p.max_tokens is None else min(p.max_tokens, budget)
            seq = Sequence(self._next_seq_id, req.index, i, req.prompt_ids, p, seed, max_tokens)
            seq.bad_word_ids = req.bad_word_ids
            self._next_seq_id += 1
            req.seqs.append(seq)
            self.scheduler.add(seq)

    def has_work(self) -> bool:
        return self.scheduler.has_work()

    def abort_all(self) -> None:
        """Drop every sequence and the step in flight (its results are never read)."""
        self._inflight = None
        self.scheduler.abort_all()
        self.penalty_slots.clear()

    def step(self) -> list[Sequence]:
        """One engine step over every replica; returns the sequences that finished."""
        try:
            return self._step()
        except BaseException:
            self.scheduler.drop_prefix_cache()  # what the failed step registered may be unwritten
            raise

    def _step(self) -> list[Sequence]:
        t0 = time.perf_counter()
        finished: list[Sequence] = []
        plans = self.scheduler.schedule()
        if self._inflight is not None and (self.penalty_slots.waits_for_host_tokens(plans) or _bad_words_wait(plans)
                                           or _grammar_wait(plans)):
            finished += self._apply(self._take_inflight())
            plans = [[c for c in plan if c.seq.finish_reason is None] for plan in plans]
            if not any(plans):  # every planned sequence just finished: nothing left to run this step
                self.wall_seconds += time.perf_counter() - t0
                return finished
        for seq, replica, slot in self.penalty_slots.assign(plans):  # before the step that reads them
            self.runner.init_penalty_counts(replica, slot, seq)
        if not any(plans):
            if self._inflight is None:
                raise RuntimeError("scheduler produced an empty step although work is pending (KV cache too small?)")
            finished += self._apply(self._take_inflight())  # every planned sequence awaits its last token
            self.wall_seconds += time.perf_counter() - t0
            return finished
        inputs = build_step(plans, self.runner.page_size, self.eos_ids, self.max_num_batched_tokens,
                            self.max_num_seqs, self.max_pages, self.runner.tile_tokens)
        if inputs.flags.grammar:  # constrained rows: their allowed tokens, computed now on the host
            rows = [(r, row, c.seq) for r, plan in enumerate(plans) for row, c in enumerate(plan)
                    if c.samples and c.seq.params.structured_outputs is not None]
            inputs.sampling["grammar_mask"] = self.grammar_masks().fill(rows, len(plans), inputs.shape.S)
        mode = self.mode_policy(plans)
        self.device_fed_tokens += int((inputs.batch["prev_index"] >= 0).sum())
        previous = self._take_inflight()
        dispatched_at = time.perf_counter()
        out = self.runner.dispatch(inputs, mode, previous.out.tokens if previous is not None else None)
        for plan in plans:
            for row, c in enumerate(plan):
                c.seq.num_computed += c.num_tokens
                if c.samples:
                    c.seq.num_pending += 1
                    c.seq.pending_row = row
        self._inflight = _InFlight(plans, out, dispatched_at)
        self.steps_per_mode[mode] = self.steps_per_mode.get(mode, 0) + 1
        self.num_steps += 1
        if previous is not None:
            finished += self._apply(previous)
        if not self.async_scheduling:
            finished += self._apply(self._take_inflight())
        self.wall_seconds += time.perf_counter() - t0
        return finished

    def grammar_masks(self) -> GrammarMasks:
        if self._grammar_masks is None:
            if self.tokenizer is None:
                raise ValueError("structured outputs need the model's tokenizer")
            self._grammar_masks = GrammarMasks(self.tokenizer.backend.to_str(), self.runner.cfg.vocab_size,
                                               self.eos_ids)
        return self._grammar_masks

    def _take_inflight(self) -> _InFlight | None:
        flight, self._inflight = self._inflight, None
        return flight

    def _read(self, flight: _InFlight) -> Sampled:
        """Wait for a step's results. Its device time runs from the later of its dispatch and the
        previous step's end to when its results arrive: exact while the host waits on the device;
        a step whose results were ready before the host asked (counted in steps_found_ready) is
        timed to when the host asked, which counts the device's idle gap as busy."""
        t = time.perf_counter()
        self.steps_found_ready += all(a.is_ready() for a in jax.tree.leaves(flight.out))
        out = jax.device_get(flight.out)
        ready = time.perf_counter()
        self.wait_seconds += ready - t
        self.device_seconds += ready - max(flight.dispatched_at, self._last_ready)
        self._last_ready = ready
        return out

    def _apply(self, flight: _InFlight | None) -> list[Sequence]:
        """Read a step's tokens and add them; returns the sequences they finished."""
        if flight is None:
            return []
        out = self._read(flight)
        finished = []
        for r, plan in enumerate(flight.plans):
            t = 0
            for row, c in enumerate(plan):
                seq, t = c.seq, t + c.num_tokens
                if out.prompt is not None and wants_prompt_logprobs(c):
                    self._prompt_logprobs(seq, c, out.prompt, r, t - c.num_tokens)
                if not c.samples:
                    continue
                seq.num_pending -= 1
                if seq.finish_reason is None and self._append(seq, out, r, row):  # else: discarded
                    self.scheduler.finish(seq)
                    finished.append(seq)
        return finished

    def _append(self, seq: Sequence, out: Sampled, r: int, row: int) -> bool:
        """Add the sampled token; True when the sequence is done."""
        token = int(out.tokens[r, row])
        seq.output_ids.append(token)
        if seq.first_token_time is None:
            seq.first_token_time = time.time()
        p = seq.params
        seq.cumulative_logprob += float(out.logprob[r, row])
        if p.logprobs is not None:
            seq.output_logprobs.append(self._logprobs(token, out.logprob[r, row], out.rank[r, row],
                                                      out.top_ids, out.top_logprobs, (r, row), p.logprobs))
        decode = (lambda ids: self.tokenizer.decode(ids, p.skip_special_tokens)) if self.tokenizer else None
        stop = check_stop(seq.output_ids, p, seq.max_tokens, self.eos_ids, decode)
        if stop is None and p.structured_outputs is not None and GrammarMasks.done(seq):
            stop = Stop("stop")  # the grammar is complete: nothing more may follow
        if stop is None:
            return False
        seq.finish_reason, seq.stop_reason = stop.finish_reason, stop.stop_reason
        seq.text = stop.text if stop.text is not None else decode(seq.output_ids) if decode else ""
        return True

    def _logprobs(self, token: int, logprob, rank, top_ids, top_logprobs, at: tuple, k: int) -> dict:
        """{token_id: Logprob} of one position: the chosen token's, then the top k (ranks 1..k)."""
        text = (lambda i: self.tokenizer.decode([i])) if self.tokenizer else (lambda i: None)
        out = {token: Logprob(float(logprob), int(rank), text(token))}
        if k:
            for j, (i, v) in enumerate(zip(top_ids[at][:k], top_logprobs[at][:k])):
                out.setdefault(int(i), Logprob(float(v), j + 1, text(int(i))))
        return out

    def _prompt_logprobs(self, seq: Sequence, c: ScheduledChunk, got, r: int, t0: int) -> None:
        """Fill seq.prompt_logprobs[p + 1] from each token p of chunk c (not again after a recompute)."""
        k = seq.params.prompt_logprobs
        for j in range(min(c.num_tokens, len(seq.prompt_ids) - 1 - c.start)):
            pos = c.start + j + 1
            if seq.prompt_logprobs[pos] is None:
                seq.prompt_logprobs[pos] = self._logprobs(seq.prompt_ids[pos], got.logprob[r, t0 + j],
                                                          got.rank[r, t0 + j], got.top_ids, got.top_logprobs,
                                                          (r, t0 + j), k)

    def stats(self) -> dict:
        """host: time in step() not spent waiting on the devices; device_idle_share: the share of
        step() wall time the devices were not busy (a lower bound where steps_found_ready > 0)."""
        host = self.wall_seconds - self.wait_seconds
        return {"num_steps": self.num_steps, "steps_per_mode": dict(self.steps_per_mode),
                "num_preemptions": self.scheduler.num_preemptions,
                "steps_per_attention": dict(self.runner.steps_per_attention),
                "precompiled_steps": self.runner.precompiled_steps, "async_scheduling": self.async_scheduling,
                "wall_seconds": self.wall_seconds, "host_seconds": host, "device_seconds": self.device_seconds,
                **step_times(self.wall_seconds, host, self.device_seconds, self.num_steps),
                "steps_found_ready": self.steps_found_ready, "device_fed_tokens": self.device_fed_tokens,
                **self.scheduler.prefix_cache_stats()}


def _grammar_wait(plans: list[list[ScheduledChunk]]) -> bool:
    """A structured-output row's mask depends on its newest token, which must be on the host."""
    return any(c.seq.num_pending and c.seq.params.structured_outputs is not None for plan in plans for c in plan)


def _bad_words_wait(plans: list[list[ScheduledChunk]]) -> bool:
    """A bad word of several tokens is banned by matching the output's newest tokens on the host,
    so a row that has one cannot leave its newest token on the device."""
    return any(c.seq.num_pending and any(len(ids) > 1 for ids in c.seq.bad_word_ids) for plan in plans for c in plan)
