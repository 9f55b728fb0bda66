"""Which parameters changed since a version: the bookkeeping behind sparse pulls.

A shard stamps every parameter it updates with the version of the push that did it,
and every block of ``BLOCK`` parameters with the newest stamp inside it. "What changed
since v" first scans the block stamps (1/256 of the range), then the element stamps
of the changed blocks only (or all element stamps when most blocks changed), so its
cost follows the number of changed blocks, and the answer is exactly the parameters
that changed: nothing unchanged is resent.
"""

from __future__ import annotations

import numpy as np

from dsgd.types import Indices
from dsgd.wire import INDEX_DTYPE

BLOCK = 256
MAX_STAMP = np.iinfo(np.uint32).max


class ChangeTracker:
    """Version stamps for a range of ``size`` parameters (all at ``version`` to start)."""

    def __init__(self, size: int, version: int = 0) -> None:
        self.size = size
        self.elements = np.full(size, min(version, MAX_STAMP), np.uint32)
        self.blocks = np.full(-(-size // BLOCK), version, np.int64)

    def mark_range(self, offset: int, count: int, version: int) -> None:
        """Parameters ``[offset, offset + count)`` changed at ``version``."""
        if count:
            self.elements[offset : offset + count] = min(version, MAX_STAMP)
            self.blocks[offset // BLOCK : (offset + count - 1) // BLOCK + 1] = version

    def mark(self, indices: Indices, version: int) -> None:
        """Parameters at ``indices`` changed at ``version``."""
        self.elements[indices] = min(version, MAX_STAMP)
        self.blocks[indices // BLOCK] = version

    def changed_since(self, version: int, max_fraction: float = 0.5) -> Indices | None:
        """Ascending indices of parameters changed after ``version``.

        None when more than ``max_fraction`` of them changed (sending the whole range is
        then cheaper than indices and values), or when stamps overflowed uint32.
        """
        if version >= MAX_STAMP:
            return None
        blocks = np.flatnonzero(self.blocks > version)
        if blocks.size == 0:
            return np.zeros(0, INDEX_DTYPE)
        if blocks.size > self.blocks.size // 4:  # scattered changes: one pass over all stamps
            changed = np.flatnonzero(self.elements > version)
        else:
            candidates = (blocks[:, None] * BLOCK + np.arange(BLOCK)[None, :]).ravel()
            candidates = candidates[candidates < self.size]
            changed = candidates[self.elements[candidates] > version]
        if changed.size > max_fraction * self.size:
            return None
        return changed.astype(INDEX_DTYPE)
