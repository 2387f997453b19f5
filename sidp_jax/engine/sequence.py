"""One sequence being generated: its tokens, KV pages and progress."""

from __future__ import annotations

import enum
import hashlib

import numpy as np

from sidp_jax.sampling_params import SamplingParams


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class Sequence:
    def __init__(self, seq_id: int, request_index: int, sample_index: int, prompt_ids: list[int],
                 params: SamplingParams, seed: int, max_tokens: int):
        self.seq_id = seq_id
        self.request_index = request_index  # which request it belongs to
        self.sample_index = sample_index  # which of the request's n samples it is
        self.prompt_ids = list(prompt_ids)
        self.output_ids: list[int] = []
        self.output_logprobs: list[dict] = []  # per output token: {token_id: Logprob}
        self.cumulative_logprob = 0.0
        self.prompt_logprobs: list[dict | None] | None = (
            [None] * len(prompt_ids) if params.prompt_logprobs is not None else None)  # [0] stays None
        self.first_token_time: float | None = None
        self.params = params
        self.seed = seed
        self.max_tokens = max_tokens
        self.status = Status.WAITING
        self.replica: int | None = None
        self.pages: list[int] = []
        self._page_array: np.ndarray | None = None  # page_array()'s cache
        self.num_computed = 0  # tokens whose K/V are in the cache
        # Tokens sampled by a step still on the device (host overlap, sidp_jax/engine/engine.py): they
        # count in num_tokens, and the next step reads the newest from the device by `pending_row`.
        self.num_pending = 0
        self.pending_row = -1  # the newest pending token's row in its step's output
        self._page_keys: list[bytes] = []  # prefix-cache keys of its full pages of known tokens
        self.num_registered_pages = 0  # pages registered in (or taken from) the prefix cache
        self.num_cached_tokens = 0  # prompt tokens its first admission found cached
        self.num_preemptions = 0
        self.penalty_slot = 0  # its row of the replica's penalty counts (0: none; engine/penalty_counts.py)
        self.bad_word_ids: list[list[int]] = []  # its request's bad words as token ids
        self.finish_reason: str | None = None
        self.stop_reason: int | str | None = None
        self.text = ""

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids) + self.num_pending

    @property
    def num_host_tokens(self) -> int:
        """Tokens known on the host: the prompt and the outputs read back so far."""
        return len(self.prompt_ids) + len(self.output_ids)

    def page_keys(self, num_pages: int, P: int) -> list[bytes]:
        """Prefix-cache keys of its first num_pages full pages of P tokens (known on the host):
        each a blake2b digest of the parent page's key and the page's token ids, so a key names
        the whole prefix. Computed once per page (one engine, one page size)."""
        while len(self._page_keys) < num_pages:
            i = len(self._page_keys)
            parent = self._page_keys[-1] if i else b""
            tokens = np.asarray(self.token_slice(i * P, P), np.int32).tobytes()
            self._page_keys.append(hashlib.blake2b(parent + tokens, digest_size=16).digest())
        return self._page_keys[:num_pages]

    @property
    def num_generated(self) -> int:
        """Tokens sampled so far, the pending ones included (the sampler's step index)."""
        return len(self.output_ids) + self.num_pending

    @property
    def all_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    def page_array(self) -> np.ndarray:
        """self.pages as int32 numpy (a block-table row), converted again only when pages were added:
        the list only grows until clear_pages()."""
        if self._page_array is None or len(self._page_array) != len(self.pages):
            self._page_array = np.asarray(self.pages, np.int32)
        return self._page_array

    def clear_pages(self) -> None:
        self.pages = []
        self._page_array = None

    def token_at(self, i: int) -> int:
        """Token i, known on the host (a pending token is read on the device instead)."""
        n = len(self.prompt_ids)
        return self.prompt_ids[i] if i < n else self.output_ids[i - n]

    def token_slice(self, start: int, length: int) -> list[int]:
        """all_ids[start:start + length] without concatenating the whole sequence."""
        n, end = len(self.prompt_ids), start + length
        if end <= n:
            return self.prompt_ids[start:end]
        if start >= n:
            return self.output_ids[start - n:end - n]
        return self.prompt_ids[start:] + self.output_ids[:end - n]

    @property
    def num_uncomputed(self) -> int:
        return self.num_tokens - self.num_computed

    def reset_for_recompute(self) -> None:
        """Preempted: drop the cache; prompt + generated tokens are prefilled again later."""
        self.clear_pages()
        self.num_computed = 0
        self.status = Status.WAITING
        self.num_preemptions += 1
