"""Real dsgd shards in their own processes, and a pusher that talks to one as a worker does.

The dsgd-path and parameter-server suites measure dsgd's own classes, not a model of them:

* :class:`ShardPeer` spawns a process running a real :class:`dsgd.shard.server.ShardServer` (SGD,
  one contiguous range, its own event loop and its own GIL, as in a cluster) and answers
  ``stats`` requests from a thread of that process, so the counters can be read while
  the shard's loop is saturated;
* :class:`Pusher` drives a real :class:`dsgd.shard.client.ShardClient` from a private event
  loop, one ``run_until_complete`` per timed operation, and pushes the way
  :meth:`dsgd.worker.replica.Replica.push` does: encode with a :class:`dsgd.codec.SparseEncoder`,
  cut into chunk messages with :mod:`dsgd.wire`, push under a permit, wait for every ack.

Every process reports readiness (never a sleep) and is stopped, reaped and closed on exit.
"""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import multiprocessing.connection
import secrets
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import zmq.asyncio

from bench._common import SPAWN, stop_process
from bench._netns import LOOPBACK, run_in
from dsgd import wire
from dsgd.codec import Encoded
from dsgd.optim import SGD
from dsgd.security import Security
from dsgd.shard.client import PushResult, ShardClient
from dsgd.shard.core import ShardCore, ShardState
from dsgd.shard.server import ShardServer
from dsgd.sockets import local_twin

FINGERPRINT = 0x0D56_D0BE_0C4E  # both ends of the benchmark use it
STATS = "stats"
STOP = "stop"
# What a stats request returns, besides the shard's monotonic clock and version.
COUNTERS = ("pushes", "updates_applied", "values_applied", "bytes_received", "duplicates")


def dsgd_transport() -> str:
    """How dsgd's clients reach a shard on this host, as the records name it: ``zmq-ipc``
    through the shard's local twin (:mod:`dsgd.sockets`), ``zmq-tcp`` where twins are off."""
    return "zmq-ipc" if local_twin("tcp://127.0.0.1:1") is not None else "zmq-tcp"


def shard_process(
    conn: mp.connection.Connection,
    shard_id: int,
    size: int,
    lr: float,
    chunk_bytes: int,
    host: str = LOOPBACK,
    keys: Path | None = None,
) -> None:
    """A real ShardServer serving ``size`` float32 parameters on ``host`` until told to
    stop; secured with the key directory ``keys`` (CURVE, admitting its members) if given."""
    try:
        asyncio.run(_serve_shard(conn, shard_id, size, lr, chunk_bytes, host, keys))
    finally:
        conn.close()


async def _serve_shard(
    conn: mp.connection.Connection,
    shard_id: int,
    size: int,
    lr: float,
    chunk_bytes: int,
    host: str,
    keys: Path | None,
) -> None:
    optimizer = SGD(lr)
    params = np.full(size, 0.0, np.float32)  # np.full writes every page: faulted in now
    state = ShardState(params, optimizer.init(size))
    core = ShardCore(shard_id, FINGERPRINT, optimizer, state, chunk_bytes=chunk_bytes)
    security = None if keys is None else Security.load(keys)
    async with ShardServer(core, host=host, security=security) as server:
        conn.send((server.data_address, server.pub_address))
        # A thread answers stats requests: a saturated shard loop never yields to other
        # tasks (a zmq.asyncio recv that finds a message queued completes without
        # suspending), but it does hand the GIL over every switch interval.
        await asyncio.to_thread(_answer_requests, conn, core)


def _answer_requests(conn: mp.connection.Connection, core: ShardCore) -> None:
    while True:
        try:
            request = conn.recv()
        except EOFError:
            return
        if request != STATS:
            return
        counters = core.counters.as_dict()
        snapshot = {name: counters[name] for name in COUNTERS}
        snapshot["version"] = core.state.version
        snapshot["time"] = time.monotonic()
        conn.send(snapshot)


