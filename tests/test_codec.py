"""Properties of the sparse codec: nothing is lost, what is sent is well-formed, it frames."""

from __future__ import annotations

from typing import Any

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from dsgd import wire
from dsgd.codec import (
    CodecConfig,
    Encoded,
    SparseEncoder,
    break_even_density,
    densify,
    density_at,
    estimate_threshold_key,
    magnitude_keys,
    sample_positions,
    threshold_key,
    to_float32,
    top_k_positions,
)
from dsgd.errors import ConfigError

DTYPES = list(wire.VALUE_DTYPES)
# sums of up to four such values neither overflow float32 nor reach 2**29, the bound below
# which clipping to float16's range keeps conservation exact
BOUND = {"float32": 2.0**123, "float16": 2.0**26, "bfloat16": 2.0**123}


def updates(size: int, bound: float = 2.0**123) -> st.SearchStrategy[np.ndarray]:
    finite = st.floats(-bound, bound, width=32, allow_nan=False, allow_infinity=False)
    # mix in zeros, ties and subnormals, which random floats rarely hit
    special = st.sampled_from([0.0, -0.0, 1.0, -1.0, 1e-45, -1e-45, 0.5])
    return hnp.arrays(np.float32, size, elements=st.one_of(finite, special))


@st.composite
def encoder_and_updates(draw: st.DrawFn, max_size: int = 300) -> tuple[SparseEncoder, list]:
    dtype = draw(st.sampled_from(DTYPES))
    size = draw(st.integers(0, max_size))
    density = draw(st.sampled_from([1e-9, 0.01, 0.1, 0.3, 0.5, 1.0]))
    threshold = draw(st.none() | st.sampled_from([0.0, 1e-3, 1.0, 1e6]))
    block = draw(st.sampled_from([8, 24, 1 << 18]))  # many blocks, ragged last block, one
    config = CodecConfig(
        density=density,
        value_dtype=dtype,
        threshold=threshold,
        sample_size=64,
        seed=7,
        block=block,
    )
    steps = draw(st.lists(updates(size, BOUND[dtype]), min_size=1, max_size=4))
    return SparseEncoder(size, config), steps


def check_well_formed(encoder: SparseEncoder, encoded: Encoded) -> None:
    assert encoded.values.dtype == wire.VALUE_DTYPES[encoder.config.value_dtype]
    if encoded.dense:
        assert encoded.values.shape == (encoder.size,)
        return
    indices = encoded.indices
    assert indices is not None
    assert indices.dtype == wire.INDEX_DTYPE
    assert indices.shape == encoded.values.shape
    assert np.all(np.diff(indices.astype(np.int64)) > 0), "unique and ascending"
    assert indices.size == 0 or int(indices[-1]) < encoder.size


@settings(max_examples=300, deadline=None)
@given(encoder_and_updates())
def test_sent_plus_residual_is_exactly_what_was_accumulated(case: Any) -> None:
    encoder, steps = case
    for update in steps:
        accumulated = encoder.residual + update
        encoded = encoder.encode(update)
        check_well_formed(encoder, encoded)
        np.testing.assert_array_equal(
            densify(encoder.size, encoded) + encoder.residual, accumulated
        )
        if not encoded.dense:
            unsent = np.ones(encoder.size, bool)
            unsent[encoded.indices] = False
            np.testing.assert_array_equal(encoder.residual[unsent], accumulated[unsent])


@settings(max_examples=200, deadline=None)
@given(encoder_and_updates())
def test_what_is_sent_outweighs_what_is_kept(case: Any) -> None:
    """The selection is a top set: no unsent entry is larger than a sent one."""
    encoder, steps = case
    for update in steps:
        accumulated = encoder.residual + update
        encoded = encoder.encode(update)
        if encoded.dense:
            continue
        sent = np.zeros(encoder.size, bool)
        sent[encoded.indices] = True
        magnitude = np.abs(accumulated)
        if sent.any() and (~sent).any():
            assert magnitude[sent].min() >= magnitude[~sent].max()
        assert np.all(accumulated[sent] != 0), "a zero is never sent"
        threshold = encoder.config.threshold
        if threshold is not None:
            expected = (magnitude >= np.float32(threshold)) & (accumulated != 0)
            np.testing.assert_array_equal(sent, expected)


