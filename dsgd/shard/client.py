"""The other end of a shard's data plane: one :class:`ShardClient` per shard, per worker.

A client owns a DEALER socket (pushes and fetches) and a SUB socket (the shard's
version broadcasts). Pushes are fire-and-forget for the caller, but each holds one
of ``max_inflight`` permits until every chunk is acknowledged, so a slow shard makes
the worker wait instead of letting memory grow. The client is the one place that
tracks a push: it resolves to one :class:`PushResult` that lists the chunks never
applied, so the caller can resend exactly those. Every wait has a timeout, and a
shard that stops answering surfaces as :class:`~dsgd.errors.PeerLost`.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np
import zmq
import zmq.asyncio
from zmq.utils.monitor import parse_monitor_message

from dsgd import wire
from dsgd.errors import Closed, ConfigError, PeerLost, ProtocolError
from dsgd.security import Security
from dsgd.sockets import LoopSocket, connect_address
from dsgd.types import FlatParams, ShardInfo
from dsgd.wire import AckStatus

log = logging.getLogger("dsgd.client")

SHARD_SILENT = 2.0  # seconds without a word from a shard before it counts as unavailable
BATCH = 64  # replies read before other tasks get a turn
NOT_PRIMARY_RETRY = 0.02  # s before resending a chunk a backup turned away


class PushResult(NamedTuple):
    """What became of one push, once every chunk was acknowledged or given up on."""

    seq: int
    statuses: list[AckStatus | None]  # per chunk; None: never acknowledged
    lost: list[wire.Chunk]  # chunks never acknowledged (timeout, or the client closed)
    rejected: list[str]  # why, for each chunk the shard refused

    @property
    def complete(self) -> bool:
        """Every chunk was applied (or was a duplicate of one that was)."""
        return all(s in (AckStatus.APPLIED, AckStatus.DUPLICATE) for s in self.statuses)


PushDone = Callable[[PushResult], None]


@dataclass
class _PendingPush:
    chunks: Sequence[wire.Chunk]
    on_done: PushDone
    expiry: asyncio.TimerHandle | None = None
    statuses: dict[int, AckStatus] = field(default_factory=dict)
    reasons: list[str] = field(default_factory=list)

    def settle(self, chunk: int, status: AckStatus, reason: str = "") -> bool:
        """Record one chunk's fate; True once every chunk has one."""
        if chunk not in self.statuses and 0 <= chunk < len(self.chunks):
            self.statuses[chunk] = status
            if status == AckStatus.REJECTED:
                self.reasons.append(reason)
        return len(self.statuses) == len(self.chunks)

    def result(self, seq: int) -> PushResult:
        statuses = [self.statuses.get(i) for i in range(len(self.chunks))]
        lost = [c for c, s in zip(self.chunks, statuses, strict=True) if s is None]
        return PushResult(seq, statuses, lost, self.reasons)


@dataclass
class _PendingFetch:
    dest: FlatParams
    done: asyncio.Future[int]
    received: set[int] = field(default_factory=set)
    bytes: int = 0


