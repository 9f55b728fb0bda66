"""Replicated shards: a range held by a primary and ``replicas - 1`` backups.

The primary applies a push chunk as before, forwards the same frames to every backup (in
the order it applied them, numbered), and holds the worker's ACK until every backup
confirmed that forward: an acknowledged chunk is applied on every live replica of its
range. The at-most-once books travel with the values (in the snapshot a backup starts
from, and by applying the same pushes with the same headers), so a worker that resends a
chunk to a promoted backup gets DUPLICATE for what was already applied, and an apply
for what was not: each acknowledged update counts exactly once. See docs/design.md,
"Replicated shards", for why this primary-backup scheme and not a chain.

- :class:`Chain` is the primary's bookkeeping (no sockets): who its backups are, what
  each confirmed, which ACKs wait for them.
- :func:`state_messages` is the snapshot a joining backup starts from.
- :class:`Follower` is the backup's side: a DEALER to its primary that joins, installs
  the snapshot, applies forwards, confirms them, and says when the primary is gone.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import zmq
import zmq.asyncio
from zmq.utils.monitor import parse_monitor_message

from dsgd import wire
from dsgd.errors import ProtocolError
from dsgd.security import Security
from dsgd.shard.core import ShardCore
from dsgd.sockets import connect_address

log = logging.getLogger("dsgd.replication")

BOOKS = "books"  # the STATE piece that carries the at-most-once books; it comes last
JOIN_TIMEOUT = 30.0  # seconds a backup waits for its primary's first state piece
CATCH_UP_TIMEOUT = 600.0  # ... and for the whole state (300 MB at 75M parameters)

Frames = list[Any]
Outgoing = list[tuple[bytes, Frames]]  # (peer identity, message) to send on the ROUTER


@dataclass
class Backup:
    identity: bytes
    replica: int
    incarnation: int
    confirmed: int  # the last forward it confirmed


@dataclass
class Chain:
    """What a primary knows of its backups. Every method is a quick, synchronous step
    of the shard's loop; what it returns is for the caller to send."""

    backups: dict[bytes, Backup] = field(default_factory=dict)
    forwarded: int = 0  # forwards numbered so far
    _held: deque[tuple[int, bytes, Frames]] = field(default_factory=deque)

    def join(self, identity: bytes, replica: int, incarnation: int) -> None:
        """Take a backup (a newer process of the same replica replaces the older one)."""
        for known, backup in list(self.backups.items()):
            if backup.replica == replica:
                del self.backups[known]
        self.backups[identity] = Backup(identity, replica, incarnation, self.forwarded)
        log.info("backup replica %d (incarnation %x) joined", replica, incarnation)

    def forward(self, frames: Frames) -> Outgoing:
        """The messages that hand one handled push (its frames) to every backup."""
        if not self.backups:
            return []
        self.forwarded += 1
        header = wire.pack_header(
            wire.Header(kind=wire.REPLICATE, fingerprint=0, shard=0, seq=self.forwarded)
        )
        return [(identity, [header, *frames]) for identity in self.backups]

    def hold(self, identity: bytes, frames: Frames) -> Outgoing:
        """An ACK for ``identity``: sent now when every backup has what it acknowledges,
        else held until they confirmed it."""
        if self.watermark() >= self.forwarded:
            return [(identity, frames)]
        self._held.append((self.forwarded, identity, frames))
        return []

    def confirm(self, identity: bytes, seq: int) -> Outgoing:
        backup = self.backups.get(identity)
        if backup is not None and backup.confirmed < seq <= self.forwarded:
            backup.confirmed = seq
        return self._release()

    def prune(self, allowed: set[tuple[int, int]]) -> Outgoing:
        """Drop the backups the coordinator no longer counts (dead, replaced)."""
        for identity, backup in list(self.backups.items()):
            if (backup.replica, backup.incarnation) not in allowed:
                del self.backups[identity]
                log.warning("backup replica %d left the chain", backup.replica)
        return self._release()

    def clear(self) -> Outgoing:
        self.backups.clear()
        return self._release()

    def watermark(self) -> int:
        """The last forward every backup confirmed."""
        return min((b.confirmed for b in self.backups.values()), default=self.forwarded)

    def _release(self) -> Outgoing:
        mark, out = self.watermark(), []
        while self._held and self._held[0][0] <= mark:
            _, identity, frames = self._held.popleft()
            out.append((identity, frames))
        return out

    @property
    def holding(self) -> int:
        return len(self._held)


def state_messages(core: ShardCore) -> list[Frames]:
    """The snapshot a joining backup starts from: parameters, optimizer state (in chunks
    copied now, so pushes applied while they travel do not show), then the books."""
    state = core.state
    arrays = {"params": state.params, **{f"opt/{k}": v for k, v in state.opt_state.items()}}
    pieces: list[tuple[str, int, np.ndarray | bytes]] = []
    for name, array in arrays.items():
        for start, stop in wire.chunk_bounds(array.size, 4, core.chunk_bytes):
            pieces.append((name, start, array[start:stop].copy()))
    pieces.append((BOOKS, 0, core.export_books()))
    out = []
    for i, (name, start, data) in enumerate(pieces):
        header = wire.Header(
            kind=wire.STATE,
            fingerprint=core.fingerprint,
            shard=core.shard_id,
            chunk=i,
            nchunks=len(pieces),
            version=state.version,
            offset=start,
            count=len(data) if isinstance(data, bytes) else data.size,
            about=name,
            incarnation=core.incarnation,
        )
        out.append([wire.pack_header(header), data])
    return out


