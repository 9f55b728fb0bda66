"""The sparse CTR example: deterministic data, a planted teacher, sparse gradients, learnable."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from dsgd.examples.ctr import (
    BATCH_SIZE,
    ROWS,
    _generate,
    ctr_embedding,
    ctr_task,
    embedding_bag_apply,
    hash_ids,
    sigmoid_cross_entropy,
)
from dsgd.model import CompiledModel, batches

SMALL = {"rows": 2**14, "vocab": 5_000, "n_train": 20_000, "n_test": 4_000}


def test_generation_is_deterministic_in_the_data_seed() -> None:
    first = ctr_task(**SMALL)
    _generate.cache_clear()
    again, other = ctr_task(**SMALL), ctr_task(**SMALL, data_seed=1)
    assert again is not first
    for name in ("x_train", "y_train", "x_test", "y_test"):
        np.testing.assert_array_equal(getattr(first.dataset, name), getattr(again.dataset, name))
    np.testing.assert_array_equal(first.teacher.vectors, again.teacher.vectors)
    assert first.stats == again.stats
    assert not np.array_equal(first.dataset.x_train, other.dataset.x_train)
    assert not np.array_equal(first.teacher.vectors, other.teacher.vectors)


def test_the_training_size_changes_neither_the_teacher_nor_the_test_split() -> None:
    small, large = ctr_task(**SMALL), ctr_task(**{**SMALL, "n_train": 30_000})
    np.testing.assert_array_equal(small.teacher.vectors, large.teacher.vectors)
    np.testing.assert_array_equal(small.dataset.x_test, large.dataset.x_test)


def test_seed_sets_the_initial_parameters_only() -> None:
    a, b, again = ctr_embedding(0, **SMALL), ctr_embedding(1, **SMALL), ctr_embedding(0, **SMALL)
    assert a.dataset is b.dataset is ctr_task(**SMALL).dataset  # one cached task
    assert not np.array_equal(a.init_params["embedding"], b.init_params["embedding"])
    for name in a.init_params:
        np.testing.assert_array_equal(a.init_params[name], again.init_params[name])


def test_shapes_dtypes_and_ranges() -> None:
    spec = ctr_embedding(**SMALL)
    data = spec.dataset
    assert data.x_train.shape == (20_000, 26) and data.x_train.dtype == np.int32
    assert data.x_test.shape == (4_000, 26) and data.x_test.dtype == np.int32
    for x in (data.x_train, data.x_test):
        assert x.min() >= 0 and x.max() < SMALL["rows"]
    for y in (data.y_train, data.y_test):
        assert y.dtype == np.int32 and set(np.unique(y)) == {0, 1}
    params = spec.init_params
    assert params["embedding"].shape == (SMALL["rows"], 8)
    assert params["w"].shape == (8,) and params["b"].shape == (1,)
    assert all(p.dtype == np.float32 for p in params.values())
    assert spec.batch_size == BATCH_SIZE
    outputs = embedding_bag_apply(params, data.x_test[:5])
    assert outputs.shape == (5,)


def test_hash_spreads_a_fields_ids_and_salts_by_field() -> None:
    ids = np.arange(10_000)
    rows = hash_ids(0, ids, ROWS)
    assert rows.dtype == np.int32 and rows.min() >= 0 and rows.max() < ROWS
    assert len(np.unique(rows)) > 9_900  # few collisions among 10k ids in 1M rows
    assert np.mean(hash_ids(1, ids, ROWS) == rows) < 0.01


def test_a_default_batch_touches_about_one_percent_of_the_rows() -> None:
    data = ctr_task(n_train=20 * BATCH_SIZE, n_test=1_000).dataset
    stream = batches(data.x_train, data.y_train, BATCH_SIZE, seed=0)
    fractions = [len(np.unique(next(stream)[0])) / ROWS for _ in range(20)]
    assert 0.003 <= float(np.mean(fractions)) <= 0.03, fractions


def test_the_teacher_is_in_the_model_class_and_beats_the_base_rate() -> None:
    task = ctr_task(**SMALL)
    data, stats = task.dataset, task.stats
    teacher_logits = np.asarray(embedding_bag_apply(task.teacher.params(), data.x_test))
    np.testing.assert_allclose(teacher_logits, task.teacher.logits(data.x_test), atol=1e-4)
    assert np.isfinite(stats.test_log_loss)
    rate = data.y_test.mean()
    base_entropy = -(rate * np.log(rate) + (1 - rate) * np.log(1 - rate))
    assert stats.test_log_loss < base_entropy - 0.02
    assert stats.test_accuracy > max(rate, 1 - rate)
    assert 0.1 < stats.base_rate < 0.5


def test_metrics_agree_with_the_loss_and_score_the_teacher_at_zero_gap() -> None:
    task = ctr_task(**SMALL)
    spec = ctr_embedding(**SMALL)
    logits = task.teacher.logits(task.dataset.x_test).astype(np.float32)
    metrics = spec.metrics(logits, task.dataset.y_test)
    assert metrics["log_loss"] == pytest.approx(metrics["teacher_log_loss"], rel=1e-6)
    assert metrics["log_loss_gap"] == pytest.approx(0.0, abs=1e-6)
    assert metrics["accuracy"] == pytest.approx(metrics["teacher_accuracy"])
    loss = float(sigmoid_cross_entropy(jax.numpy.asarray(logits), task.dataset.y_test))
    assert loss == pytest.approx(metrics["log_loss"], rel=1e-5)
    extreme = float(sigmoid_cross_entropy(jax.numpy.asarray([80.0, -80.0]), np.array([0, 1])))
    assert extreme == pytest.approx(80.0)


def test_the_gradient_is_nonzero_exactly_on_the_touched_rows() -> None:
    spec = ctr_embedding(**SMALL, batch_size=64)
    compiled = CompiledModel(spec, 1)
    x, y = spec.dataset.x_train[:64], spec.dataset.y_train[:64]
    _, grad = compiled.gradient(compiled.initial_flat(), x, y)
    grads = compiled.layout.unflatten(grad)
    touched = np.flatnonzero(np.any(np.asarray(grads["embedding"]) != 0, axis=1))
    np.testing.assert_array_equal(touched, np.unique(x))
    assert np.all(np.asarray(grads["w"]) != 0) and np.asarray(grads["b"])[0] != 0


def test_a_short_sgd_run_approaches_the_teacher() -> None:
    spec = ctr_embedding(**SMALL)
    compiled = CompiledModel(spec, 1)
    flat = compiled.initial_flat()
    before = compiled.evaluate(flat)
    stream = batches(spec.dataset.x_train, spec.dataset.y_train, 256, seed=0)
    for _ in range(150):
        x, y = next(stream)
        _, grad = compiled.gradient(flat, x, y)
        flat -= np.float32(0.3) * grad
    after = compiled.evaluate(flat)
    assert after["log_loss"] < before["log_loss"] - 0.05, (before, after)
    assert after["log_loss_gap"] < before["log_loss_gap"] / 2, (before, after)
    assert after["accuracy"] > before["accuracy"]
