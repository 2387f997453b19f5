"""The step loop: schedule, build the batch, run it on the devices, apply the sampled tokens."""

from __future__ import annotations

import time

import numpy as np

from sidp_jax.batch import build_batch
from sidp_jax.model_runner import ModelRunner
from sidp_jax.outputs import CompletionOutput, RequestMetrics, RequestOutput
from sidp_jax.sampling_params import SamplingParams
from sidp_jax.scheduler import Scheduler
from sidp_jax.sequence import Sequence


class Request:
    def __init__(self, index: int, prompt: str | None, prompt_ids: list[int], params: SamplingParams):
        self.index, self.prompt, self.prompt_ids, self.params = index, prompt, prompt_ids, params
        self.seqs: list[Sequence] = []
        self.metrics = RequestMetrics(arrival_time=time.time())

    @property
    def finished(self) -> bool:
        return all(s.finish_reason is not None for s in self.seqs)

    def output(self) -> RequestOutput:
        outs = [CompletionOutput(s.sample_index, s.text, list(s.output_ids), s.finish_reason,
                                 s.output_logprobs if self.params.logprobs is not None else None, s.stop_reason)
                for s in self.seqs]
        self.metrics.num_preemptions = sum(s.num_preemptions for s in self.seqs)
        return RequestOutput(str(self.index), self.prompt, self.prompt_ids, outs, True, self.metrics)


class Engine:
    def __init__(self, runner: ModelRunner, scheduler: Scheduler, *, tokenizer, eos_ids: list[int],
                 max_model_len: int, max_num_batched_tokens: int, max_num_seqs: int, seed: int, mode_policy):
        self.runner, self.scheduler, self.tokenizer = runner, scheduler, tokenizer
        self.eos_ids = eos_ids
        self.max_model_len = max_model_len
        self.max_num_batched_tokens, self.max_num_seqs = max_num_batched_tokens, max_num_seqs
        self.max_pages = -(-max_model_len // runner.page_size)
        self.rng = np.random.default_rng(seed)
        self.mode_policy = mode_policy
        self.steps_per_mode: dict[str, int] = {}
        self.host_seconds = 0.0
        self.device_seconds = 0.0
        self.num_steps = 0
        self._next_seq_id = 0

    def add(self, req: Request) -> None:
        p = req.params
        for i in range(p.n):
            seed = (p.seed + i) if p.seed is not None else int(self.rng.integers(0, 2**31 - 1))
            budget = self.max_model_len - len(req.prompt_ids)
            max_tokens = budget if p.max_tokens is None else min(p.max_tokens, budget)
            seq = Sequence(self._next_seq_id, req.index, i, req.prompt_ids, p, seed, max_tokens)
            self._next_seq_id += 1
            req.seqs.append(seq)
            self.scheduler.add(seq)

    def step(self) -> list[Sequence]:
        """One engine step over every replica; returns the sequences that finished."""
        t0 = time.perf_counter()
        plans = self.scheduler.schedule()
        chunks = [c for plan in plans for c in plan]
        if not chunks:
            raise RuntimeError("scheduler produced an empty step although work is pending (KV cache too small?)")
        batch, samp, flags, decode_only = build_batch(plans, self.runner.page_size, self.eos_ids,
                                                      self.max_num_batched_tokens, self.max_num_seqs, self.max_pages,
                                                      self.runner.tile_tokens)
        mode = self.mode_policy(plans)
        t1 = time.perf_counter()
        out = self.runner.run(batch, samp, flags, mode, decode_only)
        t2 = time.perf_counter()
        finished = []
        for r, plan in enumerate(plans):
            for row, c in enumerate(plan):
                seq = c.seq
                seq.num_computed += c.num_tokens
                if c.samples and self._append(seq, out, r, row):
                    self.scheduler.finish(seq)
                    finished.append(seq)
        self.steps_per_mode[mode] = self.steps_per_mode.get(mode, 0) + 1
        self.num_steps += 1
        self.device_seconds += t2 - t1
        self.host_seconds += (t1 - t0) + (time.perf_counter() - t2)
        return finished

    def _append(self, seq: Sequence, out: dict, r: int, row: int) -> bool:
        """Add the sampled token; True when the sequence is done."""
        token = int(out["tokens"][r, row])
        seq.output_ids.append(token)
        p = seq.params
        if p.logprobs is not None:
            lp = {token: float(out["logprob"][r, row])}
            if p.logprobs:
                ids, lps = out["top_ids"][r, row][:p.logprobs], out["top_logprobs"][r, row][:p.logprobs]
                lp.update({int(i): float(v) for i, v in zip(ids, lps)})
            seq.output_logprobs.append(lp)
        n = len(seq.output_ids)
        if n >= p.min_tokens:
            if not p.ignore_eos and token in self.eos_ids:
                seq.finish_reason, seq.stop_reason = "stop", None
            elif token in p.stop_token_ids:
                seq.finish_reason, seq.stop_reason = "stop", token
            elif p.stop and self._hit_stop_string(seq):
                seq.finish_reason = "stop"
        if seq.finish_reason is None and n >= seq.max_tokens:
            seq.finish_reason = "length"
        if seq.finish_reason is None:
            return False
        if not (p.stop and seq.finish_reason == "stop" and isinstance(seq.stop_reason, str)):
            seq.text = self.tokenizer.decode(seq.output_ids) if self.tokenizer else ""
        return True

    def _hit_stop_string(self, seq: Sequence) -> bool:
        """Checked after every token, so a stop string that just appeared ends in the newest token:
        decode only a tail window wide enough to hold it (4 tokens per character covers byte-level
        pieces, plus slack for the window's ragged start), and the whole output only on a hit (to
        cut the text exactly), instead of decoding the whole output every step."""
        if self.tokenizer is None:
            return False
        window = 4 * max(len(s) for s in seq.params.stop) + 8
        if len(seq.output_ids) > window and not any(
                s in self.tokenizer.decode(seq.output_ids[-window:]) for s in seq.params.stop):
            return False
        text = self.tokenizer.decode(seq.output_ids)
        hits = [(text.find(s), s) for s in seq.params.stop if s in text]
        if not hits:
            return False
        pos, s = min(hits)
        seq.text, seq.stop_reason = text[:pos], s
        return True

    def stats(self) -> dict:
        return {"num_steps": self.num_steps, "steps_per_mode": dict(self.steps_per_mode),
                "num_preemptions": self.scheduler.num_preemptions,
                "steps_per_attention": dict(self.runner.steps_per_attention),
                "precompiled_steps": self.runner.precompiled_steps,
                "host_seconds": self.host_seconds, "device_seconds": self.device_seconds}
