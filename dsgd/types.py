"""The vocabulary shared by every module: aliases and protocols."""

from __future__ import annotations

from typing import Any, NamedTuple, TypeAlias

import numpy as np
import numpy.typing as npt

FlatParams: TypeAlias = npt.NDArray[np.float32]
"""A model's parameters (or a shard's range of them) as one contiguous float32 vector."""

Indices: TypeAlias = npt.NDArray[np.uint32]
"""Positions relative to the start of a shard's range."""

PyTree: TypeAlias = Any


class ShardRange(NamedTuple):
    """The half-open range ``[start, stop)`` of the flat vector owned by one shard."""

    start: int
    stop: int

    @property
    def size(self) -> int:
        return self.stop - self.start


class ShardInfo(NamedTuple):
    """Where a shard serves and which range it owns (as the coordinator announces it)."""

    shard_id: int
    data_address: str
    pub_address: str
    start: int
    stop: int
    incarnation: int = 0
