"""Replicated shards: a range held by a primary and ``replicas - 1`` backups.

The primary applies a push chunk as before, forwards the same frames to every backup (in
the order it applied them, numbered), and holds the worker's ACK until every backup that
installed its snapshot confirmed that forward: an acknowledged chunk is applied on every
replica the coordinator may promote. The at-most-once books travel with the values (in
the snapshot a backup starts from, and by applying the same pushes with the same
headers), so a worker that resends a chunk to a promoted backup gets DUPLICATE for what
was already applied, and an apply for what was not: each acknowledged update counts
exactly once. See docs/design.md, "Replicated shards", for why this primary-backup
scheme and not a chain.

- :class:`Chain` is the primary's bookkeeping (no sockets): who its backups are, what
  each confirmed, which ACKs wait for them, which backups hold all it acknowledged (the
  ones it reports to the coordinator as promotable).
- :func:`state_messages` is the snapshot a joining backup starts from.
- :class:`Follower` is the backup's side of one join: a DEALER to its primary that
  joins, installs the snapshot, applies forwards, confirms them, and says why the join
  ended (the primary's connection dropped, or it is to be made again).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

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
MAX_BACKLOG_BYTES = 2 << 30  # forwards a primary queues for one backup, unconfirmed
HEARTBEAT_IVL_MS = 1000  # a backup's ZeroMQ heartbeats to its primary, and how long
HEARTBEAT_TIMEOUT_MS = 5000  # it waits for traffic before its connection counts as dropped

Frames = list[Any]
Outgoing = list[tuple[bytes, Frames]]  # (peer identity, message) to send on the ROUTER


@dataclass
class Backup:
    identity: bytes
    replica: int
    incarnation: int
    joins: int  # which of its process's joins this is
    confirmed: int  # the last forward it confirmed (the snapshot it started from: all before)
    counted: bool = False  # it installed the snapshot: the ACKs wait for its confirmations
    leaving: bool = False  # its connection broke: dropped once the coordinator knows
    backlog: deque[tuple[int, int]] = field(default_factory=deque)  # (forward, bytes) sent,
    backlog_bytes: int = 0  # not confirmed yet


@dataclass
class Chain:
    """What a primary knows of its backups. Every method is a quick, synchronous step
    of the shard's loop; what it returns is for the caller to send.

    The rule that keeps promotions safe: the primary stops waiting for a counted backup
    only once the coordinator knows it may no longer promote it (it said so in the
    heartbeat reply, :meth:`prune`; or the primary told it, :meth:`lose` then
    :meth:`forget`; or the backup itself said it joins again). :meth:`report` lists
    the backups that hold every update acknowledged so far, the only ones the
    coordinator promotes; ``report_due`` is set when that list changes.
    """

    backups: dict[bytes, Backup] = field(default_factory=dict)
    forwarded: int = 0  # forwards numbered so far
    released: int = 0  # the highest forward an ACK sent so far waited for
    report_due: asyncio.Event = field(default_factory=asyncio.Event)
    # messages for backups that are not forwards (join again): the server sends them
    notices: Outgoing = field(default_factory=list)
    _held: deque[tuple[int, bytes, Frames]] = field(default_factory=deque)

    def join(self, identity: bytes, replica: int, incarnation: int, joins: int) -> Outgoing | None:
        """Take a backup; it replaces any older join of the same replica (whose process
        told the coordinator it joins again before it sent this). None: this join is
        older than one taken already (read late from a connection since closed)."""
        for known, backup in list(self.backups.items()):
            if backup.replica != replica:
                continue
            if backup.incarnation == incarnation and backup.joins >= joins:
                return None
            if self.ready(backup):
                self.report_due.set()
            del self.backups[known]
        self.backups[identity] = Backup(identity, replica, incarnation, joins, self.forwarded)
        log.info("backup replica %d (incarnation %x) joined", replica, incarnation)
        return self._release()

    def forward(self, frames: Frames, version: int) -> Outgoing:
        """The messages that hand one handled push (its frames; the shard's ``version``
        after it) to every backup. A backup that fell more than MAX_BACKLOG_BYTES behind
        (stalled while catching up, say) leaves instead: the primary does not queue
        forwards without bound."""
        if not self.backups:
            return []
        self.forwarded += 1
        header = wire.pack_header(
            wire.Header(
                kind=wire.REPLICATE, fingerprint=0, shard=0, seq=self.forwarded, version=version
            )
        )
        size = wire.payload_bytes(frames)
        out: Outgoing = []
        for backup in list(self.backups.values()):
            if backup.leaving:
                continue
            if backup.backlog_bytes + size > MAX_BACKLOG_BYTES:
                log.warning("backup replica %d fell too far behind", backup.replica)
                self.lose(backup.identity)
                continue
            backup.backlog.append((self.forwarded, size))
            backup.backlog_bytes += size
            out.append((backup.identity, [header, *frames]))
        return out

    def hold(self, identity: bytes, frames: Frames) -> Outgoing:
        """An ACK for ``identity``: sent now when every backup has what it acknowledges,
        else held until they confirmed it."""
        if self.watermark() >= self.forwarded:
            self.released = self.forwarded
            return [(identity, frames)]
        self._held.append((self.forwarded, identity, frames))
        return []

    def confirm(self, identity: bytes, seq: int) -> Outgoing:
        """A backup applied every forward up to ``seq`` (0: it installed its snapshot).
        One this chain does not know (dropped, or confirming to an older chain of this
        process) is told to join again."""
        backup = self.backups.get(identity)
        if backup is None:
            self.notices.append((identity, _rejoin("this primary does not count this backup")))
            return []
        if backup.leaving:
            return []
        was_ready = self.ready(backup)
        backup.counted = True
        if backup.confirmed < seq <= self.forwarded:
            backup.confirmed = seq
        while backup.backlog and backup.backlog[0][0] <= backup.confirmed:
            backup.backlog_bytes -= backup.backlog.popleft()[1]
        out = self._release()
        if self.ready(backup) and not was_ready:
            self.report_due.set()
        return out

    def lose(self, identity: bytes) -> None:
        """A backup's connection broke. One still catching up goes at once; a counted
        one keeps holding the ACKs until the coordinator knows (:meth:`forget`)."""
        backup = self.backups.get(identity)
        if backup is None or backup.leaving:
            return
        if not backup.counted:
            del self.backups[identity]
            return
        backup.leaving = True
        log.warning("backup replica %d is unreachable", backup.replica)
        self.report_due.set()

    def waited_on(self) -> list[bytes]:
        """The backups the oldest held ACK waits for (to probe: is their link still up?)."""
        if not self._held:
            return []
        index = self._held[0][0]
        return [
            b.identity
            for b in self.backups.values()
            if b.counted and not b.leaving and b.confirmed < index
        ]

    def leaving(self) -> set[bytes]:
        return {b.identity for b in self.backups.values() if b.leaving}

    def forget(self, identities: set[bytes]) -> Outgoing:
        """Drop backups that were leaving when the coordinator last heard this chain."""
        for identity in identities:
            backup = self.backups.get(identity)
            if backup is not None and backup.leaving:
                del self.backups[identity]
                log.warning("backup replica %d left the chain", backup.replica)
        return self._release()

    def prune(self, allowed: set[tuple[int, int]]) -> Outgoing:
        """Drop the backups the coordinator no longer counts (dead, replaced), and tell
        each to join again (in ``notices``: one that was only slow still hears it)."""
        for identity, backup in list(self.backups.items()):
            if (backup.replica, backup.incarnation) not in allowed:
                del self.backups[identity]
                log.warning("backup replica %d left the chain", backup.replica)
                reason = "the coordinator stopped counting this backup"
                self.notices.append((identity, _rejoin(reason)))
        return self._release()

    def ready(self, backup: Backup) -> bool:
        """Whether the backup holds every update this primary acknowledged."""
        return backup.counted and not backup.leaving and backup.confirmed >= self.released

    def report(self) -> list[Backup]:
        """The backups the coordinator may promote."""
        return [b for b in self.backups.values() if self.ready(b)]

    def watermark(self) -> int:
        """The last forward every counted backup confirmed."""
        counted = [b.confirmed for b in self.backups.values() if b.counted]
        return min(counted, default=self.forwarded)

    def _release(self) -> Outgoing:
        mark, out = self.watermark(), []
        while self._held and self._held[0][0] <= mark:
            index, identity, frames = self._held.popleft()
            self.released = max(self.released, index)
            out.append((identity, frames))
        return out

    @property
    def holding(self) -> int:
        return len(self._held)


def _rejoin(reason: str) -> Frames:
    header = wire.Header(
        kind=wire.ERROR,
        fingerprint=0,
        shard=0,
        about=wire.JOIN,
        status=wire.REJOIN,
        reason=f"{reason}; join again",
    )
    return [wire.pack_header(header)]


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


class Ended(NamedTuple):
    """Why a :class:`Follower` stopped following."""

    gone: bool  # the connection to the primary dropped: it may be dead (ask for promotion)
    why: str


class _Refused(Exception):
    """The primary turned the join away, or dropped this backup: join again."""


class Follower:
    """A backup's link to its primary, for one join: join, take the state, apply and
    confirm forwards.

    ``install(params, opt_state, version, books)`` takes the snapshot (the shard process
    installs it in its core); ``caught_up`` is set from then on. :meth:`run` returns
    when this join is over, saying whether the primary's connection dropped (the caller
    asks the coordinator to promote a backup) or the join is to be made again (the
    process was not primary yet, dropped this backup, or did not answer).
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
        joins: int = 1,
    ) -> None:
        self.core = core
        self.size = size  # parameters in the range
        self.primary_address = primary_address
        self.replica = replica
        self.joins = joins  # which join of this process this is (the coordinator knows)
        self.install = install
        self.caught_up = asyncio.Event()
        self._ctx = context
        self._security = security

    async def run(self) -> Ended:
        """Follow the primary until this join is over; say why it ended."""
        dealer = self._ctx.socket(zmq.DEALER)
        dealer.setsockopt(zmq.LINGER, 0)
        dealer.setsockopt(zmq.RCVHWM, 100_000)
        # a connection that went quiet (a half-open TCP link) counts as dropped
        dealer.setsockopt(zmq.HEARTBEAT_IVL, HEARTBEAT_IVL_MS)
        dealer.setsockopt(zmq.HEARTBEAT_TIMEOUT, HEARTBEAT_TIMEOUT_MS)
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
                seq=self.joins,
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
                return following.result()
            return Ended(True, f"the connection to its primary at {self.primary_address} dropped")
        finally:
            dealer.disable_monitor()
            monitor.close(linger=0)
            dealer.close(linger=0)

    async def _follow(self, dealer: zmq.asyncio.Socket) -> Ended:
        try:
            await asyncio.wait_for(self._catch_up(dealer), CATCH_UP_TIMEOUT)
        except TimeoutError:
            return Ended(False, f"its primary at {self.primary_address} sent no state in time")
        except _Refused as exc:
            return Ended(False, str(exc))
        await dealer.send(wire.pack_header(self._confirm(0)))  # counted from now on
        while True:
            try:
                frames = await dealer.recv_multipart(copy=False)
                confirmed = self._apply(frames)
                # apply what else arrived, then confirm them all at once
                while int(dealer.get(zmq.EVENTS)) & zmq.POLLIN:
                    confirmed = self._apply(await dealer.recv_multipart(copy=False)) or confirmed
            except _Refused as exc:
                return Ended(False, str(exc))
            if confirmed:
                await dealer.send(wire.pack_header(self._confirm(confirmed)))

    def _confirm(self, seq: int) -> wire.Header:
        return wire.Header(
            kind=wire.CONFIRM, fingerprint=self.core.fingerprint, shard=self.core.shard_id, seq=seq
        )

    def _apply(self, frames: list[Any]) -> int:
        """Apply one forward; its number (0 for anything else)."""
        header = _header(frames)
        if header is None:
            return 0
        if header.kind == wire.ERROR:
            raise _Refused(f"its primary at {self.primary_address} said: {header.reason}")
        if header.kind != wire.REPLICATE:
            return 0
        self.core.handle(frames[1:], [], replicated=True)
        if self.core.state.version != header.version:  # (cannot happen with the same order)
            raise _Refused(
                f"version {self.core.state.version} after forward {header.seq}, its primary's "
                f"was {header.version}"
            )
        return header.seq

    async def _catch_up(self, dealer: zmq.asyncio.Socket) -> None:
        arrays: dict[str, np.ndarray] = {}
        if not await dealer.poll(JOIN_TIMEOUT * 1000):
            raise TimeoutError
        while True:
            frames = await dealer.recv_multipart(copy=False)
            header = _header(frames)
            if header is not None and header.kind == wire.ERROR:
                raise _Refused(f"{self.primary_address} said: {header.reason}")
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
