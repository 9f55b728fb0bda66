"""The shard's core: its state, at-most-once books, apply, fetch planning and stats.

This module has no sockets. :meth:`ShardCore.handle` takes one request as frames (the
header and its arrays, as ZeroMQ delivers them) and returns the reply messages to send
back; :class:`~dsgd.shard.server.ShardServer` is the thin ROUTER/PUB transport around
it, and the benchmarks and fuzzers drive it directly.

Every message is untrusted. The core checks a request in the order of :data:`CHECKS` and
refuses it for the first check that fails: counted under ``rejected_<reason>``, logged
at a limited rate, answered (an ERROR for the checks that stop before a push is looked
at, a rejecting ACK for the others), and never changing a parameter.
"""

from __future__ import annotations

import logging
import secrets
import struct
from collections import Counter, OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any, NamedTuple

import msgpack
import numpy as np

from dsgd import checkpoint, wire
from dsgd.changes import ChangeTracker
from dsgd.config import parse_staleness
from dsgd.errors import ProtocolError
from dsgd.optim import SGD, ServerOptimizerT
from dsgd.stats import CounterRecord, RateLimitedLog, RateMeter, StalenessHistogram
from dsgd.types import FlatParams, ShardRange
from dsgd.wire import AckStatus

log = logging.getLogger("dsgd.shard")

DEDUP_WINDOW = 4096  # push sequences per worker remembered for at-most-once apply
PARTIAL_HORIZON = 16  # versions after which a push still missing chunks is given up on
MAX_WORKER_BOOKS = 4096  # (worker, incarnation) pairs remembered
MAX_UPDATE_VALUE = 1e15  # larger gradient values are refused: applying them could overflow
SPARSE_PULL_MAX_FRACTION = 0.5  # above this fraction of changed blocks, send the full range


class Check(NamedTuple):
    """One of the checks a request must pass, in :data:`CHECKS` order."""

    reason: str  # the rejection counter (``rejected_<reason>``)
    stage: int  # checks of one stage cannot both fail on one message in a way that matters
    answer: str  # wire.ERROR: refused before its content is read; wire.ACK: a rejecting ACK
    what: str


CHECKS: tuple[Check, ...] = (
    Check("malformed", 0, wire.ERROR, "frames that do not decode (wire.decode)"),
    Check("not_ready", 1, wire.ERROR, "the shard has no parameters yet"),
    Check("layout", 2, wire.ERROR, "another layout fingerprint or shard id"),
    Check("kind", 3, wire.ERROR, "a kind a shard does not accept"),
    Check("backup", 3, wire.ERROR, "a push to a backup, which applies only its primary's"),
    Check("worker", 4, wire.ACK, "a negative worker id"),
    # one stage: an unsorted index list may also end beyond the range, either names it
    Check("range", 5, wire.ACK, "a dense chunk or a sparse index beyond the range"),
    Check("order", 5, wire.ACK, "sparse indices not strictly increasing"),
    Check("nonfinite", 6, wire.ACK, f"NaN, Inf or a value beyond +-{MAX_UPDATE_VALUE:g}"),
    Check("version", 7, wire.ACK, "a negative base version"),
)
"""The order in which the core checks a request; the first failing check names the refusal."""

STAGE = {check.reason: check.stage for check in CHECKS}
ANSWERED_WITH_ERROR = frozenset(c.reason for c in CHECKS if c.answer == wire.ERROR)


class Outcome(NamedTuple):
    """What became of one push chunk."""

    status: AckStatus
    reason: str = ""  # why, when REJECTED


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
    version: int = 0  # the shard's version once its first chunk was applied


def _record_fields(push: _PushRecord) -> list[Any]:
    return [push.staleness, sorted(push.chunks), push.applied, push.version]


@dataclass
class _WorkerBook:
    """Per-worker at-most-once bookkeeping and staleness."""

    pushes: OrderedDict[int, _PushRecord] = field(default_factory=OrderedDict)
    staleness: StalenessHistogram = field(default_factory=StalenessHistogram)


@dataclass(slots=True)
class ShardCounters(CounterRecord):
    """A shard's cumulative counters, reported in its heartbeat under these names (its
    refusals are counted apart, per check: :attr:`ShardCore.rejected`)."""

    bytes_received: int = 0  # payload of every request, refused or not
    bytes_sent: int = 0  # payload of fetch replies
    pushes: int = 0  # pushes applied (the version counts these)
    updates_applied: int = 0  # push chunks applied
    values_applied: int = 0
    duplicates: int = 0  # chunks applied before (resent or replayed): acknowledged only
    dropped_stale: int = 0  # chunks refused by --staleness drop:K
    fetches_sparse: int = 0  # answered with only the entries changed since the worker's version
    fetches_dense: int = 0
    replication_sends_failed: int = 0  # sends to a backup that failed (it left the chain)
    replies_lost: int = 0  # replies to a peer that had gone away


