"""The flat layout: pytree <-> float32 vector, shard ranges and the layout fingerprint."""

from __future__ import annotations

from typing import Any

import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from dsgd.errors import ModelError
from dsgd.layout import Layout, aligned_empty, split_ranges
from dsgd.types import ShardRange

PROPERTY = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _example_tree() -> dict[str, Any]:
    return {
        "dense": {"w": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.ones(3, np.float32)},
        "head": [np.full((3, 1), 2.0, np.float32), (np.float32(-1.5),)],
    }


def _leaves_equal(got: Any, want: Any) -> None:
    assert jax.tree_util.tree_structure(got) == jax.tree_util.tree_structure(want)
    for g, w in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want), strict=True):
        g, w = np.asarray(g), np.asarray(w, np.float32)
        assert g.shape == w.shape
        np.testing.assert_array_equal(g, w)


# ---------------------------------------------------------------------------
# split_ranges


@PROPERTY
@given(size=st.integers(0, 10**9), num_shards=st.integers(1, 300))
def test_split_ranges_partition_the_vector_evenly(size: int, num_shards: int) -> None:
    ranges = split_ranges(size, num_shards)
    assert len(ranges) == num_shards
    assert all(isinstance(r, ShardRange) for r in ranges)
    assert ranges[0].start == 0
    assert ranges[-1].stop == size
    for left, right in zip(ranges, ranges[1:], strict=False):
        assert left.stop == right.start
    sizes = [r.size for r in ranges]
    assert sum(sizes) == size
    assert min(sizes) >= 0
    assert max(sizes) - min(sizes) <= 1


def test_split_ranges_examples() -> None:
    assert split_ranges(10, 3) == [ShardRange(0, 3), ShardRange(3, 6), ShardRange(6, 10)]
    assert split_ranges(5, 1) == [ShardRange(0, 5)]
    assert split_ranges(4, 4) == [ShardRange(k, k + 1) for k in range(4)]


@pytest.mark.parametrize("num_shards", [0, -1])
def test_split_ranges_rejects_no_shards(num_shards: int) -> None:
    with pytest.raises(ValueError, match="num_shards"):
        split_ranges(10, num_shards)


# ---------------------------------------------------------------------------
# flatten / unflatten

float_leaves = st.one_of(
    hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=4).flatmap(
        lambda shape: hnp.arrays(
            st.sampled_from([np.float32, np.float64, np.float16]),
            shape,
            elements=st.floats(-1000, 1000, width=16),
        )
    ),
    st.floats(-1000, 1000, width=16),  # Python scalars are leaves too
)
keys = st.text(alphabet="abcdwxyz_0123", min_size=1, max_size=4)
pytrees = st.recursive(
    float_leaves,
    lambda children: st.one_of(
        st.lists(children, max_size=3),
        st.lists(children, max_size=3).map(tuple),
        st.dictionaries(keys, children, max_size=3),
    ),
    max_leaves=10,
)


def _size(tree: Any) -> int:
    return sum(np.size(leaf) for leaf in jax.tree_util.tree_leaves(tree))


@PROPERTY
@given(params=pytrees, num_shards=st.integers(1, 4))
def test_flatten_unflatten_round_trip(params: Any, num_shards: int) -> None:
    assume(_size(params) >= num_shards)
    layout = Layout.from_pytree(params, num_shards)
    flat = layout.flatten(params)
    assert flat.dtype == np.float32
    assert flat.shape == (layout.size,)
    assert layout.size == _size(params)
    _leaves_equal(layout.unflatten(flat), params)
    np.testing.assert_array_equal(layout.flatten(layout.unflatten(flat)), flat)
    assert layout.ranges == tuple(split_ranges(layout.size, num_shards))


def test_flatten_concatenates_leaves_in_jax_order() -> None:
    tree = _example_tree()
    layout = Layout.from_pytree(tree, 2)
    # dict keys in sorted order, then list/tuple positions
    assert layout.paths == ("['dense']['b']", "['dense']['w']", "['head'][0]", "['head'][1][0]")
    assert layout.shapes == ((3,), (2, 3), (3, 1), ())
    assert layout.sizes == (3, 6, 3, 1)
    assert layout.offsets == (0, 3, 9, 12)
    assert layout.size == 13
    expected = np.array([1, 1, 1, 0, 1, 2, 3, 4, 5, 2, 2, 2, -1.5], np.float32)
    np.testing.assert_array_equal(layout.flatten(tree), expected)


def test_flatten_returns_a_new_vector() -> None:
    tree = {"w": np.zeros(4, np.float32)}
    layout = Layout.from_pytree(tree, 1)
    flat = layout.flatten(tree)
    flat[:] = 7
    np.testing.assert_array_equal(tree["w"], 0)


