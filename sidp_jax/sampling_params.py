"""SamplingParams with vLLM's names and validation that names the offending field."""

from __future__ import annotations

import dataclasses
import math
from typing import Any


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


@dataclasses.dataclass
class SamplingParams:
    n: int = 1
    temperature: float = 1.0  # 0 means greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: disabled
    min_p: float = 0.0
    max_tokens: int | None = 16
    min_tokens: int = 0
    stop: list[str] | str | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    seed: int | None = None
    logprobs: int | None = None
    prompt_logprobs: int | None = None  # per prompt token: its logprob and the top-N (0: its own only)
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: dict[int, float] | None = None  # token id -> added to its logit (OpenAI's keys may be strings)
    allowed_token_ids: list[int] | None = None  # sample only among these
    bad_words: list[str] | None = None  # never generate these words (each as the tokenizer splits it)
    include_stop_str_in_output: bool = False  # keep the stop string that ended the text
    skip_special_tokens: bool = True  # leave special tokens out of the text
    spaces_between_special_tokens: bool = True  # vLLM's name; see the field's check below
    truncate_prompt_tokens: int | None = None  # keep only the prompt's last k tokens (-1: max_model_len - 1)
    structured_outputs: Any = None  # a StructuredOutputsParams (or a dict of its fields): json, regex, choice, ...

    MAX_LOGPROBS = 20
    MAX_LOGIT_BIAS = 100.0  # OpenAI's range for a bias value

    MAX_INT32 = 2**31 - 1  # the step's int32 arrays (top_k, token ids, lengths)
    MAX_SEED = 2**32 - 1  # seeds travel as uint32

    def __post_init__(self):
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if self.stop is not None and not isinstance(self.stop, (list, tuple)):
            self._fail("stop", "must be a string or a list of strings")
        if self.stop_token_ids is not None and not isinstance(self.stop_token_ids, (list, tuple)):
            self._fail("stop_token_ids", "must be a list of integers")
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        if self.top_k == -1:
            self.top_k = 0
        self.logit_bias = self._token_map("logit_bias", self.logit_bias)
        if self.structured_outputs is not None:
            from sidp_jax.structured_outputs import StructuredOutputsParams

            try:
                self.structured_outputs = StructuredOutputsParams.from_value(self.structured_outputs)
            except ValueError as e:
                raise ValueError(f"SamplingParams.{e}") from None
        if self.allowed_token_ids is not None and not isinstance(self.allowed_token_ids, (list, tuple)):
            self._fail("allowed_token_ids", "must be a list of token ids")
        if isinstance(self.bad_words, str):
            self.bad_words = [self.bad_words]
        if self.bad_words is not None and not isinstance(self.bad_words, (list, tuple)):
            self._fail("bad_words", "must be a list of strings")
        self._validate()

    def _token_map(self, field: str, value) -> dict[int, float] | None:
        """{token id: number}, the ids as ints or (JSON) decimal strings."""
        if value is None:
            return None
        if not isinstance(value, dict):
            self._fail(field, "must be an object mapping token ids to numbers")
        out = {}
        for key, v in value.items():
            tid = key if _is_int(key) else int(key) if isinstance(key, str) and key.isascii() and key.isdigit() else None
            if tid is None or not 0 <= tid <= self.MAX_INT32:
                self._fail(field, f"has a key that is not a token id ({key!r})")
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) \
                    or abs(v) > self.MAX_LOGIT_BIAS:
                self._fail(field, f"must map token ids to numbers in [-{self.MAX_LOGIT_BIAS:g}, "
                                  f"{self.MAX_LOGIT_BIAS:g}] (token {key!r}: {v!r})")
            out[tid] = float(v)
        return out or None

    def _fail(self, field: str, why: str):
        raise ValueError(f"SamplingParams.{field} {why}, got {getattr(self, field)!r}")

    def _int(self, field: str, lo: int, hi: int, optional: bool = False) -> None:
        v = getattr(self, field)
        if optional and v is None:
            return
        if not _is_int(v) or not lo <= v <= hi:
            self._fail(field, f"must be an integer in [{lo}, {hi}]" + (" or None" if optional else ""))

    def _real(self, field: str, ok, why: str) -> None:
        v = getattr(self, field)
        if not (isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and ok(v)):
            self._fail(field, f"must be a finite number {why}")

    def _validate(self):
        big = self.MAX_INT32
        self._int("n", 1, 4096)
        self._real("temperature", lambda v: v >= 0, ">= 0")
        self._real("top_p", lambda v: 0 < v <= 1, "in (0, 1]")
        self._int("top_k", 0, big)  # -1 became 0 (disabled)
        self._real("min_p", lambda v: 0 <= v <= 1, "in [0, 1]")
        self._int("max_tokens", 1, big, optional=True)
        self._int("min_tokens", 0, big)
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            self._fail("min_tokens", f"must be <= max_tokens ({self.max_tokens})")
        if any(not isinstance(s, str) or not s for s in self.stop):
            self._fail("stop", "must be non-empty strings")
        if any(not _is_int(t) or not 0 <= t <= big for t in self.stop_token_ids):
            self._fail("stop_token_ids", f"must be integers in [0, {big}]")
        if not isinstance(self.ignore_eos, bool):
            self._fail("ignore_eos", "must be true or false")
        self._int("seed", 0, self.MAX_SEED, optional=True)
        self._int("logprobs", 0, self.MAX_LOGPROBS, optional=True)
        self._int("prompt_logprobs", 0, self.MAX_LOGPROBS, optional=True)
        self._real("presence_penalty", lambda v: -2 <= v <= 2, "in [-2, 2]")
        self._real("frequency_penalty", lambda v: -2 <= v <= 2, "in [-2, 2]")
        self._real("repetition_penalty", lambda v: v > 0, "> 0")
        if self.allowed_token_ids is not None:
            self.allowed_token_ids = list(self.allowed_token_ids)
            if not self.allowed_token_ids or any(not _is_int(t) or not 0 <= t <= big for t in self.allowed_token_ids):
                self._fail("allowed_token_ids", f"must be a non-empty list of integers in [0, {big}]")
        if self.bad_words is not None:
            self.bad_words = list(self.bad_words)
            if any(not isinstance(w, str) or not w.strip() for w in self.bad_words):
                self._fail("bad_words", "must be non-blank strings")
        for flag in ("include_stop_str_in_output", "skip_special_tokens", "spaces_between_special_tokens"):
            if not isinstance(getattr(self, flag), bool):
                self._fail(flag, "must be true or false")
        if self.truncate_prompt_tokens is not None and self.truncate_prompt_tokens != -1:
            self._int("truncate_prompt_tokens", 1, big)

    def check_vocab(self, vocab_size: int) -> None:
        """Token ids the engine will look up must exist in the model's vocabulary."""
        for field, ids in (("stop_token_ids", self.stop_token_ids), ("logit_bias", self.logit_bias or {}),
                           ("allowed_token_ids", self.allowed_token_ids or [])):
            bad = [t for t in ids if t >= vocab_size]
            if bad:
                raise ValueError(f"SamplingParams.{field} token ids must be below the vocabulary size {vocab_size}, "
                                 f"got {bad[0]}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def uses_penalties(self) -> bool:
        return self.presence_penalty != 0 or self.frequency_penalty != 0 or self.repetition_penalty != 1

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "SamplingParams":
        """Build from e.g. a JSONL line's fields; unknown fields are an error naming them."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown sampling field(s): {', '.join(unknown)}")
        return cls(**d)

    def replace(self, **changes) -> "SamplingParams":
        return dataclasses.replace(self, **changes)
