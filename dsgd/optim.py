"""Server-side optimizers, applied in place to a shard's flat float32 range.

Each optimizer works on one chunk at a time (a slice for dense chunks, a set of
unique indices for sparse ones), so its cost is proportional to the chunk, not to
the shard, and no shard-sized temporary is ever allocated on the event loop.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
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


_BLOCK = 1 << 18  # elements: 1 MiB, cache-sized and far below malloc's mmap threshold


def subtract_scaled(params: FlatParams, grad: FlatParams, scale: float) -> None:
    """``params -= scale * grad`` in place, in blocks: the one-line form allocates a
    temporary the size of ``grad`` (300 MB at 75M parameters, and its page faults)."""
    step = np.empty(min(_BLOCK, grad.size), np.float32)
    factor = np.float32(scale)
    for start in range(0, grad.size, _BLOCK):
        part = params[start : start + _BLOCK]
        tmp = step[: part.size]
        np.multiply(grad[start : start + _BLOCK], factor, out=tmp)
        np.subtract(part, tmp, out=part)


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


@dataclass(frozen=True)
class Momentum:
    """SGD with (heavy-ball or Nesterov) momentum.

    Matches ``optax.sgd(lr, momentum=momentum, nesterov=nesterov)``:
    ``trace = g + momentum * trace``; ``w -= lr * (g + momentum * trace)`` with Nesterov,
    ``w -= lr * trace`` without. ``trace`` starts at zero.

    Sparse chunks take the lazy form: only the touched rows' trace decays and moves the
    weight; an untouched row keeps its trace and weight. (Applying a zero gradient to every
    other row would cost the whole shard per chunk and keep moving rows that no worker
    touched.) A sparse chunk that touches every index once equals the dense one.
    """

    lr: float
    momentum: float = 0.9
    nesterov: bool = False
    _scratch: _Scratch = field(default_factory=_scratch, init=False, repr=False, compare=False)

    @property
    def name(self) -> str:
        """``nesterov`` or ``momentum``: the name ``make_optimizer`` and checkpoints use."""
        return "nesterov" if self.nesterov else "momentum"

    def init(self, size: int) -> dict[str, FlatParams]:
        return {"trace": np.zeros(size, np.float32)}

    def apply_dense(
        self,
        params: FlatParams,
        state: dict[str, FlatParams],
        offset: int,
        grad: FlatParams,
        lr_scale: float = 1.0,
    ) -> None:
        grad = np.asarray(grad, np.float32)
        stop = offset + grad.size
        trace = state["trace"][offset:stop]
        m = np.float32(self.momentum)
        # trace = g + m * trace
        np.multiply(trace, m, out=trace)
        np.add(grad, trace, out=trace)
        step = self._scratch.get(0, grad.size)
        if self.nesterov:  # step = g + m * trace
            np.multiply(trace, m, out=step)
            np.add(grad, step, out=step)
            np.multiply(step, np.float32(self.lr * lr_scale), out=step)
        else:
            np.multiply(trace, np.float32(self.lr * lr_scale), out=step)
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
        m = np.float32(self.momentum)
        trace = grad + state["trace"][indices] * m
        state["trace"][indices] = trace
        step = grad + trace * m if self.nesterov else trace
        params[indices] -= step * np.float32(self.lr * lr_scale)


class _AdamRule:
    """The arithmetic :class:`Adam` and :class:`AdamW` share (they differ in weight decay).

    State: ``mu`` and ``nu`` (first and second moments) and ``count``, a float32 step count
    *per parameter*, each advanced only where a chunk touches. Exact up to 2**24 steps of
    one parameter; past that it stops growing, harmlessly, since ``b**count`` is 0 by then.
    """

    lr: float
    b1: float
    b2: float
    eps: float
    _scratch: _Scratch

    def _weight_decay(self) -> float:
        return 0.0

    def init(self, size: int) -> dict[str, FlatParams]:
        return {
            "mu": np.zeros(size, np.float32),
            "nu": np.zeros(size, np.float32),
            "count": np.zeros(size, np.float32),
        }

    def apply_dense(
        self,
        params: FlatParams,
        state: dict[str, FlatParams],
        offset: int,
        grad: FlatParams,
        lr_scale: float = 1.0,
    ) -> None:
        grad = np.asarray(grad, np.float32)  # float16 squares overflow past 256
        n, stop = grad.size, offset + grad.size
        mu, nu = state["mu"][offset:stop], state["nu"][offset:stop]
        count = state["count"][offset:stop]
        a, b = self._scratch.get(0, n), self._scratch.get(1, n)
        b1, b2, one = np.float32(self.b1), np.float32(self.b2), np.float32(1)
        # mu = (1 - b1) * g + b1 * mu; nu = (1 - b2) * g**2 + b2 * nu; count += 1
        np.multiply(grad, np.float32(1 - self.b1), out=a)
        np.multiply(mu, b1, out=mu)
        np.add(a, mu, out=mu)
        np.multiply(grad, grad, out=a)
        np.multiply(a, np.float32(1 - self.b2), out=a)
        np.multiply(nu, b2, out=nu)
        np.add(a, nu, out=nu)
        np.add(count, one, out=count)
        # a = mu / (1 - b1**count); b = sqrt(nu / (1 - b2**count)) + eps; a /= b
        if n and count.min() == count.max():
            # dense pushes keep a chunk's counts equal: two powers per chunk, not per
            # parameter (10x faster), bit for bit the same (the same power on one element)
            np.power(b1, count[:1], out=a[:1])
            np.power(b2, count[:1], out=b[:1])
            np.divide(mu, one - a[0], out=a)
            np.divide(nu, one - b[0], out=b)
        else:
            np.power(b1, count, out=a)
            np.subtract(one, a, out=a)
            np.divide(mu, a, out=a)
            np.power(b2, count, out=b)
            np.subtract(one, b, out=b)
            np.divide(nu, b, out=b)
        np.sqrt(b, out=b)
        np.add(b, np.float32(self.eps), out=b)
        np.divide(a, b, out=a)
        view = params[offset:stop]
        decay = self._weight_decay()
        if decay:  # a += weight_decay * w (the weight before this step)
            np.multiply(view, np.float32(decay), out=b)
            np.add(a, b, out=a)
        np.multiply(a, np.float32(self.lr * lr_scale), out=a)
        np.subtract(view, a, out=view)

    def apply_sparse(
        self,
        params: FlatParams,
        state: dict[str, FlatParams],
        indices: Positions,
        grad: FlatParams,
        lr_scale: float = 1.0,
    ) -> None:
        grad = np.asarray(grad, np.float32)
        b1, b2, one = np.float32(self.b1), np.float32(self.b2), np.float32(1)
        mu = grad * np.float32(1 - self.b1) + state["mu"][indices] * b1
        nu = grad * grad * np.float32(1 - self.b2) + state["nu"][indices] * b2
        count = state["count"][indices] + one
        state["mu"][indices] = mu
        state["nu"][indices] = nu
        state["count"][indices] = count
        step = (mu / (one - b1**count)) / (np.sqrt(nu / (one - b2**count)) + np.float32(self.eps))
        decay = self._weight_decay()
        if decay:
            step += params[indices] * np.float32(decay)
        params[indices] -= step * np.float32(self.lr * lr_scale)


@dataclass(frozen=True)
class Adam(_AdamRule):
    """Adam, with bias correction from each parameter's own step count.

    Matches ``optax.adam(lr, b1=0.9, b2=0.999, eps=1e-8)`` on dense pushes::

        mu = b1 * mu + (1 - b1) * g;  nu = b2 * nu + (1 - b2) * g**2;  count += 1
        w -= lr * (mu / (1 - b1**count)) / (sqrt(nu / (1 - b2**count)) + eps)

    ``count`` is a vector, one step count per parameter, advanced where a chunk touches.
    A dense push covers each parameter once, so there every count equals optax's single
    global count and the result is optax's. Sparse chunks take the *lazy* form (as
    TensorFlow's ``LazyAdam``): only the touched rows' ``mu``, ``nu``, ``count`` and weight
    move; untouched rows stay exactly as they were. Why: the dense form would decay the
    moments of, and keep moving, every row of the shard on every chunk (a cost of the
    shard, not of the chunk, and rows drifting that no worker touched); and with one
    global count a row touched for the first time after many steps would skip bias
    correction: its first step would be ``(1 - b1) / sqrt(1 - b2)`` (about 3.2) times lr.
    A per-parameter count bias-corrects each row by how often *it* was updated.
    """

    lr: float
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    name: str = "adam"
    _scratch: _Scratch = field(default_factory=_scratch, init=False, repr=False, compare=False)


@dataclass(frozen=True)
class AdamW(_AdamRule):
    """Adam with decoupled weight decay (Loshchilov & Hutter).

    Matches ``optax.adamw(lr, b1, b2, eps, weight_decay=weight_decay)`` on dense pushes:
    the moments, counts and bias correction of :class:`Adam`, then
    ``w -= lr * (mu_hat / (sqrt(nu_hat) + eps) + weight_decay * w)``, with ``w`` the weight
    before this step. Sparse chunks are lazy as in :class:`Adam`: an untouched row is not
    decayed either (decaying every row on each chunk would cost the shard per chunk).
    """

    lr: float
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 1e-4
    name: str = "adamw"
    _scratch: _Scratch = field(default_factory=_scratch, init=False, repr=False, compare=False)

    def _weight_decay(self) -> float:
        return self.weight_decay


ServerOptimizerT = SGD | Adagrad | Momentum | Adam | AdamW
"""A server optimizer: ``init(size) -> state`` and in-place ``apply_dense``/``apply_sparse``
on a shard's range, one chunk at a time (shaped like optax's ``init``/``update`` pair)."""
OPTIMIZERS = ("sgd", "adagrad", "momentum", "nesterov", "adam", "adamw")


def make_optimizer(
    name: str, lr: float, *, momentum: float = 0.9, weight_decay: float = 1e-4
) -> ServerOptimizerT:
    """Build the server optimizer called ``name`` with learning rate ``lr``.

    ``momentum`` is used by ``momentum`` and ``nesterov``, ``weight_decay`` by ``adamw``;
    both are validated whichever optimizer is built.
    """
    if not (lr > 0 and np.isfinite(lr)):
        raise ConfigError(f"learning rate must be a positive number, got {lr!r}")
    if not 0 <= momentum < 1:
        raise ConfigError(f"momentum must be in [0, 1), got {momentum!r}")
    if not (weight_decay >= 0 and np.isfinite(weight_decay)):
        raise ConfigError(f"weight decay must be a number >= 0, got {weight_decay!r}")
    if name == "sgd":
        return SGD(lr)
    if name == "adagrad":
        return Adagrad(lr)
    if name in ("momentum", "nesterov"):
        return Momentum(lr, momentum, nesterov=name == "nesterov")
    if name == "adam":
        return Adam(lr)
    if name == "adamw":
        return AdamW(lr, weight_decay=weight_decay)
    raise ConfigError(f"unknown optimizer {name!r}; choose one of: {', '.join(OPTIMIZERS)}")


def state_mismatch(optimizer: ServerOptimizerT, state: Mapping[str, Any], size: int) -> str | None:
    """Why ``state`` cannot be ``optimizer``'s state for ``size`` parameters; None if it can.

    One line, for an error about a checkpoint that lacks (or has extra, or wrongly sized)
    state vectors: applying a chunk to such a state would fail with a KeyError or a
    broadcasting error in the middle of serving.
    """
    want, got = sorted(optimizer.init(0)), sorted(state)
    if got != want:
        return (
            f"{optimizer.name} needs optimizer state {', '.join(want) or '(none)'}, "
            f"found {', '.join(got) or '(none)'}"
        )
    wrong = [
        f"{key} is {getattr(a, 'dtype', type(a).__name__)}{getattr(a, 'shape', '')}"
        for key, a in sorted(state.items())
        if not isinstance(a, np.ndarray) or a.dtype != np.float32 or a.shape != (size,)
    ]
    if wrong:
        return f"{optimizer.name} needs {size} float32 values per state vector: {'; '.join(wrong)}"
    return None
