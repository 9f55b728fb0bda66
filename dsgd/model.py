"""The user's model contract, and its compiled flat-vector form.

A model is a :class:`ModelSpec`: initial parameters (any pytree of float arrays), a
function returning the model's outputs, either a loss (dsgd derives the gradient
with ``jax.value_and_grad``) or a gradient function, and a :class:`Dataset`. On the
command line a model is named ``package.module:factory``; the factory returns the
spec (it receives ``seed=`` when it accepts one).

:class:`CompiledModel` wraps a spec for a worker or the evaluator: it owns the
:class:`~dsgd.layout.Layout` and the ``jax.jit``-compiled functions that work on the
flat float32 vector the parameter server stores.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from dsgd.errors import ModelError
from dsgd.layout import Layout
from dsgd.types import FlatParams, PyTree

Array = Any  # a numpy or jax array


@dataclass(frozen=True)
class Dataset:
    """Training and held-out test arrays (first axis: examples)."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray

    def __post_init__(self) -> None:
        if len(self.x_train) != len(self.y_train) or len(self.x_test) != len(self.y_test):
            raise ModelError("dataset: x and y of a split must have the same number of examples")
        if len(self.x_train) == 0:
            raise ModelError("dataset: the training split is empty")

    def partition(self, index: int, count: int) -> tuple[np.ndarray, np.ndarray]:
        """Worker ``index``'s share of the training split (every ``count``-th example)."""
        if not 0 <= index < count:
            raise ValueError(f"partition {index} of {count} does not exist")
        if count > len(self.x_train):
            raise ModelError(
                f"cannot split {len(self.x_train)} training examples over {count} workers"
            )
        return self.x_train[index::count], self.y_train[index::count]


