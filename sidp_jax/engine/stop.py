"""When a sequence ends: a pure function of its output so far (vLLM's check_stop)."""

from __future__ import annotations

import dataclasses
from typing import Callable

from sidp_jax.sampling_params import SamplingParams


@dataclasses.dataclass(frozen=True)
class Stop:
    finish_reason: str  # "stop" or "length"
    stop_reason: int | str | None = None  # the stop token id or stop string; None for EOS and length
    text: str | None = None  # the text cut before the stop string, or after it with include_stop_str_in_output


def check_stop(output_ids: list[int], params: SamplingParams, max_tokens: int, eos_ids: list[int],
               decode: Callable[[list[int]], str] | None) -> Stop | None:
    """Whether the sequence ends with its newest token, output_ids[-1]. Checked after every
    token; decode: the tokenizer's (None: no stop strings can match)."""
    token, n = output_ids[-1], len(output_ids)
    if n >= params.min_tokens:
        if not params.ignore_eos and token in eos_ids:
            return Stop("stop")
        if token in params.stop_token_ids:
            return Stop("stop", token)
        if params.stop and decode is not None and \
                (hit := stop_string(output_ids, params.stop, decode, params.include_stop_str_in_output)):
            return hit
    if n >= max_tokens:
        return Stop("length")
    return None


def stop_string(output_ids: list[int], stops: list[str], decode: Callable[[list[int]], str],
                include: bool = False) -> Stop | None:
    """Checked after every token, so a stop string that just appeared ends in the newest token:
    decode only a tail window wide enough to hold it (4 tokens per character covers byte-level
    pieces, plus slack for the window's ragged start), and the whole output only on a hit (to
    cut the text exactly), instead of decoding the whole output every step."""
    window = 4 * max(len(s) for s in stops) + 8
    if len(output_ids) > window and not any(s in decode(output_ids[-window:]) for s in stops):
        return None
    text = decode(output_ids)
    hits = [(text.find(s), s) for s in stops if s in text]
    if not hits:
        return None
    pos, s = min(hits)
    return Stop("stop", s, text[:pos + len(s)] if include else text[:pos])
