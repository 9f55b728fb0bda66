"""What applying an update costs a shard, in one process: the ``apply`` suite.

Every case hands already-received chunk messages to a real
:class:`~dsgd.shard.core.ShardCore` exactly as its server does (:func:`dsgd.wire.decode`,
then :meth:`ShardCore.apply`: validation, at-most-once books, SGD, change stamps), without
sockets:

* **dense** SGD apply of the run's payload in 1 MiB chunks, next to a numpy copy of the same
  bytes into a reused buffer in 1 MiB chunks (the memcpy bandwidth that bounds it) and to
  the optimizer's own ``apply_dense`` alone, in the same rounds (``ratio_to_memcpy``);
* **sparse** SGD apply of a 1%-dense update (scattered, ascending indices, in 1 MiB chunks)
  on shards of 1M, 10M and 75M parameters (``--quick``: 256K, 2M), with the time per
  touched parameter (``ns_per_touched``): it should follow the chunk, not the shard. The
  dense apply of the same shards, per parameter, is there to compare.
"""

from __future__ import annotations

import statistics
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from bench._dsgd_paths import Timed, measure_prepared, params_label
from bench._measure import Bench, Case, MiB, Record, make_record
from dsgd import wire
from dsgd.codec import Encoded
from dsgd.optim import SGD
from dsgd.shard.core import ShardCore, ShardState
from dsgd.wire import AckStatus

SUITE = "apply"
FULL_SIZES = (1_000_000, 10_000_000, 75_000_000)
QUICK_SIZES = (1 << 18, 1 << 21)
SPARSE_DENSITY = 0.01
TRANSPORT = "in-process"
MEMCPY = "numpy copy into a reused buffer"
APPLY_DENSE = "SGD dense apply: decode + ShardCore.apply"
OPTIMIZER_DENSE = "SGD.apply_dense alone (no checks, books or stamps)"
FINGERPRINT = 1


class _Pushes:
    """Chunk messages of one update, one fresh sequence number per push, made ahead of time
    (a shard applies a sequence number once); :meth:`apply` hands the next push to the shard
    the way its loop does."""

    def __init__(
        self, core: ShardCore, update: Encoded, count: int, chunk: int, worker: int = 1
    ) -> None:
        self.core = core
        self.queue: deque[list[list[Any]]] = deque()
        for seq in range(1, count + 1):
            template = wire.Header(
                kind=wire.PUSH, fingerprint=FINGERPRINT, shard=0, worker=worker, seq=seq
            )
            if update.indices is None:
                chunks = wire.dense_chunks(template, update.values, chunk)
            else:
                chunks = wire.sparse_chunks(template, update.indices, update.values, chunk)
            self.queue.append([c.frames for c in chunks])

    def apply(self) -> None:
        for frames in self.queue.popleft():
            header, arrays = wire.decode(frames)
            outcome = self.core.apply(header, arrays)
            if outcome.status != AckStatus.APPLIED:
                raise RuntimeError(f"chunk not applied: {outcome}")


def _core(size: int) -> ShardCore:
    optimizer = SGD(1e-6)
    params = np.full(size, 0.0, np.float32)
    state = ShardState(params, optimizer.init(size))
    return ShardCore(0, FINGERPRINT, optimizer, state)


def apply_suite(bench: Bench) -> Iterator[Record]:
    """Dense apply vs memcpy bandwidth; sparse apply time per touched parameter by shard size."""
    config = bench.config
    rounds = config.warmup + config.repeats
    chunk = wire.DEFAULT_CHUNK_BYTES
    yield from _dense(bench, rounds, chunk)
    for size in QUICK_SIZES if config.quick else FULL_SIZES:
        yield from _sparse(bench, size, rounds, chunk)


