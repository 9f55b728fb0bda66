"""The change tracker answers "what changed since v" exactly."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from dsgd.changes import BLOCK, ChangeTracker


@st.composite
def histories(draw: st.DrawFn) -> tuple[int, list[tuple[str, object]]]:
    size = draw(st.integers(1, 3 * BLOCK + 7))
    ops: list[tuple[str, object]] = []
    for _ in range(draw(st.integers(0, 12))):
        if draw(st.booleans()):
            offset = draw(st.integers(0, size - 1))
            count = draw(st.integers(0, size - offset))
            ops.append(("range", (offset, count)))
        else:
            idx = sorted(set(draw(st.lists(st.integers(0, size - 1), max_size=20))))
            ops.append(("sparse", np.array(idx, np.uint32)))
    return size, ops


@settings(max_examples=150, deadline=None)
@given(histories(), st.integers(0, 13))
def test_changed_since_is_exactly_what_changed_after_that_version(
    history: tuple[int, list[tuple[str, object]]], since: int
) -> None:
    size, ops = history
    tracker = ChangeTracker(size)
    last_change = np.zeros(size, np.int64)  # the reference: a plain array of versions
    for version, (kind, arg) in enumerate(ops, start=1):
        if kind == "range":
            offset, count = arg  # type: ignore[misc]
            tracker.mark_range(offset, count, version)
            last_change[offset : offset + count] = version
        else:
            tracker.mark(arg, version)  # type: ignore[arg-type]
            last_change[arg] = version  # type: ignore[index]
    expected = np.flatnonzero(last_change > since)
    got = tracker.changed_since(since, max_fraction=1.0)
    assert got is not None
    np.testing.assert_array_equal(got, expected)


def test_too_many_changes_ask_for_the_whole_range() -> None:
    tracker = ChangeTracker(10 * BLOCK)
    tracker.mark_range(0, 8 * BLOCK, 1)
    assert tracker.changed_since(0) is None
    assert tracker.changed_since(1) is not None and tracker.changed_since(1).size == 0


def test_a_few_changes_scattered_over_every_block_stay_sparse() -> None:
    tracker = ChangeTracker(100 * BLOCK)
    idx = np.arange(0, 100 * BLOCK, BLOCK + 1, dtype=np.uint32)  # one per block
    tracker.mark(idx, 1)
    np.testing.assert_array_equal(tracker.changed_since(0), idx)


def test_a_restored_range_starts_at_its_version() -> None:
    tracker = ChangeTracker(1000, version=40)
    assert tracker.changed_since(39) is None  # everything is newer than 39
    assert tracker.changed_since(40).size == 0
