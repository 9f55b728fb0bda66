"""The shard's transport: a ZeroMQ ROUTER and PUB around one :class:`ShardCore`.

- the ROUTER (``data_address``) receives pushes and fetches; each request goes to
  :meth:`ShardCore.handle` the moment it is read (a push chunk is applied in place
  without waiting for the rest of its push) and the replies go back to its sender.
  Requests are read in batches of what is queued (:class:`~dsgd.sockets.LoopSocket`);
  the ACKs of a batch go out at its end, merged per push (:func:`wire.merge_acks`);
- the PUB (``pub_address``) broadcasts the shard's version, so workers skip fetches
  when nothing changed;
- with a :class:`~dsgd.shard.replication.Chain` (``--replicas`` above 1), the ROUTER also
  takes backups' joins and confirmations: a primary forwards every push it handled to
  its backups and holds the ACKs until they confirmed it (and probes the backups a held
  ACK waits for, so a backup whose connection closed leaves the chain at once).

The server knows frames and peers, not parameters: what a message means is the core's
business. Nothing here imports JAX, touches the disk or blocks.
"""

from __future__ import annotations

import asyncio
import logging
import time
import warnings
from typing import Any

import zmq
import zmq.asyncio

from dsgd import wire
from dsgd.errors import Closed, ConfigError, ProtocolError
from dsgd.security import Admission, Security, count_handshake_failures
from dsgd.shard.core import ShardCore
from dsgd.shard.replication import Chain, Outgoing, state_messages
from dsgd.sockets import LoopSocket, bind_twin

log = logging.getLogger("dsgd.shard")

BROADCAST_INTERVAL = 0.005  # seconds between version broadcasts while versions change
IDLE_BROADCAST_INTERVAL = 0.5  # ... and while they do not (late subscribers learn it)
PROBE_INTERVAL = 0.05  # seconds between probes of the backups a held ACK waits for
BATCH = 64  # requests read before the batch's ACKs go out and other tasks get a turn


