"""The model contract: loading, the compiled flat-vector form, batches, the digits example."""

from __future__ import annotations

import dataclasses
import sys
import types
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from dsgd.errors import ModelError
from dsgd.examples import digits
from dsgd.examples.digits import cnn_apply, digits_cnn, digits_dataset, digits_mlp, mlp_apply
from dsgd.model import (
    CompiledModel,
    Dataset,
    ModelSpec,
    batches,
    classification_metrics,
    default_metrics,
    load_model,
    mean_squared_error,
    regression_metrics,
    softmax_cross_entropy,
)

NUM_DIGITS = 1797  # images in scikit-learn's digits dataset


@pytest.fixture(scope="module")
def mlp() -> CompiledModel:
    """One compiled MLP shared by the tests that only read from it (compiling is slow)."""
    return CompiledModel(digits_mlp(seed=1), num_shards=2)


def _params_equal(a: Any, b: Any) -> bool:
    leaves_a, leaves_b = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
    return len(leaves_a) == len(leaves_b) and all(
        np.array_equal(x, y) for x, y in zip(leaves_a, leaves_b, strict=True)
    )


def _tiny_dataset(n: int = 8) -> Dataset:
    x = np.arange(n * 2, dtype=np.float32).reshape(n, 2)
    y = (np.arange(n) % 2).astype(np.int32)
    return Dataset(x, y, x[:2], y[:2])


def _tiny_spec(**changes: Any) -> ModelSpec:
    base: dict[str, Any] = {
        "init_params": {"w": np.zeros((2, 2), np.float32)},
        "apply": lambda p, x: x @ p["w"],
        "dataset": _tiny_dataset(),
        "loss": softmax_cross_entropy,
    }
    return ModelSpec(**{**base, **changes})


# ---------------------------------------------------------------------------
# load_model


@pytest.fixture
def fake_module(monkeypatch: pytest.MonkeyPatch) -> types.ModuleType:
    """An importable module ``dsgd_test_fake_models`` that tests fill with attributes."""
    module = types.ModuleType("dsgd_test_fake_models")
    monkeypatch.setitem(sys.modules, module.__name__, module)
    return module


@pytest.mark.parametrize("ref", ["dsgd.examples.digits", "", ":digits_mlp", "dsgd.examples:"])
def test_load_model_rejects_malformed_references(ref: str) -> None:
    with pytest.raises(ModelError, match="must look like package.module:factory"):
        load_model(ref)


def test_load_model_reports_a_missing_module() -> None:
    with pytest.raises(ModelError) as info:
        load_model("dsgd_test_no_such_module:spec")
    message = str(info.value)
    assert "cannot import model module 'dsgd_test_no_such_module'" in message
    assert "PYTHONPATH" in message
    assert "\n" not in message
    assert info.value.__cause__ is None and info.value.__suppress_context__