def test_flatten_accepts_jax_arrays() -> None:
    tree = {"a": jnp.arange(4.0), "b": [jnp.ones((2, 2))]}
    layout = Layout.from_pytree(tree, 2)
    np.testing.assert_array_equal(layout.flatten(tree), [0, 1, 2, 3, 1, 1, 1, 1])


def test_unflatten_works_under_jit() -> None:
    tree = _example_tree()
    layout = Layout.from_pytree(tree, 3)
    flat = layout.flatten(tree)

    @jax.jit
    def doubled(vector: jax.Array) -> Any:
        return jax.tree_util.tree_map(lambda leaf: 2 * leaf, layout.unflatten(vector))

    _leaves_equal(doubled(jnp.asarray(flat)), jax.tree_util.tree_map(lambda x: 2 * x, tree))
    _leaves_equal(doubled(flat), jax.tree_util.tree_map(lambda x: 2 * x, tree))

    @jax.jit
    def weighted_sum(vector: jax.Array) -> jax.Array:
        p = layout.unflatten(vector)
        return jnp.sum(p["dense"]["w"] @ p["head"][0]) + p["head"][1][0] + jnp.sum(p["dense"]["b"])

    want = (tree["dense"]["w"] @ tree["head"][0]).sum() - 1.5 + 3
    assert float(weighted_sum(flat)) == pytest.approx(want)


def test_unflatten_gradient_flows_back_to_the_flat_vector() -> None:
    tree = _example_tree()
    layout = Layout.from_pytree(tree, 1)
    flat = jnp.asarray(layout.flatten(tree))
    grad = jax.grad(lambda v: jnp.sum(jnp.square(layout.unflatten(v)["dense"]["w"])))(flat)
    expected = np.zeros(layout.size, np.float32)
    expected[3:9] = 2 * np.arange(6)
    np.testing.assert_array_equal(np.asarray(grad), expected)


def test_unflatten_without_treedef_is_refused() -> None:
    layout = Layout(paths=("['a']",), shapes=((3,),), num_shards=1)
    with pytest.raises(ValueError, match="treedef"):
        layout.unflatten(np.zeros(3, np.float32))


def test_flatten_rejects_a_different_number_of_leaves() -> None:
    layout = Layout.from_pytree({"a": np.zeros(2), "b": np.zeros(3)}, 1)
    with pytest.raises(ModelError, match="expected 2 parameter arrays, got 3"):
        layout.flatten({"a": np.zeros(2), "b": np.zeros(3), "c": np.zeros(1)})


@pytest.mark.parametrize(
    "leaf",
    [np.float32(5.0), np.ones(1), np.ones((1, 3)), np.ones(4), np.ones((3, 2))],
    ids=["scalar", "one", "row", "longer", "transposed"],
)
def test_flatten_rejects_leaves_of_the_wrong_shape(leaf: np.ndarray) -> None:
    """A wrong-shaped parameter is a model mismatch, never silently broadcast or reshaped."""
    layout = Layout.from_pytree({"a": np.zeros((2, 3)), "b": np.zeros(3)}, 1)
    with pytest.raises(ModelError, match=r"\['b'\]"):
        layout.flatten({"a": np.zeros((2, 3)), "b": leaf})


# ---------------------------------------------------------------------------
# from_pytree validation


@pytest.mark.parametrize(
    "leaf",
    [
        np.arange(3, dtype=np.int32),
        np.zeros(3, bool),
        np.zeros(2, np.complex64),
        jnp.arange(3),
        3,
        True,
    ],
    ids=["int32", "bool", "complex", "jax-int", "python-int", "python-bool"],
)
def test_non_float_leaves_are_rejected(leaf: Any) -> None:
    with pytest.raises(ModelError, match=r"\['layer'\]\[1\].*floating-point"):
        Layout.from_pytree({"layer": [np.zeros(2, np.float32), leaf]}, 1)


@pytest.mark.parametrize(
    "dtype",
    [np.float16, np.float32, np.float64, ml_dtypes.bfloat16],
)
def test_every_float_dtype_is_accepted(dtype: Any) -> None:
    """bfloat16 is a float: JAX models commonly keep parameters in it."""
    tree = {"w": np.arange(4).astype(dtype)}
    layout = Layout.from_pytree(tree, 2)
    np.testing.assert_array_equal(layout.flatten(tree), [0, 1, 2, 3])


@pytest.mark.parametrize("params", [{}, [], (), None, {"a": [], "b": {}}])
def test_parameters_without_arrays_are_rejected(params: Any) -> None:
    with pytest.raises(ModelError, match="no arrays"):
        Layout.from_pytree(params, 1)


