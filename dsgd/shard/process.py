"""One parameter shard as a process: ``python -m dsgd.shard --coordinator HOST:PORT --shard-id K``.

The shard binds its data and broadcast sockets, restores its latest valid
checkpoint when ``--checkpoint-dir`` holds one, and registers with the coordinator
(which answers with its range, the layout fingerprint and the cluster's
configuration, and, for a shard without state, streams its initial values). It
then serves until the coordinator says the run is over or it receives SIGINT or
SIGTERM, checkpointing every ``checkpoint_every`` seconds and once more on the way
out. Each restart is a new *incarnation*: workers notice it and fetch again.
The shard never imports JAX.

With ``--replicas R`` each range is served by R processes (``--replica J``): the
coordinator names one the primary; the others replicate from it
(:mod:`dsgd.shard.replication`), and the heartbeat replies say when a backup is promoted
or must follow another primary.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import logging
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import zmq.asyncio

from dsgd import checkpoint, metrics
from dsgd.config import TrainConfig
from dsgd.control import CoordinatorLink, start_grpc_server, stats_message
from dsgd.errors import CheckpointError, ProtocolError
from dsgd.optim import make_optimizer, state_mismatch
from dsgd.proto import control_pb2 as pb
from dsgd.proto import control_pb2_grpc as pb_grpc
from dsgd.runtime import add_member_arguments, owned, run_process, setup_logging, write_ready_file
from dsgd.security import Security, check_listen, from_arguments
from dsgd.shard.core import ShardCore, ShardState
from dsgd.shard.replication import Chain, Ended, Follower
from dsgd.shard.server import ShardServer
from dsgd.stats import StalenessHistogram, paced_interval
from dsgd.types import ShardRange
from dsgd.wire import PROTOCOL_VERSION

# the most of its time a shard spends on periodic checkpoints: a 75M-parameter shard's
# snapshot and write (600 MB with Adagrad) took 2 s, and every 5 s that slowed the workers'
# steps on the same cores by a tenth
CHECKPOINT_DUTY = 0.1
REJOIN_PAUSE = 0.2  # seconds a backup waits before it joins again (or asks again)

log = logging.getLogger("dsgd.shard")


class ShardProcess:
    """A shard's life: restore, register, serve, checkpoint, leave."""

    def __init__(
        self,
        coordinator: str,
        shard_id: int,
        *,
        host: str = "127.0.0.1",
        advertise_host: str | None = None,
        data_port: int = 0,
        pub_port: int = 0,
        control_port: int = 0,
        checkpoint_dir: Path | None = None,
        connect_timeout: float = 60.0,
        security: Security | None = None,
        replica: int = 0,
        context: zmq.asyncio.Context | None = None,
    ) -> None:
        self.replica = replica
        # every ZeroMQ socket of this shard is made in this context: its own unless the
        # caller's (an in-process cluster's, which closes it and so the sockets it holds)
        self._own_context = context is None
        self.ctx = context or zmq.asyncio.Context()
        self.security = security
        self.link = CoordinatorLink(coordinator, give_up_after=connect_timeout, security=security)
        self.core = ShardCore(shard_id)
        self.server = ShardServer(
            self.core,
            host=host,
            data_port=data_port,
            pub_port=pub_port,
            advertise_host=advertise_host,
            context=self.ctx,
            security=security,
        )
        self.host = host
        self.advertise_host = advertise_host or host
        self.control_port = control_port
        self.control_address = ""
        self.checkpoint_dir = checkpoint_dir
        self.config = TrainConfig()
        self.restored: checkpoint.Checkpoint | None = None
        self.saved_version = -1
        # the processes that served this shard from checkpoint_dir before this one, and
        # the version this one started from (-1 until known): registrations carry them,
        # so that any coordinator can count what each restart lost
        self.lineage: list[tuple[int, int]] = []
        self.started_from = -1
        self._grpc: grpc.aio.Server | None = None
        self._save_lock = asyncio.Lock()
        # replication: the primary this backup follows (None: it is a primary)
        self.follow: pb.ShardEndpoint | None = None
        self.follower: Follower | None = None
        self._registered: pb.RegisterShardReply | None = None
        self._role_changed = asyncio.Event()
        self._lost_primary = 0  # the incarnation of a primary this backup saw go
        self._joins = 0  # joins this process made as a backup (each is announced first)
        self._beats = 0  # heartbeats sent (numbered, so the coordinator skips late ones)
        self._beating = asyncio.Lock()  # heartbeats in order: what the coordinator last
        # heard from this process is what it said last

    @property
    def shard_id(self) -> int:
        return self.core.shard_id

    async def run(self, stop: asyncio.Event, ready_file: str | None = None) -> None:
        """Serve until the run ends or ``stop``; leave cleanly whatever ends it.

        Serving, checkpointing and heartbeats are tasks of one group: if any of them
        crashes, the others stop and the process ends naming it, after the same final
        checkpoint, leaving heartbeat and gRPC stop as a clean exit.
        """
        metrics.add(
            metrics.ShardCollector(asyncio.get_running_loop(), self.shard_id, self._staleness)
        )
        self.link.stop = stop
        try:
            await self.server.start()
            self._grpc, port = await start_grpc_server(
                self.host,
                self.control_port,
                lambda s: pb_grpc.add_ShardServicer_to_server(ShardControl(self), s),
                f"shard {self.shard_id} control service",
                self.core.rejected,
                self.security,
            )
            self.control_address = f"{self.advertise_host}:{port}"
            self.restore_local()
            if not await self.register(stop):
                return
            async with asyncio.TaskGroup() as group:
                background = [
                    group.create_task(owned("the data plane", self.server.serve())),
                    group.create_task(owned("replication", self._replicate(stop))),
                ]
                if self.checkpoint_dir is not None:
                    saving = owned("periodic checkpoints", self._checkpoint_loop())
                    background.append(group.create_task(saving))
                write_ready_file(
                    ready_file,
                    {
                        "data_address": self.server.data_address,
                        "pub_address": self.server.pub_address,
                        "control_address": self.control_address,
                    },
                )
                await owned("heartbeats", self._heartbeat_until_done(stop))
                for task in background:
                    task.cancel()
        finally:
            await self._leave()

    async def _leave(self) -> None:
        """Save a last checkpoint, say goodbye, and close everything this process opened."""
        if self.core.installed and self.checkpoint_dir is not None:
            try:
                await self.save("final")
            except CheckpointError as exc:
                log.warning("shard %d: final checkpoint failed: %s", self.shard_id, exc)
        with contextlib.suppress(grpc.aio.AioRpcError):
            await self._beat(leaving=True)
        if self._grpc is not None:
            await self._grpc.stop(grace=0.2)
        await self.server.aclose()
        await self.link.aclose()
        if self._own_context:
            self.ctx.term()

    # -- state -------------------------------------------------------------------------------

    def restore_local(self) -> None:
        """Load the newest valid checkpoint of this shard, if the directory has one."""
        if self.checkpoint_dir is None:
            return
        self.lineage = checkpoint.read_lineage(self.checkpoint_dir, self.shard_id)
        scan = checkpoint.scan_latest(self.checkpoint_dir, self.shard_id)
        for path, reason in scan.rejected:
            log.warning("shard %d: skipping checkpoint %s: %s", self.shard_id, path, reason)
        self.restored = scan.checkpoint
        if self.restored is not None:
            log.info(
                "shard %d: restored version %d from %s",
                self.shard_id,
                self.restored.version,
                self.restored.path,
            )
            self.saved_version = self.restored.version
            self.started_from = self.restored.version
        self._write_lineage()

    def _write_lineage(self) -> None:
        """Record this process in the directory's lineage (small and rare: at start, and
        once it knows the version it started from)."""
        if self.checkpoint_dir is not None:
            mine = (self.core.incarnation, self.started_from)
            checkpoint.write_lineage(self.checkpoint_dir, self.shard_id, [*self.lineage, mine])

    def _lineage_message(self) -> list[pb.Incarnation]:
        past = [pb.Incarnation(incarnation=i, started_from=v) for i, v in self.lineage]
        mine = pb.Incarnation(incarnation=self.core.incarnation, started_from=self.started_from)
        return [*past, mine]

    def _staleness(self) -> tuple[StalenessHistogram, dict[str, int]]:
        """The merged staleness histogram and the rejections, for the metrics."""
        merged = StalenessHistogram()
        for histogram in self.core.worker_staleness().values():
            merged.merge(histogram)
        return merged, dict(self.core.rejected)

    async def register(self, stop: asyncio.Event) -> bool:
        """Register (again); install restored, streamed or kept state. False if stopped."""
        core, server = self.core, self.server
        held = self.restored if not core.installed else None
        request = pb.RegisterShardRequest(
            shard_id=self.shard_id,
            endpoint=pb.ShardEndpoint(
                shard_id=self.shard_id,
                data_address=server.data_address,
                pub_address=server.pub_address,
                incarnation=core.incarnation,
                control_address=self.control_address,
                replica=self.replica,
            ),
            layout_fingerprint=held.fingerprint if held else core.fingerprint,
            version=held.version if held else core.state.version,
            protocol_version=PROTOCOL_VERSION,
            replica=self.replica,
            following=self.follow.incarnation if self.follow and core.installed else 0,
            lineage=self._lineage_message(),
        )
        # not ready while the cluster does not know the model yet
        reply = await self.link.register(
            self.link.stub.RegisterShard, request, stop, f"shard {self.shard_id}"
        )
        if reply is None:
            return False
        self.config = TrainConfig.from_json(reply.config_json)
        self._registered = reply
        if reply.HasField("primary"):  # a backup: take the primary's state, not ours
            self._become_backup(reply.primary)
            await self._beat()
            return True
        if held is not None and held.fingerprint != reply.layout_fingerprint:
            raise CheckpointError(
                f"checkpoint {held.path} belongs to another model or shard count "
                f"(fingerprint {held.fingerprint:016x}, the cluster's is "
                f"{reply.layout_fingerprint:016x}); use another --checkpoint-dir"
            )
        if reply.send_initial or not core.installed:  # a caught-up backup keeps its books
            await self._install(reply, held if core.primary else None)
        self._become_primary()
        # report at once, so the coordinator marks this shard ready without waiting a period
        await self._beat()
        return True

    async def _install(
        self, reply: pb.RegisterShardReply, held: checkpoint.Checkpoint | None
    ) -> None:
        """Take the state this registration gives: streamed initial values, or the
        checkpoint restored at start; with the cluster's optimizer and settings."""
        shard_range = ShardRange(reply.start, reply.stop)
        config = self.config
        optimizer = make_optimizer(
            config.optimizer, config.lr, momentum=config.momentum, weight_decay=config.weight_decay
        )
        restored_from: str | None = None  # restored state must fit; kept state may not
        if reply.send_initial:
            state = await self._fetch_initial(reply, shard_range.size)
            if state.opt_state or reply.version > 0:
                restored_from = "the cluster checkpoint the coordinator restored"
        elif held is not None:
            if held.optimizer != optimizer.name:
                raise CheckpointError(
                    f"checkpoint {held.path} was trained with {held.optimizer}, the cluster "
                    f"uses {optimizer.name}; start the cluster with --optimizer {held.optimizer} "
                    "or use another --checkpoint-dir"
                )
            state = ShardState(held.params, dict(held.opt_state), held.version)
            restored_from = f"checkpoint {held.path}"
        else:
            state = self.core.state
        problem = state_mismatch(optimizer, state.opt_state, shard_range.size)
        if problem is not None:
            if restored_from is not None:
                raise CheckpointError(f"{restored_from} cannot be restored: {problem}")
            if state.opt_state:
                log.warning(
                    "shard %d: optimizer state %s does not fit %s; starting it afresh",
                    self.shard_id,
                    sorted(state.opt_state),
                    optimizer.name,
                )
            state.opt_state = optimizer.init(shard_range.size)
        self.core.install(
            reply.layout_fingerprint,
            optimizer,
            state,
            staleness=self.config.staleness,
            chunk_bytes=self.config.chunk_bytes,
            shard_range=shard_range,
            num_shards=reply.num_shards,
        )
        log.info(
            "shard %d serving %d parameters at version %d",
            self.shard_id,
            shard_range.size,
            state.version,
        )
        if self.started_from < 0:
            self.started_from = state.version
            await asyncio.to_thread(self._write_lineage)

    # -- replication ---------------------------------------------------------------------------

    def _become_primary(self) -> None:
        if self.follow is not None:
            log.warning("shard %d replica %d is the primary now", self.shard_id, self.replica)
        self.core.primary = True
        self.follow = None
        if self.config.replicas > 1 and self.server.chain is None:
            self.server.chain = Chain()
        self._role_changed.set()

    def _become_backup(self, primary: pb.ShardEndpoint) -> None:
        """Follow ``primary``. A deposed primary's held ACKs are dropped, not sent: what
        they acknowledge may be on no other replica (its workers resend it)."""
        if self.follow is not None and self.follow.incarnation == primary.incarnation:
            return
        log.info(
            "shard %d replica %d follows replica %d at %s",
            self.shard_id,
            self.replica,
            primary.replica,
            primary.data_address,
        )
        self.core.primary = False
        if self._registered is not None:
            self.core.fingerprint = self._registered.layout_fingerprint
        self.server.chain = None
        self.follow = primary
        self._role_changed.set()

    async def _replicate(self, stop: asyncio.Event) -> None:
        """While a backup, follow the primary, joining again whenever a join ends; when
        the primary's connection drops, ask at once to be promoted."""
        while not stop.is_set():
            self._role_changed.clear()
            target = self.follow
            if target is None:
                await self._role_changed.wait()
                continue
            # the coordinator hears of a new join before the primary does: from now on it
            # promotes this process only once the primary reports this join caught up
            self._joins += 1
            self._lost_primary, self.follower = 0, None
            answer = await self._beat()
            if answer is not None:
                await self._follow_reply(answer)
            if answer is None or self.follow is not target:
                await self._pause(REJOIN_PAUSE)
                continue
            ended = await self._follow_once(target)
            if ended is None:  # the role changed meanwhile
                continue
            log.warning("shard %d replica %d: %s", self.shard_id, self.replica, ended.why)
            if ended.gone and self.follower is not None and self.follower.caught_up.is_set():
                await self._ask_promotion(target, stop)  # the range waits: now, not next beat
            await self._pause(REJOIN_PAUSE)

    async def _follow_once(self, target: pb.ShardEndpoint) -> Ended | None:
        """One join of ``target``, until it ends (None: the role changed first)."""
        reply = self._registered
        assert reply is not None
        follower = self.follower = Follower(
            self.core,
            target.data_address,
            self.replica,
            self.ctx,
            self._install_replica,
            reply.stop - reply.start,
            self.security,
            joins=self._joins,
        )
        following = asyncio.ensure_future(follower.run())
        changed = asyncio.ensure_future(self._role_changed.wait())
        try:
            await asyncio.wait({following, changed}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (following, changed):
                if not task.done():
                    task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        if following.cancelled() or self.follow is not target:
            return None
        return following.result()

    async def _ask_promotion(self, lost: pb.ShardEndpoint, stop: asyncio.Event) -> None:
        """Tell the coordinator the primary's connection dropped, until it answers."""
        self._lost_primary = lost.incarnation
        while not stop.is_set() and self.follow is lost:
            answer = await self._beat()
            if answer is not None:
                await self._follow_reply(answer)
                return
            await self._pause(REJOIN_PAUSE)

    async def _pause(self, seconds: float) -> None:
        """Wait ``seconds``, or less if the role changes."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._role_changed.wait(), seconds)

    def _install_replica(
        self, params: np.ndarray, opt_state: dict[str, np.ndarray], version: int, books: bytes
    ) -> None:
        """Take the primary's state (from a :class:`Follower`)."""
        reply = self._registered
        assert reply is not None
        config = self.config
        optimizer = make_optimizer(
            config.optimizer, config.lr, momentum=config.momentum, weight_decay=config.weight_decay
        )
        problem = state_mismatch(optimizer, opt_state, params.size)
        if problem is not None:
            raise ProtocolError(f"the primary's state does not fit this shard: {problem}")
        self.core.install(
            reply.layout_fingerprint,
            optimizer,
            ShardState(params, opt_state, version),
            staleness=config.staleness,
            chunk_bytes=config.chunk_bytes,
            shard_range=ShardRange(reply.start, reply.stop),
            num_shards=reply.num_shards,
        )
        self.core.import_books(books)
        self.core.primary = False

    async def _follow_reply(self, reply: pb.HeartbeatReply) -> None:
        """Act on what a heartbeat reply says of this shard's role."""
        if self.config.replicas == 1:
            return
        if reply.primary:
            if not self.core.primary:
                if not self.core.installed:
                    return
                self._become_primary()
            chain = self.server.chain
            if chain is not None and not reply.settling:
                allowed = {(e.replica, e.incarnation) for e in reply.replicas}
                await self.server.release(chain.prune(allowed))
        elif reply.replicas:
            self._become_backup(reply.replicas[0])

    async def _fetch_initial(self, reply: Any, size: int) -> ShardState:
        arrays: dict[str, np.ndarray] = {}
        filled: dict[str, int] = {}
        stream = self.link.stub.FetchInitialShard(
            pb.FetchInitialShardRequest(
                shard_id=self.shard_id, layout_fingerprint=reply.layout_fingerprint
            ),
            timeout=120.0,
        )
        async for chunk in stream:
            piece = np.frombuffer(chunk.data, np.float32)
            if chunk.total != size or chunk.offset + piece.size > size:
                raise ProtocolError("the coordinator streamed initial values of the wrong size")
            target = arrays.setdefault(chunk.name, np.empty(size, np.float32))
            target[chunk.offset : chunk.offset + piece.size] = piece
            filled[chunk.name] = filled.get(chunk.name, 0) + piece.size
        if filled.get("params") != size or any(n != size for n in filled.values()):
            raise ProtocolError(f"received {filled} of {size} initial values")
        params = arrays.pop("params")
        opt_state = {name.removeprefix("opt_state/"): a for name, a in arrays.items()}
        return ShardState(params, opt_state, reply.version)

    # -- checkpoints ---------------------------------------------------------------------------

    async def save(
        self, reason: str, directory: Path | None = None, *, read_back: bool = False
    ) -> tuple[checkpoint.WriteResult, list[bytes]]:
        """Snapshot on the loop, write in a thread; serialised so saves never interleave.

        With ``read_back``, also return the file's bytes in streaming pieces, read before
        any later save could prune the file.
        """
        target = directory or self.checkpoint_dir
        assert target is not None
        async with self._save_lock:
            snap = self.core.snapshot({"reason": reason, "config": self.config.to_json()})
            result = await checkpoint.save_async(snap, target, keep=self.config.checkpoint_keep)
            pieces: list[bytes] = []
            if read_back:
                pieces = await asyncio.to_thread(lambda: list(checkpoint.stream_file(result.path)))
        if target == self.checkpoint_dir:
            self.saved_version = snap.version
        log.info("shard %d: checkpoint v%d (%s)", self.shard_id, snap.version, reason)
        return result, pieces

    async def _checkpoint_loop(self) -> None:
        """Checkpoint every ``checkpoint_every`` seconds, or less often when a checkpoint
        takes long (a large range), so that checkpointing takes at most CHECKPOINT_DUTY."""
        took = 0.0
        while True:
            await asyncio.sleep(paced_interval(self.config.checkpoint_every, took, CHECKPOINT_DUTY))
            if self.core.state.version != self.saved_version:
                began = time.monotonic()
                try:
                    await self.save("periodic")
                except CheckpointError as exc:
                    log.warning("shard %d: checkpoint failed: %s", self.shard_id, exc)
                took = time.monotonic() - began

    # -- heartbeats ----------------------------------------------------------------------------

    def _heartbeat(self, leaving: bool = False) -> pb.HeartbeatRequest:
        core = self.core
        counters = core.stats()
        counters["checkpoint_version"] = float(self.saved_version)
        chain = self.server.chain
        members: list[pb.ChainMember] = []
        if chain is not None and core.primary:
            members = [
                pb.ChainMember(replica=b.replica, incarnation=b.incarnation, joins=b.joins)
                for b in chain.report()
            ]
            counters["replication_backups"] = float(len(chain.backups))
            counters["replication_backups_ready"] = float(len(members))
            counters["replication_acks_held"] = float(chain.holding)
        follower = self.follower
        caught_up = core.primary or (follower is not None and follower.caught_up.is_set())
        stats = {"version": core.state.version, "rate": core.apply_rate.rate()}
        return pb.HeartbeatRequest(
            role=pb.ROLE_SHARD,
            id=self.shard_id,
            incarnation=core.incarnation,
            stats=stats_message({**stats, "counters": counters}),
            leaving=leaving,
            replica=self.replica,
            lost_primary=0 if core.primary else self._lost_primary,
            caught_up=caught_up and core.installed,
            joins=self._joins,
            chain=members,
            beat=self._beats,
        )

    async def _beat(self, leaving: bool = False) -> pb.HeartbeatReply | None:
        """One heartbeat, in order with the others. A backup that left the chain while
        the coordinator still counted it is dropped once this heartbeat told it so."""
        async with self._beating:
            chain = self.server.chain
            leaving_backups = chain.leaving() if chain is not None else set()
            if chain is not None:
                chain.report_due.clear()
            self._beats += 1
            reply = await self.link.heartbeat_once(self._heartbeat(leaving))
            if chain is not None and reply is not None and reply.primary:  # still primary
                await self.server.release(chain.forget(leaving_backups))
            return reply

    async def _heartbeat_until_done(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            await self._until_beat_due(stop)
            if stop.is_set():
                return
            reply = await self._beat()
            if reply is None:
                continue
            if reply.shutdown:
                log.info("shard %d: coordinator ended the run (%s)", self.shard_id, reply.reason)
                return
            if reply.reregister:
                log.info("shard %d: coordinator restarted; registering again", self.shard_id)
                await self.register(stop)
            else:
                await self._follow_reply(reply)

    async def _until_beat_due(self, stop: asyncio.Event) -> None:
        """A heartbeat period, or less: when stopping, or when the chain has news for the
        coordinator (a backup caught up or left)."""
        waits = [asyncio.ensure_future(stop.wait())]
        chain = self.server.chain
        if chain is not None:
            waits.append(asyncio.ensure_future(chain.report_due.wait()))
        try:
            await asyncio.wait(
                waits, timeout=self.config.heartbeat_interval, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            for wait in waits:
                wait.cancel()


class ShardControl(pb_grpc.ShardServicer):
    """The shard's gRPC control service: checkpoints on demand, streamed in pieces."""

    def __init__(self, process: ShardProcess) -> None:
        self.p = process

    async def Checkpoint(self, request: Any, context: Any) -> AsyncIterator[pb.CheckpointPiece]:
        if not self.p.core.installed:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "shard has no parameters yet")
        with tempfile.TemporaryDirectory(prefix="dsgd-ckpt-") as tmp:
            directory = self.p.checkpoint_dir or Path(tmp)
            result, pieces = await self.p.save(
                request.reason or "on demand", directory, read_back=True
            )
            whole = hashlib.sha256()
            for data in pieces:
                whole.update(data)
            offset = 0
            for i, data in enumerate(pieces):
                last = i == len(pieces) - 1
                yield pb.CheckpointPiece(
                    file=result.path.name,
                    offset=offset,
                    data=data,
                    last=last,
                    sha256=whole.hexdigest() if last else "",
                )
                offset += len(data)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m dsgd.shard", description="Run one dsgd parameter shard."
    )
    add_member_arguments(parser, "write bound addresses here (JSON) once serving")
    parser.add_argument("--shard-id", type=int, required=True, help="which shard slot to serve")
    parser.add_argument(
        "--replica",
        type=int,
        default=0,
        help="which of the range's --replicas processes this is (0..replicas-1)",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--advertise-host", help="address peers use to reach this shard")
    parser.add_argument("--data-port", type=int, default=0, help="push/fetch port (0: any)")
    parser.add_argument("--pub-port", type=int, default=0, help="version broadcast port (0: any)")
    parser.add_argument("--control-port", type=int, default=0, help="gRPC control port (0: any)")
    parser.add_argument(
        "--checkpoint-dir", type=Path, help="restore from and checkpoint to this directory"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging(f"shard{args.shard_id}", args.log_level)

    async def shard_main(stop: asyncio.Event) -> int:
        security = from_arguments(args)
        check_listen(args.host, security, args.insecure, f"shard {args.shard_id}")
        process = ShardProcess(
            args.coordinator,
            args.shard_id,
            host=args.host,
            advertise_host=args.advertise_host,
            data_port=args.data_port,
            pub_port=args.pub_port,
            control_port=args.control_port,
            checkpoint_dir=args.checkpoint_dir,
            connect_timeout=args.connect_timeout,
            security=security,
            replica=args.replica,
        )
        await process.run(stop, args.ready_file)
        return 0

    return run_process(f"shard {args.shard_id}", shard_main, args)


async def run_shard(coordinator: str, shard_id: int, stop: asyncio.Event, **options: Any) -> None:
    """Serve shard ``shard_id`` until the run ends or ``stop`` (for in-process clusters)."""
    ready_file = options.pop("ready_file", None)
    await ShardProcess(coordinator, shard_id, **options).run(stop, ready_file)