Install = Callable[[np.ndarray, dict[str, np.ndarray], int, bytes], None]


class Follower:
    """A backup's link to its primary: join, take the state, apply and confirm forwards.

    ``install(params, opt_state, version, books)`` takes the snapshot (the shard process
    installs it in its core); ``caught_up`` is set from then on. :meth:`run` returns when
    the primary is gone (its connection dropped, or it never answered the join): the
    caller then asks the coordinator to promote a backup.
    """

    def __init__(
        self,
        core: ShardCore,
        primary_address: str,
        replica: int,
        context: zmq.asyncio.Context,
        install: Install,
        size: int,
        security: Security | None = None,
    ) -> None:
        self.core = core
        self.size = size  # parameters in the range
        self.primary_address = primary_address
        self.replica = replica
        self.install = install
        self.caught_up = asyncio.Event()
        self._ctx = context
        self._security = security
        self.applied = 0  # forwards applied

    async def run(self) -> str:
        """Follow the primary until it is gone; return why it is considered gone."""
        dealer = self._ctx.socket(zmq.DEALER)
        dealer.setsockopt(zmq.LINGER, 0)
        dealer.setsockopt(zmq.RCVHWM, 100_000)
        if self._security is not None:
            self._security.curve_client(dealer)
        monitor = dealer.get_monitor_socket(zmq.EVENT_DISCONNECTED)
        try:
            dealer.connect(connect_address(self.primary_address))
            join = wire.Header(
                kind=wire.JOIN,
                fingerprint=self.core.fingerprint,
                shard=self.core.shard_id,
                worker=self.replica,
                incarnation=self.core.incarnation,
            )
            await dealer.send(wire.pack_header(join))
            gone = asyncio.ensure_future(_disconnected(monitor))
            following = asyncio.ensure_future(self._follow(dealer))
            try:
                done, _ = await asyncio.wait({gone, following}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for task in (gone, following):
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await task
            if following in done:
                return str(following.result())
            return f"the connection to its primary at {self.primary_address} dropped"
        finally:
            dealer.disable_monitor()
            monitor.close(linger=0)
            dealer.close(linger=0)

    async def _follow(self, dealer: zmq.asyncio.Socket) -> str:
        try:
            await asyncio.wait_for(self._catch_up(dealer), CATCH_UP_TIMEOUT)
        except TimeoutError:
            return f"its primary at {self.primary_address} sent no state in time"
        while True:
            frames = await dealer.recv_multipart(copy=False)
            confirmed = self._apply(frames)
            # apply what else arrived, then confirm them all at once
            while int(dealer.get(zmq.EVENTS)) & zmq.POLLIN:
                confirmed = self._apply(await dealer.recv_multipart(copy=False)) or confirmed
            if confirmed:
                confirm = wire.Header(
                    kind=wire.CONFIRM,
                    fingerprint=self.core.fingerprint,
                    shard=self.core.shard_id,
                    seq=confirmed,
                )
                await dealer.send(wire.pack_header(confirm))

    def _apply(self, frames: list[Any]) -> int:
        """Apply one forward; its number (0 for anything else)."""
        header = _header(frames)
        if header is None or header.kind != wire.REPLICATE:
            return 0
        self.core.handle(frames[1:], [], replicated=True)
        self.applied += 1
        return header.seq

    async def _catch_up(self, dealer: zmq.asyncio.Socket) -> None:
        arrays: dict[str, np.ndarray] = {}
        if not await dealer.poll(JOIN_TIMEOUT * 1000):
            raise TimeoutError
        while True:
            frames = await dealer.recv_multipart(copy=False)
            header = _header(frames)
            if header is None or header.kind != wire.STATE or len(frames) != 2:
                continue
            data = frames[1].buffer
            if header.about == BOOKS:
                params = arrays.pop("params", None)
                if params is None:
                    raise ProtocolError("the primary's state came without parameters")
                opt = {name.removeprefix("opt/"): a for name, a in arrays.items()}
                self.install(params, opt, header.version, bytes(data))
                self.caught_up.set()
                log.info(
                    "shard %d replica %d caught up with its primary at version %d",
                    self.core.shard_id,
                    self.replica,
                    header.version,
                )
                return
            values = np.frombuffer(data, np.float32)
            if header.offset + values.size > self.size:
                raise ProtocolError("the primary's state is larger than this shard's range")
            target = arrays.setdefault(header.about, np.empty(self.size, np.float32))
            target[header.offset : header.offset + values.size] = values


def _header(frames: list[Any]) -> wire.Header | None:
    try:
        return wire.unpack_header(frames[0].bytes if hasattr(frames[0], "bytes") else frames[0])
    except (ProtocolError, IndexError):
        return None


async def _disconnected(monitor: zmq.asyncio.Socket) -> None:
    while True:
        event = parse_monitor_message(await monitor.recv_multipart())
        if event["event"] == zmq.EVENT_DISCONNECTED:
            return
