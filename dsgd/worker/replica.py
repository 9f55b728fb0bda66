"""A model replica: the DistBelief Downpour loop.

Every ``n_fetch`` steps the worker refreshes its parameters from the shards (only
the shards whose broadcast version moved, and only what changed); every step it
computes a gradient with the ``jax.jit``-compiled step (in a thread, off the event
loop), takes a local SGD step and accumulates into one sparse encoder per shard;
every ``n_push`` steps it encodes what each encoder holds (the largest entries, or
all of them at density 1) and pushes it in chunks. Pushes are not awaited: they stream
out and are acknowledged while the next gradient is being computed, with at most
``max_inflight`` unacknowledged pushes per shard. What a shard never acknowledges
goes back into the encoder's residual and is sent again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np
import zmq.asyncio

from dsgd import wire
from dsgd.codec import CodecConfig, Encoded, SparseEncoder
from dsgd.config import TrainConfig
from dsgd.errors import Closed, LayoutMismatch, PeerLost, ProtocolError
from dsgd.layout import aligned_empty
from dsgd.model import EAGER, CompiledModel, batches
from dsgd.optim import subtract_scaled
from dsgd.security import Security
from dsgd.shard.client import SHARD_SILENT, PushResult, ShardClient
from dsgd.stats import ACKED_PREFIX, CounterRecord, RateMeter
from dsgd.types import FlatParams, ShardInfo

log = logging.getLogger("dsgd.worker")

DRAIN_TIMEOUT = 10.0  # seconds to wait for acknowledgements when the run ends
PERMIT_TIMEOUT = 5.0  # seconds to wait for a push permit before holding the push


@dataclass(slots=True)
class WorkerCounters(CounterRecord):
    """A worker's cumulative counters, reported in its heartbeat under these names
    (:meth:`Replica.stats` adds ``pushes_resent`` and the ``acked_shard...`` versions,
    which its shard clients keep)."""

    pushes: int = 0  # push rounds that sent to at least one shard
    bytes_pushed: int = 0
    bytes_pushed_dense_equivalent: int = 0  # the same pushes sent densely (4 B a value)
    values_pushed: int = 0
    bytes_fetched: int = 0
    bytes_fetched_dense_equivalent: int = 0  # every range fetched densely at every fetch round
    fetches: int = 0
    fetches_skipped: int = 0  # the shard's version had not moved
    fetches_failed: int = 0
    fetches_unavailable: int = 0  # not asked: the shard was silent
    pushes_deferred: int = 0  # a shard's share kept in the residual (silent, or no permit)
    values_given_back: int = 0  # never applied: returned to the residual to send again
    chunks_rejected: int = 0
    chunks_resent: int = 0  # unacknowledged chunks resent, as they were, to a promoted backup
    values_unpushed: int = 0  # held for a shard that could not be reached when the worker left
    nonfinite_updates: int = 0  # a shard's share not pushed: it held NaN or Inf
    gradient_seconds: float = 0.0  # computing gradients
    exchange_seconds: float = 0.0  # pushing and fetching (beside the gradient with --overlap)


def acked_counters(shard_id: int, acked: dict[int, int]) -> dict[str, float]:
    """The heartbeat counters that tell the coordinator the highest version shard
    ``shard_id`` acknowledged to this worker, per shard incarnation (its low 32 bits, which
    a double holds exactly): ``acked_shard{K}_{incarnation}``."""
    return {f"{ACKED_PREFIX}{shard_id}_{inc & 0xFFFFFFFF}": float(v) for inc, v in acked.items()}


def worker_batches(
    compiled: CompiledModel,
    config: TrainConfig,
    partition: int,
    num_partitions: int,
    worker_id: int | None = None,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """The batch stream of one worker: its data partition, in an order seeded by the run's
    seed and the worker id (workers that joined beyond the configured count share a
    partition, not a batch order)."""
    x, y = compiled.spec.dataset.partition(partition, num_partitions)
    batch_size = config.batch_size or compiled.spec.batch_size
    who = partition if worker_id is None else worker_id
    seed = config.seed * 1_000_003 + who
    return batches(x, y, batch_size, seed=seed, augment=compiled.spec.augment)


class Replica:
    """One model replica's training loop against a set of shards."""

    def __init__(
        self,
        compiled: CompiledModel,
        config: TrainConfig,
        worker_id: int,
        partition: int,
        num_partitions: int,
        shards: Sequence[ShardInfo],
        context: zmq.asyncio.Context,
        incarnation: int = 0,
        security: Security | None = None,
    ) -> None:
        self.compiled = compiled
        self.config = config
        self.worker_id = worker_id
        self.partition = partition
        self.num_partitions = num_partitions
        self.incarnation = incarnation or secrets.randbits(62) + 1
        self.shards = sorted(shards, key=lambda s: s.shard_id)
        expected = [(r.start, r.stop) for r in compiled.layout.ranges]
        announced = [(s.start, s.stop) for s in self.shards]
        if announced != expected:
            raise LayoutMismatch(
                f"the coordinator announced shard ranges {announced}, this model's layout "
                f"needs {expected}; are worker and coordinator running the same model?"
            )
        self._ctx = context
        self._security = security
        self.clients: list[ShardClient] = []
        size = compiled.layout.size
        # aligned: the jitted gradient reads params in place instead of copying them
        self.params: FlatParams = aligned_empty(size)  # with local steps applied
        # When every step pushes and fetches and nothing overlaps, a local step would be
        # undone by the next fetch before any gradient saw it: the worker then takes none
        # and keeps one copy of the parameters, which fetches write in place (300 MB and
        # two passes over it per step at 75M parameters).
        self.local_steps = config.n_fetch > 1 or config.n_push > 1 or config.overlap
        self.server_params: FlatParams = (  # as last fetched
            aligned_empty(size) if self.local_steps else self.params
        )
        n = len(self.shards)
        self.held_versions = [-1] * n  # per shard: the version server_params hold
        self.held_incarnations = [0] * n  # ... of which shard incarnation
        # our own push moves a shard's version before its broadcast says so
        self._pushed_since_fetch = [False] * n
        self.encoders = [
            SparseEncoder(
                s.stop - s.start,
                CodecConfig(
                    density=config.density,
                    value_dtype=config.value_dtype,
                    warmup_pushes=config.density_warmup,
                    seed=config.seed * 7919 + worker_id * 131 + s.shard_id,
                ),
            )
            for s in self.shards
        ]
        self._unavailable: dict[int, tuple[float, str]] = {}  # shards held back: since, why
        # what closed clients (a shard that moved, the end of the run) had acknowledged,
        # per shard id and incarnation, and resent: still reported in every heartbeat
        self._retired_acked: dict[int, dict[int, int]] = {}
        self._retired_resent = 0
        self.step = 0
        self.seq = 0
        self.loss = float("nan")
        self.rate = RateMeter()
        self.counters = WorkerCounters()
        self.notes: dict[str, str] = {}  # facts for status, said once (how the gradient runs)
        self.on_first_push: Callable[[], None] | None = None  # called once a push is applied

    # -- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        self.clients = [self._client(shard) for shard in self.shards]
        for client in self.clients:
            await client.start()

    def _client(self, shard: ShardInfo) -> ShardClient:
        return ShardClient(
            shard.shard_id,
            shard.data_address,
            shard.pub_address,
            self.compiled.layout.fingerprint,
            self.worker_id,
            self._ctx,
            max_inflight=self.config.max_inflight,
            security=self._security,
            replicated=self.config.replicas > 1,
        )

    def shard_lost(self) -> bool:
        """Whether the connection to a (replicated) shard's primary dropped and no
        heartbeat reply has named its successor yet."""
        return any(c.lost is not None and c.lost.is_set() for c in self.clients)

    async def aclose(self) -> None:
        for client in self.clients:
            await self._retire(client)
        self.clients = []

    async def __aenter__(self) -> Replica:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def update_endpoints(self, shards: Sequence[ShardInfo]) -> None:
        """Follow shards that moved: a restarted shard binds new ports (reconnect; what it
        never acknowledged goes back into the residual), a promoted backup serves the
        range elsewhere (retarget, resending what it never acknowledged unchanged)."""
        if not self.clients:  # not started, or the run is over
            return
        for info in shards:
            k = next((i for i, s in enumerate(self.shards) if s.shard_id == info.shard_id), None)
            if k is None or (info.start, info.stop) != (self.shards[k].start, self.shards[k].stop):
                continue
            current = self.shards[k]
            if (info.data_address, info.pub_address) == (
                current.data_address,
                current.pub_address,
            ):
                continue
            log.info(
                "worker %d: shard %d moved to %s; reconnecting",
                self.worker_id,
                info.shard_id,
                info.data_address,
            )
            self.shards[k] = info
            self.held_versions[k] = -1
            if self.config.replicas > 1:  # a backup took over: it has the books, resend as-is
                resent = await self.clients[k].retarget(info.data_address, info.pub_address)
                self.counters.chunks_resent += resent
                continue
            old = self.clients[k]
            self.clients[k] = self._client(info)
            await self.clients[k].start()
            await self._retire(old)  # its unacknowledged pushes come back as lost: resent later

    async def _retire(self, client: ShardClient) -> None:
        """Close ``client``, keeping what it knew that heartbeats still report."""
        await client.aclose()
        acked = self._retired_acked.setdefault(client.shard_id, {})
        for incarnation, version in client.acked_versions.items():
            acked[incarnation] = max(acked.get(incarnation, 0), version)
        self._retired_resent += client.pushes_resent

    # -- the Downpour loop -----------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        """Train until ``stop`` is set or ``max_steps`` is reached, then drain pushes."""
        config = self.config
        await self._first_fetch(stop)
        stream = worker_batches(
            self.compiled, config, self.partition, self.num_partitions, self.worker_id
        )
        local_lr = float(config.worker_lr) if self.local_steps else 0.0
        log.info(
            "worker %d training on partition %d/%d",
            self.worker_id,
            self.partition,
            self.num_partitions,
        )
        fetch_due = push_due = False
        while not stop.is_set() and not (config.max_steps and self.step >= config.max_steps):
            x, y = next(stream)
            if not config.overlap:
                await self._exchange(push_due, fetch_due, adopt=True)
                loss, pieces = await self._gradient(x, y)
            else:  # the previous step's push and the next fetch run while this one computes
                exchange = asyncio.ensure_future(self._exchange(push_due, fetch_due, adopt=False))
                try:
                    loss, pieces = await self._gradient(x, y)
                finally:
                    fetched = await exchange
                if fetched:
                    np.copyto(self.params, self.server_params)
            self._take(pieces, local_lr)
            del pieces  # JAX's output buffers: free before the next step allocates its own
            self.step += 1
            self.rate.add()
            self.loss = loss if np.isnan(self.loss) else 0.95 * self.loss + 0.05 * loss
            push_due = self.step % config.n_push == 0
            fetch_due = self.step % config.n_fetch == 0
        await self.push(flush=True)  # what the residuals still hold, so nothing is left behind
        await self.drain()
        await self.aclose()  # what was never acknowledged comes back into the residuals ...
        self._count_unpushed()  # ... and is counted: the leaving heartbeat reports it

    def _count_unpushed(self) -> None:
        """Count (and say) what the residuals still hold as the worker leaves: updates for
        a shard it could not reach, never applied anywhere."""
        for k, encoder in enumerate(self.encoders):
            held = int(np.count_nonzero(encoder.residual))
            if not held:
                continue
            self.counters.values_unpushed += held
            since, why = self._unavailable.get(k, (time.monotonic(), "not acknowledged"))
            log.warning(
                "worker %d: leaving with %d values never applied by shard %d (%s, for %.0f s)",
                self.worker_id,
                held,
                self.shards[k].shard_id,
                why,
                time.monotonic() - since,
            )

    async def _gradient(
        self, x: np.ndarray, y: np.ndarray
    ) -> tuple[float, list[tuple[int, FlatParams]]]:
        """The gradient at ``params`` in pieces (see ``CompiledModel.gradient_pieces``),
        computed in a thread (the loop goes on meanwhile)."""
        began = time.perf_counter()
        loss, pieces = await asyncio.to_thread(self.compiled.gradient_pieces, self.params, x, y)
        self.counters.gradient_seconds += time.perf_counter() - began
        if not self.notes:
            self._note_gradient_path()
        return loss, pieces

    def _take(self, pieces: list[tuple[int, FlatParams]], local_lr: float) -> None:
        """Add a gradient's pieces into the encoders (and take the local step)."""
        for offset, values in pieces:
            for k, start, part in self.compiled.layout.by_shard(offset, values):
                self.encoders[k].accumulate(part, start)
            if local_lr:
                subtract_scaled(self.params[offset : offset + values.size], values, local_lr)

    async def _exchange(self, push: bool, fetch: bool, *, adopt: bool) -> bool:
        """Push what the encoders hold, then fetch; True if the fetch changed
        ``server_params`` (copied into ``params`` too with ``adopt``)."""
        began = time.perf_counter()
        if push:
            await self.push()
        fetched = await self.fetch(adopt=adopt) if fetch else False
        self.counters.exchange_seconds += time.perf_counter() - began
        return fetched

    def _note_gradient_path(self) -> None:
        compiled = self.compiled
        if compiled.gradient_path == EAGER:
            self.notes["gradient"] = f"eager NumPy float32 ({compiled.gradient_note})"
            log.warning(
                "worker %d: %s, so it runs eagerly on float32 NumPy arrays (slower than "
                "jax.jit; write it with jax.numpy to compile it)",
                self.worker_id,
                compiled.gradient_note,
            )
        else:
            self.notes["gradient"] = compiled.gradient_path

    async def _first_fetch(self, stop: asyncio.Event) -> None:
        waited_since = time.monotonic()
        while self.fetch_missing() and not stop.is_set():
            await self.fetch()
            if self.fetch_missing():
                missing = ", ".join(str(self.shards[k].shard_id) for k in self.fetch_missing())
                log.warning(
                    "worker %d waiting for shard(s) %s since %.0f s",
                    self.worker_id,
                    missing,
                    time.monotonic() - waited_since,
                )
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), 1.0)

    def fetch_missing(self) -> list[int]:
        return [k for k, v in enumerate(self.held_versions) if v < 0]

    async def drain(self) -> None:
        try:
            async with asyncio.timeout(DRAIN_TIMEOUT):
                for client in self.clients:
                    await client.drain()
        except TimeoutError:
            log.warning(
                "worker %d: %d pushes still unacknowledged after %.0f s at shutdown",
                self.worker_id,
                sum(client.inflight for client in self.clients),
                DRAIN_TIMEOUT,
            )

    # -- fetch -------------------------------------------------------------------------------

    async def fetch(self, adopt: bool = True) -> bool:
        """Refresh ``server_params`` from every shard whose version moved (and with
        ``adopt``, ``params`` from them); True if any did.

        Every shard is asked at once. A shard that does not answer keeps its last
        parameters; the worker goes on.
        """
        fetched = await asyncio.gather(*(self._fetch_shard(k) for k in range(len(self.clients))))
        changed = any(fetched)
        if changed and adopt and self.params is not self.server_params:
            np.copyto(self.params, self.server_params)
        return changed

    async def _fetch_shard(self, k: int) -> bool:
        client, shard = self.clients[k], self.shards[k]
        self.counters.bytes_fetched_dense_equivalent += 4 * (shard.stop - shard.start)
        held = self.held_versions[k]
        same_shard = client.incarnation == self.held_incarnations[k]
        if held >= 0 and same_shard and not self._pushed_since_fetch[k]:
            if client.broadcast_version == held:
                self.counters.fetches_skipped += 1
                return False
        if held >= 0 and client.silent_for() > SHARD_SILENT:
            self.counters.fetches_unavailable += 1
            return False
        dest = self.server_params[shard.start : shard.stop]
        try:
            version, nbytes = await client.fetch(dest, since=held if same_shard else -1)
        except (PeerLost, ProtocolError, Closed) as exc:  # Closed: the shard moved
            self.counters.fetches_failed += 1
            log.warning("worker %d: fetch from shard %d failed: %s", self.worker_id, k, exc)
            return False
        self.held_versions[k] = version
        self.held_incarnations[k] = client.incarnation
        self._pushed_since_fetch[k] = False
        self.counters.fetches += 1
        self.counters.bytes_fetched += nbytes
        return True

    # -- push --------------------------------------------------------------------------------

    async def push(self, flush: bool = False) -> None:
        """Encode what each shard's encoder accumulated (sparse when ``density`` < 1) and send it.

        A shard that is silent, or still holding ``max_inflight`` unacknowledged pushes,
        is skipped: its share stays in the encoder's residual for a later push. ``flush``
        sends every residual entry (densely), and nothing where the residual is empty.
        """
        self.seq += 1
        seq = self.seq
        sent_any = False
        for k, (client, shard) in enumerate(zip(self.clients, self.shards, strict=True)):
            if flush and not self.encoders[k].residual.any():
                continue
            if client.silent_for() > SHARD_SILENT:
                self._mark_unavailable(k, f"silent for {client.silent_for():.0f} s")
                continue
            try:
                encoded = self.encoders[k].encode(density=1.0 if flush else None)
            except FloatingPointError as exc:
                self.counters.nonfinite_updates += 1
                log.warning("worker %d: push to shard %d skipped: %s", self.worker_id, k, exc)
                continue
            template = wire.Header(
                kind=wire.PUSH,
                fingerprint=self.compiled.layout.fingerprint,
                shard=shard.shard_id,
                worker=self.worker_id,
                seq=seq,
                base_version=max(self.held_versions[k], 0),
                incarnation=self.incarnation,
            )
            chunk = self.config.chunk_bytes
            if encoded.indices is None:
                chunks = list(wire.dense_chunks(template, encoded.values, chunk))
            else:
                chunks = list(wire.sparse_chunks(template, encoded.indices, encoded.values, chunk))
            before = client.bytes_pushed
            try:
                done = partial(self._push_done, k, encoded)
                sent = await client.push(seq, chunks, done, PERMIT_TIMEOUT)
            except Closed:  # the shard moved while we waited for a permit
                sent = False
            if not sent:
                self._give_back(k, encoded, chunks)
                self._mark_unavailable(k, f"{client.inflight} pushes unacknowledged")
                continue
            self._available_again(k)
            self._pushed_since_fetch[k] = True
            self.counters.bytes_pushed += client.bytes_pushed - before
            self.counters.bytes_pushed_dense_equivalent += 4 * (shard.stop - shard.start)
            self.counters.values_pushed += encoded.values.size
            sent_any = True
        if sent_any:
            self.counters.pushes += 1

    def _push_done(self, k: int, encoded: Encoded, result: PushResult) -> None:
        """A push to shard k settled: what was never applied goes back to the residual."""
        self._give_back(k, encoded, result.lost)
        if self.on_first_push is not None and wire.AckStatus.APPLIED in result.statuses:
            self.on_first_push()
            self.on_first_push = None
        if result.rejected:
            self.counters.chunks_rejected += len(result.rejected)
            log.warning(
                "worker %d: push %d to shard %d: %d chunk(s) rejected: %s",
                self.worker_id,
                result.seq,
                k,
                len(result.rejected),
                result.rejected[0],
            )

    def _give_back(self, k: int, encoded: Encoded, chunks: Sequence[wire.Chunk]) -> None:
        """Return never-applied chunks of ``encoded`` to shard k's residual, so a later
        push resends them."""
        encoder = self.encoders[k]
        for start, stop, _ in chunks:
            values = encoded.values[start:stop]
            if encoded.indices is None:
                encoder.give_back_dense(values, start)
            else:
                encoder.give_back(encoded.indices[start:stop], values)
            self.counters.values_given_back += stop - start

    def _available_again(self, k: int) -> None:
        held = self._unavailable.pop(k, None)
        if held is not None:
            log.info(
                "worker %d: pushing to shard %d again after %.0f s; what it held goes with it",
                self.worker_id,
                self.shards[k].shard_id,
                time.monotonic() - held[0],
            )

    def _mark_unavailable(self, k: int, why: str) -> None:
        self.counters.pushes_deferred += 1
        if k not in self._unavailable:
            self._unavailable[k] = (time.monotonic(), why)
            log.warning(
                "worker %d: holding updates for shard %d (%s); they stay in the residual",
                self.worker_id,
                self.shards[k].shard_id,
                why,
            )

    # -- reporting ---------------------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        counters = self.counters.as_dict()
        acked = {shard_id: dict(versions) for shard_id, versions in self._retired_acked.items()}
        for client in self.clients:
            mine = acked.setdefault(client.shard_id, {})
            for incarnation, version in client.acked_versions.items():
                mine[incarnation] = max(mine.get(incarnation, 0), version)
        for shard_id, versions in acked.items():
            counters.update(acked_counters(shard_id, versions))
        resent = self._retired_resent + sum(c.pushes_resent for c in self.clients)
        counters["pushes_resent"] = float(resent)
        now = time.monotonic()
        notes = dict(self.notes)
        for k, (since, why) in sorted(self._unavailable.items()):
            shard_id = self.shards[k].shard_id
            notes[f"worker {self.worker_id} holding shard {shard_id}"] = (
                f"updates held for {now - since:.0f} s ({why})"
            )
        return {
            "version": int(sum(max(v, 0) for v in self.held_versions)),
            "step": self.step,
            "rate": self.rate.rate(),
            "loss": 0.0 if np.isnan(self.loss) else float(self.loss),
            "counters": counters,
            "notes": notes,
        }