@pytest.mark.parametrize("num_shards", [0, -1, 7])
def test_shard_count_must_fit_the_parameter_count(num_shards: int) -> None:
    with pytest.raises(ModelError, match="between 1 and 6 shards"):
        Layout.from_pytree({"w": np.zeros((2, 3))}, num_shards)


def test_as_many_shards_as_parameters_is_allowed() -> None:
    layout = Layout.from_pytree({"w": np.zeros((2, 3))}, 6)
    assert [r.size for r in layout.ranges] == [1] * 6


# ---------------------------------------------------------------------------
# fingerprint


def test_fingerprint_is_stable() -> None:
    """The fingerprint travels between processes and versions: it must not depend on
    the process (hash seed, object ids) or on the values. Changing this constant breaks
    mixed-version clusters and existing checkpoints, so do it only on purpose."""
    a = Layout.from_pytree(_example_tree(), 2)
    b = Layout.from_pytree(jax.tree_util.tree_map(lambda x: np.asarray(x) + 1, _example_tree()), 2)
    assert a.fingerprint == b.fingerprint
    assert a == b
    assert a.fingerprint == 2097498564318592108
    assert 0 <= a.fingerprint < 2**63  # fits a signed 64-bit msgpack / protobuf field
    assert f"{a.fingerprint:016x}" in a.describe()


def test_fingerprint_ignores_leaf_dtype_and_array_type() -> None:
    a = Layout.from_pytree({"w": np.zeros((2, 3), np.float32)}, 1)
    b = Layout.from_pytree({"w": jnp.zeros((2, 3), jnp.float16)}, 1)
    assert a.fingerprint == b.fingerprint


@pytest.mark.parametrize(
    ("other", "num_shards"),
    [
        ({"w": np.zeros((3, 2)), "b": np.zeros(3)}, 2),  # same sizes, other shape
        ({"w": np.zeros((2, 3)), "b": np.zeros(4)}, 2),  # other size
        ({"w": np.zeros((2, 3)), "b": np.zeros((3, 1))}, 2),  # extra unit axis
        ({"w": np.zeros((2, 3)), "c": np.zeros(3)}, 2),  # renamed leaf
        ({"w": np.zeros((2, 3)), "b": [np.zeros(3)]}, 2),  # same leaf, deeper path
        ({"w": np.zeros((2, 3)), "b": np.zeros(3)}, 3),  # other shard count
        ({"w": np.zeros((2, 3)), "b": np.zeros(3), "c": np.zeros(0)}, 2),  # an empty leaf
    ],
)
def test_fingerprint_changes_with_shapes_paths_and_shard_count(
    other: dict[str, Any], num_shards: int
) -> None:
    base = Layout.from_pytree({"w": np.zeros((2, 3)), "b": np.zeros(3)}, 2)
    changed = Layout.from_pytree(other, num_shards)
    assert changed.fingerprint != base.fingerprint
    assert changed != base


@pytest.mark.parametrize("size", [1, 17, 1_000_003])
def test_aligned_vectors_start_on_a_64_byte_boundary(size: int) -> None:
    flat = aligned_empty(size)
    assert flat.dtype == np.float32 and flat.shape == (size,)
    assert flat.ctypes.data % 64 == 0 and flat.flags.writeable and flat.flags.c_contiguous


def test_flatten_gives_an_aligned_vector_that_jit_reads_in_place() -> None:
    params = {"w": np.arange(12, dtype=np.float32).reshape(3, 4), "b": np.ones(5, np.float32)}
    flat = Layout.from_pytree(params, 1).flatten(params)
    assert flat.ctypes.data % 64 == 0
    assert jax.device_put(flat).unsafe_buffer_pointer() == flat.ctypes.data  # no copy


def test_a_piece_of_the_flat_vector_splits_along_the_shard_ranges() -> None:
    """How a worker routes one parameter array's gradient to the shards it spans."""
    layout = Layout.from_pytree({"a": np.zeros(7, np.float32), "b": np.zeros(3, np.float32)}, 3)
    assert [tuple(r) for r in layout.ranges] == [(0, 3), (3, 6), (6, 10)]
    piece = np.arange(2, 9, dtype=np.float32)  # entries 2..8 of the flat vector
    parts = [(k, start, part.tolist()) for k, start, part in layout.by_shard(2, piece)]
    assert parts == [(0, 2, [2.0]), (1, 0, [3.0, 4.0, 5.0]), (2, 0, [6.0, 7.0, 8.0])]
    assert [k for k, _, _ in layout.by_shard(7, np.zeros(3, np.float32))] == [2]
