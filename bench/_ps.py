"""Parameter-server throughput: the ``ps`` suite.

N synthetic workers (processes without JAX, N = 1, 2, 4, 8; ``--quick``: 1, 2) push the same
update in a loop, as fast as their push permits allow, to real shard processes
(:class:`bench._shard_peer.ShardPeer`) through dsgd's own :class:`~dsgd.shard.client.ShardClient`:
every worker push is cut into 1 MiB chunk messages per shard, sent zero-copy, applied (SGD)
and acknowledged, with at most ``max_inflight`` (4) unacknowledged pushes per worker and
shard, as in training. Three set-ups:

* dense pushes to one shard holding the whole model;
* dense pushes to two shards holding half each (a worker push is one push per shard);
* sparse pushes (1% of the entries, index + value) to one shard.

Throughput is read from the shards' own counters (values applied, pushes) and clocks over
consecutive windows once the workers have warmed up: ``gbps_*`` are bytes applied per second
(4 per dense value, 8 per sparse entry), over all shards, one figure per window; records
carry ``pushes_per_s`` (worker pushes applied per second). The raw-TCP reference is timed
while the workers are idle, just before each set-up, for ``ratio_to_tcp``.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing.connection
import secrets
import statistics
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import zmq.asyncio

from bench._common import SPAWN, stop_process
from bench._measure import Bench, MiB, Record, make_record
from bench._shard_peer import FINGERPRINT, ShardPeer, dsgd_transport
from dsgd import wire
from dsgd.codec import Encoded
from dsgd.shard.client import PushResult, ShardClient
from dsgd.wire import AckStatus

SUITE = "ps"
READY = "ready"
STARTED = "started"
STOP = "stop"
FULL_WORKERS = (1, 2, 4, 8)
QUICK_WORKERS = (1, 2)
SPARSE_DENSITY = 0.01
SPARSE_VARIETY = 8  # sparse updates each worker rotates through


@dataclass(frozen=True)
class Job:
    """What a synthetic worker pushes, and where: one (id, data, pub, size) per shard."""

    shards: tuple[tuple[int, str, str, int], ...]
    density: float  # 1.0: dense float32; below: that fraction of entries, index + value
    chunk_bytes: int
    max_inflight: int
    timeout_s: float


@dataclass(frozen=True)
class Setup:
    variant: str
    shards: int
    density: float


def setups() -> tuple[Setup, ...]:
    return (
        Setup("dense push, 1 shard", 1, 1.0),
        Setup("dense push, 2 shards", 2, 1.0),
        Setup(f"sparse push ({SPARSE_DENSITY:.0%} of entries), 1 shard", 1, SPARSE_DENSITY),
    )


# ---------------------------------------------------------------- the worker process


def synthetic_worker(conn: multiprocessing.connection.Connection, worker_id: int) -> None:
    """Run one :class:`Job` after another (each until told to stop), report counts."""
    try:
        asyncio.run(_worker_main(conn, worker_id))
    finally:
        conn.close()


async def _worker_main(conn: multiprocessing.connection.Connection, worker_id: int) -> None:
    ctx = zmq.asyncio.Context()
    try:
        conn.send(READY)
        while True:
            job = await asyncio.to_thread(_receive, conn)
            if not isinstance(job, Job):
                return
            conn.send(await _push_until_stopped(ctx, conn, worker_id, job))
    finally:
        ctx.destroy(linger=0)


def _receive(conn: multiprocessing.connection.Connection) -> Any:
    try:
        return conn.recv()
    except EOFError:
        return None


def _update(size: int, density: float, rng: np.random.Generator) -> Encoded:
    if density >= 1.0:
        return Encoded(None, rng.standard_normal(size, dtype=np.float32) * np.float32(1e-6))
    picked = rng.choice(size, round(density * size), replace=False, shuffle=False)
    values = rng.standard_normal(picked.size, dtype=np.float32) * np.float32(1e-6)
    return Encoded(np.sort(picked).astype(wire.INDEX_DTYPE), values)


async def _push_until_stopped(
    ctx: zmq.asyncio.Context,
    conn: multiprocessing.connection.Connection,
    worker_id: int,
    job: Job,
) -> dict[str, int]:
    """Push the job's update to every shard, push after push, until ``conn`` says stop."""
    rng = np.random.default_rng(worker_id)
    incarnation = secrets.randbits(62) + 1  # a new one per job: sequence numbers restart
    # sparse: a different set of entries each push, as top-k selections are (a fixed set
    # would stay in the shard's cache and flatter it); dense: one update is as good as any
    variety = 1 if job.density >= 1.0 else SPARSE_VARIETY
    updates = [[_update(size, job.density, rng) for _ in range(variety)] for *_, size in job.shards]
    clients = [
        ShardClient(
            shard_id,
            data,
            pub,
            FINGERPRINT,
            worker_id,
            ctx,
            max_inflight=job.max_inflight,
            ack_timeout=job.timeout_s,
            fetch_timeout=job.timeout_s,
        )
        for shard_id, data, pub, _ in job.shards
    ]
    counts = {"pushes": 0, "chunks_applied": 0, "chunks_not_applied": 0}

    def on_done(result: PushResult) -> None:
        applied = sum(status == AckStatus.APPLIED for status in result.statuses)
        counts["chunks_applied"] += applied
        counts["chunks_not_applied"] += len(result.statuses) - applied

    stop: asyncio.Future[Any] | None = None
    try:
        for client in clients:
            await client.start()
        conn.send(STARTED)  # updates made, sockets connected: the clock may start
        stop = asyncio.ensure_future(asyncio.to_thread(_receive, conn))
        seq = 0
        while not stop.done():
            seq += 1
            for client, choices in zip(clients, updates, strict=True):
                update = choices[seq % len(choices)]
                template = wire.Header(
                    kind=wire.PUSH,
                    fingerprint=FINGERPRINT,
                    shard=client.shard_id,
                    worker=worker_id,
                    seq=seq,
                    base_version=max(client.broadcast_version, 0),
                    incarnation=incarnation,
                )
                if update.indices is None:
                    chunks = list(wire.dense_chunks(template, update.values, job.chunk_bytes))
                else:
                    chunks = list(
                        wire.sparse_chunks(template, update.indices, update.values, job.chunk_bytes)
                    )
                if await client.push(seq, chunks, on_done, job.timeout_s):
                    counts["pushes"] += 1
        for client in clients:
            await asyncio.wait_for(client.drain(), job.timeout_s)
    finally:
        for client in clients:
            await client.aclose()
        if stop is not None:
            await stop
    return counts


