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
import dataclasses
import importlib
import inspect
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from dsgd.errors import ModelError
from dsgd.layout import Layout, aligned_empty
from dsgd.types import FlatParams, PyTree

Array = Any  # a numpy or jax array


class Rows:
    """Rows of a (typically memory-mapped) array picked by index, read only when used.

    A Dataset split may be Rows instead of an array: a worker's partition is then a
    strided view of the indices, and each batch reads just its own rows, so a process
    never holds more of a large image set than what it touches.
    """

    def __init__(self, array: np.ndarray, indices: np.ndarray) -> None:
        self.array = array
        self.indices = np.asarray(indices, np.int64)

    def __len__(self) -> int:
        return len(self.indices)

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self.indices), *self.array.shape[1:])

    @property
    def dtype(self) -> np.dtype[Any]:
        return self.array.dtype

    @property
    def ndim(self) -> int:
        return int(self.array.ndim)

    def __getitem__(self, key: Any) -> Any:
        if isinstance(key, slice):
            return Rows(self.array, self.indices[key])
        picked = self.indices[key]
        if np.ndim(picked) == 0:
            return np.asarray(self.array[int(picked)])
        order = np.argsort(picked, kind="stable")  # read the file front to back
        out = np.empty((len(picked), *self.array.shape[1:]), self.array.dtype)
        out[order] = self.array[picked[order]]
        return out

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        out = self[np.arange(len(self))]
        return out if dtype is None else out.astype(dtype)


@dataclass(frozen=True)
class Dataset:
    """Training and held-out test arrays (first axis: examples)."""

    x_train: np.ndarray | Rows
    y_train: np.ndarray
    x_test: np.ndarray | Rows
    y_test: np.ndarray

    def __post_init__(self) -> None:
        for split in ("train", "test"):
            x, y = getattr(self, f"x_{split}"), getattr(self, f"y_{split}")
            if len(x) != len(y):
                raise ModelError(
                    f"dataset: x_{split} has {len(x)} examples but y_{split} has {len(y)}; "
                    "give every example exactly one label"
                )
            for name, array in ((f"x_{split}", x), (f"y_{split}", y)):
                _check_finite(name, array)
        if len(self.x_train) == 0:
            raise ModelError("dataset: the training split is empty")
        if len(self.x_test) == 0:
            raise ModelError("dataset: the test split is empty; hold out some examples")

    def partition(self, index: int, count: int) -> tuple[np.ndarray, np.ndarray]:
        """Worker ``index``'s share of the training split (every ``count``-th example)."""
        if not 0 <= index < count:
            raise ValueError(f"partition {index} of {count} does not exist")
        if count > len(self.x_train):
            raise ModelError(
                f"cannot split {len(self.x_train)} training examples over {count} workers"
            )
        return self.x_train[index::count], self.y_train[index::count]


def _check_finite(name: str, array: np.ndarray | Rows) -> None:
    """A NaN or infinity in the data poisons every gradient it touches: refuse it up front."""
    if not np.issubdtype(array.dtype, np.floating):
        return  # integers (images, labels) hold no NaN: nothing to read
    array = np.asarray(array)
    bad = ~np.isfinite(array.reshape(len(array), -1)).all(axis=1) if len(array) else []
    count = int(np.count_nonzero(bad))
    if count:
        first = int(np.argmax(bad))
        raise ModelError(
            f"dataset: {name} has NaN or infinite values in {count} example(s) (the first "
            f"is example {first}); drop or impute them before training"
        )


