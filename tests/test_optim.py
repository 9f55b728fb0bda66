"""Server optimizers: checked against optax, chunk by chunk and index by index."""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dsgd.errors import ConfigError
from dsgd.optim import OPTIMIZERS, SGD, Adagrad, make_optimizer
from dsgd.wire import VALUE_DTYPES, chunk_bounds

SIZE = 1000
LR = 0.05
# float32 arithmetic in a different order (optax multiplies by rsqrt, we divide by
# sqrt) differs in the last bits; over 25 steps that stays well under this.
RTOL, ATOL = 2e-5, 1e-6


def _rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def _grads(rng: np.random.Generator, steps: int, size: int = SIZE) -> list[np.ndarray]:
    """Gradients spanning several magnitudes, as a real model produces."""
    scales = 10.0 ** rng.uniform(-3, 1, size)
    return [(rng.standard_normal(size) * scales).astype(np.float32) for _ in range(steps)]


def _optax_trajectory(
    transform: optax.GradientTransformation, params: np.ndarray, grads: list[np.ndarray]
) -> list[np.ndarray]:
    p = jnp.asarray(params)
    state = transform.init(p)
    out = []
    for g in grads:
        updates, state = transform.update(jnp.asarray(g), state, p)
        p = optax.apply_updates(p, updates)
        out.append(np.asarray(p))
    return out


# ---------------------------------------------------------------------------
# Adagrad


def test_adagrad_defaults_match_the_optax_defaults() -> None:
    opt = Adagrad(LR)
    assert opt.initial_accumulator_value == 0.1
    assert opt.eps == 1e-7
    assert opt.name == "adagrad"


def test_adagrad_init_fills_the_accumulator() -> None:
    state = Adagrad(LR).init(7)
    assert set(state) == {"accumulator"}
    assert state["accumulator"].dtype == np.float32
    np.testing.assert_array_equal(state["accumulator"], np.full(7, 0.1, np.float32))


def test_adagrad_dense_matches_optax() -> None:
    rng = _rng(1)
    params = rng.standard_normal(SIZE).astype(np.float32)
    grads = _grads(rng, 25)
    expected = _optax_trajectory(
        optax.adagrad(LR, initial_accumulator_value=0.1, eps=1e-7), params, grads
    )

    opt = Adagrad(LR)
    state = opt.init(SIZE)
    ours = params.copy()
    for g, want in zip(grads, expected, strict=True):
        opt.apply_dense(ours, state, 0, g)
        assert ours.dtype == np.float32
        np.testing.assert_allclose(ours, want, rtol=RTOL, atol=ATOL)
    # the parameters really moved, so the comparison is not vacuous
    assert np.abs(ours - params).max() > 0.1


@settings(deadline=None, max_examples=30)
@given(chunk_elems=st.integers(1, SIZE + 10), seed=st.integers(0, 2**32 - 1))
def test_adagrad_dense_chunk_by_chunk_equals_whole(chunk_elems: int, seed: int) -> None:
    rng = _rng(seed)
    params = rng.standard_normal(SIZE).astype(np.float32)
    grads = _grads(rng, 3)
    opt = Adagrad(LR)

    whole, whole_state = params.copy(), opt.init(SIZE)
    chunked, chunked_state = params.copy(), opt.init(SIZE)
    for g in grads:
        opt.apply_dense(whole, whole_state, 0, g)
        for start, stop in chunk_bounds(SIZE, 4, chunk_elems * 4):
            opt.apply_dense(chunked, chunked_state, start, g[start:stop])
    # elementwise IEEE operations: splitting must not change a single bit
    np.testing.assert_array_equal(chunked, whole)
    np.testing.assert_array_equal(chunked_state["accumulator"], whole_state["accumulator"])


def test_adagrad_dense_touches_only_its_slice() -> None:
    rng = _rng(2)
    params = rng.standard_normal(SIZE).astype(np.float32)
    opt = Adagrad(LR)
    state = opt.init(SIZE)
    before = params.copy()
    grad = np.ones(100, np.float32)
    opt.apply_dense(params, state, 300, grad)
    np.testing.assert_array_equal(params[:300], before[:300])
    np.testing.assert_array_equal(params[400:], before[400:])
    assert np.all(params[300:400] < before[300:400])
    np.testing.assert_array_equal(state["accumulator"][:300], np.float32(0.1))
    np.testing.assert_array_equal(state["accumulator"][400:], np.float32(0.1))
    np.testing.assert_allclose(state["accumulator"][300:400], 1.1, rtol=1e-6)