class WorkerPool:
    """``n`` :func:`synthetic_worker` processes, started at once, idle between jobs."""

    def __init__(self, n: int, timeout_s: float) -> None:
        self.timeout_s = timeout_s
        self.conns: list[multiprocessing.connection.Connection] = []
        self.processes: list[Any] = []
        try:
            for worker_id in range(n):
                conn, child = SPAWN.Pipe()
                self.conns.append(conn)
                process = SPAWN.Process(
                    target=synthetic_worker, args=(child, worker_id), daemon=True
                )
                process.start()
                child.close()
                self.processes.append(process)
            for conn in self.conns:
                if not conn.poll(timeout_s) or conn.recv() != READY:
                    raise TimeoutError("a synthetic worker did not report ready")
        except BaseException:
            self.close()
            raise

    def start(self, job: Job, n: int) -> None:
        """Hand ``job`` to the first ``n`` workers; return once all of them are pushing."""
        for conn in self.conns[:n]:
            conn.send(job)
        for conn in self.conns[:n]:
            if not conn.poll(self.timeout_s) or conn.recv() != STARTED:
                raise TimeoutError("a synthetic worker did not start its job")

    def stop(self, n: int) -> list[dict[str, int]]:
        for conn in self.conns[:n]:
            conn.send(STOP)
        counts = []
        for conn in self.conns[:n]:
            if not conn.poll(self.timeout_s + 10):
                raise TimeoutError("a synthetic worker did not stop")
            counts.append(conn.recv())
        return counts

    def close(self) -> None:
        for conn in self.conns:
            with contextlib.suppress(OSError):
                conn.send(None)
        for process in self.processes:
            stop_process(process, self.timeout_s)
        for conn in self.conns:
            conn.close()
        self.processes, self.conns = [], []

    def __enter__(self) -> WorkerPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ---------------------------------------------------------------- the suite


