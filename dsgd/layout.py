"""The flat layout: pytree -> one float32 vector -> contiguous shard ranges.

This is the one place that decides where every parameter lives. Workers and the
coordinator build a :class:`Layout` from the model's initial parameters; shards never
see the model, only their :class:`~dsgd.types.ShardRange` and the layout's
fingerprint, which travels in every data-plane header so that a peer built from
another model (or another shard count) is refused instead of obeyed.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import numpy as np

from dsgd.errors import ModelError
from dsgd.types import FlatParams, PyTree, ShardRange

ALIGNMENT = 64  # bytes: what XLA needs to read a NumPy buffer in place


def aligned_empty(size: int) -> FlatParams:
    """An uninitialised float32 vector starting on a 64-byte boundary. ``jax.jit`` reads
    such a buffer in place; NumPy's own (16-byte aligned) buffers are copied on every
    call, 0.15 s per step for a 75M-parameter vector."""
    raw = np.empty(size * 4 + ALIGNMENT, np.uint8)
    skip = -raw.ctypes.data % ALIGNMENT
    return raw[skip : skip + size * 4].view(np.float32)


def split_ranges(size: int, num_shards: int) -> list[ShardRange]:
    """Split ``[0, size)`` into ``num_shards`` contiguous ranges whose sizes differ by <= 1."""
    if num_shards < 1:
        raise ValueError(f"num_shards must be >= 1, got {num_shards}")
    bounds = [k * size // num_shards for k in range(num_shards + 1)]
    return [ShardRange(bounds[k], bounds[k + 1]) for k in range(num_shards)]


@dataclass(frozen=True)
class Layout:
    """Where each leaf of a parameter pytree lives in the flat float32 vector."""

    paths: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    num_shards: int
    treedef: Any = field(default=None, compare=False, repr=False)

    @classmethod
    def from_pytree(cls, params: PyTree, num_shards: int) -> Layout:
        """Compute the layout of ``params`` split over ``num_shards`` shards."""
        import jax

        leaves_with_paths, treedef = jax.tree_util.tree_flatten_with_path(params)
        if not leaves_with_paths:
            raise ModelError("the model's initial parameters contain no arrays")
        paths, shapes = [], []
        for path, leaf in leaves_with_paths:
            arr = np.asarray(leaf)
            if not jax.numpy.issubdtype(arr.dtype, jax.numpy.floating):
                raise ModelError(
                    f"parameter {jax.tree_util.keystr(path)} has dtype {arr.dtype}; "
                    "dsgd trains floating-point parameters only"
                )
            paths.append(jax.tree_util.keystr(path))
            shapes.append(tuple(int(d) for d in arr.shape))
        layout = cls(tuple(paths), tuple(shapes), num_shards, treedef)
        if num_shards < 1 or num_shards > layout.size:
            raise ModelError(
                f"cannot split {layout.size} parameters over {num_shards} shards; "
                f"use between 1 and {layout.size} shards"
            )
        return layout

    @cached_property
    def sizes(self) -> tuple[int, ...]:
        return tuple(int(np.prod(s, dtype=np.int64)) for s in self.shapes)

    @cached_property
    def offsets(self) -> tuple[int, ...]:
        return tuple(int(o) for o in np.cumsum((0, *self.sizes))[:-1])

    @property
    def size(self) -> int:
        return sum(self.sizes)

    @cached_property
    def ranges(self) -> tuple[ShardRange, ...]:
        return tuple(split_ranges(self.size, self.num_shards))

    @cached_property
    def fingerprint(self) -> int:
        """A 63-bit hash of the leaf paths, shapes and shard count."""
        text = repr((self.paths, self.shapes, self.num_shards)).encode()
        return int.from_bytes(hashlib.sha256(text).digest()[:8], "big") >> 1

    def flatten(self, params: PyTree) -> FlatParams:
        """Concatenate the leaves of ``params`` into one new float32 vector."""
        import jax

        leaves = jax.tree_util.tree_leaves(params)
        if len(leaves) != len(self.shapes):
            raise ModelError(f"expected {len(self.shapes)} parameter arrays, got {len(leaves)}")
        out = aligned_empty(self.size)
        for i, leaf in enumerate(leaves):
            arr = np.asarray(leaf, np.float32)
            if arr.shape != self.shapes[i]:
                raise ModelError(
                    f"parameter {self.paths[i]} has shape {arr.shape}, "
                    f"the layout expects {self.shapes[i]}"
                )
            out[self.offsets[i] : self.offsets[i] + self.sizes[i]] = arr.ravel()
        return out

    def unflatten(self, flat: Any) -> PyTree:
        """Rebuild the pytree from a flat vector (numpy or jax; works under ``jax.jit``)."""
        import jax

        if self.treedef is None:
            raise ValueError("this layout was built without a treedef and cannot unflatten")
        leaves = [
            flat[offset : offset + size].reshape(shape)
            for offset, size, shape in zip(self.offsets, self.sizes, self.shapes, strict=True)
        ]
        return jax.tree_util.tree_unflatten(self.treedef, leaves)

    def by_shard(self, offset: int, values: FlatParams) -> Iterator[tuple[int, int, FlatParams]]:
        """Split the piece ``values`` of the flat vector at ``offset`` along the shard ranges:
        ``(shard index, offset inside that shard's range, the part in it)`` per shard it
        touches, in order."""
        end = offset + values.size
        for k, r in enumerate(self.ranges):
            lo, hi = max(offset, r.start), min(end, r.stop)
            if lo < hi:
                yield k, lo - r.start, values[lo - offset : hi - offset]

    def describe(self) -> str:
        return (
            f"{self.size:,} parameters in {len(self.shapes)} arrays over {self.num_shards} "
            f"shard(s), fingerprint {self.fingerprint:016x}"
        )
