"""Results in vLLM's shapes: RequestOutput holding CompletionOutputs."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass
class Logprob:
    """vLLM's: a token's log-probability, its rank in the vocabulary (1: the most likely) and its text."""
    logprob: float
    rank: int | None = None
    decoded_token: str | None = None

    def __float__(self) -> float:  # code that wants the number (JSON records) can float() it
        return float(self.logprob)


@dataclasses.dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None  # "stop" | "length" | None while running
    logprobs: list[dict[int, Logprob]] | None = None  # per generated token: {token_id: Logprob}
    stop_reason: int | str | None = None
    cumulative_logprob: float | None = None  # the sum of the generated tokens' logprobs


@dataclasses.dataclass
class RequestMetrics:
    arrival_time: float
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    finished_time: float | None = None
    num_preemptions: int = 0


@dataclasses.dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool = True
    metrics: RequestMetrics | None = None
    error: str | None = None  # set when the request could not run (e.g. prompt too long)
    num_cached_tokens: int = 0  # prompt tokens found in the prefix cache (vLLM's field)
    prompt_logprobs: list[dict[int, Logprob] | None] | None = None  # per prompt token (the first: None)

    @property
    def num_output_tokens(self) -> int:
        return sum(len(o.token_ids) for o in self.outputs)