def _dense(bench: Bench, rounds: int, chunk: int) -> Iterator[Record]:
    size = bench.config.payload_bytes // 4
    rng = np.random.default_rng(0)
    grad = rng.standard_normal(size, dtype=np.float32)
    core = _core(size)
    pushes = _Pushes(core, Encoded(None, grad), rounds, chunk)
    dest = np.ones(size, np.float32)
    optimizer = SGD(1e-6)
    per_chunk = chunk // 4

    def memcpy() -> None:
        for start in range(0, size, per_chunk):
            np.copyto(dest[start : start + per_chunk], grad[start : start + per_chunk])

    def optimizer_only() -> None:
        for start in range(0, size, per_chunk):
            optimizer.apply_dense(dest, {}, start, grad[start : start + per_chunk])

    cases = [
        Timed(Case(TRANSPORT, MEMCPY, chunk, memcpy)),
        Timed(Case(TRANSPORT, APPLY_DENSE, chunk, pushes.apply)),
        Timed(Case(TRANSPORT, OPTIMIZER_DENSE, chunk, optimizer_only)),
    ]
    seconds, _ = measure_prepared(bench, cases, with_reference=False)
    memcpy_s = statistics.median(seconds[0])
    for timed, times in zip(cases, seconds, strict=True):
        yield make_record(
            SUITE,
            TRANSPORT,
            timed.case.variant,
            4 * size,
            min(chunk, 4 * size),
            times,
            params=size,
            ns_per_param=statistics.median(times) / size * 1e9,
            ratio_to_memcpy=memcpy_s / statistics.median(times),
        )


def _sparse(bench: Bench, size: int, rounds: int, chunk: int) -> Iterator[Record]:
    rng = np.random.default_rng(size)
    touched = np.flatnonzero(rng.random(size, dtype=np.float32) < SPARSE_DENSITY)
    sparse = Encoded(
        touched.astype(wire.INDEX_DTYPE),
        rng.standard_normal(touched.size, dtype=np.float32),
    )
    dense = Encoded(None, rng.standard_normal(size, dtype=np.float32))
    core = _core(size)
    label = params_label(size)
    # (variant, entries, bytes per entry, the pushes)
    groups: list[tuple[str, int, int, Callable[[], None]]] = [
        (
            f"SGD sparse apply, {SPARSE_DENSITY:.0%} of a {label}-parameter shard",
            touched.size,
            8,
            _Pushes(core, sparse, rounds, chunk).apply,
        ),
        (
            f"SGD dense apply, a {label}-parameter shard",
            size,
            4,
            _Pushes(core, dense, rounds, chunk, worker=2).apply,
        ),
    ]
    cases = [Timed(Case(TRANSPORT, variant, chunk, run)) for variant, _, _, run in groups]
    seconds, _ = measure_prepared(bench, cases, with_reference=False)
    for (variant, entries, per_entry, _), times in zip(groups, seconds, strict=True):
        payload = max(per_entry * entries, 1)
        yield make_record(
            SUITE,
            TRANSPORT,
            variant,
            payload,
            min(chunk, payload),
            times,
            params=size,
            touched=entries,
            density=SPARSE_DENSITY if per_entry == 8 else 1.0,
            ns_per_touched=statistics.median(times) / max(entries, 1) * 1e9,
        )


def dense_apply_target(records: list[Record]) -> dict[str, Any] | None:
    """Dense SGD apply at the shard vs memcpy, same rounds: the target is >= 1/3."""
    for r in records:
        if r["suite"] == SUITE and r["variant"] == APPLY_DENSE:
            return {
                "what": f"shard dense apply (SGD) of {r['payload_bytes'] // MiB} MiB, x memcpy",
                "value": r["ratio_to_memcpy"],
                "target": ">= 0.33",
                "met": r["ratio_to_memcpy"] >= 1 / 3,
            }
    return None


def sparse_apply_target(records: list[Record]) -> dict[str, Any] | None:
    """Sparse apply per touched parameter, largest shard over smallest: ~1 when the cost
    follows the chunk (a shard-sized pass would make it grow with the shard, 75x here)."""
    rows = [r for r in records if r["suite"] == SUITE and r.get("density") == SPARSE_DENSITY]
    if len(rows) < 2:
        return None
    small, large = min(rows, key=lambda r: r["params"]), max(rows, key=lambda r: r["params"])
    growth = large["ns_per_touched"] / small["ns_per_touched"]
    return {
        "what": (
            f"sparse apply per touched parameter, {params_label(large['params'])} vs "
            f"{params_label(small['params'])}-parameter shard "
            f"({large['ns_per_touched']:.0f} vs {small['ns_per_touched']:.0f} ns; "
            f"the shard is {large['params'] / small['params']:.0f}x larger)"
        ),
        "value": growth,
        "target": "<= 3 (proportional to the chunk, not the shard)",
        "met": growth <= 3,
    }
