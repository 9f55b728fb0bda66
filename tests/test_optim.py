"""Server optimizers: checked against optax, chunk by chunk and index by index."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dsgd import checkpoint
from dsgd.config import TrainConfig
from dsgd.errors import CheckpointError, ConfigError
from dsgd.optim import (
    OPTIMIZERS,
    SGD,
    Adagrad,
    Adam,
    AdamW,
    Momentum,
    ServerOptimizerT,
    make_optimizer,
    state_mismatch,
    subtract_scaled,
)
from dsgd.shard.core import ShardState
from dsgd.shard.process import ShardProcess
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
# Momentum, Nesterov, Adam, AdamW

BIG = 3000  # several chunks per push, of uneven sizes
ADAM_LR = 1e-2


def _new_optimizers() -> list[tuple[str, ServerOptimizerT, optax.GradientTransformation]]:
    """(id, ours, optax's) for each new optimizer, with non-default settings too."""
    adamw = dict(b1=0.9, b2=0.999, eps=1e-8)
    return [
        ("momentum", Momentum(LR, 0.9), optax.sgd(LR, momentum=0.9)),
        ("momentum-0.5", Momentum(LR, 0.5), optax.sgd(LR, momentum=0.5)),
        ("nesterov", Momentum(LR, 0.9, nesterov=True), optax.sgd(LR, momentum=0.9, nesterov=True)),
        ("nesterov-0.7", Momentum(LR, 0.7, True), optax.sgd(LR, momentum=0.7, nesterov=True)),
        ("adam", Adam(ADAM_LR), optax.adam(ADAM_LR, b1=0.9, b2=0.999, eps=1e-8)),
        ("adamw", AdamW(ADAM_LR), optax.adamw(ADAM_LR, **adamw, weight_decay=1e-4)),
        (
            "adamw-0.05",
            AdamW(ADAM_LR, weight_decay=0.05),
            optax.adamw(ADAM_LR, **adamw, weight_decay=0.05),
        ),
    ]


NEW = _new_optimizers()
NEW_IDS = [case[0] for case in NEW]


def _random_chunks(rng: np.random.Generator, size: int) -> list[tuple[int, int]]:
    """A push's dense chunks: uneven sizes, arbitrary offsets, in a random order."""
    cuts = np.sort(rng.choice(np.arange(1, size), int(rng.integers(2, 9)), replace=False))
    bounds = list(zip([0, *cuts.tolist()], [*cuts.tolist(), size], strict=True))
    rng.shuffle(bounds)
    return bounds


def test_new_optimizer_defaults_match_the_optax_defaults() -> None:
    assert (Momentum(LR).momentum, Momentum(LR).nesterov) == (0.9, False)
    assert (Momentum(LR).name, Momentum(LR, nesterov=True).name) == ("momentum", "nesterov")
    for opt in (Adam(LR), AdamW(LR)):
        assert (opt.b1, opt.b2, opt.eps) == (0.9, 0.999, 1e-8)
    assert AdamW(LR).weight_decay == 1e-4
    assert (Adam(LR).name, AdamW(LR).name) == ("adam", "adamw")


def test_new_optimizers_init_their_state() -> None:
    assert Momentum(LR).init(5).keys() == {"trace"}
    assert Adam(LR).init(5).keys() == AdamW(LR).init(5).keys() == {"mu", "nu", "count"}
    for opt in (Momentum(LR), Adam(LR), AdamW(LR)):
        for array in opt.init(5).values():
            assert array.dtype == np.float32
            np.testing.assert_array_equal(array, np.zeros(5, np.float32))


@pytest.mark.parametrize(("case", "ours", "theirs"), NEW, ids=NEW_IDS)
def test_new_optimizers_dense_chunk_by_chunk_match_optax(
    case: str, ours: ServerOptimizerT, theirs: optax.GradientTransformation
) -> None:
    rng = _rng(11)
    params = rng.standard_normal(BIG).astype(np.float32)
    grads = _grads(rng, 25, BIG)
    expected = _optax_trajectory(theirs, params, grads)

    state = ours.init(BIG)
    got = params.copy()
    for g, want in zip(grads, expected, strict=True):
        for start, stop in _random_chunks(rng, BIG):
            ours.apply_dense(got, state, start, g[start:stop])
        assert got.dtype == np.float32
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    assert np.abs(got - params).max() > 0.1  # it really moved
    if "trace" not in state:
        np.testing.assert_array_equal(state["count"], np.float32(25))


@pytest.mark.parametrize(("case", "ours", "theirs"), NEW, ids=NEW_IDS)
def test_new_optimizers_lr_scale_matches_optax_at_the_scaled_rate(
    case: str, ours: ServerOptimizerT, theirs: optax.GradientTransformation
) -> None:
    """``lr_scale`` (the staleness policy) multiplies the learning rate and nothing else."""
    rng = _rng(12)
    params = rng.standard_normal(BIG).astype(np.float32)
    grads = _grads(rng, 20, BIG)
    if isinstance(ours, Momentum):
        reference = optax.sgd(LR * 0.25, momentum=ours.momentum, nesterov=ours.nesterov)
    elif isinstance(ours, AdamW):
        reference = optax.adamw(ADAM_LR * 0.25, weight_decay=ours.weight_decay)
    else:
        reference = optax.adam(ADAM_LR * 0.25)
    expected = _optax_trajectory(reference, params, grads)[-1]

    state = ours.init(BIG)
    got = params.copy()
    for g in grads:
        for start, stop in _random_chunks(rng, BIG):
            ours.apply_dense(got, state, start, g[start:stop], lr_scale=0.25)
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", ["momentum", "nesterov", "adam", "adamw"])
@pytest.mark.parametrize("apply", ["dense", "sparse"])
def test_new_optimizers_lr_scale_is_a_learning_rate_multiplier(name: str, apply: str) -> None:
    rng = _rng(13)
    params = rng.standard_normal(SIZE).astype(np.float32)
    grads = _grads(rng, 3)
    indices = _unique_indices(rng, 300)
    opt, half = make_optimizer(name, LR), make_optimizer(name, LR * 0.5)
    scaled, unscaled = params.copy(), params.copy()
    s1, s2 = opt.init(SIZE), half.init(SIZE)
    for g in grads:
        if apply == "dense":
            opt.apply_dense(scaled, s1, 0, g, lr_scale=0.5)
            half.apply_dense(unscaled, s2, 0, g)
        else:
            opt.apply_sparse(scaled, s1, indices, g[:300], lr_scale=0.5)
            half.apply_sparse(unscaled, s2, indices, g[:300])
    np.testing.assert_array_equal(scaled, unscaled)
    for key in s1:
        np.testing.assert_array_equal(s1[key], s2[key])


@settings(deadline=None, max_examples=20)
@given(
    name=st.sampled_from(["momentum", "nesterov", "adam", "adamw"]),
    chunk_elems=st.integers(1, SIZE + 10),
    seed=st.integers(0, 2**32 - 1),
)
def test_new_optimizers_dense_chunk_by_chunk_equals_whole(
    name: str, chunk_elems: int, seed: int
) -> None:
    rng = _rng(seed)
    params = rng.standard_normal(SIZE).astype(np.float32)
    grads = _grads(rng, 3)
    opt = make_optimizer(name, LR, weight_decay=0.01)

    whole, whole_state = params.copy(), opt.init(SIZE)
    chunked, chunked_state = params.copy(), opt.init(SIZE)
    for g in grads:
        opt.apply_dense(whole, whole_state, 0, g)
        for start, stop in chunk_bounds(SIZE, 4, chunk_elems * 4):
            opt.apply_dense(chunked, chunked_state, start, g[start:stop])
    # elementwise IEEE operations: splitting must not change a single bit
    np.testing.assert_array_equal(chunked, whole)
    for key in whole_state:
        np.testing.assert_array_equal(chunked_state[key], whole_state[key])


def _lazy_reference(
    opt: ServerOptimizerT,
    params: np.ndarray,
    pushes: list[tuple[np.ndarray, np.ndarray, float]],
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """The lazy sparse rule written out, one touched index at a time, in float64."""
    w = params.astype(np.float64)
    size = w.size
    if isinstance(opt, Momentum):
        trace = np.zeros(size)
        for indices, values, scale in pushes:
            for i, g in zip(indices.tolist(), values.astype(np.float64).tolist(), strict=True):
                trace[i] = g + opt.momentum * trace[i]
                step = g + opt.momentum * trace[i] if opt.nesterov else trace[i]
                w[i] -= opt.lr * scale * step
        return w, {"trace": trace}
    assert isinstance(opt, Adam | AdamW)
    decay = opt.weight_decay if isinstance(opt, AdamW) else 0.0
    mu, nu, count = np.zeros(size), np.zeros(size), np.zeros(size)
    for indices, values, scale in pushes:
        for i, g in zip(indices.tolist(), values.astype(np.float64).tolist(), strict=True):
            mu[i] = opt.b1 * mu[i] + (1 - opt.b1) * g
            nu[i] = opt.b2 * nu[i] + (1 - opt.b2) * g * g
            count[i] += 1  # this parameter's own step count
            mu_hat = mu[i] / (1 - opt.b1 ** count[i])
            nu_hat = nu[i] / (1 - opt.b2 ** count[i])
            w[i] -= opt.lr * scale * (mu_hat / (math.sqrt(nu_hat) + opt.eps) + decay * w[i])
    return w, {"mu": mu, "nu": nu, "count": count}


@pytest.mark.parametrize(
    "opt",
    [
        Momentum(LR),
        Momentum(LR, 0.8, nesterov=True),
        Adam(ADAM_LR),
        AdamW(ADAM_LR, weight_decay=0.05),
    ],
    ids=["momentum", "nesterov", "adam", "adamw"],
)
def test_new_optimizers_sparse_is_lazy_as_the_written_reference(opt: ServerOptimizerT) -> None:
    """Only touched rows move (weight and state), each bias-corrected by its own count."""
    rng = _rng(14)
    params = rng.standard_normal(SIZE).astype(np.float32)
    untouched = np.arange(100)  # no push ever touches [0, 100)
    pushes = []
    for step in range(25):
        k = int(rng.integers(1, SIZE // 3))
        indices = (100 + rng.choice(SIZE - 100, k, replace=False)).astype(np.uint32)
        indices.sort()
        scale = 0.5 if step % 5 == 4 else 1.0  # a few stale, scaled pushes
        pushes.append((indices, _grads(rng, 1, k)[0], scale))
    want, want_state = _lazy_reference(opt, params, pushes)

    got, state = params.copy(), opt.init(SIZE)
    before = {key: a.copy() for key, a in state.items()}
    for indices, values, scale in pushes:
        positions = indices.astype(np.intp) if scale == 1.0 else indices  # both index kinds
        opt.apply_sparse(got, state, positions, values, lr_scale=scale)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    for key, array in state.items():
        assert array.dtype == np.float32
        np.testing.assert_allclose(array, want_state[key], rtol=1e-6, atol=1e-6)
    if "count" in state:
        touches = np.zeros(SIZE)
        for indices, _, _ in pushes:
            touches[indices] += 1
        np.testing.assert_array_equal(state["count"], touches)
        assert len(set(touches[100:].tolist())) > 3, "counts differ from row to row"
    # untouched rows: bit for bit what they were (no decay, no drift)
    assert got[untouched].tobytes() == params[untouched].tobytes()
    for key in state:
        assert state[key][untouched].tobytes() == before[key][untouched].tobytes()
    assert np.abs(got - params).max() > 0.05  # the touched ones moved


@pytest.mark.parametrize("name", ["momentum", "nesterov", "adam", "adamw"])
def test_new_optimizers_sparse_touching_every_index_equals_dense(name: str) -> None:
    rng = _rng(15)
    params = rng.standard_normal(SIZE).astype(np.float32)
    grads = _grads(rng, 5)
    opt = make_optimizer(name, LR, weight_decay=0.02)
    sparse, sparse_state = params.copy(), opt.init(SIZE)
    for _ in range(3):  # first some partial pushes, so that Adam's counts differ by row
        indices = _unique_indices(rng, int(rng.integers(1, SIZE)))
        opt.apply_sparse(sparse, sparse_state, indices, _grads(rng, 1, indices.size)[0])
    dense, dense_state = sparse.copy(), {key: a.copy() for key, a in sparse_state.items()}
    for g in grads:
        order = rng.permutation(SIZE).astype(np.uint32)  # order within a chunk does not matter
        opt.apply_sparse(sparse, sparse_state, order, g[order])
        for start, stop in _random_chunks(rng, SIZE):
            opt.apply_dense(dense, dense_state, start, g[start:stop])
    np.testing.assert_array_equal(sparse, dense)
    for key in dense_state:
        np.testing.assert_array_equal(sparse_state[key], dense_state[key])


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_empty_chunks_change_nothing(name: str) -> None:
    """A push of an empty update still sends one empty chunk."""
    opt = make_optimizer(name, LR)
    params, state = np.ones(4, np.float32), opt.init(4)
    opt.apply_dense(params, state, 4, np.zeros(0, np.float32))
    opt.apply_sparse(params, state, np.zeros(0, np.uint32), np.zeros(0, np.float32))
    np.testing.assert_array_equal(params, 1.0)
    for key, array in state.items():
        np.testing.assert_array_equal(array, opt.init(4)[key])


def test_adam_sparse_first_touch_is_fully_bias_corrected() -> None:
    """A row touched first after many pushes to others takes a first step of lr, not the
    (1 - b1) / sqrt(1 - b2) = 3.2 times lr that one global step count would give."""
    opt = Adam(ADAM_LR)
    params, state = np.zeros(4, np.float32), opt.init(4)
    for _ in range(100):
        opt.apply_sparse(params, state, np.array([0], np.uint32), np.ones(1, np.float32))
    opt.apply_sparse(params, state, np.array([3], np.uint32), np.ones(1, np.float32))
    np.testing.assert_allclose(params[3], -ADAM_LR, rtol=1e-5)
    np.testing.assert_array_equal(state["count"], [100, 0, 0, 1])
    np.testing.assert_array_equal(params[1:3], 0)


def test_adamw_dense_decays_the_weights_even_with_zero_gradients() -> None:
    opt = AdamW(LR, weight_decay=0.1)
    params, state = np.full(8, 2.0, np.float32), opt.init(8)
    opt.apply_dense(params, state, 0, np.zeros(8, np.float32))
    np.testing.assert_allclose(params, 2.0 - LR * 0.1 * 2.0, rtol=1e-6)


# ---------------------------------------------------------------------------
# optimizer state through a shard checkpoint

CKPT_FP = 0x0DDB_A11F_00D5_EED5
CKPT_SIZE = 500


def _reply(size: int = CKPT_SIZE) -> Any:
    """The parts of a RegisterShardReply that ``_install`` reads, for a shard that kept
    (restored) its state."""
    return SimpleNamespace(
        start=0, stop=size, send_initial=False, layout_fingerprint=CKPT_FP, num_shards=1, version=7
    )


async def _close(process: ShardProcess) -> None:
    await process.server.aclose()
    await process.link.aclose()
    process.ctx.term()


def _trained(opt: ServerOptimizerT, seed: int = 16) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    rng = _rng(seed)
    params = rng.standard_normal(CKPT_SIZE).astype(np.float32)
    state = opt.init(CKPT_SIZE)
    for g in _grads(rng, 4, CKPT_SIZE):
        opt.apply_dense(params, state, 0, g)
    indices = _unique_indices(rng, 40, CKPT_SIZE)
    opt.apply_sparse(params, state, indices, _grads(rng, 1, 40)[0])
    return params, state


@pytest.mark.parametrize("name", ["adagrad", "momentum", "nesterov", "adam", "adamw"])
async def test_optimizer_state_round_trips_through_a_shard_checkpoint(
    tmp_path: Path, name: str
) -> None:
    """Save with the shard's own save path, restore it as a restarted shard does, and
    carry on: bit for bit where the saved shard carries on."""
    config = TrainConfig(optimizer=name, lr=0.01, momentum=0.8, weight_decay=0.03)
    opt = make_optimizer(name, 0.01, momentum=0.8, weight_decay=0.03)
    params, state = _trained(opt)

    saver = ShardProcess("127.0.0.1:1", 0, checkpoint_dir=tmp_path)
    restorer = ShardProcess("127.0.0.1:1", 0, checkpoint_dir=tmp_path)
    try:
        saver.config = config
        saver.core.install(
            CKPT_FP, opt, ShardState(params, state, 7), shard_range=None, num_shards=1
        )
        result, _ = await saver.save("test")
        assert checkpoint.read_checkpoint(result.path).optimizer == name

        restorer.config = config
        restorer.restore_local()
        await restorer._install(_reply(), restorer.restored)
    finally:
        await _close(saver)
        await _close(restorer)
    core = restorer.core
    assert core.optimizer == opt and core.optimizer.name == name
    assert core.state.version == 7
    assert core.state.params.tobytes() == params.tobytes()
    assert core.state.opt_state.keys() == state.keys() == opt.init(0).keys()
    for key, array in state.items():
        assert core.state.opt_state[key].dtype == np.float32
        assert core.state.opt_state[key].tobytes() == array.tobytes(), key

    rng = _rng(17)
    grad, indices = _grads(rng, 1, CKPT_SIZE)[0], _unique_indices(rng, 60, CKPT_SIZE)
    for p, s in ((params, state), (core.state.params, core.state.opt_state)):
        opt.apply_dense(p, s, 100, grad[100:400])
        opt.apply_sparse(p, s, indices, grad[:60])
    assert core.state.params.tobytes() == params.tobytes()
    for key in state:
        assert core.state.opt_state[key].tobytes() == state[key].tobytes()


def _write_checkpoint(directory: Path, optimizer: str, opt_state: dict[str, np.ndarray]) -> None:
    checkpoint.write(
        checkpoint.snapshot(
            shard_id=0,
            shard_range=(0, CKPT_SIZE),
            num_shards=1,
            version=7,
            fingerprint=CKPT_FP,
            optimizer=optimizer,
            incarnation=1,
            params=np.ones(CKPT_SIZE, np.float32),
            opt_state=opt_state,
        ),
        directory,
    )


def _adam_state() -> dict[str, np.ndarray]:
    return Adam(0.1).init(CKPT_SIZE)


@pytest.mark.parametrize(
    ("saved_as", "opt_state", "match"),
    [
        (
            "adam",
            {k: v for k, v in _adam_state().items() if k != "count"},
            "needs optimizer state count, mu, nu, found mu, nu",
        ),
        ("adam", {}, r"found \(none\)"),
        (
            "adam",
            {**_adam_state(), "trace": np.zeros(CKPT_SIZE, np.float32)},
            "found count, mu, nu, trace",
        ),
        (
            "adam",
            {**_adam_state(), "nu": np.zeros(CKPT_SIZE - 1, np.float32)},
            r"nu is float32\(499,\)",
        ),
        ("adamw", _adam_state(), "trained with adamw, the cluster uses adam"),
        ("momentum", {"trace": np.zeros(CKPT_SIZE, np.float32)}, "trained with momentum"),
    ],
    ids=["missing-vector", "no-state", "extra-vector", "wrong-size", "adamw", "momentum"],
)
async def test_restoring_state_that_does_not_fit_is_one_checkpoint_error(
    tmp_path: Path, saved_as: str, opt_state: dict[str, np.ndarray], match: str
) -> None:
    """Not a KeyError (or a broadcasting error) at the first push, nor silently new state."""
    _write_checkpoint(tmp_path, saved_as, opt_state)
    process = ShardProcess("127.0.0.1:1", 0, checkpoint_dir=tmp_path)
    try:
        process.config = TrainConfig(optimizer="adam")
        process.restore_local()
        with pytest.raises(CheckpointError, match=match) as info:
            await process._install(_reply(), process.restored)
    finally:
        await _close(process)
    assert "\n" not in str(info.value)
    assert not process.core.installed


def test_state_mismatch_says_what_is_wrong_in_one_line() -> None:
    adam = Adam(0.1)
    assert state_mismatch(adam, adam.init(10), 10) is None
    assert state_mismatch(SGD(0.1), {}, 10) is None
    assert state_mismatch(SGD(0.1), {"trace": np.zeros(10, np.float32)}, 10) == (
        "sgd needs optimizer state (none), found trace"
    )
    wrong_dtype = {**adam.init(10), "mu": np.zeros(10, np.float64)}
    assert "mu is float64(10,)" in (state_mismatch(adam, wrong_dtype, 10) or "")
    assert "count is float32(10,)" in (state_mismatch(adam, adam.init(10), 11) or "")


# ---------------------------------------------------------------------------
# make_optimizer


def test_make_optimizer_builds_each_optimizer() -> None:
    assert make_optimizer("sgd", 0.1) == SGD(0.1)
    assert make_optimizer("adagrad", 0.2) == Adagrad(0.2)
    assert make_optimizer("momentum", 0.3) == Momentum(0.3, 0.9, nesterov=False)
    assert make_optimizer("nesterov", 0.3, momentum=0.5) == Momentum(0.3, 0.5, nesterov=True)
    assert make_optimizer("adam", 0.4, weight_decay=0.5) == Adam(0.4)
    assert make_optimizer("adamw", 0.4) == AdamW(0.4, weight_decay=1e-4)
    assert make_optimizer("adamw", 0.4, weight_decay=0.0) == AdamW(0.4, weight_decay=0.0)
    assert {make_optimizer(name, 1.0).name for name in OPTIMIZERS} == set(OPTIMIZERS)


@pytest.mark.parametrize("name", ["Adam", "SGD", "", "sgd ", "lamb", "adam_w", "nesterov-momentum"])
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


@pytest.mark.parametrize("momentum", [1.0, 1.5, -0.1, math.nan, math.inf])
@pytest.mark.parametrize("name", OPTIMIZERS)
def test_make_optimizer_rejects_bad_momentum(name: str, momentum: float) -> None:
    with pytest.raises(ConfigError, match=r"momentum must be in \[0, 1\)") as info:
        make_optimizer(name, 0.1, momentum=momentum)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("weight_decay", [-1e-4, math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("name", OPTIMIZERS)
def test_make_optimizer_rejects_bad_weight_decay(name: str, weight_decay: float) -> None:
    with pytest.raises(ConfigError, match="weight decay must be") as info:
        make_optimizer(name, 0.1, weight_decay=weight_decay)
    assert "\n" not in str(info.value)


def test_make_optimizer_accepts_the_boundaries() -> None:
    assert make_optimizer("momentum", 0.1, momentum=0.0) == Momentum(0.1, 0.0)
    assert make_optimizer("nesterov", 0.1, momentum=0.999).momentum == 0.999
    assert make_optimizer("adamw", 0.1, weight_decay=0.0) == AdamW(0.1, weight_decay=0.0)


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


@pytest.mark.parametrize("size", [1, 1000, (1 << 18) + 7, 3 << 18])
def test_subtract_scaled_equals_the_one_line_form(size: int) -> None:
    rng = np.random.default_rng(size)
    params = rng.standard_normal(size).astype(np.float32)
    grad = rng.standard_normal(size).astype(np.float32)
    expected = params - np.float32(0.3) * grad
    subtract_scaled(params, grad, 0.3)
    assert np.array_equal(params, expected)
