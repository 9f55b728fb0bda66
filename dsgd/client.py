"""The worker side of the data plane: one :class:`ShardClient` per parameter shard.

A client owns a DEALER socket (pushes and fetches) and a SUB socket (the shard's
version broadcasts). Pushes are fire-and-forget for the caller, but each holds one
of ``max_inflight`` permits until every chunk is acknowledged, so a slow shard makes
the worker wait instead of letting memory grow. Every wait has a timeout, and a
shard that stops answering surfaces as :class:`~dsgd.errors.PeerLost`.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import zmq
import zmq.asyncio

from dsgd import wire
from dsgd.errors import Closed, ConfigError, PeerLost, ProtocolError
from dsgd.types import FlatParams

log = logging.getLogger("dsgd.client")

PushDone = Callable[[int, list[str]], None]
LOST = "lost"  # the status of a chunk never acknowledged (timeout, or the client closed)


@dataclass
class _PendingPush:
    nchunks: int
    done: asyncio.Future[list[str]]
    statuses: dict[int, str] = field(default_factory=dict)


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
        incarnation: int = 0,
    ) -> None:
        self.shard_id = shard_id
        self.data_address = data_address
        self.pub_address = pub_address
        self.fingerprint = fingerprint
        self.worker_id = worker_id
        self.worker_incarnation = incarnation
        self.ack_timeout = ack_timeout
        self.fetch_timeout = fetch_timeout
        self._ctx = context
        self._permits = asyncio.Semaphore(max_inflight)
        self._pushes: dict[int, _PendingPush] = {}
        self._fetches: dict[int, _PendingFetch] = {}
        self._request_ids = itertools.count(1)
        self._tasks: set[asyncio.Task[Any]] = set()
        self._dealer: zmq.asyncio.Socket | None = None
        self._sub: zmq.asyncio.Socket | None = None
        self._closed = False
        self.broadcast_version = -1  # the latest version the shard announced
        self.incarnation = 0  # the shard incarnation last seen (ack, reply or broadcast)
        self.last_heard = time.monotonic()
        self.bytes_pushed = 0
        self.bytes_fetched = 0
        self.errors: list[str] = []

    async def start(self) -> None:
        wire.keep_frame_memory()  # parameter replies arrive as 1 MiB frames too
        dealer = self._ctx.socket(zmq.DEALER)
        sub = self._ctx.socket(zmq.SUB)
        for sock in (dealer, sub):
            sock.setsockopt(zmq.LINGER, 0)
        dealer.setsockopt(zmq.SNDHWM, 100_000)
        dealer.setsockopt(zmq.RCVHWM, 100_000)
        sub.setsockopt(zmq.SUBSCRIBE, b"")
        try:
            dealer.connect(self.data_address)
            sub.connect(self.pub_address)
        except zmq.ZMQError as exc:
            dealer.close(linger=0)
            sub.close(linger=0)
            raise ConfigError(
                f"cannot connect to shard {self.shard_id} at {self.data_address} / "
                f"{self.pub_address}: {exc}"
            ) from None
        self._dealer, self._sub = dealer, sub
        self._spawn(self._receive_loop(), "receive")
        self._spawn(self._broadcast_loop(), "broadcast")

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
        futures: list[asyncio.Future[Any]] = [p.done for p in self._pushes.values()]
        futures += [f.done for f in self._fetches.values()]
        for future in futures:
            if not future.done():
                future.set_exception(Closed("client closed"))
                future.exception()  # mark retrieved
        for sock in (self._dealer, self._sub):
            if sock is not None:
                sock.close(linger=0)

    # -- push ------------------------------------------------------------------------------

    @property
    def inflight(self) -> int:
        return len(self._pushes)

    def silent_for(self) -> float:
        """Seconds since the shard was last heard from (reply or version broadcast)."""
        return time.monotonic() - self.last_heard

    async def push(
        self, seq: int, messages: list[list[Any]], on_done: PushDone, permit_timeout: float
    ) -> bool:
        """Send one push (its chunk messages) once a permit is free; False if none freed.

        Returns when the chunks are queued. ``on_done(seq, statuses)`` is called once,
        when every chunk is acknowledged or after ``ack_timeout``, with one status per
        chunk (``LOST`` for the unacknowledged), so the caller can resend what was lost.
        """
        if self._closed or self._dealer is None:
            raise Closed("push on a closed ShardClient")
        try:
            await asyncio.wait_for(self._permits.acquire(), permit_timeout)
        except TimeoutError:
            return False
        future: asyncio.Future[list[str]] = asyncio.get_running_loop().create_future()
        self._pushes[seq] = _PendingPush(len(messages), future)
        try:
            for frames in messages:
                self.bytes_pushed += wire.payload_bytes(frames)
                await self._dealer.send_multipart(frames, copy=False)
        except BaseException:
            self._pushes.pop(seq, None)
            self._permits.release()
            raise
        self._spawn(self._await_acks(seq, future, on_done), f"acks-{seq}")
        return True

    async def _await_acks(
        self, seq: int, future: asyncio.Future[list[str]], on_done: PushDone
    ) -> None:
        pending = self._pushes[seq]
        try:
            await asyncio.wait_for(asyncio.shield(future), self.ack_timeout)
        except TimeoutError:
            log.warning(
                "shard %d did not acknowledge push %d within %.0f s",
                self.shard_id,
                seq,
                self.ack_timeout,
            )
        except Closed:
            pass
        finally:
            self._pushes.pop(seq, None)
            self._permits.release()
            on_done(seq, [pending.statuses.get(i, LOST) for i in range(pending.nchunks)])

    async def drain(self) -> None:
        """Wait until every push in flight is acknowledged or failed (bound it with a timeout)."""
        while self._pushes:
            await asyncio.wait([p.done for p in self._pushes.values()])
            await asyncio.sleep(0)  # let the ack waiters run and release their permits

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
        try:
            await self._dealer.send_multipart(wire.encode(header))
            version = await asyncio.wait_for(future, self.fetch_timeout)
        except TimeoutError:
            raise PeerLost(
                f"shard {self.shard_id} at {self.data_address} did not answer a fetch "
                f"within {self.fetch_timeout:.0f} s"
            ) from None
        finally:
            self._fetches.pop(request, None)
        self.bytes_fetched += pending.bytes
        return version, pending.bytes

    # -- receiving -------------------------------------------------------------------------

    async def _receive_loop(self) -> None:
        assert self._dealer is not None
        while True:
            frames = await self._dealer.recv_multipart(copy=False)
            self.last_heard = time.monotonic()
            try:
                header, arrays = wire.decode(frames)
            except ProtocolError as exc:
                log.warning("shard %d sent a malformed message: %s", self.shard_id, exc)
                continue
            self.incarnation = header.incarnation
            if header.kind == wire.ACK:
                self._on_ack(header)
            elif header.kind == wire.PARAMS:
                self._on_params(header, arrays, wire.payload_bytes(frames))
            elif header.kind == wire.ERROR:
                self._on_error(header)

    def _on_ack(self, header: wire.Header) -> None:
        pending = self._pushes.get(header.seq)
        if pending is None or pending.done.done():
            return
        pending.statuses[header.chunk] = header.status
        if len(pending.statuses) >= pending.nchunks:
            pending.done.set_result([pending.statuses[i] for i in sorted(pending.statuses)])

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
        self.errors.append(header.status)
        error = ProtocolError(f"shard {self.shard_id} refused a request: {header.status}")
        fetch = self._fetches.get(header.seq) if header.about == wire.FETCH else None
        if fetch is not None and not fetch.done.done():
            fetch.done.set_exception(error)
            return
        push = self._pushes.get(header.seq) if header.about == wire.PUSH else None
        if push is not None and not push.done.done():
            push.statuses[header.chunk] = f"rejected: {header.status}"
            if len(push.statuses) >= push.nchunks:
                push.done.set_result([push.statuses[i] for i in sorted(push.statuses)])
        else:
            log.warning("shard %d: %s", self.shard_id, header.status)

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