class ShardClient:
    """Pushes to and fetches from one shard, with backpressure and timeouts."""

    def __init__(
        self,
        shard_id: int,
        data_address: str,
        pub_address: str,
        fingerprint: int,
        worker_id: int,
        context: zmq.asyncio.Context,
        *,
        max_inflight: int = 4,
        ack_timeout: float = 10.0,
        fetch_timeout: float = 10.0,
        security: Security | None = None,
        replicated: bool = False,
    ) -> None:
        self.shard_id = shard_id
        # a replicated range (--replicas above 1): ``lost`` is set when the connection to
        # the shard drops (its process died), so the owner can ask at once where the range
        # is served now; and a push that outlives ``ack_timeout`` is sent again as it was
        # (its at-most-once books make that safe; an ACK can be held that long while a
        # backup is dropped), not given up, which would apply it a second time
        self.replicated = replicated
        self.lost: asyncio.Event | None = asyncio.Event() if replicated else None
        self._monitor: zmq.asyncio.Socket | None = None
        self.security = security  # CURVE keys, for a cluster started with --secure
        self.data_address = data_address
        self.pub_address = pub_address
        self.fingerprint = fingerprint
        self.worker_id = worker_id
        self.ack_timeout = ack_timeout
        self.fetch_timeout = fetch_timeout
        self._ctx = context
        self._permits = asyncio.Semaphore(max_inflight)
        self._pushes: dict[int, _PendingPush] = {}
        self._settled: asyncio.Event | None = None  # set when the last push in flight settles
        self._fetches: dict[int, _PendingFetch] = {}
        self._request_ids = itertools.count(1)
        self._tasks: set[asyncio.Task[Any]] = set()
        self._dealer: LoopSocket | None = None
        self._sub: zmq.asyncio.Socket | None = None
        self._closed = False
        self.broadcast_version = -1  # the latest version the shard announced
        self.incarnation = 0  # the shard incarnation last seen (ack, reply or broadcast)
        self.last_heard = time.monotonic()
        self.bytes_pushed = 0
        self.pushes_resent = 0  # (replicated) pushes sent again after ack_timeout
        self.connected_to = ""
        # the highest version an APPLIED ack named, per shard incarnation (the last two):
        # what the coordinator needs to count acknowledged pushes a restart lost
        self.acked_versions: dict[int, int] = {}

    async def start(self) -> None:
        wire.keep_frame_memory()  # parameter replies arrive as 1 MiB frames too
        dealer: zmq.Socket[Any] = zmq.Socket(self._ctx, zmq.DEALER)
        sub = self._ctx.socket(zmq.SUB)
        for sock in (dealer, sub):
            sock.setsockopt(zmq.LINGER, 0)
            if self.security is not None:
                self.security.curve_client(sock)
        dealer.setsockopt(zmq.SNDHWM, 100_000)
        dealer.setsockopt(zmq.RCVHWM, 100_000)
        sub.setsockopt(zmq.SUBSCRIBE, b"")
        self.connected_to = connect_address(self.data_address)  # a local twin, or TCP
        self._sub_connected_to = connect_address(self.pub_address)
        try:
            dealer.connect(self.connected_to)
            sub.connect(self._sub_connected_to)
        except zmq.ZMQError as exc:
            dealer.close(linger=0)
            sub.close(linger=0)
            raise ConfigError(
                f"cannot connect to shard {self.shard_id} at {self.data_address} / "
                f"{self.pub_address}: {exc}"
            ) from None
        self._dealer, self._sub = LoopSocket(dealer), sub
        if self.lost is not None:
            # (a socket of the asyncio context, as the DEALER is)
            monitor: Any = dealer.get_monitor_socket(zmq.EVENT_DISCONNECTED)
            self._monitor = monitor
            self._spawn(self._watch_loop(monitor), "watch")
        self._spawn(self._receive_loop(), "receive")
        self._spawn(self._broadcast_loop(), "broadcast")

    async def retarget(self, data_address: str, pub_address: str) -> int:
        """Talk to another process serving the same range from now on (a backup promoted
        to primary), and resend there every chunk still unacknowledged, as it was: the
        promoted backup's at-most-once books answer DUPLICATE for what it already applied.
        Fetches still waiting fail with :class:`Closed` (fetch again). Returns the chunks
        resent."""
        if self._closed or self._dealer is None or self._sub is None:
            raise Closed("retarget on a closed ShardClient")
        dealer = self._dealer.sock
        with contextlib.suppress(zmq.ZMQError):  # (already gone)
            dealer.disconnect(self.connected_to)
        with contextlib.suppress(zmq.ZMQError):
            self._sub.disconnect(self._sub_connected_to)
        self.data_address, self.pub_address = data_address, pub_address
        self.connected_to = connect_address(data_address)
        self._sub_connected_to = connect_address(pub_address)
        dealer.connect(self.connected_to)
        self._sub.connect(self._sub_connected_to)
        self.broadcast_version = -1
        self.last_heard = time.monotonic()
        if self.lost is not None:
            self.lost.clear()
        # a fetch the old process never answered would wait out fetch_timeout (10 s of a
        # worker's training stalled per failover): it fails now, and the caller fetches
        # the whole range again from the new one
        for fetch in self._fetches.values():
            if not fetch.done.done():
                fetch.done.set_exception(
                    Closed(f"shard {self.shard_id} moved to {data_address} during a fetch")
                )
        loop = asyncio.get_running_loop()
        resent = 0
        for seq, pending in list(self._pushes.items()):
            resent += await self._send_unacknowledged(seq)
            if pending.expiry is not None:  # a new primary: a full wait for its ACKs
                pending.expiry.cancel()
                pending.expiry = loop.call_later(self.ack_timeout, self._expire_push, seq)
        return resent

    def _spawn(self, coro: Any, what: str) -> asyncio.Task[Any]:
        task = asyncio.create_task(coro, name=f"shard{self.shard_id}-{what}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        for seq in list(self._pushes):
            self._finish_push(seq)  # what was acknowledged so far; the rest is lost
        for fetch in self._fetches.values():
            if not fetch.done.done():
                fetch.done.set_exception(Closed("client closed"))
                fetch.done.exception()  # mark retrieved
        if self._monitor is not None:
            assert self._dealer is not None
            with contextlib.suppress(zmq.ZMQError):
                self._dealer.sock.disable_monitor()
            self._monitor.close(linger=0)
        if self._dealer is not None:
            self._dealer.close()
        if self._sub is not None:
            self._sub.close(linger=0)

    # -- push ------------------------------------------------------------------------------

    @property
    def inflight(self) -> int:
        return len(self._pushes)

    def silent_for(self) -> float:
        """Seconds since the shard was last heard from (reply or version broadcast)."""
        return time.monotonic() - self.last_heard

    async def push(
        self, seq: int, chunks: Sequence[wire.Chunk], on_done: PushDone, permit_timeout: float
    ) -> bool:
        """Send one push (its chunks) once a permit is free; False if none freed in time.

        Returns when the chunks are queued. ``on_done(result)`` is called once, when
        every chunk is acknowledged or after ``ack_timeout``, with a :class:`PushResult`
        listing the chunks never acknowledged, so the caller can resend exactly those.
        """
        if self._closed or self._dealer is None:
            raise Closed("push on a closed ShardClient")
        if self._permits.locked():  # (a free permit is taken without a timer task)
            try:
                await asyncio.wait_for(self._permits.acquire(), permit_timeout)
            except TimeoutError:
                return False
        else:
            await self._permits.acquire()
        pending = self._pushes[seq] = _PendingPush(chunks, on_done)
        try:
            for chunk in chunks:
                self.bytes_pushed += wire.payload_bytes(chunk.frames)
                await self._dealer.send(chunk.frames)
        except BaseException:
            self._pushes.pop(seq, None)
            self._permits.release()
            raise
        if seq in self._pushes:  # (not settled already: the ACKs are read by another task)
            loop = asyncio.get_running_loop()
            pending.expiry = loop.call_later(self.ack_timeout, self._expire_push, seq)
        return True

    def _expire_push(self, seq: int) -> None:
        pending = self._pushes.get(seq)
        resend = self.replicated and pending is not None and not self._closed
        log.warning(
            "shard %d did not acknowledge push %d within %.0f s%s",
            self.shard_id,
            seq,
            self.ack_timeout,
            "; sending it again" if resend else "",
        )
        if not resend or pending is None:
            self._finish_push(seq)
            return
        self.pushes_resent += 1
        self._spawn(self._send_unacknowledged(seq), "resend")
        pending.expiry = asyncio.get_running_loop().call_later(
            self.ack_timeout, self._expire_push, seq
        )

    async def _send_unacknowledged(self, seq: int) -> int:
        """Send push ``seq``'s unacknowledged chunks again, unchanged; how many."""
        pending = self._pushes.get(seq)
        if pending is None or self._dealer is None or self._closed:
            return 0
        sent = 0
        for i, chunk in enumerate(pending.chunks):
            if i not in pending.statuses:
                await self._dealer.send(chunk.frames)
                sent += 1
        return sent

    def _finish_push(self, seq: int) -> None:
        """Hand a push's result to its caller (all chunks settled, timed out or closed)."""
        pending = self._pushes.pop(seq, None)
        if pending is None:
            return
        if pending.expiry is not None:
            pending.expiry.cancel()
        self._permits.release()
        if not self._pushes and self._settled is not None:
            self._settled.set()
        try:
            pending.on_done(pending.result(seq))
        except Exception:  # the caller's bug must not stop this client's receive loop
            log.exception("shard %d: the callback of push %d failed", self.shard_id, seq)

    async def drain(self) -> None:
        """Wait until every push in flight is acknowledged or failed (bound it with a timeout)."""
        while self._pushes:
            self._settled = asyncio.Event()
            await self._settled.wait()

    # -- fetch -----------------------------------------------------------------------------

    async def fetch(self, dest: FlatParams, since: int = -1) -> tuple[int, int]:
        """Fill ``dest`` (this shard's range) with the shard's parameters.

        With ``since >= 0`` only blocks changed after that version are sent (``dest``
        must then hold the parameters as of ``since``). Returns (version, bytes received).
        """
        if self._closed or self._dealer is None:
            raise Closed("fetch on a closed ShardClient")
        request = next(self._request_ids)
        future: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        pending = _PendingFetch(dest, future)
        self._fetches[request] = pending
        header = wire.Header(
            kind=wire.FETCH,
            fingerprint=self.fingerprint,
            shard=self.shard_id,
            worker=self.worker_id,
            seq=request,
            base_version=since,
        )
        expiry = asyncio.get_running_loop().call_later(
            self.fetch_timeout, self._expire_fetch, future
        )
        try:
            await self._dealer.send(wire.encode(header))
            version = await future
        finally:
            expiry.cancel()
            self._fetches.pop(request, None)
        return version, pending.bytes

    def _expire_fetch(self, future: asyncio.Future[int]) -> None:
        if not future.done():
            future.set_exception(
                PeerLost(
                    f"shard {self.shard_id} at {self.data_address} did not answer a fetch "
                    f"within {self.fetch_timeout:.0f} s"
                )
            )

    # -- receiving -------------------------------------------------------------------------

    async def _receive_loop(self) -> None:
        dealer = self._dealer
        assert dealer is not None
        handled = 0
        while True:
            await dealer.readable()
            ready = dealer.recv_ready(BATCH)
            if ready:
                self.last_heard = time.monotonic()
            for frames in ready:
                self._on_message(frames)
            handled += len(ready)
            if handled >= BATCH:  # replies keep coming: let the other tasks run too
                handled = 0
                await asyncio.sleep(0)

    def _on_message(self, frames: list[Any]) -> None:
        try:
            header, arrays = wire.decode(frames)
        except ProtocolError as exc:
            log.warning("shard %d sent a malformed message: %s", self.shard_id, exc)
            return
        self.incarnation = header.incarnation
        if header.kind == wire.ACK:
            self._on_ack(header)
        elif header.kind == wire.PARAMS:
            self._on_params(header, arrays, wire.payload_bytes(frames))
        elif header.kind == wire.ERROR:
            self._on_error(header)

    def _on_ack(self, header: wire.Header) -> None:
        pending = self._pushes.get(header.seq)
        if pending is None:
            return
        try:
            status = AckStatus(header.status)
        except ValueError:
            log.warning("shard %d acknowledged with status %r", self.shard_id, header.status)
            return
        if status == AckStatus.APPLIED:
            known = self.acked_versions
            if header.incarnation not in known and len(known) >= 2:
                del known[next(iter(known))]
            known[header.incarnation] = max(known.get(header.incarnation, 0), header.version)
        settled = False
        for chunk in wire.acked_chunks(header):
            settled = pending.settle(chunk, status, header.reason)
        if settled:
            self._finish_push(header.seq)

    def _on_params(self, header: wire.Header, arrays: list[np.ndarray], nbytes: int) -> None:
        pending = self._fetches.get(header.seq)
        if pending is None or pending.done.done() or header.chunk in pending.received:
            return
        dest = pending.dest
        try:
            if header.encoding == wire.DENSE:
                (values,) = arrays
                if header.offset + header.count > dest.size:
                    raise ProtocolError("parameter chunk beyond this shard's range")
                dest[header.offset : header.offset + header.count] = values
            else:
                indices, values = arrays
                if header.count and int(indices.max()) >= dest.size:
                    raise ProtocolError("parameter index beyond this shard's range")
                dest[indices] = values
        except ProtocolError as exc:
            pending.done.set_exception(exc)
            return
        pending.received.add(header.chunk)
        pending.bytes += nbytes
        if len(pending.received) >= header.nchunks:
            pending.done.set_result(header.version)

    def _on_error(self, header: wire.Header) -> None:
        fetch = self._fetches.get(header.seq) if header.about == wire.FETCH else None
        if fetch is not None and not fetch.done.done():
            refusal = f"shard {self.shard_id} refused a request: {header.reason}"
            fetch.done.set_exception(ProtocolError(refusal))
            return
        push = self._pushes.get(header.seq) if header.about == wire.PUSH else None
        if push is not None and header.status == wire.NOT_PRIMARY:
            # a backup the coordinator just promoted, before it heard so: not a refusal
            self._spawn(self._resend_later(header.seq, header.chunk), "resend")
            return
        if push is not None:
            if push.settle(header.chunk, AckStatus.REJECTED, header.reason):
                self._finish_push(header.seq)
        else:
            log.warning("shard %d: %s", self.shard_id, header.reason)

    async def _resend_later(self, seq: int, chunk: int) -> None:
        """Resend one chunk of push ``seq`` shortly, unless it settled meanwhile (its
        ``ack_timeout`` still bounds the push)."""
        await asyncio.sleep(NOT_PRIMARY_RETRY)
        pending = self._pushes.get(seq)
        if pending is None or chunk in pending.statuses or not 0 <= chunk < len(pending.chunks):
            return
        if self._dealer is not None and not self._closed:
            await self._dealer.send(pending.chunks[chunk].frames)

    async def _watch_loop(self, monitor: zmq.asyncio.Socket) -> None:
        assert self.lost is not None
        while True:
            event = parse_monitor_message(await monitor.recv_multipart())
            if event["event"] == zmq.EVENT_DISCONNECTED:
                self.lost.set()

    async def _broadcast_loop(self) -> None:
        assert self._sub is not None
        while True:
            frame = await self._sub.recv()
            try:
                header = wire.unpack_header(frame)
            except ProtocolError:
                continue
            if (
                header.kind == wire.VERSION
                and header.shard == self.shard_id
                and header.fingerprint == self.fingerprint
            ):
                self.broadcast_version = header.version
                self.incarnation = header.incarnation
                self.last_heard = time.monotonic()


class ParameterReader:
    """Reads the whole flat vector from every shard, like a worker's full fetch.

    For the evaluator and the coordinator's final parameters: one client per shard,
    replaced when the shard restarts (a new incarnation) or moves.
    """

    def __init__(
        self,
        fingerprint: int,
        context: zmq.asyncio.Context,
        *,
        fetch_timeout: float = 10.0,
        security: Security | None = None,
    ) -> None:
        self.fingerprint = fingerprint
        self.fetch_timeout = fetch_timeout
        self.security = security
        self._ctx = context
        self._clients: dict[int, tuple[ShardInfo, ShardClient]] = {}

    async def read(self, shards: Sequence[ShardInfo], out: FlatParams) -> int:
        """Fill ``out`` with every shard's range; return the sum of their versions.

        Raises PeerLost when a shard is silent or does not answer in time.
        """
        total = 0
        for info in shards:
            client = await self._client(info)
            if client.broadcast_version >= 0 and client.silent_for() > SHARD_SILENT:
                raise PeerLost(f"shard {info.shard_id} silent for {client.silent_for():.0f} s")
            version, _ = await client.fetch(out[info.start : info.stop])
            total += version
        return total

    async def _client(self, info: ShardInfo) -> ShardClient:
        known = self._clients.get(info.shard_id)
        if known is not None and known[0] == info:
            return known[1]
        if known is not None:
            await known[1].aclose()
        client = ShardClient(
            info.shard_id,
            info.data_address,
            info.pub_address,
            self.fingerprint,
            -1,
            self._ctx,
            fetch_timeout=self.fetch_timeout,
            security=self.security,
        )
        await client.start()
        self._clients[info.shard_id] = (info, client)
        return client

    async def aclose(self) -> None:
        for _, client in self._clients.values():
            await client.aclose()
        self._clients.clear()