class ShardCore:
    """One shard's parameters and the rules for changing and reading them."""

    def __init__(
        self,
        shard_id: int,
        fingerprint: int = 0,
        optimizer: ServerOptimizerT | None = None,
        state: ShardState | None = None,
        *,
        staleness: str = "none",
        chunk_bytes: int = wire.DEFAULT_CHUNK_BYTES,
    ) -> None:
        self.shard_id = shard_id
        self.incarnation = secrets.randbits(62) + 1
        self.counters = ShardCounters()
        self.rejected: Counter[str] = Counter()
        self.apply_rate = RateMeter()
        self.rate_log = RateLimitedLog(log)
        self.primary = True  # a backup applies only what its primary forwards
        self.installed = False
        self.install(
            fingerprint,
            optimizer or SGD(1.0),
            state or ShardState(np.zeros(0, np.float32), {}),
            staleness=staleness,
            chunk_bytes=chunk_bytes,
        )
        self.installed = state is not None

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

        A shard binds its sockets before it registers (its addresses are part of the
        registration), but its parameters arrive only after it, hence two steps.
        """
        self.fingerprint = fingerprint
        self.optimizer = optimizer
        self.state = state
        self.staleness_policy, self.staleness_bound = parse_staleness(staleness)
        self.chunk_bytes = chunk_bytes
        self.changes = ChangeTracker(state.params.size, state.version)
        # at-most-once books per (worker id, worker incarnation): a restarted worker
        # starts its sequence numbers again without being mistaken for a replay
        self._workers: OrderedDict[tuple[int, int], _WorkerBook] = OrderedDict()
        # pushes applied in part (chunks still to come), oldest first: a fetch answered
        # meanwhile names a version before them (see plan_fetch)
        self._partial: OrderedDict[int, _PushRecord] = OrderedDict()
        self.shard_range = shard_range or ShardRange(0, state.params.size)
        self.num_shards = num_shards
        self.installed = True

    def snapshot(self, metadata: dict[str, Any] | None = None) -> checkpoint.Checkpoint:
        """A copy of the state for a checkpoint (a memcpy; writing it happens elsewhere)."""
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

    def export_books(self) -> bytes:
        """The at-most-once books (which chunks of which pushes were seen), for a backup
        to start from, so a push retransmitted after a failover is applied only once."""
        books = [
            [worker, incarnation, [[seq, *_record_fields(p)] for seq, p in book.pushes.items()]]
            for (worker, incarnation), book in self._workers.items()
        ]
        return bytes(msgpack.packb(books, use_bin_type=True))

    def import_books(self, blob: bytes) -> None:
        """Take the books :meth:`export_books` made (a ProtocolError if they do not parse)."""
        try:
            books = msgpack.unpackb(blob, raw=False, strict_map_key=True)
            workers: OrderedDict[tuple[int, int], _WorkerBook] = OrderedDict()
            for worker, incarnation, pushes in books:
                book = workers[(int(worker), int(incarnation))] = _WorkerBook()
                for seq, staleness, chunks, applied, version in pushes:
                    book.pushes[int(seq)] = _PushRecord(
                        int(staleness), {int(c) for c in chunks}, bool(applied), int(version)
                    )
        except (ValueError, TypeError, struct.error, msgpack.ExtraData) as exc:
            raise ProtocolError(f"at-most-once books do not parse: {exc}") from None
        self._workers = workers

    # -- requests --------------------------------------------------------------------------

    def handle(
        self,
        message: Sequence[Any],
        acks: list[wire.Header] | None = None,
        *,
        replicated: bool = False,
    ) -> list[list[Any]]:
        """Handle one request (``[header, arrays...]``); return the reply messages.

        Checks run in :data:`CHECKS` order up to the kind; the push checks follow in
        :meth:`apply`. With ``acks``, a push's ACK is appended there instead of returned,
        for the caller to send later with others to the same peer (:func:`wire.merge_acks`).
        ``replicated``: a push its primary forwarded, which a backup applies.
        """
        self.counters.bytes_received += wire.payload_bytes(message)
        try:
            header, arrays = wire.decode(message)
        except ProtocolError as exc:
            return [self.refuse("malformed", str(exc))]
        if not self.installed:
            reason = f"shard {self.shard_id} has no parameters yet; retry shortly"
            return [self.refuse("not_ready", reason, header)]
        if header.fingerprint != self.fingerprint or header.shard != self.shard_id:
            reason = (
                f"layout fingerprint {header.fingerprint:016x} / shard {header.shard} does not "
                f"match this shard ({self.fingerprint:016x} / {self.shard_id}): the peer runs "
                "another model or shard count"
            )
            return [self.refuse("layout", reason, header)]
        if header.kind == wire.PUSH:
            if not (self.primary or replicated):
                reason = f"shard {self.shard_id} is a backup now; push to its primary"
                return [self.refuse("backup", reason, header, wire.NOT_PRIMARY)]
            ack = self._ack(header, self.apply(header, arrays))
            if acks is not None:
                acks.append(ack)
                return []
            return [[wire.pack_header(ack)]]
        if header.kind == wire.FETCH:
            return self.plan_fetch(header)
        if header.kind == wire.JOIN:  # (a primary's server takes joins before the core)
            reason = f"shard {self.shard_id} is not serving as primary (yet)"
            return [self.refuse("backup", reason, header, wire.NOT_PRIMARY)]
        return [self.refuse("kind", f"a shard does not accept {header.kind!r} messages", header)]

    def apply(self, header: wire.Header, arrays: list[np.ndarray]) -> Outcome:
        """Check and apply one decoded push chunk in place (the push part of :data:`CHECKS`).

        Only an APPLIED outcome changes anything. The version counts pushes, not chunks:
        it moves on the first chunk of a push that is applied.
        """
        indices = arrays[0] if header.encoding == wire.SPARSE else None
        values32 = arrays[-1].astype(np.float32, copy=False)
        refusal = self._check_push(header, indices, values32)
        if refusal is not None:
            return Outcome(AckStatus.REJECTED, self._reject(*refusal))
        state = self.state
        book = self._book(header.worker, header.incarnation)
        push = book.pushes.get(header.seq)
        if push is None:
            if len(book.pushes) >= DEDUP_WINDOW and header.seq <= next(iter(book.pushes)):
                self.counters.duplicates += 1  # older than anything remembered: a replay
                return Outcome(AckStatus.DUPLICATE)
            # staleness is measured once per push, against the version before it
            push = _PushRecord(staleness=max(0, state.version - header.base_version))
            book.pushes[header.seq] = push
            if len(book.pushes) > DEDUP_WINDOW:
                book.pushes.popitem(last=False)
            book.staleness.add(push.staleness)
        if header.chunk in push.chunks:
            self.counters.duplicates += 1
            return Outcome(AckStatus.DUPLICATE)
        push.chunks.add(header.chunk)
        lr_scale = 1.0
        if self.staleness_policy == "drop" and push.staleness > self.staleness_bound:
            self.counters.dropped_stale += 1
            return Outcome(AckStatus.STALE)
        if self.staleness_policy == "scale":
            lr_scale = 1.0 / (1.0 + push.staleness)
        if not push.applied:
            push.applied = True
            state.version += 1
            push.version = state.version
            self.counters.pushes += 1
        self._track_partial(push, header.nchunks)
        self._apply_values(header, indices, values32, lr_scale)
        self.counters.updates_applied += 1
        self.counters.values_applied += header.count
        self.apply_rate.add()
        return Outcome(AckStatus.APPLIED)

    def _track_partial(self, push: _PushRecord, nchunks: int) -> None:
        """Keep ``_partial`` to the pushes with chunks still to come; forget those that
        fell PARTIAL_HORIZON versions behind (their sender died, or a chunk was refused)."""
        key = id(push)
        if len(push.chunks) < nchunks:
            self._partial.setdefault(key, push)
        else:
            self._partial.pop(key, None)
        while self._partial:
            oldest = next(iter(self._partial.values()))
            if oldest.version > self.state.version - PARTIAL_HORIZON:
                break
            self._partial.popitem(last=False)

    def fetch_version(self) -> int:
        """The version a fetch reply names: the current one, or just before the oldest
        push applied in part. Its later chunks are stamped with versions after the one
        the reply names, so the requester's next fetch of what changed since then
        includes them; naming the current version would leave the requester without
        them until those parameters change again."""
        if not self._partial:
            return self.state.version
        return min(self.state.version, next(iter(self._partial.values())).version - 1)

    def _check_push(
        self, header: wire.Header, indices: np.ndarray | None, values32: FlatParams
    ) -> tuple[str, str] | None:
        """The first push check (``worker`` onwards in :data:`CHECKS`) that fails, if any."""
        size = self.state.params.size
        if header.worker < 0:
            return "worker", f"push from invalid worker id {header.worker}"
        if indices is None:
            if header.offset + header.count > size:
                stop = header.offset + header.count
                return "range", f"dense chunk [{header.offset}, {stop}) exceeds {size} parameters"
        else:
            if header.count and int(indices[-1]) >= size:
                return "range", f"sparse index beyond the shard's {size} parameters"
            if header.count > 1 and not bool(np.all(indices[1:] > indices[:-1])):
                return "order", "sparse indices are not strictly increasing"
        # NaN makes min/max NaN and fails both comparisons; the bound keeps a finite but
        # absurd update from overflowing the parameters or Adagrad's accumulator
        low, high = values32.min(initial=0.0), values32.max(initial=0.0)
        if not (-MAX_UPDATE_VALUE <= low and high <= MAX_UPDATE_VALUE):
            return "nonfinite", f"update contains NaN, Inf or values beyond +-{MAX_UPDATE_VALUE:g}"
        if header.base_version < 0:
            return "version", f"push claims base version {header.base_version}"
        return None

    def _apply_values(
        self,
        header: wire.Header,
        indices: np.ndarray | None,
        values32: FlatParams,
        lr_scale: float,
    ) -> None:
        state = self.state
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

    def plan_fetch(self, request: wire.Header) -> list[list[Any]]:
        """The PARAMS messages answering a FETCH: the range, or (when cheaper) only the
        parameters changed since the version the requester holds. Zero-copy views of
        the live parameters (Hogwild: a push applied meanwhile may show in part, and then
        the reply names the version before it: see :meth:`fetch_version`)."""
        params = self.state.params
        template = replace(
            request,
            kind=wire.PARAMS,
            version=self.fetch_version(),
            incarnation=self.incarnation,
            offset=0,
            status="",
            reason="",
        )
        indices = None
        if request.base_version >= 0:
            indices = self.changes.changed_since(request.base_version, SPARSE_PULL_MAX_FRACTION)
        if indices is not None:
            chunks = wire.sparse_chunks(template, indices, params[indices], self.chunk_bytes)
            self.counters.fetches_sparse += 1
        else:
            chunks = wire.dense_chunks(template, params, self.chunk_bytes)
            self.counters.fetches_dense += 1
        messages = [chunk.frames for chunk in chunks]
        self.counters.bytes_sent += sum(wire.payload_bytes(m) for m in messages)
        return messages

    def version_header(self) -> wire.Header:
        """The VERSION broadcast announcing the current version."""
        return wire.Header(
            kind=wire.VERSION,
            fingerprint=self.fingerprint,
            shard=self.shard_id,
            version=self.state.version,
            incarnation=self.incarnation,
        )

    # -- refusals --------------------------------------------------------------------------

    def _ack(self, request: wire.Header, outcome: Outcome) -> wire.Header:
        return replace(
            request,
            kind=wire.ACK,
            count=1,
            version=self.state.version,
            incarnation=self.incarnation,
            status=outcome.status.value,
            reason=outcome.reason,
            encoding=wire.DENSE,
            dtype="float32",
        )

    def refuse(
        self, key: str, reason: str, request: wire.Header | None = None, status: str = ""
    ) -> list[Any]:
        """Count and log a refusal; the ERROR message that answers it (``status``: a word
        the client acts on, such as :data:`wire.NOT_PRIMARY`)."""
        base = request or wire.Header(kind=wire.ERROR, fingerprint=self.fingerprint, shard=-1)
        header = replace(
            base,
            kind=wire.ERROR,
            about=request.kind if request is not None else "",
            count=0,
            encoding=wire.DENSE,
            dtype="float32",
            status=status,
            reason=self._reject(key, reason),
            version=self.state.version,
            incarnation=self.incarnation,
        )
        return [wire.pack_header(header)]

    def _reject(self, key: str, reason: str) -> str:
        self.rejected[key] += 1
        self.rate_log.warning(key, f"shard {self.shard_id} rejected a message: {reason}")
        return reason[:200]

    # -- reporting -------------------------------------------------------------------------

    def stats(self) -> dict[str, float]:
        """Cumulative counters for heartbeats and status (flat, name -> number)."""
        per_worker = self.worker_staleness()
        merged = StalenessHistogram()
        for histogram in per_worker.values():
            merged.merge(histogram)
        out = self.counters.as_dict()
        out.update({f"rejected_{k}": float(v) for k, v in self.rejected.items()})
        out["rejected"] = float(sum(self.rejected.values()))
        for q in (50, 90, 99):
            out[f"staleness_p{q}"] = merged.percentile(q)
        out["staleness_max"] = float(merged.maximum)
        out["size"] = float(self.state.params.size)
        for worker, histogram in per_worker.items():
            out[f"staleness_p50_worker{worker}"] = histogram.percentile(50)
            out[f"staleness_p99_worker{worker}"] = histogram.percentile(99)
        return out

    def worker_staleness(self) -> dict[int, StalenessHistogram]:
        """Staleness histogram per worker id (all its incarnations together)."""
        out: dict[int, StalenessHistogram] = {}
        for (worker, _), book in self._workers.items():
            out.setdefault(worker, StalenessHistogram()).merge(book.staleness)
        return out
