"""Server-side optimizers, applied in place to a shard's flat float32 range.

Each optimizer works on one chunk at a time (a slice for dense chunks, a set of
unique indices for sparse ones), so its cost is proportional to the chunk, not to
the shard, and no shard-sized temporary is ever allocated on the event loop.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from dsgd.errors import ConfigError
from dsgd.types import FlatParams, Indices


@dataclass(frozen=True)
class SGD:
    """Plain SGD: ``w -= lr * g``."""

    lr: float
    name: str = "sgd"

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
        view -= np.float32(self.lr * lr_scale) * grad

    def apply_sparse(
        self,
        params: FlatParams,
        state: dict[str, FlatParams],
        indices: Indices,
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
        acc += grad * grad
        params[offset:stop] -= np.float32(self.lr * lr_scale) * grad / np.sqrt(acc + self.eps)

    def apply_sparse(
        self,
        params: FlatParams,
        state: dict[str, FlatParams],
        indices: Indices,
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
