"""Page allocator for one replica's KV cache, with automatic prefix caching.

Page 0 is reserved as the padding tokens' scratch. Pages are reference-counted: a full page
whose tokens are known is registered under a key that chains its parent page's key and its
token ids (blake2b, sidp_jax/engine/sequence.py), and a later sequence whose prompt starts
with the same tokens takes the cached pages instead of computing them. A page no sequence holds
stays cached until the free list needs it; then the least recently freed goes first. Free-page
counts include those cached pages, so KV capacity and preemption keep their meaning.

A page is registered when the step that computes it is planned (its tokens are all known on the
host), so a sequence admitted later in the same step may already share it: each layer writes
the whole step's K/V before it attends, so the sharer reads the page after it is written.
Shared pages are never written again: a sequence computes only past its cached prefix, and at
least its last known token (so the next token has logits to come from).
"""

from __future__ import annotations

import collections

from sidp_jax.engine.sequence import Sequence


class BlockManager:
    def __init__(self, num_pages: int, page_size: int, enable_prefix_caching: bool = False):
        if num_pages < 2:
            raise ValueError(f"the KV cache needs at least 2 pages (one is reserved), got {num_pages}")
        self.num_pages = num_pages
        self.page_size = page_size
        self.enable_prefix_caching = enable_prefix_caching
        self._free = list(range(num_pages - 1, 0, -1))  # holding nothing; pop() hands out low ids first
        self._evictable: collections.OrderedDict[int, None] = collections.OrderedDict()  # cached, unheld; LRU first
        self._refs = [0] * num_pages
        self._key_of: dict[int, bytes] = {}  # page -> its key
        self._page_of: dict[bytes, int] = {}  # key -> page
        self.num_evictions = 0

    @property
    def num_free(self) -> int:
        return len(self._free) + len(self._evictable)

    @property
    def capacity_tokens(self) -> int:
        return (self.num_pages - 1) * self.page_size

    @property
    def num_cached_pages(self) -> int:
        return len(self._page_of)

    def pages_needed(self, seq: Sequence, num_new_tokens: int) -> int:
        total = seq.num_computed + num_new_tokens
        return max(0, -(-total // self.page_size) - len(seq.pages))

    def can_allocate(self, seq: Sequence, num_new_tokens: int) -> bool:
        return self.pages_needed(seq, num_new_tokens) <= self.num_free

    def _take(self) -> int:
        if self._free:
            page = self._free.pop()
        else:  # evict the least recently freed cached page
            page, _ = self._evictable.popitem(last=False)
            del self._page_of[self._key_of.pop(page)]
            self.num_evictions += 1
        self._refs[page] = 1
        return page

    def allocate(self, seq: Sequence, num_new_tokens: int) -> None:
        need = self.pages_needed(seq, num_new_tokens)
        if need > self.num_free:
            raise RuntimeError("out of KV pages; call can_allocate first")
        seq.pages.extend(self._take() for _ in range(need))

    def free(self, seq: Sequence) -> None:
        """Drop seq's hold on its pages; the last page first, so its tail is evicted before its prefix."""
        for page in reversed(seq.pages):
            self._refs[page] -= 1
            if self._refs[page] == 0:
                if page in self._key_of:
                    self._evictable[page] = None
                else:
                    self._free.append(page)
        seq.clear_pages()
        seq.num_registered_pages = 0

    # ----- prefix caching -----
    def cached_prefix(self, seq: Sequence) -> list[int]:
        """The cached pages that hold seq's known tokens from the start, leaving at least its last
        known token to compute (no side effects)."""
        if not self.enable_prefix_caching or seq.params.prompt_logprobs is not None:
            return []  # prompt logprobs need every prompt token computed
        pages = []
        for key in seq.page_keys((seq.num_host_tokens - 1) // self.page_size, self.page_size):
            page = self._page_of.get(key)
            if page is None:
                break
            pages.append(page)
        return pages

    def share(self, seq: Sequence, pages: list[int]) -> None:
        """Give seq (holding no pages) the cached prefix `pages`: their tokens count as computed."""
        assert not seq.pages and seq.num_computed == 0
        for page in pages:
            if self._refs[page] == 0:
                del self._evictable[page]
            self._refs[page] += 1
        seq.pages.extend(pages)
        seq.num_registered_pages = len(pages)
        seq.num_computed = len(pages) * self.page_size

    def register(self, seq: Sequence, num_tokens: int) -> None:
        """Cache seq's full pages within its first num_tokens tokens (computed by the step being
        planned, every token known on the host)."""
        if not self.enable_prefix_caching:
            return
        full = min(num_tokens, seq.num_host_tokens) // self.page_size
        if full <= seq.num_registered_pages:
            return
        keys = seq.page_keys(full, self.page_size)
        for i in range(seq.num_registered_pages, full):
            page, key = seq.pages[i], keys[i]
            if key not in self._page_of and page not in self._key_of:
                self._page_of[key], self._key_of[page] = page, key
        seq.num_registered_pages = full

    def drop_cache(self) -> None:
        """Forget every cached page (after an aborted step, whose pages may never have been written)."""
        for page in list(self._evictable):
            self._free.append(page)
        self._evictable.clear()
        self._key_of.clear()
        self._page_of.clear()
