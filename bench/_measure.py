"""Timing and records shared by every transport-benchmark suite.

A suite builds :class:`Case` objects (one timed end-to-end transfer of the whole
payload each), hands them to :func:`measure`, and yields the records it returns.
:func:`measure` interleaves the cases round by round, in a new random order each round, so
the slow drift of a shared machine, and whatever one case leaves behind for the next (a
peer still freeing buffers), land on every case alike and the ratios between them hold.
"""

from __future__ import annotations

import math
import os
import platform
import random
import statistics
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

KiB = 1 << 10
MiB = 1 << 20

Record = dict[str, Any]

# Every record carries at least these; tests/test_bench.py checks them.
REQUIRED_FIELDS = (
    "suite",
    "transport",
    "variant",
    "payload_bytes",
    "chunk_bytes",
    "gbps_median",
    "gbps_min",
    "gbps_max",
    "ratio_to_tcp",
)


@dataclass(frozen=True)
class Config:
    """What one run measures: payload, chunk sizes, repetitions, socket timeouts."""

    payload_bytes: int
    chunk_sizes: tuple[int, ...]
    warmup: int
    repeats: int
    timeout_s: float
    quick: bool = False

    def chunks(self, *, at_most: int | None = None) -> tuple[int, ...]:
        """The chunk sizes to sweep, capped at the payload (and at ``at_most``)."""
        cap = min(self.payload_bytes, at_most or self.payload_bytes)
        return tuple(sorted({min(c, cap) for c in self.chunk_sizes}))


@dataclass(frozen=True)
class Case:
    """One timed thing: ``run()`` moves ``payload_bytes`` end to end and returns when
    the receiver has taken all of it."""

    transport: str
    variant: str
    chunk_bytes: int
    run: Callable[[], object]
    extra: tuple[tuple[str, Any], ...] = ()


def measure(
    suite: str,
    cases: list[Case],
    config: Config,
    *,
    reference: Case | None = None,
    payload_bytes: int | None = None,
) -> list[Record]:
    """Time every case ``warmup + repeats`` times, round-robin; one record per case.

    With a ``reference`` (the raw-TCP case), it runs in every round too, and each record's
    ``ratio_to_tcp`` is its median over the reference's median from the same rounds, so a
    machine that slows down for a minute shifts both and leaves the ratio alone.
    """
    payload = payload_bytes or config.payload_bytes
    timed = [*cases, reference] if reference is not None else list(cases)
    seconds: list[list[float]] = [[] for _ in timed]
    order = list(range(len(timed)))
    shuffle = random.Random(0).shuffle
    for round_ in range(config.warmup + config.repeats):
        shuffle(order)  # what one case leaves behind (frees, page cache) hits a random next
        for i in order:
            start = time.perf_counter()
            timed[i].run()
            elapsed = time.perf_counter() - start
            if round_ >= config.warmup:
                seconds[i].append(elapsed)
    extra: dict[str, Any] = {}
    if reference is not None:
        gbps = [config.payload_bytes / max(s, 1e-9) / 1e9 for s in seconds.pop()]
        extra["tcp_reference_gbps"] = statistics.median(gbps)
    records = []
    for case, times in zip(cases, seconds, strict=True):
        record = make_record(
            suite, case.transport, case.variant, payload, case.chunk_bytes, times, **extra
        )
        record.update(case.extra)
        if reference is not None:
            record["ratio_to_tcp"] = record["gbps_median"] / extra["tcp_reference_gbps"]
        records.append(record)
    return records


@dataclass(frozen=True)
class Bench:
    """What a suite is given: the run's :class:`Config`, and :meth:`measure` with the
    run's raw-TCP reference case interleaved (see :func:`measure`)."""

    config: Config
    reference: Case | None = None

    def measure(
        self, suite: str, cases: list[Case], *, payload_bytes: int | None = None
    ) -> list[Record]:
        return measure(
            suite, cases, self.config, reference=self.reference, payload_bytes=payload_bytes
        )


def make_record(
    suite: str,
    transport: str,
    variant: str,
    payload_bytes: int,
    chunk_bytes: int,
    seconds: Iterable[float],
    **extra: Any,
) -> Record:
    """A record from the seconds each repetition took to move ``payload_bytes``.

    ``ratio_to_tcp`` is left NaN for :func:`measure` (or the runner) to fill in.
    """
    times = [max(s, 1e-9) for s in seconds]
    gbps = [payload_bytes / s / 1e9 for s in times]
    return {
        "suite": suite,
        "transport": transport,
        "variant": variant,
        "payload_bytes": payload_bytes,
        "chunk_bytes": chunk_bytes,
        "gbps_median": statistics.median(gbps),
        "gbps_min": min(gbps),
        "gbps_max": max(gbps),
        "seconds_median": statistics.median(times),
        "repeats": len(times),
        "ratio_to_tcp": math.nan,
        **extra,
    }


def human_bytes(n: int) -> str:
    for unit, size in (("MiB", MiB), ("KiB", KiB)):
        if n >= size and n % size == 0:
            return f"{n // size} {unit}"
    return f"{n} B"


def machine_info() -> dict[str, Any]:
    """What the numbers depend on: CPU, memory, kernel, transparent huge pages."""
    info: dict[str, Any] = {
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
    }
    try:
        info["cpus_usable"] = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        pass
    cpuinfo = _read(Path("/proc/cpuinfo"))
    for line in cpuinfo.splitlines():
        if line.startswith("model name"):
            info["cpu_model"] = line.split(":", 1)[1].strip()
            break
    for line in _read(Path("/proc/meminfo")).splitlines():
        if line.startswith("MemTotal:"):
            info["memory_kib"] = int(line.split()[1])
            break
    thp = _read(Path("/sys/kernel/mm/transparent_hugepage/enabled")).strip()
    if thp:
        info["transparent_hugepage"] = thp
    return info


def package_versions() -> dict[str, str]:
    versions = {}
    for name in ("numpy", "pyzmq", "msgpack", "grpcio", "protobuf", "matplotlib", "dsgd"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    import zmq

    versions["libzmq"] = zmq.zmq_version()
    return versions


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""
