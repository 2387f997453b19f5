"""SamplingParams with vLLM's names and validation that names the offending field."""

from __future__ import annotations

import dataclasses
from typing import Any


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
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0

    MAX_LOGPROBS = 20

    def __post_init__(self):
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        if self.top_k == -1:
            self.top_k = 0
        self._validate()

    def _fail(self, field: str, why: str):
        raise ValueError(f"SamplingParams.{field} {why}, got {getattr(self, field)!r}")

    def _validate(self):
        if not isinstance(self.n, int) or self.n < 1:
            self._fail("n", "must be an integer >= 1")
        if self.temperature < 0:
            self._fail("temperature", "must be >= 0")
        if not 0 < self.top_p <= 1:
            self._fail("top_p", "must be in (0, 1]")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            self._fail("top_k", "must be -1, 0 (disabled) or a positive integer")
        if not 0 <= self.min_p <= 1:
            self._fail("min_p", "must be in [0, 1]")
        if self.max_tokens is not None and (not isinstance(self.max_tokens, int) or self.max_tokens < 1):
            self._fail("max_tokens", "must be an integer >= 1 or None")
        if not isinstance(self.min_tokens, int) or self.min_tokens < 0:
            self._fail("min_tokens", "must be an integer >= 0")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            self._fail("min_tokens", f"must be <= max_tokens ({self.max_tokens})")
        if any(not isinstance(s, str) or not s for s in self.stop):
            self._fail("stop", "must be non-empty strings")
        if any(not isinstance(t, int) or t < 0 for t in self.stop_token_ids):
            self._fail("stop_token_ids", "must be non-negative integers")
        if self.seed is not None and (not isinstance(self.seed, int) or self.seed < 0):
            self._fail("seed", "must be a non-negative integer or None")
        if self.logprobs is not None and not 0 <= self.logprobs <= self.MAX_LOGPROBS:
            self._fail("logprobs", f"must be in [0, {self.MAX_LOGPROBS}] or None")
        if not -2 <= self.presence_penalty <= 2:
            self._fail("presence_penalty", "must be in [-2, 2]")
        if not -2 <= self.frequency_penalty <= 2:
            self._fail("frequency_penalty", "must be in [-2, 2]")
        if not 0 < self.repetition_penalty:
            self._fail("repetition_penalty", "must be > 0")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def uses_penalties(self) -> bool:
        return self.presence_penalty != 0 or self.frequency_penalty != 0 or self.repetition_penalty != 1

    @property
    def uses_filters(self) -> bool:
        return self.top_p < 1 or self.top_k > 0 or self.min_p > 0

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