@settings(max_examples=200, deadline=None)
@given(
    size=st.integers(1, 400),
    density=st.floats(1e-6, 0.3),
    data=st.data(),
)
def test_count_is_near_the_target_when_the_sample_is_everything(
    size: int, density: float, data: st.DataObject
) -> None:
    """Small ranges use an exact quantile: between k (or every non-zero) and 2k entries."""
    update = data.draw(updates(size, 2.0**20))
    encoder = SparseEncoder(size, CodecConfig(density=density, sample_size=1000))
    encoded = encoder.encode(update)
    k = max(1, round(density * size))
    nonzero = int(np.count_nonzero(update))
    assert min(k, nonzero) <= encoded.size <= 2 * k


@settings(max_examples=12, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    shape=st.sampled_from(["normal", "laplace", "uniform", "mostly_zero", "layered"]),
    density=st.sampled_from([0.001, 0.01, 0.05]),
)
def test_count_is_near_the_target_on_large_updates(seed: int, shape: str, density: float) -> None:
    n = 200_000
    rng = np.random.default_rng(seed)
    update = {
        "normal": lambda: rng.standard_normal(n),
        "laplace": lambda: rng.laplace(size=n),
        "uniform": lambda: rng.uniform(-1, 1, n),
        "mostly_zero": lambda: rng.standard_normal(n) * (rng.random(n) < 0.2),
        "layered": lambda: rng.standard_normal(n) * np.repeat([1e-4, 1.0, 3e-2, 10.0], n // 4),
    }[shape]().astype(np.float32)
    encoder = SparseEncoder(n, CodecConfig(density=density, sample_size=20_000, seed=seed))
    for _ in range(3):
        encoded = encoder.encode(update)
        k = density * n
        assert 0.5 * k <= encoded.size <= 2 * k


@settings(max_examples=100, deadline=None)
@given(encoder_and_updates())
def test_accumulating_first_sends_the_same_as_encoding_the_sum(case: Any) -> None:
    """``accumulate(u); encode()`` is ``encode(u)``: same sample, same sum, same push."""
    encoder, steps = case
    twin = SparseEncoder(encoder.size, encoder.config)
    for update in steps:
        encoded = encoder.encode(update)
        twin.accumulate(update)
        other = twin.encode()
        assert encoded.dense == other.dense
        np.testing.assert_array_equal(densify(encoder.size, encoded), densify(twin.size, other))
        np.testing.assert_array_equal(encoder.residual, twin.residual)
    twin.reset()
    assert not twin.residual.any()


def test_ties_are_cut_to_exactly_k_lowest_positions_first() -> None:
    encoder = SparseEncoder(1000, CodecConfig(density=0.01, sample_size=100))
    encoded = encoder.encode(np.full(1000, 0.25, np.float32))
    np.testing.assert_array_equal(encoded.indices, np.arange(10))
    np.testing.assert_array_equal(encoder.residual[10:], 0.25)
    assert not encoder.residual[:10].any()


@pytest.mark.parametrize("dtype", DTYPES)
def test_zero_and_empty_updates_send_nothing(dtype: str) -> None:
    encoder = SparseEncoder(50, CodecConfig(density=0.1, value_dtype=dtype))
    encoded = encoder.encode(np.zeros(50, np.float32))
    assert encoded.indices is not None and encoded.size == 0
    assert encoded.values.dtype == wire.VALUE_DTYPES[dtype]
    assert not encoder.residual.any()
    empty = SparseEncoder(0, CodecConfig(density=0.1, value_dtype=dtype))
    assert empty.encode(np.zeros(0, np.float32)).size == 0


@pytest.mark.parametrize("dtype", DTYPES)
def test_density_one_goes_dense(dtype: str) -> None:
    update = np.linspace(-3, 3, 101, dtype=np.float32)
    encoder = SparseEncoder(101, CodecConfig(density=1.0, value_dtype=dtype))
    encoded = encoder.encode(update)
    assert encoded.dense and encoded.indices is None
    np.testing.assert_array_equal(to_float32(encoded.values) + encoder.residual, update)
    if dtype == "float32":
        assert not encoder.residual.any()


def test_at_or_above_break_even_goes_dense() -> None:
    assert break_even_density("float32") == 0.5
    assert break_even_density("float16") == pytest.approx(1 / 3)
    update = np.ones(30, np.float32)
    assert SparseEncoder(30, CodecConfig(density=0.5)).encode(update).dense
    assert not SparseEncoder(30, CodecConfig(density=0.49)).encode(update).dense
    assert SparseEncoder(30, CodecConfig(density=0.34, value_dtype="float16")).encode(update).dense


def test_a_tiny_density_still_sends_the_largest_entry() -> None:
    update = np.zeros(10_000, np.float32)
    update[1234] = -1e-30
    update[[9, 7777]] = 1e-31
    encoder = SparseEncoder(10_000, CodecConfig(density=1e-9, sample_size=100))
    encoded = encoder.encode(update)
    np.testing.assert_array_equal(encoded.indices, [1234])
    np.testing.assert_array_equal(encoded.values, [np.float32(-1e-30)])


@pytest.mark.parametrize("dtype", DTYPES)
def test_values_beyond_the_dtype_range_are_clipped_and_the_rest_kept(dtype: str) -> None:
    big = {"float32": 3e38, "float16": 1e6, "bfloat16": 3.4e38}[dtype]
    update = np.array([big, -big, 1.0], np.float32)
    encoder = SparseEncoder(3, CodecConfig(density=0.3, value_dtype=dtype))
    encoded = encoder.encode(update)
    assert np.isfinite(to_float32(encoded.values)).all()
    np.testing.assert_array_equal(densify(3, encoded) + encoder.residual, update)


@settings(max_examples=100, deadline=None)
@given(encoder_and_updates(), st.data())
def test_accumulating_in_pieces_sends_the_same_as_the_whole(case: Any, data: Any) -> None:
    """A gradient accumulated one parameter array at a time (in order, as a worker does,
    or out of order; after dense pushes whose buffers stand for zeros too) is the same
    update: same residual, same push."""
    encoder, steps = case
    twin = SparseEncoder(encoder.size, encoder.config)
    for update in steps:
        cuts = sorted(data.draw(st.sets(st.integers(0, encoder.size), max_size=4)))
        bounds = list(zip([0, *cuts], [*cuts, encoder.size], strict=True))
        if data.draw(st.booleans()):
            bounds.reverse()
        encoder.accumulate(update)
        for lo, hi in bounds:
            twin.accumulate(update[lo:hi], lo)
        encoded, other = encoder.encode(), twin.encode()
        assert encoded.dense == other.dense
        np.testing.assert_array_equal(densify(encoder.size, encoded), densify(twin.size, other))
        np.testing.assert_array_equal(encoder.residual, twin.residual)


def test_a_piece_must_fit_inside_the_range() -> None:
    encoder = SparseEncoder(10)
    encoder.accumulate(np.ones(4, np.float32), 6)
    with pytest.raises(ValueError, match="overflows a range of 10"):
        encoder.accumulate(np.ones(4, np.float32), 7)
    with pytest.raises(ValueError, match="overflows"):
        encoder.accumulate(np.ones(1, np.float32), -1)
    with pytest.raises(ValueError, match="encoder expects"):
        encoder.encode(np.ones(4, np.float32))  # a push is always the whole range
    with pytest.raises(ValueError, match="encoder expects"):
        encoder.accumulate(np.ones(4, np.float32))  # so is an update without an offset
    assert encoder.residual[6:].tolist() == [1.0] * 4 and not encoder.residual[:6].any()


@pytest.mark.parametrize("density", [0.01, 1.0])
def test_a_non_finite_piece_raises_at_the_next_push(density: float) -> None:
    encoder = SparseEncoder(1000, CodecConfig(density=density, sample_size=100))
    encoder.encode(np.ones(1000, np.float32))  # a dense push leaves a stale buffer
    encoder.accumulate(np.ones(600, np.float32), 0)
    bad = np.ones(400, np.float32)
    bad[7] = np.nan
    encoder.accumulate(bad, 600)
    with pytest.raises(FloatingPointError, match="1 NaN/Inf"):
        encoder.encode()
    assert np.isfinite(encoder.residual).all() and encoder.residual[607] == 0


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("density", [0.01, 1.0])
def test_a_non_finite_update_raises_and_does_not_poison_the_residual(
    bad: float, density: float
) -> None:
    update = np.ones(1000, np.float32)
    update[[3, 500]] = bad
    encoder = SparseEncoder(1000, CodecConfig(density=density, sample_size=100))
    with pytest.raises(FloatingPointError, match="2 NaN/Inf"):
        encoder.encode(update)
    assert np.isfinite(encoder.residual).all()
    assert encoder.residual[3] == 0 and encoder.residual[1] == 1.0
    assert encoder.encode(np.zeros(1000, np.float32)).size > 0


@settings(max_examples=200, deadline=None)
@given(encoder_and_updates())
def test_give_back_restores_the_residual_exactly(case: Any) -> None:
    encoder, steps = case
    for update in steps:
        accumulated = encoder.residual + update
        encoded = encoder.encode(update)
        if encoded.indices is None:
            encoder.give_back_dense(encoded.values)
        else:
            encoder.give_back(encoded.indices, encoded.values)
        np.testing.assert_array_equal(encoder.residual, accumulated)


def test_give_back_by_chunk_after_a_shard_died() -> None:
    rng = np.random.default_rng(3)
    encoder = SparseEncoder(5000, CodecConfig(density=0.2, value_dtype="bfloat16"))
    update = rng.standard_normal(5000).astype(np.float32)
    encoded = encoder.encode(update)
    assert encoded.indices is not None
    template = wire.Header(kind=wire.PUSH, fingerprint=1, shard=0)
    for _, _, frames in wire.sparse_chunks(template, encoded.indices, encoded.values, 4096):
        _, (indices, values) = wire.decode([bytes(f) for f in frames])
        encoder.give_back(indices, values)
    np.testing.assert_array_equal(encoder.residual, update)
    dense = SparseEncoder(5000, CodecConfig(density=1.0, value_dtype="float16"))
    sent = dense.encode(update)
    for _, _, frames in wire.dense_chunks(template, sent.values, 4096):
        header, (values,) = wire.decode([bytes(f) for f in frames])
        dense.give_back_dense(values, header.offset)
    np.testing.assert_array_equal(dense.residual, update)


def test_give_back_adds_repeated_indices_each_time() -> None:
    encoder = SparseEncoder(4)
    encoder.give_back(np.array([2, 0, 2], np.uint32), np.array([1.0, 5.0, 0.5], np.float32))
    np.testing.assert_array_equal(encoder.residual, [5.0, 0.0, 1.5, 0.0])


def test_give_back_rejects_what_cannot_be_ours() -> None:
    encoder = SparseEncoder(10)
    with pytest.raises(ValueError):
        encoder.give_back(np.array([10], np.uint32), np.ones(1, np.float32))
    with pytest.raises(ValueError):
        encoder.give_back(np.array([1, 2], np.uint32), np.ones(1, np.float32))
    with pytest.raises(ValueError):
        encoder.give_back_dense(np.ones(4, np.float32), offset=7)
    with pytest.raises(ValueError):
        encoder.encode(np.ones(11, np.float32))
    with pytest.raises(ValueError):
        SparseEncoder((1 << 32) + 1)
    with pytest.raises(ValueError):
        encoder.encode(np.ones(10, np.float32), density=0.0)
    assert encoder.pushes == 0, "a refused encode is not a push"


@settings(max_examples=200, deadline=None)
@given(
    target=st.floats(1e-6, 1.0),
    warmup=st.integers(0, 50),
    pushes=st.lists(st.integers(0, 100), min_size=2, max_size=10),
)
def test_warmup_decays_monotonically_from_dense_to_the_target(
    target: float, warmup: int, pushes: list[int]
) -> None:
    pushes.sort()
    densities = [density_at(p, target, warmup) for p in pushes]
    assert all(a >= b for a, b in zip(densities, densities[1:], strict=False))
    assert all(target <= d <= 1.0 for d in densities)
    assert density_at(warmup, target, warmup) == target
    assert density_at(warmup + 7, target, warmup) == target
    if warmup > 0:
        assert density_at(0, target, warmup) == 1.0


def test_the_encoder_follows_its_warmup() -> None:
    encoder = SparseEncoder(10_000, CodecConfig(density=0.01, warmup_pushes=4, sample_size=500))
    update = np.random.default_rng(0).standard_normal(10_000).astype(np.float32)
    sizes = []
    for _ in range(6):
        encoded = encoder.encode(update)
        sizes.append(encoded.size if not encoded.dense else -1)
    assert sizes[0] == -1, "the first push goes dense"
    assert sizes[1] > sizes[2] > sizes[3] > sizes[4], "then 0.32, 0.1, 0.03, 0.01"
    assert 50 <= sizes[4] <= 200 and 50 <= sizes[5] <= 200, "then the target, 100 of 10k"
    assert encoder.encode(update, density=1.0).dense


@settings(max_examples=100, deadline=None)
@given(
    dtype=st.sampled_from(DTYPES),
    per_chunk=st.integers(1, 8),
    nchunks=st.integers(1, 5),
    extra=st.integers(0, 1),
    seed=st.integers(0, 1000),
)
def test_sparse_chunks_round_trip_through_the_wire(
    dtype: str, per_chunk: int, nchunks: int, extra: int, seed: int
) -> None:
    """Selected count = per_chunk * nchunks (+ extra): chunk boundaries fall exactly on
    ``chunk_bytes``, and each chunk decodes to its slice of the encoded push."""
    rng = np.random.default_rng(seed)
    count = per_chunk * nchunks + extra
    size = count + 50
    update = (rng.uniform(0.01, 0.4, size) * rng.choice([-1, 1], size)).astype(np.float32)
    update[rng.choice(size, count, replace=False)] = 3.0 * rng.choice([-1, 1], count)
    encoder = SparseEncoder(size, CodecConfig(threshold=1.0, value_dtype=dtype))
    encoded = encoder.encode(update)
    assert encoded.indices is not None and encoded.size == count
    per_element = wire.INDEX_DTYPE.itemsize + wire.VALUE_DTYPES[dtype].itemsize
    chunk_bytes = per_chunk * per_element
    template = wire.Header(kind=wire.PUSH, fingerprint=9, shard=2, worker=1, seq=5)
    messages = [
        [bytes(f) for f in frames]
        for _, _, frames in wire.sparse_chunks(
            template, encoded.indices, encoded.values, chunk_bytes
        )
    ]
    assert len(messages) == nchunks + extra
    received_indices, received_values = [], []
    for i, frames in enumerate(messages):
        header, (indices, values) = wire.decode(frames)
        assert (header.chunk, header.nchunks, header.encoding) == (i, len(messages), wire.SPARSE)
        assert header.dtype == dtype
        assert len(frames[1]) + len(frames[2]) <= chunk_bytes
        if i < nchunks:
            assert len(frames[1]) + len(frames[2]) == chunk_bytes
        received_indices.append(indices)
        received_values.append(values)
    np.testing.assert_array_equal(np.concatenate(received_indices), encoded.indices)
    np.testing.assert_array_equal(
        np.concatenate(received_values).view(np.uint8), encoded.values.view(np.uint8)
    )


def test_an_empty_push_is_still_one_message() -> None:
    encoded = SparseEncoder(10, CodecConfig(density=0.1)).encode(np.zeros(10, np.float32))
    assert encoded.indices is not None
    template = wire.Header(kind=wire.PUSH, fingerprint=1, shard=0)
    ((_, _, frames),) = wire.sparse_chunks(template, encoded.indices, encoded.values)
    header, (indices, values) = wire.decode([bytes(f) for f in frames])
    assert header.count == 0 and indices.size == 0 and values.size == 0


@settings(max_examples=200, deadline=None)
@given(keys=hnp.arrays(np.uint32, st.integers(0, 200), elements=st.integers(0, 20)), k=st.data())
def test_top_k_positions_matches_a_stable_sort(keys: np.ndarray, k: st.DataObject) -> None:
    want = k.draw(st.integers(0, keys.size + 2))
    order = np.lexsort((np.arange(keys.size), -keys.astype(np.int64)))
    np.testing.assert_array_equal(top_k_positions(keys, want), np.sort(order[:want]))


@given(updates(100, 2.0**126) | hnp.arrays(np.float32, 20, elements=st.floats(width=32)))
def test_magnitude_keys_order_like_abs_with_non_finite_on_top(values: np.ndarray) -> None:
    keys = magnitude_keys(values).astype(np.int64)
    magnitude = np.abs(values.astype(np.float64))
    finite = np.isfinite(values)
    f_keys, f_mag = keys[finite], magnitude[finite]
    assert np.array_equal(
        np.sign(f_keys[:, None] - f_keys[None, :]), np.sign(f_mag[:, None] - f_mag[None, :])
    )
    if finite.any() and (~finite).any():
        assert keys[~finite].min() >= keys[finite].max()


def test_thresholds_never_select_zeros() -> None:
    assert threshold_key(0.0) == 1
    assert estimate_threshold_key(np.zeros(10, np.uint32), 0.5) == 1
    assert estimate_threshold_key(np.arange(100, dtype=np.uint32), 0.1) == 90


@given(size=st.integers(1, 10**9), sample_size=st.integers(1, 1000), seed=st.integers(0, 99))
def test_samples_are_stratified_and_in_range(size: int, sample_size: int, seed: int) -> None:
    positions = sample_positions(size, sample_size, np.random.default_rng(seed))
    assert positions.size == sample_size
    assert np.all(np.diff(positions) >= 0) and 0 <= positions[0] and positions[-1] < size
    strata = np.arange(sample_size)
    assert np.all(positions >= np.floor(strata * size / sample_size))
    assert np.all(positions <= np.ceil((strata + 1) * size / sample_size))


def test_same_seed_same_push() -> None:
    update = np.random.default_rng(1).standard_normal(50_000).astype(np.float32)
    a, b = (SparseEncoder(50_000, CodecConfig(sample_size=1000, seed=4)) for _ in range(2))
    np.testing.assert_array_equal(a.encode(update).indices, b.encode(update).indices)


def test_bfloat16_values_are_rounded_to_nearest() -> None:
    update = np.array([1.0 + 2**-9, 1.0 + 3 * 2**-9], np.float32)
    encoded = SparseEncoder(2, CodecConfig(density=1.0, value_dtype="bfloat16")).encode(update)
    assert encoded.values.dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(to_float32(encoded.values), [1.0, 1.0 + 2**-7])


@pytest.mark.parametrize(
    "kwargs",
    [
        {"density": 0.0},
        {"density": 1.5},
        {"value_dtype": "float64"},
        {"threshold": -1.0},
        {"threshold": float("nan")},
        {"warmup_pushes": -1},
        {"max_overselect": 0.5},
        {"sample_size": 0},
    ],
)
def test_bad_configs_are_refused(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ConfigError):
        CodecConfig(**kwargs)