def _unique_indices(rng: np.random.Generator, k: int, size: int = SIZE) -> np.ndarray:
    return np.sort(rng.choice(size, k, replace=False)).astype(np.uint32)


def _scatter(indices: np.ndarray, values: np.ndarray, size: int = SIZE) -> np.ndarray:
    dense = np.zeros(size, np.float32)
    dense[indices] = values
    return dense


def test_adagrad_sparse_matches_optax_on_the_scattered_gradient() -> None:
    rng = _rng(3)
    params = rng.standard_normal(SIZE).astype(np.float32)
    updates = []
    for _ in range(25):
        k = int(rng.integers(1, SIZE // 4))
        indices = _unique_indices(rng, k)
        rng.shuffle(indices)  # order within a chunk does not matter
        updates.append((indices, _grads(rng, 1, k)[0]))
    expected = _optax_trajectory(
        optax.adagrad(LR, initial_accumulator_value=0.1, eps=1e-7),
        params,
        [_scatter(i, v) for i, v in updates],
    )

    opt = Adagrad(LR)
    state = opt.init(SIZE)
    ours = params.copy()
    for (indices, values), want in zip(updates, expected, strict=True):
        opt.apply_sparse(ours, state, indices, values)
        np.testing.assert_allclose(ours, want, rtol=RTOL, atol=ATOL)


@settings(deadline=None, max_examples=30)
@given(seed=st.integers(0, 2**32 - 1), k=st.integers(0, SIZE))
def test_adagrad_sparse_equals_dense_with_zeros_elsewhere(seed: int, k: int) -> None:
    rng = _rng(seed)
    params = rng.standard_normal(SIZE).astype(np.float32)
    indices = _unique_indices(rng, k)
    values = _grads(rng, 1, k)[0]
    opt = Adagrad(LR)

    sparse, sparse_state = params.copy(), opt.init(SIZE)
    dense, dense_state = params.copy(), opt.init(SIZE)
    opt.apply_sparse(sparse, sparse_state, indices, values)
    opt.apply_dense(dense, dense_state, 0, _scatter(indices, values))
    np.testing.assert_array_equal(sparse, dense)
    np.testing.assert_array_equal(sparse_state["accumulator"], dense_state["accumulator"])


def test_adagrad_lr_scale_is_a_learning_rate_multiplier() -> None:
    rng = _rng(4)
    params = rng.standard_normal(SIZE).astype(np.float32)
    grad = _grads(rng, 1)[0]
    indices = _unique_indices(rng, 50)

    for apply in ("dense", "sparse"):
        scaled, unscaled = params.copy(), params.copy()
        opt, half = Adagrad(LR), Adagrad(LR * 0.5)
        s1, s2 = opt.init(SIZE), half.init(SIZE)
        if apply == "dense":
            opt.apply_dense(scaled, s1, 0, grad, lr_scale=0.5)
            half.apply_dense(unscaled, s2, 0, grad)
        else:
            opt.apply_sparse(scaled, s1, indices, grad[:50], lr_scale=0.5)
            half.apply_sparse(unscaled, s2, indices, grad[:50])
        np.testing.assert_array_equal(scaled, unscaled)
        np.testing.assert_array_equal(s1["accumulator"], s2["accumulator"])


def test_adagrad_lr_scale_zero_still_accumulates() -> None:
    """A fully discounted (stale) update changes no weight but still counts as seen."""
    opt = Adagrad(LR)
    state = opt.init(4)
    params = np.ones(4, np.float32)
    opt.apply_dense(params, state, 0, np.full(4, 2.0, np.float32), lr_scale=0.0)
    np.testing.assert_array_equal(params, 1.0)
    np.testing.assert_allclose(state["accumulator"], 4.1, rtol=1e-6)


# ---------------------------------------------------------------------------
# SGD


def test_sgd_has_no_state() -> None:
    assert SGD(LR).init(SIZE) == {}
    assert SGD(LR).name == "sgd"


def test_sgd_dense_is_exact() -> None:
    rng = _rng(5)
    params = rng.standard_normal(SIZE).astype(np.float32)
    grad = _grads(rng, 1)[0]
    expected = params.copy()
    expected[100:600] = params[100:600] - np.float32(LR * 0.25) * grad[100:600]

    opt = SGD(LR)
    ours = params.copy()
    opt.apply_dense(ours, opt.init(SIZE), 100, grad[100:600], lr_scale=0.25)
    assert ours.dtype == np.float32
    np.testing.assert_array_equal(ours, expected)


def test_sgd_sparse_is_exact() -> None:
    rng = _rng(6)
    params = rng.standard_normal(SIZE).astype(np.float32)
    indices = _unique_indices(rng, 200)
    rng.shuffle(indices)
    values = _grads(rng, 1, 200)[0]
    expected = params.copy()
    expected[indices] = params[indices] - np.float32(LR) * values

    opt = SGD(LR)
    ours = params.copy()
    opt.apply_sparse(ours, opt.init(SIZE), indices, values)
    np.testing.assert_array_equal(ours, expected)


def test_sgd_chunked_and_sparse_agree_with_whole_dense() -> None:
    rng = _rng(7)
    params = rng.standard_normal(SIZE).astype(np.float32)
    grad = _grads(rng, 1)[0]
    opt = SGD(LR)

    whole = params.copy()
    opt.apply_dense(whole, {}, 0, grad)
    chunked = params.copy()
    for start, stop in chunk_bounds(SIZE, 4, 4 * 77):
        opt.apply_dense(chunked, {}, start, grad[start:stop])
    sparse = params.copy()
    opt.apply_sparse(sparse, {}, np.arange(SIZE, dtype=np.uint32)[::-1], grad[::-1])
    np.testing.assert_array_equal(chunked, whole)
    np.testing.assert_array_equal(sparse, whole)


def test_sgd_matches_optax() -> None:
    rng = _rng(8)
    params = rng.standard_normal(SIZE).astype(np.float32)
    grads = _grads(rng, 10)
    expected = _optax_trajectory(optax.sgd(LR), params, grads)
    opt = SGD(LR)
    ours = params.copy()
    for g, want in zip(grads, expected, strict=True):
        opt.apply_dense(ours, {}, 0, g)
        np.testing.assert_allclose(ours, want, rtol=1e-6, atol=1e-7)


# ---------------------------------------------------------------------------
# make_optimizer


def test_make_optimizer_builds_each_optimizer() -> None:
    assert make_optimizer("sgd", 0.1) == SGD(0.1)
    assert make_optimizer("adagrad", 0.2) == Adagrad(0.2)
    assert {make_optimizer(name, 1.0).name for name in OPTIMIZERS} == set(OPTIMIZERS)


@pytest.mark.parametrize("name", ["adam", "SGD", "", "sgd ", "momentum"])
def test_make_optimizer_rejects_unknown_names(name: str) -> None:
    with pytest.raises(ConfigError, match="unknown optimizer") as info:
        make_optimizer(name, 0.1)
    for known in OPTIMIZERS:
        assert known in str(info.value)


@pytest.mark.parametrize("lr", [0.0, -0.1, math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("name", OPTIMIZERS)
def test_make_optimizer_rejects_bad_learning_rates(name: str, lr: float) -> None:
    with pytest.raises(ConfigError, match="learning rate"):
        make_optimizer(name, lr)


# ---------------------------------------------------------------------------
# gradients as the wire delivers them


@pytest.mark.parametrize("value_dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("name", OPTIMIZERS)
@pytest.mark.parametrize("apply", ["dense", "sparse"])
def test_half_precision_gradients_apply_like_their_float32_values(
    name: str, value_dtype: str, apply: str
) -> None:
    """``--value-dtype float16|bfloat16`` pushes arrive from ``wire.decode`` in that dtype.

    Applying them must give exactly what applying the same numbers as float32 gives:
    squaring a float16 gradient above 256 in float16 overflows to inf and freezes that
    weight forever, and squaring in bfloat16 keeps only 8 bits of the accumulator.
    """
    half = np.array([300.0, -1000.0, 1e-3, -2.0, 0.0, 7.0], VALUE_DTYPES[value_dtype])
    full = half.astype(np.float32)
    indices = np.array([5, 0, 2, 1, 4, 3], np.uint32)
    opt = make_optimizer(name, LR)
    results = []
    for grad in (half, full):
        params = np.linspace(-1, 1, 6, dtype=np.float32)
        state = opt.init(6)
        if apply == "dense":
            opt.apply_dense(params, state, 0, grad)
        else:
            opt.apply_sparse(params, state, indices, grad)
        assert params.dtype == np.float32
        results.append((params, state))
    (got, got_state), (want, want_state) = results
    np.testing.assert_array_equal(got, want)
    for key in want_state:
        assert got_state[key].dtype == np.float32
        np.testing.assert_array_equal(got_state[key], want_state[key])
