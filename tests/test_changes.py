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


@settings(max_examples=300, deadline=None)
@given(histories(), st.integers(0, 13), st.lists(st.booleans(), max_size=12), st.integers(0, 40))
def test_changed_since_is_exactly_what_changed_after_that_version(
    history: tuple[int, list[tuple[str, object]]], since: int, same: list[bool], budget: int
) -> None:
    """From the log of recent changes (however small its budget) or from the stamps, with
    several changes at one version (the chunks of one push)."""
    size, ops = history
    tracker = ChangeTracker(size, log_budget=budget)
    last_change = np.zeros(size, np.int64)  # the reference: a plain array of versions
    steps = [0 if i < len(same) and same[i] else 1 for i in range(len(ops) - 1)]
    versions = np.cumsum([1, *steps])[: len(ops)]
    for version, (kind, arg) in zip(versions.tolist(), ops, strict=True):
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


def test_recent_changes_come_from_the_log_and_older_ones_from_the_stamps() -> None:
    tracker = ChangeTracker(100 * BLOCK, log_budget=12)
    a, b = np.array([5, 900, 7000], np.uint32), np.array([6, 900, 20000], np.uint32)
    tracker.mark(a, 1)
    tracker.mark(b, 2)
    np.testing.assert_array_equal(tracker.changed_since(1), b)
    np.testing.assert_array_equal(tracker.changed_since(0), [5, 6, 900, 7000, 20000])
    tracker.mark(np.arange(8, dtype=np.uint32), 3)  # over budget: version 1 is forgotten
    assert [v for v, _ in tracker._log] == [2, 3]
    np.testing.assert_array_equal(tracker.changed_since(0), [*range(8), 900, 7000, 20000])
    tracker.mark(np.zeros(0, np.uint32), 3)  # an empty push changes nothing: not logged
    assert len(tracker._log) == 2
    tracker.mark_range(BLOCK, 2 * BLOCK, 4)  # dense: not logged
    assert not tracker._log and tracker.changed_since(4).size == 0
    assert tracker.changed_since(3).size == 2 * BLOCK


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