def batches(
    x: np.ndarray, y: np.ndarray, batch_size: int, seed: int
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Endless shuffled mini-batches (a fresh permutation each epoch, seeded).

    Every batch has exactly ``batch_size`` examples (the tail of an epoch that does
    not fill a batch is dropped), so the jitted step compiles once.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    n = len(x)
    batch_size = min(batch_size, n)
    rng = np.random.default_rng(seed)
    while True:
        order = rng.permutation(n)
        for start in range(0, n - batch_size + 1, batch_size):
            idx = order[start : start + batch_size]
            yield x[idx], y[idx]


def softmax_cross_entropy(logits: Array, labels: Array) -> Array:
    """Mean cross-entropy of integer ``labels`` under ``logits`` (a convenient default loss)."""
    import jax
    import jax.numpy as jnp

    logp = jax.nn.log_softmax(logits)
    return -jnp.mean(jnp.take_along_axis(logp, labels[:, None].astype(jnp.int32), axis=1))


def classification_metrics(outputs: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Accuracy of argmax predictions (or of ``outputs > 0`` for a single logit)."""
    outputs = np.asarray(outputs)
    if outputs.ndim == 1 or outputs.shape[-1] == 1:
        predicted = (outputs.reshape(len(labels)) > 0).astype(labels.dtype)
    else:
        predicted = outputs.argmax(axis=-1)
    return {"accuracy": float(np.mean(predicted == labels))}


@dataclass(frozen=True)
class ModelSpec:
    """What a user hands dsgd.

    ``apply(params, x) -> outputs``; ``loss(outputs, y) -> scalar``; or instead
    ``grad(params, (x, y)) -> (loss, grads)`` with ``grads`` shaped like ``params``.
    ``metrics(outputs, y) -> {name: value}`` must include ``accuracy`` (the target);
    the default handles classification.
    """

    init_params: PyTree
    apply: Callable[[PyTree, Array], Array]
    dataset: Dataset
    loss: Callable[[Array, Array], Array] | None = None
    grad: Callable[[PyTree, tuple[Array, Array]], tuple[Array, PyTree]] | None = None
    batch_size: int = 32
    metrics: Callable[[np.ndarray, np.ndarray], dict[str, float]] = classification_metrics
    name: str = "model"

    def __post_init__(self) -> None:
        if self.loss is None and self.grad is None:
            raise ModelError("the model spec needs a loss or a grad function")
        if not callable(self.apply):
            raise ModelError("the model spec's apply is not callable")
        if self.batch_size < 1:
            raise ModelError(f"the model spec's batch_size must be >= 1, got {self.batch_size}")


def load_model(ref: str, seed: int = 0) -> ModelSpec:
    """Import ``package.module:factory`` and call it; every failure is a one-line ModelError."""
    module_name, sep, attr = ref.partition(":")
    if not sep or not module_name or not attr:
        raise ModelError(f"model {ref!r} must look like package.module:factory")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ModelError(
            f"cannot import model module {module_name!r} ({exc}); is it installed or on PYTHONPATH?"
        ) from None
    factory = getattr(module, attr, None)
    if factory is None:
        raise ModelError(f"module {module_name!r} has no attribute {attr!r}")
    if isinstance(factory, ModelSpec):
        return factory
    if not callable(factory):
        raise ModelError(f"{ref} is neither a ModelSpec nor a factory returning one")
    try:
        accepts_seed = "seed" in inspect.signature(factory).parameters
    except (TypeError, ValueError):
        accepts_seed = False
    spec = factory(seed=seed) if accepts_seed else factory()
    if not isinstance(spec, ModelSpec):
        raise ModelError(f"{ref}() returned {type(spec).__name__}, expected dsgd.ModelSpec")
    return spec


class CompiledModel:
    """A spec bound to its layout, with jitted functions on the flat vector."""

    def __init__(self, spec: ModelSpec, num_shards: int) -> None:
        import jax
        import jax.numpy as jnp

        self.spec = spec
        self.layout = Layout.from_pytree(spec.init_params, num_shards)
        layout = self.layout
        user_grad = spec.grad
        loss_fn = spec.loss

        if user_grad is not None:

            def flat_grad(flat: Array, x: Array, y: Array) -> tuple[Array, Array]:
                loss, grads = user_grad(layout.unflatten(flat), (x, y))
                leaves = jax.tree_util.tree_leaves(grads)
                return loss, jnp.concatenate([jnp.ravel(g).astype(jnp.float32) for g in leaves])

        else:
            assert loss_fn is not None

            def objective(flat: Array, x: Array, y: Array) -> Array:
                return loss_fn(spec.apply(layout.unflatten(flat), x), y)

            # differentiating with respect to the flat vector itself writes the gradient
            # straight into one buffer instead of concatenating per-leaf gradients
            flat_grad = jax.value_and_grad(objective)

        def outputs(flat: Array, x: Array) -> Array:
            return spec.apply(layout.unflatten(flat), x)

        self.grad_step = jax.jit(flat_grad)
        self._outputs = jax.jit(outputs)

    def initial_flat(self) -> FlatParams:
        return self.layout.flatten(self.spec.init_params)

    def gradient(self, flat: FlatParams, x: np.ndarray, y: np.ndarray) -> tuple[float, FlatParams]:
        """Loss and flat float32 gradient at ``flat`` for one batch (runs the jitted step)."""
        loss, grad = self.grad_step(flat, x, y)
        return float(loss), np.asarray(grad)

    def evaluate(self, flat: FlatParams, batch_size: int = 1024) -> dict[str, float]:
        """Metrics of ``flat`` on the held-out split, plus ``loss`` when the spec has one.

        A model function that raises (``apply``, ``metrics``, ``loss``) is a ModelError
        naming the function and the exception, in one line.
        """
        data = self.spec.dataset
        with _blame("apply", self.spec.apply):
            outs = [
                np.asarray(self._outputs(flat, data.x_test[i : i + batch_size]))
                for i in range(0, len(data.x_test), batch_size)
            ]
        out = np.concatenate(outs)
        with _blame("metrics", self.spec.metrics):
            metrics = dict(self.spec.metrics(out, data.y_test))
            result = {str(k): float(v) for k, v in metrics.items()}
        if self.spec.loss is not None and "loss" not in result:
            with _blame("loss", self.spec.loss):
                result["loss"] = float(self.spec.loss(out, data.y_test))
        return result


@contextlib.contextmanager
def _blame(role: str, function: Any = None) -> Iterator[None]:
    """Turn an exception raised by the model's ``role`` function into a one-line ModelError."""
    try:
        yield
    except ModelError:
        raise
    except Exception as exc:
        name = getattr(function, "__qualname__", None) or role
        line = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        detail = f"{type(exc).__name__}: {line}" if line else type(exc).__name__
        raise ModelError(f"the model's {role} function ({name}) raised {detail}") from exc