def batches(
    x: np.ndarray | Rows,
    y: np.ndarray,
    batch_size: int,
    seed: int,
    augment: Augment | None = None,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Endless shuffled mini-batches (a fresh permutation each epoch, seeded).

    Every batch has exactly ``batch_size`` examples (the tail of an epoch that does
    not fill a batch is dropped), so the jitted step compiles once. ``augment(x, rng)``,
    when given, transforms each batch's inputs (random crops, flips) with the same
    seeded generator.
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
            xb, yb = x[idx], y[idx]
            if augment is not None:
                with _blame("augment", augment):
                    xb = augment(xb, rng)
            yield xb, yb


Augment = Callable[[np.ndarray, np.random.Generator], np.ndarray]


def softmax_cross_entropy(logits: Array, labels: Array) -> Array:
    """Mean cross-entropy of integer ``labels`` under ``logits`` (a convenient default loss)."""
    import jax
    import jax.numpy as jnp

    logp = jax.nn.log_softmax(logits)
    return -jnp.mean(jnp.take_along_axis(logp, labels[:, None].astype(jnp.int32), axis=1))


def classification_metrics(outputs: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Accuracy of argmax predictions (or of ``outputs > 0`` for a single logit).

    Labels must be class indices that the outputs can predict: ``0..C-1`` for ``C``
    output columns, ``0``/``1`` for a single logit (a ModelError says so otherwise).
    """
    outputs = np.asarray(outputs)
    labels = np.asarray(labels)
    binary = outputs.ndim == 1 or outputs.shape[-1] == 1
    classes = 2 if binary else outputs.shape[-1]
    if outputs.shape[0] != len(labels):
        raise ModelError(
            f"the model gave {outputs.shape[0]} outputs for {len(labels)} test labels; "
            "apply must return one row per example"
        )
    if len(labels) and (labels.min() < 0 or labels.max() >= classes):
        raise ModelError(
            f"labels range over {labels.min()}..{labels.max()} but the model's outputs "
            f"predict {classes} classes (0..{classes - 1}); fix the labels or the output size"
        )
    if binary:
        predicted = (outputs.reshape(len(labels)) > 0).astype(labels.dtype)
    else:
        predicted = outputs.argmax(axis=-1)
    return {"accuracy": float(np.mean(predicted == labels))}


def regression_metrics(outputs: np.ndarray, targets: np.ndarray) -> dict[str, float]:
    """Mean squared error and the coefficient of determination (R^2) of real-valued outputs."""
    targets = np.asarray(targets, np.float64)
    outputs = np.asarray(outputs, np.float64)
    if outputs.size != targets.size:
        raise ModelError(
            f"outputs of shape {outputs.shape} do not fit regression targets of shape "
            f"{targets.shape}; apply must return one value per target (integer labels "
            "are read as classes, float labels as regression targets)"
        )
    outputs = outputs.reshape(targets.shape)
    mse = float(np.mean((outputs - targets) ** 2))
    variance = float(np.mean((targets - targets.mean()) ** 2))
    r2 = 1.0 - mse / variance if variance > 0 else 0.0
    return {"mse": mse, "r2": r2}


def default_metrics(outputs: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Accuracy for integer (or boolean) labels, MSE and R^2 for float labels."""
    labels = np.asarray(labels)
    if np.issubdtype(labels.dtype, np.floating):
        return regression_metrics(outputs, labels)
    if labels.dtype == np.bool_:
        labels = labels.astype(np.int32)
    return classification_metrics(outputs, labels)


def mean_squared_error(outputs: Array, targets: Array) -> Array:
    """Mean squared error of ``outputs`` against real-valued ``targets`` (a regression loss)."""
    import jax.numpy as jnp

    return jnp.mean((jnp.reshape(outputs, jnp.shape(targets)) - targets) ** 2)


@dataclass(frozen=True)
class ModelSpec:
    """What a user hands dsgd.

    ``apply(params, x) -> outputs``; ``loss(outputs, y) -> scalar``; or instead
    ``grad(params, (x, y)) -> (loss, grads)`` with ``grads`` shaped like ``params``.
    ``metrics(outputs, y) -> {name: value}``: any names (a ``--target`` may name one;
    ``loss`` is added from ``loss`` when present); the default gives ``accuracy`` for
    integer labels and ``mse``/``r2`` for float labels.

    The functions may be JAX code (jitted) or anything else, e.g. NumPy: a ``grad`` that
    JAX cannot trace runs eagerly on float32 NumPy arrays (see :class:`CompiledModel`).
    """

    init_params: PyTree
    apply: Callable[[PyTree, Array], Array]
    dataset: Dataset
    loss: Callable[[Array, Array], Array] | None = None
    grad: Callable[[PyTree, tuple[Array, Array]], tuple[Array, PyTree]] | None = None
    batch_size: int = 32
    metrics: Callable[[np.ndarray, np.ndarray], dict[str, float]] = default_metrics
    name: str = "model"
    augment: Augment | None = None  # (x_batch, rng) -> x_batch, on training batches only

    def __post_init__(self) -> None:
        if self.loss is None and self.grad is None:
            raise ModelError("the model spec needs a loss or a grad function")
        if not callable(self.apply):
            raise ModelError("the model spec's apply is not callable")
        if self.batch_size < 1:
            raise ModelError(f"the model spec's batch_size must be >= 1, got {self.batch_size}")


def load_model(ref: str, seed: int = 0, data: str = "", args: str = "") -> ModelSpec:
    """Import ``package.module:factory`` and call it; every failure is a one-line ModelError.

    The factory receives ``seed=`` and ``data=`` (``--data``) when it takes them, and the
    ``--model-arg`` settings ``args`` (``"image_size=48,background=true"``) as keywords.
    """
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
    keywords = parse_model_args(args)
    if isinstance(factory, ModelSpec):
        if keywords or data:
            raise ModelError(f"{ref} is a ModelSpec, not a factory: it takes no arguments")
        return factory
    if not callable(factory):
        raise ModelError(f"{ref} is neither a ModelSpec nor a factory returning one")
    try:
        takes = set(inspect.signature(factory).parameters)
    except (TypeError, ValueError):
        takes = set()
    unknown = sorted(set(keywords) - takes)
    if unknown:
        raise ModelError(
            f"--model-arg {unknown[0]}: {ref} takes no such argument "
            f"(it takes: {', '.join(sorted(takes - {'seed', 'data'})) or 'none'})"
        )
    if "seed" in takes:
        keywords["seed"] = seed
    if data:
        if "data" not in takes:
            raise ModelError(f"--data: {ref} takes no data argument")
        keywords["data"] = data
    with _blame("factory", factory):
        spec = factory(**keywords)
    if not isinstance(spec, ModelSpec):
        raise ModelError(f"{ref}() returned {type(spec).__name__}, expected dsgd.ModelSpec")
    return spec


def parse_model_args(text: str) -> dict[str, Any]:
    """``"k=v,k2=v2"`` -> keywords; values read as int, float, true/false, else strings."""
    out: dict[str, Any] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, sep, value = item.partition("=")
        if not sep or not key.strip().isidentifier():
            raise ModelError(f"--model-arg {item!r} must look like NAME=VALUE")
        out[key.strip()] = _literal(value.strip())
    return out


def _literal(value: str) -> Any:
    if value.lower() in ("true", "false"):
        return value.lower() == "true"
    for kind in (int, float):
        try:
            return kind(value)
        except ValueError:
            pass
    return value


JIT = "jax.jit"
EAGER = "eager"


class CompiledModel:
    """A spec bound to its layout, with its functions on the flat vector.

    Each function runs one of two ways, decided once by :meth:`prepare_gradient` (and, for
    ``apply``, at the first evaluation): compiled with ``jax.jit`` when JAX can trace it,
    else eagerly on float32 NumPy arrays (parameters as the same pytree, read-only views
    of the flat vector). Only a ``grad`` may be eager: a ``loss`` needs JAX to derive its
    gradient. ``gradient_path`` says which way the gradient runs.
    """

    def __init__(self, spec: ModelSpec, num_shards: int) -> None:
        import jax
        import jax.numpy as jnp

        self.spec = spec
        self.layout = Layout.from_pytree(spec.init_params, num_shards)
        self.gradient_path = ""  # JIT or EAGER, once prepare_gradient has run
        self.gradient_note = ""  # why the gradient runs eagerly
        self.outputs_path = ""
        layout = self.layout
        # the functions, not the spec: the jitted closures must not keep the spec's initial
        # values alive (see drop_initial)
        user_grad, loss_fn, apply_fn = spec.grad, spec.loss, spec.apply

        def checked(grads: PyTree) -> tuple[Array, ...]:
            leaves = tuple(jnp.asarray(g, jnp.float32) for g in jax.tree_util.tree_leaves(grads))
            shapes = tuple(tuple(jnp.shape(g)) for g in leaves)
            if shapes != layout.shapes:  # static under tracing: checked once, at compile
                raise ModelError(
                    f"the model's grad function returned gradients shaped {shapes}; "
                    f"they must be shaped like the parameters, {layout.shapes}"
                )
            return leaves

        if user_grad is not None:

            def leaf_grads(flat: Array, x: Array, y: Array) -> tuple[Array, tuple[Array, ...]]:
                with _blame("grad", user_grad):
                    loss, grads = user_grad(layout.unflatten(flat), (x, y))
                return loss, checked(grads)

        else:
            assert loss_fn is not None

            def objective(params: PyTree, x: Array, y: Array) -> Array:
                with _blame("apply", apply_fn):
                    outputs = apply_fn(params, x)
                with _blame("loss", loss_fn):
                    return loss_fn(outputs, y)

            def leaf_grads(flat: Array, x: Array, y: Array) -> tuple[Array, tuple[Array, ...]]:
                # with respect to the pytree, not the flat vector: the flat form's gradient
                # is a pad-and-add of every leaf into one vector, 2-3x slower at 75M
                loss, grads = jax.value_and_grad(objective)(layout.unflatten(flat), x, y)
                return loss, checked(grads)

        def outputs(flat: Array, x: Array) -> Array:
            with _blame("apply", apply_fn):
                return apply_fn(layout.unflatten(flat), x)

        self.grad_step = jax.jit(leaf_grads)  # (loss, per-leaf gradients)
        self._outputs = jax.jit(outputs)

    def initial_flat(self) -> FlatParams:
        if self.spec.init_params is None:
            raise RuntimeError("this model's initial values were dropped (drop_initial)")
        return self.layout.flatten(self.spec.init_params)

    def drop_initial(self) -> None:
        """Let go of the spec's initial values (300 MB at 75M parameters) in a process that
        holds parameters of its own from then on; :meth:`initial_flat` then raises."""
        self.spec = dataclasses.replace(self.spec, init_params=None)

    def _params_view(self, flat: FlatParams) -> PyTree:
        """The pytree of read-only float32 views of ``flat`` an eager function receives."""
        view = np.asarray(flat, np.float32).view()
        view.flags.writeable = False
        return self.layout.unflatten(view)

    def _eager_gradient(
        self, flat: FlatParams, x: np.ndarray, y: np.ndarray
    ) -> tuple[float, FlatParams]:
        assert self.spec.grad is not None
        with _blame("grad", self.spec.grad):
            loss, grads = self.spec.grad(self._params_view(flat), (x, y))
            loss = float(np.asarray(loss))
        try:
            return loss, self.layout.flatten(grads)
        except ModelError as exc:
            raise ModelError(f"the model's grad function returned gradients that {exc}") from None

    def prepare_gradient(self, x: np.ndarray, y: np.ndarray, flat: FlatParams | None = None) -> str:
        """Decide, on one batch (at ``flat``, else the initial values), how the gradient
        runs: jitted, or eagerly when JAX cannot trace the model's functions. A function
        that raises for another reason is a ModelError naming it. Returns the path
        (``jax.jit`` or ``eager``)."""
        import jax

        flat = self.initial_flat() if flat is None else flat
        try:
            # run to the end: the first execution's one-time costs (a second at 75M
            # parameters) are then paid here, while the cluster starts, not by the first step
            jax.block_until_ready(self.grad_step(flat, x, y))
        except Exception as traced:
            if self.spec.grad is None:
                if not _untraceable(traced):
                    raise _as_model_error(traced, "loss") from None
                raise ModelError(
                    f"{_one_line(traced)}: JAX cannot trace the model's apply or loss, so it "
                    "cannot derive the gradient; give the spec a grad function (it may use "
                    "NumPy) or write apply and loss with jax.numpy"
                ) from None
            try:
                self._eager_gradient(flat, x, y)
            except ModelError:
                if not _untraceable(traced):
                    raise _as_model_error(traced, "grad") from None
                raise
            self.gradient_path = EAGER
            self.gradient_note = f"JAX cannot trace grad ({_cause_name(traced)})"
        else:
            self.gradient_path = JIT
        return self.gradient_path

    def gradient_pieces(
        self, flat: FlatParams, x: np.ndarray, y: np.ndarray
    ) -> tuple[float, list[tuple[int, FlatParams]]]:
        """Loss and float32 gradient at ``flat`` for one batch, as pieces of the flat
        gradient: ``(offset, values)`` in ascending order, covering it. The jitted path
        gives one piece per parameter array, read in place from JAX's output buffers (a
        flat copy would cost a 300 MB pass and buffer per step at 75M parameters); drop
        them before the next call, or both steps' buffers are held at once.

        Runs the jitted step, or the user's ``grad`` eagerly (see :meth:`prepare_gradient`,
        which runs first when it has not). A model function that raises is a ModelError.
        """
        if not self.gradient_path:
            self.prepare_gradient(x, y, flat)
        if self.gradient_path == EAGER:
            loss, grad = self._eager_gradient(flat, x, y)
            return loss, [(0, grad)]
        try:
            loss, leaves = self.grad_step(flat, x, y)
            pieces = [
                (offset, np.asarray(leaf).reshape(-1))
                for offset, leaf in zip(self.layout.offsets, leaves, strict=True)
            ]
        except ModelError:
            raise
        except Exception as exc:
            raise _as_model_error(exc, "grad" if self.spec.grad else "loss") from None
        return float(loss), pieces

    def gradient(self, flat: FlatParams, x: np.ndarray, y: np.ndarray) -> tuple[float, FlatParams]:
        """Loss and flat float32 gradient at ``flat`` for one batch (valid until the next
        call, like :meth:`gradient_pieces`, which workers use)."""
        loss, pieces = self.gradient_pieces(flat, x, y)
        if len(pieces) == 1:
            return loss, pieces[0][1]
        grad = aligned_empty(self.layout.size)
        for offset, values in pieces:
            grad[offset : offset + values.size] = values
        return loss, grad

    def outputs(self, flat: FlatParams, x: np.ndarray) -> np.ndarray:
        """The model's outputs for ``x`` (jitted, or eager when JAX cannot trace ``apply``)."""
        if self.outputs_path != EAGER:
            try:
                out = np.asarray(self._outputs(flat, x))
            except Exception as exc:
                if self.outputs_path == JIT or not _untraceable(exc):
                    raise _as_model_error(exc, "apply") from None
                self.outputs_path = EAGER
            else:
                self.outputs_path = JIT
                return out
        with _blame("apply", self.spec.apply):
            return np.asarray(self.spec.apply(self._params_view(flat), x))

    def evaluate(
        self, flat: FlatParams, rows: np.ndarray | None = None, batch_size: int = 0
    ) -> dict[str, float]:
        """Metrics of ``flat`` on the held-out split (or its ``rows``), plus ``loss`` when
        the spec has one. Batches hold about 16 MB of inputs (at most 1024 examples), so
        a large model's activations stay small.

        A model function that raises (``apply``, ``metrics``, ``loss``) is a ModelError
        naming the function and the exception, in one line.
        """
        data = self.spec.dataset
        picked = np.arange(len(data.x_test)) if rows is None else np.asarray(rows, np.int64)
        if not batch_size:
            example_bytes = max(1, int(np.prod(data.x_test.shape[1:])) * 4)
            batch_size = int(np.clip(16 * 2**20 // example_bytes, 1, 1024))
        outs = [
            self.outputs(flat, np.asarray(data.x_test[picked[i : i + batch_size]]))
            for i in range(0, len(picked), batch_size)
        ]
        out = np.concatenate(outs)
        labels = np.asarray(data.y_test[picked])
        with _blame("metrics", self.spec.metrics):
            metrics = dict(self.spec.metrics(out, labels))
            result = {str(k): float(v) for k, v in metrics.items()}
        if self.spec.loss is not None and "loss" not in result:
            with _blame("loss", self.spec.loss):
                result["loss"] = float(np.asarray(self.spec.loss(out, labels)))
        return result

    def evaluation_sample(self, size: int, seed: int) -> np.ndarray | None:
        """A fixed random sample of ``size`` held-out rows (sorted), or None for the whole
        split (``size`` 0 or at least the split)."""
        total = len(self.spec.dataset.x_test)
        if size <= 0 or size >= total:
            return None
        return np.sort(np.random.default_rng(seed).choice(total, size, replace=False))


def _untraceable(exc: BaseException) -> bool:
    """Whether ``exc`` says that JAX could not trace a function (NumPy or another framework
    called on a tracer), rather than the function failing on its own."""
    import jax

    cause = exc.__cause__ if isinstance(exc, ModelError) and exc.__cause__ else exc
    if isinstance(cause, jax.errors.JAXTypeError | jax.errors.JAXIndexError):
        return True
    return "Trace" in str(cause) or "Tracer" in type(cause).__name__


def _cause_name(exc: BaseException) -> str:
    cause = exc.__cause__ if isinstance(exc, ModelError) and exc.__cause__ else exc
    return type(cause).__name__


def _one_line(exc: BaseException) -> str:
    cause = exc.__cause__ if isinstance(exc, ModelError) and exc.__cause__ else exc
    line = str(cause).strip().splitlines()[0] if str(cause).strip() else ""
    return f"{type(cause).__name__}: {line}" if line else type(cause).__name__


def _as_model_error(exc: BaseException, role: str) -> ModelError:
    """``exc`` as the one-line ModelError that blames ``role``. (A ModelError raised inside
    a traced function comes back with JAX's notes appended: only its first line is kept.)"""
    if isinstance(exc, ModelError):
        return ModelError(str(exc).strip().splitlines()[0])
    return ModelError(f"the model's {role} function raised {_one_line(exc)}")


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
