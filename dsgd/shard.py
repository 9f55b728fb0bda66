"""One parameter shard: owns a contiguous range, applies chunks on arrival, serves fetches.

The shard is a single asyncio event loop around two ZeroMQ sockets:

- a ROUTER (``data_address``) on which workers push update chunks and ask for
  parameters; every push chunk is applied in place the moment it arrives, without
  locks and without waiting for the other chunks of its push (Hogwild: a concurrent
  fetch may see part of a push), and acknowledged;
- a PUB (``pub_address``) on which it broadcasts its version, so workers skip
  fetches when nothing changed.

Nothing here imports JAX, touches the disk or blocks: a shard starts in a fraction
of a second and its loop never waits on XLA. Every message is treated as untrusted:
malformed frames, another model's layout, out-of-range indices, NaN/Inf values and
replays are rejected, counted and logged (rate-limited), and never change a parameter.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections import Counter, OrderedDict
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import zmq
import zmq.asyncio

from dsgd import checkpoint, wire
from dsgd.changes import ChangeTracker
from dsgd.checkpoint import Checkpoint
from dsgd.config import parse_staleness
from dsgd.errors import Closed, ProtocolError
from dsgd.optim import SGD, ServerOptimizerT
from dsgd.stats import RateLimitedLog, RateMeter, StalenessHistogram
from dsgd.types import FlatParams, ShardRange

log = logging.getLogger("dsgd.shard")

DEDUP_WINDOW = 4096  # push sequences per worker remembered for at-most-once apply
MAX_WORKER_BOOKS = 4096  # (worker, incarnation) pairs remembered
MAX_UPDATE_VALUE = 1e15  # larger gradient values are refused: applying them could overflow
BROADCAST_INTERVAL = 0.005  # seconds between version broadcasts while versions change
IDLE_BROADCAST_INTERVAL = 0.5  # ... and while they do not (late subscribers learn it)
SPARSE_PULL_MAX_FRACTION = 0.5  # above this fraction of changed blocks, send the full range


@dataclass
class ShardState:
    """What a shard owns: its range of parameters, optimizer state and version."""

    params: FlatParams
    opt_state: dict[str, FlatParams]
    version: int = 0


@dataclass
class _PushRecord:
    staleness: int
    chunks: set[int] = field(default_factory=set)
    applied: bool = False


@dataclass
class _WorkerBook:
    """Per-worker at-most-once bookkeeping and staleness."""

    pushes: OrderedDict[int, _PushRecord] = field(default_factory=OrderedDict)
    staleness: StalenessHistogram = field(default_factory=StalenessHistogram)
    chunks_applied: int = 0


class ShardServer:
    """The data plane of one shard: :meth:`start` binds, :meth:`serve` runs, :meth:`aclose` ends."""

    def __init__(
        self,
        shard_id: int,
        fingerprint: int = 0,
        optimizer: ServerOptimizerT | None = None,
        state: ShardState | None = None,
        *,
        staleness: str = "none",
        chunk_bytes: int = wire.DEFAULT_CHUNK_BYTES,
        host: str = "127.0.0.1",
        data_port: int = 0,
        pub_port: int = 0,
        advertise_host: str | None = None,
        context: zmq.asyncio.Context | None = None,
    ) -> None:
        self.shard_id = shard_id
        self.fingerprint = fingerprint
        self.optimizer: ServerOptimizerT = optimizer or SGD(1.0)
        self.state = state or ShardState(np.zeros(0, np.float32), {})
        self.installed = state is not None
        self.staleness_policy, self.staleness_bound = parse_staleness(staleness)
        self.chunk_bytes = chunk_bytes
        self.incarnation = secrets.randbits(62) + 1
        self._host = host
        self._ports = (data_port, pub_port)
        self._advertise = advertise_host or host
        self._own_context = context is None
        self._ctx = context or zmq.asyncio.Context()
        self._router: zmq.asyncio.Socket | None = None
        self._pub: zmq.asyncio.Socket | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._closed = False
        self.changes = ChangeTracker(self.state.params.size)
        # at-most-once books per (worker id, worker incarnation): a restarted worker
        # starts its sequence numbers again without being mistaken for a replay
        self._workers: OrderedDict[tuple[int, int], _WorkerBook] = OrderedDict()
        self.shard_range = ShardRange(0, self.state.params.size)
        self.num_shards = 1
        self.counters: Counter[str] = Counter()
        self.rejected: Counter[str] = Counter()
        self.apply_rate = RateMeter()
        self._rate_log = RateLimitedLog(log)
        self.data_address = ""
        self.pub_address = ""
        self.started = time.monotonic()

    def install(
        self,
        fingerprint: int,
        optimizer: ServerOptimizerT,
        state: ShardState,
        *,
        staleness: str = "none",
        chunk_bytes: int = wire.DEFAULT_CHUNK_BYTES,
        shard_range: ShardRange | None = None,
        num_shards: int = 1,
    ) -> None:
        """Take (new) parameters and settings; until the first call, requests are refused.

        Sockets are bound before the shard registers (its addresses are part of the
        registration), but its parameters arrive only after it, hence two steps.
        """
        self.fingerprint = fingerprint
        self.optimizer = optimizer
        self.state = state
        self.staleness_policy, self.staleness_bound = parse_staleness(staleness)
        self.chunk_bytes = chunk_bytes
        self.changes = ChangeTracker(state.params.size, state.version)
        self._workers.clear()
        self.shard_range = shard_range or ShardRange(0, state.params.size)
        self.num_shards = num_shards
        self.installed = True

    def snapshot(self, metadata: dict[str, Any] | None = None) -> Checkpoint:
        """A copy of the state for a checkpoint (memcpy on the loop; writing happens elsewhere)."""
        return checkpoint.snapshot(
            shard_id=self.shard_id,
            shard_range=self.shard_range,
            num_shards=self.num_shards,
            version=self.state.version,
            fingerprint=self.fingerprint,
            optimizer=self.optimizer.name,
            incarnation=self.incarnation,
            params=self.state.params,
            opt_state=self.state.opt_state,
            metadata=metadata,
        )

    # -- lifecycle -----------------------------------------------------------------

    async def start(self) -> None:
        """Bind both sockets (raising a clear error if a port is taken) and start broadcasting."""
        wire.keep_frame_memory()
        router = self._ctx.socket(zmq.ROUTER)
        pub = self._ctx.socket(zmq.PUB)
        self._router, self._pub = router, pub
        for sock in (router, pub):
            sock.setsockopt(zmq.LINGER, 0)
        router.setsockopt(zmq.ROUTER_MANDATORY, 1)
        router.setsockopt(zmq.MAXMSGSIZE, wire.MAX_FRAME_BYTES)  # a bigger frame: disconnect
        router.setsockopt(zmq.SNDHWM, 100_000)
        router.setsockopt(zmq.RCVHWM, 100_000)
        data_port = _bind(router, self._host, self._ports[0], "data")
        pub_port = _bind(pub, self._host, self._ports[1], "broadcast")
        self.data_address = f"tcp://{self._advertise}:{data_port}"
        self.pub_address = f"tcp://{self._advertise}:{pub_port}"
        self._tasks.append(asyncio.create_task(self._broadcast_loop(), name="shard-broadcast"))
        log.info(
            "shard %d listening on %s (versions on %s)",
            self.shard_id,
            self.data_address,
            self.pub_address,
        )

    async def serve(self) -> None:
        """Receive and handle messages until closed."""
        if self._router is None:
            raise Closed("ShardServer.serve() called before start()")
        router = self._router
        while not self._closed:
            try:
                frames = await router.recv_multipart(copy=False)
            except (zmq.ContextTerminated, zmq.ZMQError, asyncio.CancelledError):
                if self._closed:
                    return
                raise
            await self.handle(frames)

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        for sock in (self._router, self._pub):
            if sock is not None:
                sock.close(linger=0)
        if self._own_context:
            self._ctx.term()

    async def __aenter__(self) -> ShardServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    def __del__(self) -> None:
        if not getattr(self, "_closed", True) and self._router is not None:
            import warnings

            warnings.warn(f"ShardServer {self.shard_id} was never closed", ResourceWarning, 2)

    # -- message handling -------------------------------------------------------------

    async def handle(self, frames: list[Any]) -> None:
        """Handle one message from a ROUTER peer: ``[identity, header, arrays...]``."""
        if len(frames) < 2:
            self._reject("framing", "message without an identity and a header")
            return
        identity, message = frames[0], frames[1:]
        self.counters["bytes_received"] += wire.payload_bytes(message)
        try:
            header, arrays = wire.decode(message)
        except ProtocolError as exc:
            self._reject("malformed", str(exc))
            await self._reply(identity, self._error_header(str(exc)))
            return
        if not self.installed:
            reason = f"shard {self.shard_id} has no parameters yet; retry shortly"
            self._reject("not_ready", reason)
            await self._reply(identity, self._error_header(reason, header))
            return
        if header.fingerprint != self.fingerprint or header.shard != self.shard_id:
            reason = (
                f"layout fingerprint {header.fingerprint:016x} / shard {header.shard} does not "
                f"match this shard ({self.fingerprint:016x} / {self.shard_id}): the peer runs "
                "another model or shard count"
            )
            self._reject("layout", reason)
            await self._reply(identity, self._error_header(reason, header))
            return
        if header.kind == wire.PUSH:
            status = self.apply_push(header, arrays)
            ack = replace(
                header,
                kind=wire.ACK,
                count=0,
                version=self.state.version,
                incarnation=self.incarnation,
                status=status,
                encoding=wire.DENSE,
                dtype="float32",
            )
            await self._reply(identity, ack)
        elif header.kind == wire.FETCH:
            await self._serve_fetch(identity, header)
        else:
            reason = f"a shard does not accept {header.kind!r} messages"
            self._reject("kind", reason)
            await self._reply(identity, self._error_header(reason, header))

    def apply_push(self, header: wire.Header, arrays: list[np.ndarray]) -> str:
        """Validate and apply one push chunk in place; return the ACK status.

        Statuses: ``applied``, ``duplicate`` (seen before: at-most-once), ``stale`` (dropped
        by the staleness policy) or ``rejected: <why>``. Only ``applied`` changes anything.
        """
        state = self.state
        size = state.params.size
        if header.worker < 0:
            return self._reject("worker", f"push from invalid worker id {header.worker}")
        if header.encoding == wire.DENSE:
            (values,) = arrays
            if header.offset + header.count > size:
                return self._reject(
                    "range",
                    f"dense chunk [{header.offset}, {header.offset + header.count}) "
                    f"exceeds the shard's {size} parameters",
                )
            indices = None
        else:
            indices, values = arrays
            if header.count and int(indices[-1]) >= size:
                return self._reject("range", f"sparse index beyond the shard's {size} parameters")
            if header.count > 1 and not bool(np.all(indices[1:] > indices[:-1])):
                return self._reject("order", "sparse indices are not strictly increasing")
        values32 = values if values.dtype == np.float32 else values.astype(np.float32)
        # NaN makes min/max NaN and fails both comparisons; the bound keeps a finite but
        # absurd update from overflowing the parameters or Adagrad's accumulator
        low, high = values32.min(initial=0.0), values32.max(initial=0.0)
        if not (-MAX_UPDATE_VALUE <= low and high <= MAX_UPDATE_VALUE):
            return self._reject(
                "nonfinite", f"update contains NaN, Inf or values beyond +-{MAX_UPDATE_VALUE:g}"
            )
        if header.base_version < 0:
            return self._reject("version", f"push claims base version {header.base_version}")

        book = self._book(header.worker, header.incarnation)
        push = book.pushes.get(header.seq)
        if push is None:
            if len(book.pushes) >= DEDUP_WINDOW and header.seq <= next(iter(book.pushes)):
                self.counters["duplicates"] += 1  # older than anything remembered: a replay
                return "duplicate"
            # staleness is measured once per push, against the version before it
            push = _PushRecord(staleness=max(0, state.version - header.base_version))
            book.pushes[header.seq] = push
            if len(book.pushes) > DEDUP_WINDOW:
                book.pushes.popitem(last=False)
            book.staleness.add(push.staleness)
        if header.chunk in push.chunks:
            self.counters["duplicates"] += 1
            return "duplicate"
        push.chunks.add(header.chunk)
        lr_scale = 1.0
        if self.staleness_policy == "drop" and push.staleness > self.staleness_bound:
            self.counters["dropped_stale"] += 1
            return "stale"
        if self.staleness_policy == "scale":
            lr_scale = 1.0 / (1.0 + push.staleness)
        if not push.applied:  # the version counts pushes, not chunks
            push.applied = True
            state.version += 1
            self.counters["pushes"] += 1
        if indices is None:
            self.optimizer.apply_dense(
                state.params, state.opt_state, header.offset, values32, lr_scale
            )
            self.changes.mark_range(header.offset, header.count, state.version)
        else:
            # numpy converts uint32 indices to intp on every fancy-indexing operation (the
            # optimizer's gathers and scatters, the stamps): convert once instead
            positions = indices.astype(np.intp)
            self.optimizer.apply_sparse(
                state.params, state.opt_state, positions, values32, lr_scale
            )
            self.changes.mark(positions, state.version)
        book.chunks_applied += 1
        self.counters["updates_applied"] += 1
        self.counters["values_applied"] += header.count
        self.apply_rate.add()
        return "applied"

    def _book(self, worker: int, incarnation: int) -> _WorkerBook:
        key = (worker, incarnation)
        book = self._workers.get(key)
        if book is None:
            book = self._workers[key] = _WorkerBook()
            if len(self._workers) > MAX_WORKER_BOOKS:
                self._workers.popitem(last=False)
        else:
            self._workers.move_to_end(key)
        return book

    async def _serve_fetch(self, identity: Any, request: wire.Header) -> None:
        """Answer a FETCH with the range (or, when cheaper, only blocks changed since v)."""
        params = self.state.params
        template = replace(
            request,
            kind=wire.PARAMS,
            version=self.state.version,
            incarnation=self.incarnation,
            offset=0,
            status="",
        )
        since = request.base_version
        messages: list[list[Any]]
        if since >= 0:
            indices = self.changes.changed_since(since, SPARSE_PULL_MAX_FRACTION)
            if indices is not None:
                messages = list(
                    wire.sparse_chunks(template, indices, params[indices], self.chunk_bytes)
                )
                self.counters["fetches_sparse"] += 1
                await self._send_all(identity, messages)
                return
        messages = list(wire.dense_chunks(template, params, self.chunk_bytes))
        self.counters["fetches_dense"] += 1
        await self._send_all(identity, messages)

    async def _send_all(self, identity: Any, messages: list[list[Any]]) -> None:
        for frames in messages:
            self.counters["bytes_sent"] += wire.payload_bytes(frames)
            if not await self._send(identity, frames):
                return

    async def _reply(self, identity: Any, header: wire.Header) -> None:
        await self._send(identity, [wire.pack_header(header)])

    async def _send(self, identity: Any, frames: list[Any]) -> bool:
        assert self._router is not None
        try:
            await self._router.send_multipart([identity, *frames], copy=False)
        except zmq.ZMQError as exc:  # EHOSTUNREACH: the peer went away
            self._rate_log.warning("send", f"shard {self.shard_id}: reply to a lost peer: {exc}")
            self.counters["replies_lost"] += 1
            return False
        return True

    def _error_header(self, reason: str, request: wire.Header | None = None) -> wire.Header:
        base = request or wire.Header(kind=wire.ERROR, fingerprint=self.fingerprint, shard=-1)
        return replace(
            base,
            kind=wire.ERROR,
            about=request.kind if request is not None else "",
            count=0,
            encoding=wire.DENSE,
            dtype="float32",
            status=reason[:200],
            version=self.state.version,
            incarnation=self.incarnation,
        )

    def _reject(self, key: str, reason: str) -> str:
        self.rejected[key] += 1
        self._rate_log.warning(key, f"shard {self.shard_id} rejected a message: {reason}")
        return f"rejected: {reason}"[:200]

    # -- version broadcast ---------------------------------------------------------------

    async def _broadcast_loop(self) -> None:
        assert self._pub is not None
        last_version, last_sent = -1, 0.0
        while True:
            now = time.monotonic()
            version = self.state.version
            if version != last_version or now - last_sent >= IDLE_BROADCAST_INTERVAL:
                header = wire.Header(
                    kind=wire.VERSION,
                    fingerprint=self.fingerprint,
                    shard=self.shard_id,
                    version=version,
                    incarnation=self.incarnation,
                )
                await self._pub.send(wire.pack_header(header))
                last_version, last_sent = version, now
            await asyncio.sleep(BROADCAST_INTERVAL)

    # -- reporting -------------------------------------------------------------------------

    def stats(self) -> dict[str, float]:
        """Cumulative counters for heartbeats and status (flat, name -> number)."""
        merged = StalenessHistogram()
        for book in self._workers.values():
            merged.merge(book.staleness)
        out: dict[str, float] = {k: float(v) for k, v in self.counters.items()}
        out.update({f"rejected_{k}": float(v) for k, v in self.rejected.items()})
        out["rejected"] = float(sum(self.rejected.values()))
        out["staleness_p50"] = merged.percentile(50)
        out["staleness_p90"] = merged.percentile(90)
        out["staleness_p99"] = merged.percentile(99)
        out["staleness_max"] = float(merged.maximum)
        out["size"] = float(self.state.params.size)
        for worker, histogram in self.worker_staleness().items():
            out[f"staleness_p50_worker{worker}"] = histogram.percentile(50)
            out[f"staleness_p99_worker{worker}"] = histogram.percentile(99)
        return out

    def worker_staleness(self) -> dict[int, StalenessHistogram]:
        """Staleness histogram per worker id (all its incarnations together)."""
        out: dict[int, StalenessHistogram] = {}
        for (worker, _), book in self._workers.items():
            out.setdefault(worker, StalenessHistogram()).merge(book.staleness)
        return out


def _bind(sock: zmq.asyncio.Socket, host: str, port: int, what: str) -> int:
    from dsgd.errors import ConfigError

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