class ShardPeer:
    """A :func:`shard_process` of ``size`` parameters; :meth:`wait_ready` for its addresses.

    Start several, then wait for them, so they boot in parallel. ``at`` (network
    namespace, address) puts it on another host (:mod:`bench._netns`); ``keys`` (a key
    directory) secures it as ``--secure`` does.
    """

    def __init__(
        self,
        size: int,
        timeout_s: float,
        *,
        shard_id: int = 0,
        lr: float = 1e-6,
        chunk_bytes: int = wire.DEFAULT_CHUNK_BYTES,
        at: tuple[str | None, str] = (None, LOOPBACK),
        keys: Path | None = None,
    ) -> None:
        self.size = size
        self.shard_id = shard_id
        self.timeout_s = timeout_s
        self.data_address = self.pub_address = ""
        self._lock = threading.Lock()
        self._conn, child = SPAWN.Pipe()
        netns, host = at
        self.process: Any = SPAWN.Process(
            target=run_in,
            args=(netns, shard_process, child, shard_id, size, lr, chunk_bytes, host, keys),
            daemon=True,
        )
        try:
            self.process.start()
        except BaseException:
            self._conn.close()
            raise
        finally:
            child.close()

    def wait_ready(self) -> ShardPeer:
        if not self._conn.poll(self.timeout_s):
            raise TimeoutError(f"shard {self.shard_id} did not report its addresses")
        try:
            self.data_address, self.pub_address = self._conn.recv()
        except EOFError:
            raise RuntimeError(
                f"shard {self.shard_id} exited before reporting its addresses (see its traceback)"
            ) from None
        return self

    def stats(self) -> dict[str, float]:
        """The shard's counters (:data:`COUNTERS`), version and monotonic time, read now."""
        with self._lock:
            self._conn.send(STATS)
            if not self._conn.poll(self.timeout_s):
                raise TimeoutError(f"shard {self.shard_id} did not answer a stats request")
            stats: dict[str, float] = self._conn.recv()
            return stats

    def close(self) -> None:
        if self.process is None:
            return
        try:
            self._conn.send(STOP)
        except OSError:
            pass
        stop_process(self.process, self.timeout_s)
        self.process = None
        self._conn.close()

    def __enter__(self) -> ShardPeer:
        try:
            return self.wait_ready()
        except BaseException:
            self.close()
            raise

    def __exit__(self, *exc: object) -> None:
        self.close()


class Pusher:
    """One worker's connection to one shard: a :class:`ShardClient` on a private loop.

    :meth:`push` and :meth:`fetch` each run the loop until the operation is complete.
    """

    def __init__(
        self,
        shard: ShardPeer,
        timeout_s: float,
        *,
        worker_id: int = 1,
        chunk_bytes: int = wire.DEFAULT_CHUNK_BYTES,
    ) -> None:
        self.shard_id = shard.shard_id
        self.worker_id = worker_id
        self.chunk_bytes = chunk_bytes
        self.timeout_s = timeout_s
        self.incarnation = secrets.randbits(62) + 1
        self.seq = 0
        self.version = 0  # the shard's version: this pusher is its only writer
        self.loop = asyncio.new_event_loop()
        self.ctx = zmq.asyncio.Context()
        self.client = ShardClient(
            shard.shard_id,
            shard.data_address,
            shard.pub_address,
            FINGERPRINT,
            worker_id,
            self.ctx,
            ack_timeout=timeout_s,
            fetch_timeout=timeout_s,
        )
        try:
            self.loop.run_until_complete(self.client.start())
        except BaseException:
            self.close()
            raise

    def push(self, encode: Callable[[], Encoded]) -> None:
        """Encode, chunk and push one update; return once every chunk is acknowledged."""
        self.loop.run_until_complete(self._push(encode))

    def fetch(self, dest: np.ndarray, since: int = -1) -> int:
        """Fetch the range into ``dest`` (only what changed after ``since`` when >= 0)."""
        version, _ = self.loop.run_until_complete(self.client.fetch(dest, since))
        if version != self.version:
            raise RuntimeError(f"fetched version {version}, expected {self.version}")
        return version

    async def _push(self, encode: Callable[[], Encoded]) -> None:
        encoded = encode()  # what Replica.push does, minus giving back what was lost
        self.seq += 1
        template = wire.Header(
            kind=wire.PUSH,
            fingerprint=FINGERPRINT,
            shard=self.shard_id,
            worker=self.worker_id,
            seq=self.seq,
            base_version=self.version,
            incarnation=self.incarnation,
        )
        if encoded.indices is None:
            chunks = list(wire.dense_chunks(template, encoded.values, self.chunk_bytes))
        else:
            chunks = list(
                wire.sparse_chunks(template, encoded.indices, encoded.values, self.chunk_bytes)
            )
        done: asyncio.Future[PushResult] = self.loop.create_future()
        if not await self.client.push(self.seq, chunks, done.set_result, self.timeout_s):
            raise TimeoutError("no push permit freed in time")
        result = await done
        if not result.complete:
            raise RuntimeError(f"push {self.seq} not applied: {result.statuses}")
        self.version += 1

    def close(self) -> None:
        if self.loop.is_closed():
            return
        self.loop.run_until_complete(self.client.aclose())
        self.loop.close()
        self.ctx.term()

    def __enter__(self) -> Pusher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
