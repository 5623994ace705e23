"""The KV page pool: which pages are free, and each sequence's page table (its `pages` list).

The tensors themselves live with the model runner; this module only hands out page ids.
"""

from __future__ import annotations

from collections import deque

from nanoflow.engine.request import Sequence


class PagePool:
    def __init__(self, num_pages: int) -> None:
        self.num_pages = num_pages
        self._free: deque[int] = deque(range(num_pages))

    @property
    def num_free(self) -> int:
        return len(self._free)

    def can_allocate(self, seq: Sequence, num_tokens: int) -> bool:
        return seq.pages_needed(num_tokens) <= len(self._free)

    def allocate(self, seq: Sequence, num_tokens: int) -> None:
        """Grows seq's page table to hold num_tokens tokens."""
        need = seq.pages_needed(num_tokens)
        if need > len(self._free):
            raise RuntimeError(f"KV cache: {need} pages needed, {len(self._free)} free")
        for _ in range(need):
            seq.pages.append(self._free.popleft())

    def free(self, seq: Sequence) -> None:
        self._free.extend(seq.pages)
        seq.pages = []