class ShardServer:
    """Binds on :meth:`start`, serves in :meth:`serve` until cancelled, ends in :meth:`aclose`.

    ``async with ShardServer(core) as server`` binds and serves in a task the server owns
    (for tests and benchmarks); a shard process runs :meth:`serve` in its own task group.
    """

    def __init__(
        self,
        core: ShardCore,
        *,
        host: str = "127.0.0.1",
        data_port: int = 0,
        pub_port: int = 0,
        advertise_host: str | None = None,
        context: zmq.asyncio.Context | None = None,
        security: Security | None = None,
    ) -> None:
        self.core = core
        self.chain: Chain | None = None  # set when the range is replicated
        self._holding = asyncio.Event()  # the chain may hold ACKs: the probes run
        self._security = security
        self._admission: Admission | None = None
        self._host = host
        self._ports = (data_port, pub_port)
        self._advertise = advertise_host or host
        self._own_context = context is None
        self._ctx = context or zmq.asyncio.Context()
        self._router: LoopSocket | None = None
        self._pub: zmq.asyncio.Socket | None = None
        self._serving: asyncio.Task[None] | None = None
        self._closed = False
        self.data_address = ""
        self.pub_address = ""
        self.local_addresses: tuple[str | None, str | None] = (None, None)

    async def start(self) -> None:
        """Bind both sockets, raising a one-line ConfigError if a port is taken."""
        wire.keep_frame_memory()
        if self._security is not None:  # admits the cluster's keys; before any socket binds
            self._admission = Admission(self._ctx, self._security.directory, self.core.rejected)
            self._admission.start()
        # made by the context, which then knows it (its destroy() closes it); pyzmq's stub
        # allows only the context's own socket class
        router: zmq.Socket[Any] = self._ctx.socket(
            zmq.ROUTER,
            socket_class=zmq.Socket,  # type: ignore[arg-type]
        )
        pub = self._ctx.socket(zmq.PUB)
        self._router, self._pub = LoopSocket(router), pub
        for sock in (router, pub):
            sock.setsockopt(zmq.LINGER, 0)
            if self._security is not None:
                self._security.curve_server(sock)
        router.setsockopt(zmq.ROUTER_MANDATORY, 1)
        router.setsockopt(zmq.MAXMSGSIZE, wire.MAX_FRAME_BYTES)  # a bigger frame: disconnect
        router.setsockopt(zmq.SNDHWM, 100_000)
        router.setsockopt(zmq.RCVHWM, 100_000)
        data_port = _bind(router, self._host, self._ports[0], "data")
        pub_port = _bind(pub, self._host, self._ports[1], "broadcast")
        self.data_address = f"tcp://{self._advertise}:{data_port}"
        self.pub_address = f"tcp://{self._advertise}:{pub_port}"
        # peers on this host connect to these instead (see dsgd.sockets)
        self.local_addresses = (
            bind_twin(router, self.data_address),
            bind_twin(pub, self.pub_address),
        )
        log.info(
            "shard %d listening on %s (versions on %s)",
            self.core.shard_id,
            self.data_address,
            self.pub_address,
        )

    async def serve(self) -> None:
        """Receive and answer requests, and broadcast the version, until cancelled."""
        if self._router is None or self._pub is None:
            raise Closed("ShardServer.serve() called before start()")
        async with asyncio.TaskGroup() as group:
            group.create_task(self._receive_loop(self._router), name="shard-receive")
            group.create_task(self._broadcast_loop(self._pub), name="shard-broadcast")
            group.create_task(self._probe_loop(self._router), name="shard-probe")
            if self._security is not None:
                core, what = self.core, f"shard {self.core.shard_id}"
                for sock in (self._router.sock, self._pub):
                    failures = count_handshake_failures(sock, core.rejected, core.rate_log, what)
                    group.create_task(failures, name="shard-handshakes")

    async def _receive_loop(self, router: LoopSocket) -> None:
        core = self.core
        handled = 0
        while True:
            await router.readable()
            acks: dict[bytes, list[wire.Header]] = {}
            ready = router.recv_ready(BATCH)
            chain = self.chain  # one role per batch: a deposed primary sends none of its ACKs
            for frames in ready:
                if len(frames) < 2:
                    core.rejected["framing"] += 1
                    core.rate_log.warning("framing", "a message without an identity and a header")
                    continue
                identity = frames[0].bytes
                if chain is not None and await self._replication(router, identity, frames):
                    continue
                pushed = acks.setdefault(identity, [])
                before = len(pushed)
                for reply in core.handle(frames[1:], pushed):
                    if not await self._send(router, identity, reply):
                        break
                if chain is not None and len(pushed) > before:  # a push reached apply
                    forwards = chain.forward(frames[1:], core.state.version)
                    self._to_backups(router, chain, forwards)
            for identity, headers in acks.items():
                for ack in wire.merge_acks(headers):
                    message = [wire.pack_header(ack)]
                    if chain is not None:
                        if self.chain is chain and core.primary:
                            await self._send_all(router, chain.hold(identity, message))
                            if chain.holding:
                                self._holding.set()
                    elif not await self._send(router, identity, message):
                        break
            handled += len(ready)
            if handled >= BATCH:  # requests keep coming: let the broadcasts out too
                handled = 0
                await asyncio.sleep(0)

    async def _replication(self, router: LoopSocket, identity: bytes, frames: list[Any]) -> bool:
        """Handle a backup's join or confirmation; False for any other message, and for
        these while this process is not serving as primary (the core refuses them: a
        join with NOT_PRIMARY, so the backup joins again shortly)."""
        try:
            header = wire.unpack_header(frames[1].bytes)
        except (ProtocolError, IndexError):
            return False  # the core refuses it, and counts it
        if header.kind not in (wire.JOIN, wire.CONFIRM):
            return False
        core, chain = self.core, self.chain
        if chain is None or not core.primary or not core.installed:
            return False
        if header.fingerprint != core.fingerprint or header.shard != core.shard_id:
            core.rejected["layout"] += 1
            return True
        if header.kind == wire.JOIN:
            joined = chain.join(identity, header.worker, header.incarnation, header.seq)
            if joined is not None:  # (None: an older join, read late)
                await self._send_all(router, joined)
                self._to_backups(router, chain, [(identity, m) for m in state_messages(core)])
        else:
            await self._send_all(router, chain.confirm(identity, header.seq))
        self._send_notices(router, chain)
        return True

    def _send_notices(self, router: LoopSocket, chain: Chain) -> None:
        """What the chain has for its backups besides forwards (join again)."""
        notices, chain.notices = chain.notices, []
        self._to_backups(router, chain, notices)

    def _to_backups(self, router: LoopSocket, chain: Chain, outgoing: Outgoing) -> None:
        """Send to backups without waiting: a backup whose queue is full or whose
        connection closed leaves the chain (it must not stall the primary)."""
        for identity, message in outgoing:
            if not router.try_send([identity, *message]):
                self.core.counters.replication_sends_failed += 1
                chain.lose(identity)

    async def _probe_loop(self, router: LoopSocket) -> None:
        """While ACKs are held, send the backups they wait for a version message (which
        a backup ignores): a send to a backup whose connection closed fails, and it
        leaves the chain. With every permit held, no new push would find that out."""
        while True:
            await self._holding.wait()  # (an unreplicated or idle shard does not wake)
            await asyncio.sleep(PROBE_INTERVAL)
            chain = self.chain
            if chain is None or not chain.holding:
                self._holding.clear()
                continue
            probe = [wire.pack_header(self.core.version_header())]
            self._to_backups(router, chain, [(b, probe) for b in chain.waited_on()])

    async def release(self, outgoing: Outgoing) -> None:
        """Send ACKs a :class:`Chain` released outside the receive loop (a backup left),
        and what it has for its backups."""
        if self._router is not None:
            await self._send_all(self._router, outgoing)
            if self.chain is not None:
                self._send_notices(self._router, self.chain)

    async def _send_all(self, router: LoopSocket, outgoing: Outgoing) -> None:
        for identity, frames in outgoing:
            await self._send(router, identity, frames)

    async def _send(self, router: LoopSocket, identity: bytes, frames: list[Any]) -> bool:
        try:
            await router.send([identity, *frames])
        except zmq.ZMQError as exc:  # EHOSTUNREACH: the peer went away
            self.core.counters.replies_lost += 1
            self.core.rate_log.warning("send", f"shard {self.core.shard_id}: lost peer: {exc}")
            return False
        return True

    async def _broadcast_loop(self, pub: zmq.asyncio.Socket) -> None:
        last_version, last_sent = -1, 0.0
        while True:
            now = time.monotonic()
            version = self.core.state.version
            if version != last_version or now - last_sent >= IDLE_BROADCAST_INTERVAL:
                await pub.send(wire.pack_header(self.core.version_header()))
                last_version, last_sent = version, now
            await asyncio.sleep(BROADCAST_INTERVAL)

    async def aclose(self) -> None:
        """Stop serving (if this server runs its own serve task) and close the sockets."""
        if self._closed:
            return
        self._closed = True
        crashed: BaseException | None = None
        if self._serving is not None:
            self._serving.cancel()
            try:
                await self._serving
            except asyncio.CancelledError:
                pass
            except Exception as exc:  # a crashed serve task: surfaced to the owner below
                crashed = exc
        if self._router is not None:
            self._router.close()
        if self._pub is not None:
            self._pub.close(linger=0)
        if self._admission is not None:
            self._admission.stop()
        if self._own_context:
            self._ctx.term()
        if crashed is not None:
            raise crashed

    async def start_serving(self) -> None:
        """Bind, then serve in a task this server owns (awaited by :meth:`aclose`)."""
        await self.start()
        self._serving = asyncio.create_task(self.serve(), name=f"shard{self.core.shard_id}")

    async def __aenter__(self) -> ShardServer:
        await self.start_serving()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    @property
    def serving(self) -> bool:
        """Whether the serve task this server owns is still running."""
        return self._serving is not None and not self._serving.done()

    def __del__(self) -> None:
        if not getattr(self, "_closed", True) and self._router is not None:
            warnings.warn(f"ShardServer {self.core.shard_id} was never closed", ResourceWarning, 2)


def _bind(sock: zmq.Socket[Any], host: str, port: int, what: str) -> int:
    try:
        if port == 0:
            return int(sock.bind_to_random_port(f"tcp://{host}"))
        sock.bind(f"tcp://{host}:{port}")
        return port
    except zmq.ZMQError as exc:
        raise ConfigError(
            f"cannot bind the shard's {what} socket on {host}:{port} ({exc}); "
            "choose another port or stop the process using it"
        ) from None
