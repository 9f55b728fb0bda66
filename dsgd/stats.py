"""Small counters shared by the shard and the worker: the base of each role's counter
record, rates, staleness, rate-limited logs."""

from __future__ import annotations

import logging
import resource
import sys
import time
from collections import Counter
from dataclasses import dataclass, fields

import numpy as np

# Staleness histogram buckets: [0], [1], [2, 3], [4, 7], ... [512, inf)
STALENESS_EDGES = (0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512)

# a worker's heartbeat counters acked_shard{K}_{incarnation}: the highest version shard K
# acknowledged to it per shard incarnation, for counting pushes a restart lost
ACKED_PREFIX = "acked_shard"


@dataclass(slots=True)
class CounterRecord:
    """The base of a role's counters (``WorkerCounters``, ``ShardCounters``,
    ``EvaluatorCounters``): a ``@dataclass(slots=True)`` with one field per counter, so a
    misspelled name is a type error for mypy and an AttributeError at run time, never a
    new key or a KeyError in production."""

    def as_dict(self) -> dict[str, float]:
        """The flat ``name -> number`` map a heartbeat's ``counters`` carries."""
        return {f.name: float(getattr(self, f.name)) for f in fields(self)}


def peak_rss_bytes() -> float:
    """This process's peak resident set size, in bytes (``ru_maxrss``)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return float(peak if sys.platform == "darwin" else peak * 1024)


class StalenessHistogram:
    """A fixed-bucket histogram of update staleness (versions between fetch and apply)."""

    def __init__(self) -> None:
        self.counts = np.zeros(len(STALENESS_EDGES), np.int64)
        self.total = 0
        self.sum = 0
        self.maximum = 0

    def add(self, staleness: int) -> None:
        bucket = int(np.searchsorted(STALENESS_EDGES, staleness, side="right")) - 1
        self.counts[max(bucket, 0)] += 1
        self.total += 1
        self.sum += staleness
        self.maximum = max(self.maximum, staleness)

    def merge(self, other: StalenessHistogram) -> None:
        self.counts += other.counts
        self.total += other.total
        self.sum += other.sum
        self.maximum = max(self.maximum, other.maximum)

    def percentile(self, q: float) -> float:
        """The lower edge of the bucket holding the q-th percentile (0 when empty)."""
        if self.total == 0:
            return 0.0
        rank = q / 100.0 * self.total
        cumulative = np.cumsum(self.counts)
        bucket = int(np.searchsorted(cumulative, rank, side="left"))
        return float(STALENESS_EDGES[min(bucket, len(STALENESS_EDGES) - 1)])


def paced_interval(every: float, took: float, duty: float) -> float:
    """Seconds from the start of one round of periodic background work (an evaluation, a
    checkpoint) to the next: ``every``, or longer when a round is slow (a large model), so
    that the work takes at most ``duty`` of the time and never starves training beside it."""
    return max(every, took / duty)


class RateMeter:
    """Events per second over a sliding window of about ``window`` seconds."""

    def __init__(self, window: float = 5.0) -> None:
        self.window = window
        self._marks: list[tuple[float, int]] = [(time.monotonic(), 0)]
        self.count = 0

    def add(self, n: int = 1) -> None:
        self.count += n

    def rate(self) -> float:
        now = time.monotonic()
        self._marks.append((now, self.count))
        while len(self._marks) > 2 and now - self._marks[1][0] > self.window:
            self._marks.pop(0)
        t0, c0 = self._marks[0]
        return (self.count - c0) / (now - t0) if now > t0 else 0.0


class RateLimitedLog:
    """Logs at most one line per ``interval`` seconds per key, counting what it held back."""

    def __init__(self, logger: logging.Logger, interval: float = 5.0) -> None:
        self.logger = logger
        self.interval = interval
        self._last: dict[str, float] = {}
        self._held: Counter[str] = Counter()

    def warning(self, key: str, message: str) -> None:
        now = time.monotonic()
        if now - self._last.get(key, -1e9) >= self.interval:
            held = self._held.pop(key, 0)
            suffix = f" ({held} more like it since the last report)" if held else ""
            self.logger.warning("%s%s", message, suffix)
            self._last[key] = now
        else:
            self._held[key] += 1
