"""Server-side optimizers, applied in place to a shard's flat float32 range.

Each optimizer works on one chunk at a time (a slice for dense chunks, a set of
unique indices for sparse ones), so its cost is proportional to the chunk, not to
the shard, and no shard-sized temporary is ever allocated on the event loop.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from dsgd.errors import ConfigError
from dsgd.types import FlatParams

Positions = npt.NDArray[np.integer[Any]]  # uint32 from the wire, or intp (faster to index)


class _Scratch(threading.local):
    """Temporaries reused from chunk to chunk (one set per thread), grown to the largest
    chunk seen, so that applying a chunk allocates nothing: a fresh temporary per chunk
    costs an allocation and, for the biggest chunks, page faults."""

    def __init__(self) -> None:
        self.buffers: list[FlatParams] = []

    def __reduce__(self) -> tuple[type[_Scratch], tuple[()]]:
        return _Scratch, ()  # a copy (or a pickle) starts with its own, empty, scratch

    def get(self, i: int, n: int) -> FlatParams:
        while len(self.buffers) <= i:
            self.buffers.append(np.empty(0, np.float32))
        if self.buffers[i].size < n:
            self.buffers[i] = np.empty(n, np.float32)
        return self.buffers[i][:n]


def _scratch() -> _Scratch:
    return _Scratch()


@dataclass(frozen=True)
class SGD:
    """Plain SGD: ``w -= lr * g``."""

    lr: float
    name: str = "sgd"
    _scratch: _Scratch = field(default_factory=_scratch, init=False, repr=False, compare=False)

    def init(self, size: int) -> dict[str, FlatParams]:
        return {}

    def apply_dense(
        self,
        params: FlatParams,
        state: dict[str, FlatParams],
        offset: int,
        grad: FlatParams,
        lr_scale: float = 1.0,
    ) -> None:
        view = params[offset : offset + grad.size]
        step = self._scratch.get(0, grad.size)
        np.multiply(np.float32(self.lr * lr_scale), grad, out=step)
        np.subtract(view, step, out=view)

    def apply_sparse(
        self,
        params: FlatParams,
        state: dict[str, FlatParams],
        indices: Positions,
        grad: FlatParams,
        lr_scale: float = 1.0,
    ) -> None:
        # indices are unique within a chunk (the codec guarantees it), so fancy-index
        # assignment is exact and 2x faster than np.add.at.
        params[indices] -= np.float32(self.lr * lr_scale) * grad


@dataclass(frozen=True)
class Adagrad:
    """DistBelief's Adagrad: per-parameter ``lr / sqrt(sum of squared gradients)``.

    Matches ``optax.adagrad(lr, initial_accumulator_value, eps)``:
    ``acc += g**2; w -= lr * g / sqrt(acc + eps)``.
    """

    lr: float
    initial_accumulator_value: float = 0.1
    eps: float = 1e-7
    name: str = "adagrad"
    _scratch: _Scratch = field(default_factory=_scratch, init=False, repr=False, compare=False)

    def init(self, size: int) -> dict[str, FlatParams]:
        return {"accumulator": np.full(size, self.initial_accumulator_value, np.float32)}

    def apply_dense(
        self,
        params: FlatParams,
        state: dict[str, FlatParams],
        offset: int,
        grad: FlatParams,
        lr_scale: float = 1.0,
    ) -> None:
        grad = np.asarray(grad, np.float32)  # float16 squares overflow past 256
        stop = offset + grad.size
        acc = state["accumulator"][offset:stop]
        step, scale = self._scratch.get(0, grad.size), self._scratch.get(1, grad.size)
        # acc += grad * grad; params -= lr * grad / sqrt(acc + eps), without temporaries
        np.multiply(grad, grad, out=step)
        np.add(acc, step, out=acc)
        np.multiply(np.float32(self.lr * lr_scale), grad, out=step)
        np.add(acc, self.eps, out=scale)
        np.sqrt(scale, out=scale)
        np.divide(step, scale, out=step)
        view = params[offset:stop]
        np.subtract(view, step, out=view)

    def apply_sparse(
        self,
        params: FlatParams,
        state: dict[str, FlatParams],
        indices: Positions,
        grad: FlatParams,
        lr_scale: float = 1.0,
    ) -> None:
        grad = np.asarray(grad, np.float32)
        acc_all = state["accumulator"]
        acc = acc_all[indices] + grad * grad
        acc_all[indices] = acc
        params[indices] -= np.float32(self.lr * lr_scale) * grad / np.sqrt(acc + self.eps)


ServerOptimizerT = SGD | Adagrad
"""A server optimizer: ``init(size) -> state`` and in-place ``apply_dense``/``apply_sparse``
on a shard's range, one chunk at a time (shaped like optax's ``init``/``update`` pair)."""
OPTIMIZERS = ("sgd", "adagrad")


def make_optimizer(name: str, lr: float) -> ServerOptimizerT:
    """Build the server optimizer called ``name`` with learning rate ``lr``."""
    if not (lr > 0 and np.isfinite(lr)):
        raise ConfigError(f"learning rate must be a positive number, got {lr!r}")
    if name == "sgd":
        return SGD(lr)
    if name == "adagrad":
        return Adagrad(lr)
    raise ConfigError(f"unknown optimizer {name!r}; choose one of: {', '.join(OPTIMIZERS)}")