def ps_suite(bench: Bench) -> Iterator[Record]:
    """Pushes/s and applied GB/s at the shards vs the number of synthetic workers."""
    config = bench.config
    quick = config.quick
    workers = QUICK_WORKERS if quick else FULL_WORKERS
    model = (1 if quick else 16) * MiB // 4  # parameters; one dense push = 1 or 16 MiB
    warmup_s, window_s, windows = (0.2, 0.15, 3) if quick else (0.6, 0.5, 6)
    chunk = wire.DEFAULT_CHUNK_BYTES
    with contextlib.ExitStack() as stack:
        groups = []  # every shard process starts now, so that they all boot in parallel
        for setup in setups():
            shards = []
            for k in range(setup.shards):
                size = model * (k + 1) // setup.shards - model * k // setup.shards
                shards.append(ShardPeer(size, config.timeout_s, shard_id=k, chunk_bytes=chunk))
                stack.callback(shards[-1].close)
            groups.append((setup, shards))
        pool = stack.enter_context(WorkerPool(max(workers), config.timeout_s))
        for setup, shards in groups:
            for shard in shards:
                shard.wait_ready()
            job = Job(
                shards=tuple((s.shard_id, s.data_address, s.pub_address, s.size) for s in shards),
                density=setup.density,
                chunk_bytes=chunk,
                max_inflight=4,
                timeout_s=config.timeout_s,
            )
            for n in workers:
                reference = _reference_gbps(bench)
                pool.start(job, n)
                try:
                    time.sleep(warmup_s)
                    samples = [[s.stats() for s in shards]]
                    for _ in range(windows):
                        time.sleep(window_s)
                        samples.append([s.stats() for s in shards])
                finally:
                    counts = pool.stop(n)
                sizes = [s.size for s in shards]
                yield _record(setup, n, sizes, samples, counts, chunk, reference)
            for shard in shards:  # idle shards still wake up to broadcast: stop them now
                shard.close()


def _reference_gbps(bench: Bench, repeats: int = 3) -> float | None:
    """The raw-TCP reference's median GB/s, timed now (the workers idle)."""
    if bench.reference is None:
        return None
    gbps = []
    for _ in range(repeats):
        start = time.perf_counter()
        bench.reference.run()
        gbps.append(bench.config.payload_bytes / (time.perf_counter() - start) / 1e9)
    return statistics.median(gbps)


def _record(
    setup: Setup,
    workers: int,
    sizes: Sequence[int],
    samples: list[list[dict[str, float]]],
    counts: list[dict[str, int]],
    chunk: int,
    reference: float | None,
) -> Record:
    per_value = 4 if setup.density >= 1.0 else wire.INDEX_DTYPE.itemsize + 4
    entries = sum(sizes) if setup.density >= 1.0 else round(setup.density * sum(sizes))
    push_bytes = per_value * entries  # one worker push, all shards
    gbps, pushes_per_s = [], []
    for before, after in zip(samples, samples[1:], strict=False):
        rate_bytes = rate_pushes = 0.0
        for b, a in zip(before, after, strict=True):
            dt = max(a["time"] - b["time"], 1e-9)
            rate_bytes += per_value * (a["values_applied"] - b["values_applied"]) / dt
            rate_pushes += (a["pushes"] - b["pushes"]) / dt
        gbps.append(max(rate_bytes / 1e9, 1e-9))
        pushes_per_s.append(rate_pushes / setup.shards)
    extra: dict[str, Any] = {
        "workers": workers,
        "shards": setup.shards,
        "density": setup.density,
        "params": sum(sizes),
        "pushes_per_s": statistics.median(pushes_per_s),
        "pushes_per_s_min": min(pushes_per_s),
        "pushes_per_s_max": max(pushes_per_s),
        "worker_pushes": sum(c["pushes"] for c in counts),
        "chunks_not_applied": sum(c["chunks_not_applied"] for c in counts),
        "window_s": samples[-1][0]["time"] - samples[0][0]["time"],
    }
    if reference is not None:
        extra["tcp_reference_gbps"] = reference
    # one "repeat" per window: the time the shards took to apply one push's worth of bytes
    seconds = [push_bytes / (g * 1e9) for g in gbps]
    record = make_record(
        SUITE, dsgd_transport(), setup.variant, push_bytes, min(chunk, push_bytes), seconds, **extra
    )
    if reference is not None:
        record["ratio_to_tcp"] = record["gbps_median"] / reference
    return record