def test_load_model_reports_a_missing_dependency_of_the_module(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "dsgd_test_broken_model.py").write_text(
        "import dsgd_test_missing_dependency\n\ndef spec():\n    pass\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ModelError, match="dsgd_test_missing_dependency"):
        load_model("dsgd_test_broken_model:spec")


def test_load_model_reports_a_missing_attribute() -> None:
    with pytest.raises(ModelError, match="module 'dsgd.examples.digits' has no attribute 'nope'"):
        load_model("dsgd.examples.digits:nope")


@pytest.mark.parametrize("value", [42, "digits_mlp", [1, 2]])
def test_load_model_rejects_attributes_that_are_not_specs(
    fake_module: types.ModuleType, value: Any
) -> None:
    fake_module.thing = value
    with pytest.raises(ModelError, match="neither a ModelSpec nor a factory"):
        load_model("dsgd_test_fake_models:thing")


@pytest.mark.parametrize("returned", [42, None, {"init_params": {}}])
def test_load_model_rejects_factories_that_return_something_else(
    fake_module: types.ModuleType, returned: Any
) -> None:
    fake_module.factory = lambda: returned
    with pytest.raises(ModelError, match=f"returned {type(returned).__name__}, expected"):
        load_model("dsgd_test_fake_models:factory")


def test_load_model_accepts_a_spec_instance(fake_module: types.ModuleType) -> None:
    spec = _tiny_spec()
    fake_module.spec = spec
    assert load_model("dsgd_test_fake_models:spec", seed=5) is spec


def test_load_model_calls_a_factory_without_seed(fake_module: types.ModuleType) -> None:
    calls: list[tuple[Any, ...]] = []

    def factory() -> ModelSpec:
        calls.append(())
        return _tiny_spec()

    fake_module.factory = factory
    assert isinstance(load_model("dsgd_test_fake_models:factory", seed=3), ModelSpec)
    assert calls == [()]


def test_load_model_passes_the_seed_to_a_factory_that_takes_one(
    fake_module: types.ModuleType,
) -> None:
    seeds: list[int] = []

    def factory(seed: int = 0) -> ModelSpec:
        seeds.append(seed)
        return _tiny_spec()

    fake_module.factory = factory
    load_model("dsgd_test_fake_models:factory", seed=7)
    load_model("dsgd_test_fake_models:factory")
    assert seeds == [7, 0]


def test_load_model_builds_the_bundled_examples() -> None:
    spec = load_model("dsgd.examples.digits:digits_mlp", seed=3)
    assert spec.name == "digits-mlp"
    assert _params_equal(spec.init_params, digits_mlp(seed=3).init_params)
    assert not _params_equal(spec.init_params, digits_mlp(seed=4).init_params)
    assert load_model("dsgd.examples.digits:digits_cnn").name == "digits-cnn"


# ---------------------------------------------------------------------------
# ModelSpec and Dataset validation


def test_spec_needs_a_loss_or_a_grad() -> None:
    with pytest.raises(ModelError, match="loss or a grad"):
        _tiny_spec(loss=None)


def test_spec_apply_must_be_callable() -> None:
    with pytest.raises(ModelError, match="apply is not callable"):
        _tiny_spec(apply="x @ w")


@pytest.mark.parametrize("batch_size", [0, -1])
def test_spec_batch_size_must_be_positive(batch_size: int) -> None:
    with pytest.raises(ModelError, match="batch_size"):
        _tiny_spec(batch_size=batch_size)


def test_dataset_rejects_mismatched_or_empty_splits() -> None:
    x, y = np.zeros((4, 2)), np.zeros(4)
    with pytest.raises(ModelError, match="x_train has 4 examples but y_train has 3"):
        Dataset(x, y[:3], x, y)
    with pytest.raises(ModelError, match="x_test has 1 examples but y_test has 4"):
        Dataset(x, y, x[:1], y)
    with pytest.raises(ModelError, match="training split is empty"):
        Dataset(x[:0], y[:0], x, y)
    with pytest.raises(ModelError, match="test split is empty"):
        Dataset(x, y, x[:0], y[:0])


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_dataset_rejects_non_finite_values_naming_the_example(bad: float) -> None:
    x, y = np.zeros((5, 3), np.float32), np.zeros(5, np.float32)
    x_bad = x.copy()
    x_bad[3, 1] = bad
    with pytest.raises(ModelError, match=r"x_train .* 1 example\(s\) \(the first is example 3\)"):
        Dataset(x_bad, y, x, y)
    y_bad = y.copy()
    y_bad[2] = bad
    with pytest.raises(ModelError, match="y_test"):
        Dataset(x, y, x, y_bad)
    Dataset(x.astype(np.uint8), y.astype(np.int32), x, y)  # integer arrays hold no NaN


def test_dataset_partitions_are_disjoint_and_cover_the_training_split() -> None:
    data = _tiny_dataset(10)
    parts = [data.partition(i, 3) for i in range(3)]
    assert [len(px) for px, _ in parts] == [4, 3, 3]
    seen = np.sort(np.concatenate([px[:, 0] for px, _ in parts]))
    np.testing.assert_array_equal(seen, np.sort(data.x_train[:, 0]))
    for px, py in parts:  # x and y stay paired
        np.testing.assert_array_equal(py, (px[:, 0] // 2 % 2).astype(np.int32))


def test_dataset_partition_errors() -> None:
    data = _tiny_dataset(4)
    with pytest.raises(ValueError, match="does not exist"):
        data.partition(3, 3)
    with pytest.raises(ValueError, match="does not exist"):
        data.partition(-1, 2)
    with pytest.raises(ModelError, match="cannot split 4 training examples over 5 workers"):
        data.partition(0, 5)


# ---------------------------------------------------------------------------
# CompiledModel


def _direct_value_and_grad(spec: ModelSpec, params: Any, x: Any, y: Any) -> tuple[Any, Any]:
    assert spec.loss is not None
    loss_fn = spec.loss
    return jax.value_and_grad(lambda p: loss_fn(spec.apply(p, x), y))(params)


def test_gradient_equals_jax_grad_of_the_loss(mlp: CompiledModel) -> None:
    data = mlp.spec.dataset
    x, y = data.x_train[:32], data.y_train[:32]
    rng = np.random.default_rng(0)
    flat = mlp.initial_flat() + rng.normal(0, 0.05, mlp.layout.size).astype(np.float32)

    loss, grad = mlp.gradient(flat, x, y)
    want_loss, want_grads = _direct_value_and_grad(mlp.spec, mlp.layout.unflatten(flat), x, y)
    assert isinstance(loss, float)
    assert grad.dtype == np.float32
    assert grad.shape == (mlp.layout.size,)
    assert loss == pytest.approx(float(want_loss), rel=1e-5)
    np.testing.assert_allclose(grad, mlp.layout.flatten(want_grads), rtol=1e-4, atol=1e-6)
    assert np.abs(grad).max() > 0


def test_initial_flat_is_the_flattened_init_params(mlp: CompiledModel) -> None:
    flat = mlp.initial_flat()
    assert flat.dtype == np.float32
    assert _params_equal(mlp.layout.unflatten(flat), mlp.spec.init_params)


def test_the_jitted_grad_step_compiles_once() -> None:
    spec = digits_mlp(seed=0)
    model = CompiledModel(spec, num_shards=1)
    data = spec.dataset
    stream = batches(data.x_train, data.y_train, spec.batch_size, seed=0)
    flat = model.initial_flat()
    assert model.grad_step._cache_size() == 0
    model.gradient(flat, *next(stream))
    assert model.grad_step._cache_size() == 1
    for _ in range(5):  # new batches and new parameters, as in the worker loop
        _, grad = model.gradient(flat, *next(stream))
        flat = flat - np.float32(0.1) * grad
    model.evaluate(flat)
    assert model.grad_step._cache_size() == 1


def test_a_grad_function_is_used_instead_of_the_loss() -> None:
    """``grad`` wins over ``loss`` and may compute anything (here: least squares by hand)."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal((16, 3)).astype(np.float32)
    y = rng.standard_normal(16).astype(np.float32)

    def apply(params: Any, inputs: Any) -> Any:
        return inputs @ params["w"] + params["b"]

    def grad(params: Any, batch: tuple[Any, Any]) -> tuple[Any, Any]:
        inputs, targets = batch
        residual = apply(params, inputs) - targets
        n = inputs.shape[0]
        loss = jnp.mean(residual**2)
        return loss, {"w": 2 * inputs.T @ residual / n, "b": 2 * jnp.mean(residual)}

    spec = ModelSpec(
        init_params={"w": np.array([0.5, -1.0, 2.0], np.float32), "b": np.float32(0.25)},
        apply=apply,
        grad=grad,
        loss=lambda out, target: jnp.asarray(123.0),  # must be ignored by gradient()
        dataset=Dataset(x, y, x, y),
        metrics=lambda out, target: {"accuracy": 0.0, "mse": float(np.mean((out - target) ** 2))},
    )
    model = CompiledModel(spec, num_shards=2)
    assert model.layout.paths == ("['b']", "['w']")
    loss, flat_grad = model.gradient(model.initial_flat(), x, y)

    residual = x @ spec.init_params["w"] + spec.init_params["b"] - y
    assert loss == pytest.approx(float(np.mean(residual**2)), rel=1e-5)
    want = np.concatenate([[2 * residual.mean()], 2 * x.T @ residual / len(x)])
    np.testing.assert_allclose(flat_grad, want, rtol=1e-5, atol=1e-6)

    result = model.evaluate(model.initial_flat())
    assert result["mse"] == pytest.approx(loss, rel=1e-5)
    assert result["loss"] == 123.0  # reported from the spec's loss when it has one


def test_evaluate_reports_accuracy_and_loss(mlp: CompiledModel) -> None:
    result = mlp.evaluate(mlp.initial_flat())
    assert set(result) == {"accuracy", "loss"}
    assert 0.0 <= result["accuracy"] <= 1.0
    assert 0.5 < result["loss"] < 10.0  # an untrained 10-class classifier
    # evaluating in smaller batches (with a ragged tail) gives the same numbers
    small = mlp.evaluate(mlp.initial_flat(), batch_size=100)
    assert small["accuracy"] == pytest.approx(result["accuracy"], abs=1.5 / 360)
    assert small["loss"] == pytest.approx(result["loss"], rel=1e-5)


def test_evaluate_without_a_loss_reports_metrics_only() -> None:
    def grad(params: Any, batch: tuple[Any, Any]) -> tuple[Any, Any]:
        return jnp.float32(0), jax.tree_util.tree_map(jnp.zeros_like, params)

    model = CompiledModel(_tiny_spec(loss=None, grad=grad), num_shards=1)
    assert set(model.evaluate(model.initial_flat())) == {"accuracy"}


def test_compiled_model_rejects_too_many_shards() -> None:
    with pytest.raises(ModelError, match="shards"):
        CompiledModel(_tiny_spec(), num_shards=5)


# ---------------------------------------------------------------------------
# batches


def _take(stream: Iterator[tuple[np.ndarray, np.ndarray]], n: int) -> list[np.ndarray]:
    out = []
    for _ in range(n):
        x, y = next(stream)
        np.testing.assert_array_equal(y, x * 10)  # examples stay paired with labels
        out.append(x)
    return out


def _indexed(n: int) -> tuple[np.ndarray, np.ndarray]:
    x = np.arange(n)
    return x, x * 10


def test_batches_have_a_fixed_size() -> None:
    stream = batches(*_indexed(103), batch_size=10, seed=0)
    assert all(len(b) == 10 for b in _take(stream, 50))


def test_batches_cover_an_epoch_without_repeats() -> None:
    stream = batches(*_indexed(100), batch_size=10, seed=1)
    first = np.concatenate(_take(stream, 10))
    second = np.concatenate(_take(stream, 10))
    np.testing.assert_array_equal(np.sort(first), np.arange(100))
    np.testing.assert_array_equal(np.sort(second), np.arange(100))
    assert not np.array_equal(first, second)  # a fresh permutation each epoch


def test_batches_drop_the_ragged_tail_of_each_epoch() -> None:
    stream = batches(*_indexed(25), batch_size=10, seed=2)
    for _ in range(3):  # each epoch: two full batches of distinct examples
        epoch = np.concatenate(_take(stream, 2))
        assert len(np.unique(epoch)) == 20


def test_batches_are_deterministic_per_seed() -> None:
    a = _take(batches(*_indexed(50), batch_size=8, seed=7), 20)
    b = _take(batches(*_indexed(50), batch_size=8, seed=7), 20)
    c = _take(batches(*_indexed(50), batch_size=8, seed=8), 20)
    assert all(np.array_equal(p, q) for p, q in zip(a, b, strict=True))
    assert not all(np.array_equal(p, q) for p, q in zip(a, c, strict=True))


def test_batches_larger_than_the_data_shrink_to_it() -> None:
    stream = batches(*_indexed(6), batch_size=32, seed=0)
    for batch in _take(stream, 3):
        np.testing.assert_array_equal(np.sort(batch), np.arange(6))


def test_batches_keep_the_trailing_axes() -> None:
    data = digits_dataset()
    x, y = next(batches(data.x_train, data.y_train, 16, seed=0))
    assert x.shape == (16, 8, 8, 1)
    assert y.shape == (16,)
    assert (x.dtype, y.dtype) == (np.float32, np.int32)


# ---------------------------------------------------------------------------
# helpers: loss and metrics


def test_softmax_cross_entropy_matches_optax() -> None:
    rng = np.random.default_rng(4)
    logits = rng.standard_normal((20, 10)).astype(np.float32) * 3
    labels = rng.integers(0, 10, 20).astype(np.int32)
    want = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    assert float(softmax_cross_entropy(logits, labels)) == pytest.approx(float(want), rel=1e-5)


def test_classification_metrics() -> None:
    logits = np.array([[0.1, 0.9], [2.0, -1.0], [0.0, 3.0], [5.0, 4.0]])
    labels = np.array([1, 0, 0, 0])
    assert classification_metrics(logits, labels) == {"accuracy": 0.75}
    single = np.array([[1.5], [-0.5], [0.2], [-3.0]])
    assert classification_metrics(single, np.array([1, 0, 0, 0])) == {"accuracy": 0.75}
    assert classification_metrics(single[:, 0], np.array([1, 1, 1, 0])) == {"accuracy": 0.75}


# ---------------------------------------------------------------------------
# the digits example


def test_digits_split_is_a_stratified_fifth() -> None:
    data = digits_dataset()
    n_test, n_train = len(data.y_test), len(data.y_train)
    assert n_test + n_train == NUM_DIGITS
    assert n_test == int(np.ceil(digits.TEST_FRACTION * NUM_DIGITS))
    assert data.x_train.shape[1:] == data.x_test.shape[1:] == (8, 8, 1)
    assert 0.0 <= data.x_train.min() and data.x_train.max() <= 1.0
    per_class_test = np.bincount(data.y_test, minlength=10)
    per_class_all = per_class_test + np.bincount(data.y_train, minlength=10)
    assert per_class_all.min() > 150  # all ten classes are present
    # stratified: each class is split 80/20 up to rounding
    assert np.all(np.abs(per_class_test - digits.TEST_FRACTION * per_class_all) <= 1)


def test_digits_split_is_deterministic() -> None:
    cached = digits_dataset()
    assert digits_dataset() is cached
    fresh = digits_dataset.__wrapped__()
    for name in ("x_train", "y_train", "x_test", "y_test"):
        np.testing.assert_array_equal(getattr(fresh, name), getattr(cached, name))


def test_digits_factories_are_seeded() -> None:
    for factory in (digits_mlp, digits_cnn):
        assert _params_equal(factory(seed=2).init_params, factory(seed=2).init_params)
        assert not _params_equal(factory(seed=2).init_params, factory(seed=3).init_params)
        assert _params_equal(factory().init_params, factory(seed=0).init_params)
        assert factory().dataset is digits_dataset()


@pytest.mark.parametrize(("factory", "apply"), [(digits_mlp, mlp_apply), (digits_cnn, cnn_apply)])
def test_digits_models_output_ten_logits(factory: Any, apply: Any) -> None:
    spec = factory()
    assert spec.apply is apply
    x = spec.dataset.x_test[:5]
    out = jax.eval_shape(apply, spec.init_params, x)  # shapes only: no compilation
    assert out.shape == (5, 10)
    assert out.dtype == jnp.float32
    for leaf in jax.tree_util.tree_leaves(spec.init_params):
        assert leaf.dtype == np.float32


def test_classification_metrics_refuse_labels_the_outputs_cannot_predict() -> None:
    logits = np.zeros((3, 4))
    with pytest.raises(ModelError, match=r"labels range over 0\.\.7 .* 4 classes"):
        classification_metrics(logits, np.array([0, 7, 1]))
    with pytest.raises(ModelError, match="2 classes"):
        classification_metrics(np.zeros(3), np.array([0, 1, 2]))
    with pytest.raises(ModelError, match="3 outputs for 2 test labels"):
        classification_metrics(logits, np.array([0, 1]))


def test_regression_metrics_are_mse_and_r2() -> None:
    targets = np.array([1.0, 2.0, 3.0, 4.0], np.float32)
    assert regression_metrics(targets, targets) == {"mse": 0.0, "r2": 1.0}
    mean = np.full(4, targets.mean())
    assert regression_metrics(mean, targets) == pytest.approx({"mse": 1.25, "r2": 0.0})
    got = regression_metrics((targets + 1)[:, None], targets)  # a column of outputs fits too
    assert got == pytest.approx({"mse": 1.0, "r2": 0.2})
    with pytest.raises(ModelError, match="do not fit regression targets"):
        regression_metrics(np.zeros((4, 3)), targets)


def test_default_metrics_read_float_labels_as_regression_and_others_as_classes() -> None:
    assert set(default_metrics(np.zeros(3), np.array([0.5, 1.0, 2.0]))) == {"mse", "r2"}
    assert default_metrics(np.array([[0, 1], [1, 0]]), np.array([1, 0])) == {"accuracy": 1.0}
    assert default_metrics(np.array([1.0, -1.0]), np.array([True, False])) == {"accuracy": 1.0}


def test_mean_squared_error_matches_numpy() -> None:
    outputs, targets = np.array([[1.0], [3.0]], np.float32), np.array([2.0, 2.0], np.float32)
    assert float(mean_squared_error(outputs, targets)) == pytest.approx(1.0)


# ---------------------------------------------------------------------------
# gradient paths: jitted when JAX can trace the model, eager NumPy when it cannot


def _numpy_linear_spec(**changes: Any) -> ModelSpec:
    """Least squares with a gradient written in NumPy (np.asarray fails on a tracer)."""

    def grad(params: Any, batch: Any) -> Any:
        x, y = batch
        w = np.asarray(params["w"])
        residual = x @ w - y
        return float(np.mean(residual**2)), {"w": 2 * x.T @ residual / len(y)}

    x = np.random.default_rng(0).standard_normal((64, 3)).astype(np.float32)
    y = (x @ np.array([1.0, -2.0, 0.5], np.float32)).astype(np.float32)
    base: dict[str, Any] = {
        "init_params": {"w": np.zeros(3, np.float32)},
        "apply": lambda p, x: np.asarray(x) @ np.asarray(p["w"]),
        "grad": grad,
        "dataset": Dataset(x, y, x[:16], y[:16]),
    }
    return ModelSpec(**{**base, **changes})


def test_a_jax_model_is_jitted() -> None:
    model = CompiledModel(digits_mlp(seed=0), num_shards=1)
    data = model.spec.dataset
    assert model.prepare_gradient(data.x_train[:8], data.y_train[:8]) == "jax.jit"


def test_a_numpy_gradient_runs_eagerly_and_matches_the_math() -> None:
    model = CompiledModel(_numpy_linear_spec(), num_shards=1)
    data = model.spec.dataset
    x, y = data.x_train[:16], data.y_train[:16]
    assert model.prepare_gradient(x, y) == "eager"
    assert "TracerArrayConversionError" in model.gradient_note
    flat = np.array([0.5, 0.5, 0.5], np.float32)
    loss, grad = model.gradient(flat, x, y)
    residual = x @ flat - y
    np.testing.assert_allclose(grad, 2 * x.T @ residual / len(y), rtol=1e-5)
    assert loss == pytest.approx(float(np.mean(residual**2)), rel=1e-5)
    assert grad.dtype == np.float32
    metrics = model.evaluate(flat)  # apply is NumPy too: evaluated eagerly
    assert model.outputs_path == "eager" and set(metrics) == {"mse", "r2"}


def test_an_eager_gradient_gets_read_only_parameters() -> None:
    def grad(params: Any, batch: Any) -> Any:
        np.asarray(params["w"])[0] = 99.0  # a bug: writing into the parameters
        return 0.0, params

    model = CompiledModel(_numpy_linear_spec(grad=grad), num_shards=1)
    data = model.spec.dataset
    with pytest.raises(ModelError, match=r"grad function \(.*grad\) raised .*read-only"):
        model.prepare_gradient(data.x_train[:4], data.y_train[:4])


def test_a_gradient_of_the_wrong_shape_is_named() -> None:
    def grad(params: Any, batch: Any) -> Any:
        return 0.0, {"w": np.zeros(4, np.float32)}

    model = CompiledModel(_numpy_linear_spec(grad=grad), num_shards=1)
    data = model.spec.dataset
    with pytest.raises(ModelError, match=r"returned gradients shaped \(\(4,\),\).*\(\(3,\),\)"):
        model.prepare_gradient(data.x_train[:4], data.y_train[:4])


def test_a_grad_that_raises_is_a_one_line_model_error_naming_it() -> None:
    def broken_grad(params: Any, batch: Any) -> Any:
        raise ValueError("shapes do not line up\nsecond line")

    model = CompiledModel(_numpy_linear_spec(grad=broken_grad), num_shards=1)
    data = model.spec.dataset
    with pytest.raises(ModelError) as info:
        model.gradient(model.initial_flat(), data.x_train[:4], data.y_train[:4])
    assert str(info.value) == (
        "the model's grad function (test_a_grad_that_raises_is_a_one_line_model_error_naming_it."
        "<locals>.broken_grad) raised ValueError: shapes do not line up"
    )


def test_a_jax_grad_with_a_bug_is_blamed_not_run_eagerly() -> None:
    def buggy(params: Any, batch: Any) -> Any:
        return jnp.sum(params["nope"]), params

    model = CompiledModel(_numpy_linear_spec(grad=buggy), num_shards=1)
    data = model.spec.dataset
    with pytest.raises(ModelError, match="grad function .* raised KeyError: 'nope'"):
        model.prepare_gradient(data.x_train[:4], data.y_train[:4])
    assert model.gradient_path == ""


def test_an_untraceable_loss_asks_for_a_grad_function() -> None:
    spec = _tiny_spec(apply=lambda p, x: np.asarray(x) @ np.asarray(p["w"]))
    model = CompiledModel(spec, num_shards=1)
    data = spec.dataset
    with pytest.raises(ModelError, match="cannot derive the gradient; give the spec a grad"):
        model.prepare_gradient(data.x_train[:2], data.y_train[:2])


def test_a_factory_that_raises_is_a_model_error_naming_it(fake_module: types.ModuleType) -> None:
    def factory() -> ModelSpec:
        raise FileNotFoundError("data/train.csv")

    fake_module.factory = factory  # type: ignore[attr-defined]
    with pytest.raises(ModelError, match=r"factory function \(.*factory\) raised FileNotFound"):
        load_model("dsgd_test_fake_models:factory")


def test_a_worker_can_drop_the_initial_values_it_no_longer_needs(mlp: CompiledModel) -> None:
    import gc
    import weakref

    import jax

    own = jax.tree_util.tree_map(np.array, mlp.spec.init_params)
    first = weakref.ref(jax.tree_util.tree_leaves(own)[0])
    model = CompiledModel(dataclasses.replace(mlp.spec, init_params=own), 1)
    del own
    model.drop_initial()
    gc.collect()
    assert first() is None  # freed: nothing (the jitted functions neither) holds them
    assert model.spec.init_params is None and mlp.spec.init_params is not None
    with pytest.raises(RuntimeError, match="dropped"):
        model.initial_flat()
    x, y = mlp.spec.dataset.x_train[:8], mlp.spec.dataset.y_train[:8]
    _, grad = model.gradient(mlp.initial_flat(), x, y)  # the model itself still works
    assert grad.shape == (mlp.layout.size,)
