"""The coordinator's state and rules: membership, the model's layout, liveness, the end.

It is not on the data path: workers push to and fetch from the shards directly, so
training continues while the coordinator is down, and members re-register on their own
when it returns. It never loads the model (so it never imports JAX): the first worker
or evaluator to register describes the model's layout, and uploads its initial
parameters unless the run restores a checkpoint; the coordinator streams them on to
each shard that registers without state. The evaluator reports evaluations; the run
ends when one reaches the target, the time or step budget is spent, or a model function
fails for good.

This module holds no sockets: :mod:`dsgd.coordinator.service` adapts it to gRPC and
:mod:`dsgd.coordinator.process` runs it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from dsgd import wire
from dsgd.checkpoint import ClusterCheckpoint
from dsgd.checkpoint.fileformat import fingerprint_error
from dsgd.config import TrainConfig, parse_target
from dsgd.control import layout_from_message
from dsgd.coordinator.initial import InitialState
from dsgd.errors import Refusal, Refused
from dsgd.layout import Layout
from dsgd.proto import control_pb2 as pb
from dsgd.stats import ACKED_PREFIX, peak_rss_bytes
from dsgd.types import FlatParams

log = logging.getLogger("dsgd.coordinator")

SHARD_GRACE = 15.0  # seconds shards keep serving after the run ends, for workers to drain
MAX_WORKERS = 4096
MAX_ACKED = 65536  # (shard, incarnation) acknowledged versions remembered
MAX_LINEAGE = 64  # a shard's past incarnations taken from one registration
UPLOAD_STALL = 10.0  # seconds without progress before another member may upload instead
ROLES = {pb.ROLE_SHARD: "shard", pb.ROLE_WORKER: "worker", pb.ROLE_EVALUATOR: "evaluator"}


@dataclass
class Member:
    role: Any  # pb.Role
    member_id: int
    incarnation: int = 0
    address: str = ""
    endpoint: pb.ShardEndpoint | None = None
    ready: bool = False
    left: bool = False
    registered_at: float = field(default_factory=time.monotonic)
    last_seen: float = field(default_factory=time.monotonic)
    stats: pb.MemberStats = field(default_factory=pb.MemberStats)
    replica: int = 0  # a shard: which of its range's processes
    caught_up: bool = False  # a backup: it holds its primary's state
    joins: int = 0  # a backup: which join its process made last
    beat: int = 0  # a shard: the number of its last heartbeat taken
    # a primary: the backups it last reported holding every update it acknowledged, as
    # (incarnation, join): the backups the coordinator may promote
    chain: frozenset[tuple[int, int]] = frozenset()


def check_protocol(version: int) -> None:
    if version != wire.PROTOCOL_VERSION:
        raise Refused(
            Refusal.MISMATCH,
            f"protocol version {version}, the coordinator speaks {wire.PROTOCOL_VERSION}; "
            "run the same dsgd version everywhere",
        )


_TCP = re.compile(r"^tcp://[^\s:/]+:(\d{1,5})$")
_HOST_PORT = re.compile(r"^[^\s/]+:(\d{1,5})$")


def check_endpoint(endpoint: pb.ShardEndpoint) -> None:
    """Refuse shard addresses no worker could connect to."""
    for name, pattern, value, optional in (
        ("data_address", _TCP, endpoint.data_address, False),
        ("pub_address", _TCP, endpoint.pub_address, False),
        ("control_address", _HOST_PORT, endpoint.control_address, True),
    ):
        if optional and not value:
            continue
        match = pattern.match(value)
        if match is None or not 0 < int(match.group(1)) < 65536:
            raise Refused(Refusal.INVALID, f"shard {name} {value[:80]!r} is not a valid address")


class Coordinator:
    """Membership and the end of the run; every method is a quick, synchronous decision."""

    def __init__(
        self,
        config: TrainConfig,
        restore: ClusterCheckpoint | None = None,
        *,
        run_age: float = 0.0,
    ) -> None:
        """``run_age``: seconds the run had been going when this coordinator started (a
        restarted coordinator keeps the run's time budget and clock, not a new one)."""
        self.config = config
        self.restore = restore
        self.layout: Layout | None = None
        self.initial: InitialState | None = (
            InitialState.from_checkpoint(restore, config) if restore is not None else None
        )
        self.booted = time.monotonic()  # this process: members may still be re-registering
        self.started = self.booted - max(0.0, run_age)  # the run
        # pushes have been applied: members need not wait for anything of the start (the
        # evaluator's first read) before joining
        self.training_began = False
        self.shards: dict[int, Member] = {}  # each range's primary
        self.backups: dict[int, dict[int, Member]] = {}  # range -> replica -> backup
        self.failovers = 0
        # acknowledged pushes lost to restarts from checkpoints: the highest version each
        # shard incarnation (low 32 bits) acknowledged to any worker, and for each
        # (shard, incarnation that ended) the version its successor started from; both
        # rebuilt from what members report, by a restarted coordinator too
        self.acked: dict[tuple[int, int], int] = {}
        self.restarts: dict[tuple[int, int], int] = {}
        self.workers: dict[int, Member] = {}
        self.evaluator: Member | None = None
        self.history: list[pb.Evaluation] = []
        self.evaluator_read = False  # it holds the parameters as they were before any push
        self.done = False
        self.done_reason = ""
        self.done_at = 0.0
        self.reached_target = False
        self.failed = False
        self.usage_error = False  # failed on a user's mistake: a restart would fail the same way
        self.target = parse_target(config.target)
        self.final_taken = False  # the final parameters were read: shards may leave
        self.refused: dict[str, int] = {}
        self.upload_progress: float | None = None  # when an upload of initial values last moved
        self.finished = asyncio.Event()  # the run is over
        self.shutdown_requested = asyncio.Event()  # ... and nobody needs to be waited for

    # -- the model ---------------------------------------------------------------------------

    def describe_model(self, message: pb.ModelLayout) -> bool:
        """Adopt (or check against) a member's model layout; True if its initial parameters
        are wanted. Refuses a layout that is invalid or differs from the cluster's."""
        try:
            offered = layout_from_message(message)
        except ValueError as exc:
            raise Refused(Refusal.INVALID, f"invalid model layout: {exc}") from None
        if self.layout is None:
            if offered.num_shards != self.config.num_shards:
                raise Refused(
                    Refusal.MISMATCH,
                    f"the model was split over {offered.num_shards} shards, the cluster runs "
                    f"{self.config.num_shards}",
                )
            if (
                self.restore is not None
                and self.restore.manifest.fingerprint != offered.fingerprint
            ):
                error = fingerprint_error(
                    f"cluster checkpoint {self.restore.directory}",
                    self.restore.manifest.fingerprint,
                    self.restore.manifest.num_shards,
                    offered.fingerprint,
                )
                raise Refused(Refusal.MISMATCH, str(error))
            self.layout = offered
            log.info("model %s: %s", self.config.model, offered.describe())
        elif offered.fingerprint != self.layout.fingerprint:
            raise Refused(
                Refusal.MISMATCH,
                f"this model's layout {offered.fingerprint:016x} differs from the cluster's "
                f"{self.layout.fingerprint:016x} ({self.config.model}); start it with the "
                "cluster's --model",
            )
        if self.initial is not None:
            return False
        moving = self.upload_progress
        if moving is not None and time.monotonic() - moving < UPLOAD_STALL:
            return False  # someone is uploading them: wait for that
        self.upload_progress = time.monotonic()
        return True

    def accept_initial(self, fingerprint: int, params: FlatParams) -> bool:
        """Take a member's upload of the initial parameters; False if already held."""
        if self.layout is None or fingerprint != self.layout.fingerprint:
            raise Refused(Refusal.MISMATCH, "initial parameters of a layout the cluster lacks")
        if params.size != self.layout.size:
            raise Refused(
                Refusal.INVALID,
                f"{params.size} initial parameters, the layout has {self.layout.size}",
            )
        if not bool(np.isfinite(params).all()):
            raise Refused(Refusal.INVALID, "the model's initial parameters hold NaN or Inf")
        self.upload_progress = None
        if self.initial is not None:
            return False
        self.initial = InitialState.fresh(params, self.layout)
        log.info("initial parameters received (%d values)", params.size)
        return True

    # -- membership --------------------------------------------------------------------------

    def all_members(self) -> list[Member]:
        evaluator = [self.evaluator] if self.evaluator is not None else []
        backups = [b for group in self.backups.values() for b in group.values()]
        return [*self.shards.values(), *backups, *self.workers.values(), *evaluator]

    def member_state(self, member: Member) -> str:
        if member.left:
            return "left"
        silent = time.monotonic() - member.last_seen
        if silent > self.config.heartbeat_timeout:
            return "dead"
        if silent > 2 * self.config.heartbeat_interval:
            return "suspect"
        return "alive"

    def waiting_for(self) -> str:
        """What the cluster is waiting for, or '' when every shard and worker is up."""
        now = time.monotonic()
        since = f"since {now - self.started:.0f} s"
        if self.layout is None:
            return f"a worker or the evaluator to describe the model ({since})"
        if (
            self.initial is None
            and len(self.shards) < self.config.num_shards
            and not self.training_began  # (mid-run the shards come back with their state)
        ):
            return f"the model's initial parameters ({since})"
        for shard_id in range(self.config.num_shards):
            shard = self.shards.get(shard_id)
            if shard is None:
                return f"shard {shard_id} to register ({since})"
            if not shard.ready:
                loading = now - shard.registered_at
                return f"shard {shard_id} to load its parameters (since {loading:.0f} s)"
            if self.member_state(shard) == "dead":
                return f"shard {shard_id} (silent for {now - shard.last_seen:.0f} s)"
        if self._evaluator_gate():
            return f"the evaluator to read the initial parameters ({since})"
        live = [w for w in self.workers.values() if self.member_state(w) != "dead"]
        if len(live) < self.config.num_workers and not self.done:
            missing = self.config.num_workers - len(live)
            return f"{missing} of {self.config.num_workers} workers to register ({since})"
        return ""

    def _evaluator_gate(self) -> bool:
        """Whether workers wait for the evaluator's first read: only at the start of a run,
        so that its first evaluation sees the parameters before any push. Once pushes were
        applied (a coordinator that restarted mid-run) nothing is gained by it, and a worker
        must never wait on a member that may itself be waiting for a shard."""
        return self.config.evaluator and not self.evaluator_read and not self.training_began

    def shards_ready(self) -> bool:
        return len(self.shards) == self.config.num_shards and all(
            s.ready for s in self.shards.values()
        )

    def register_shard(self, request: pb.RegisterShardRequest) -> pb.RegisterShardReply:
        shard_id = request.shard_id
        if not 0 <= shard_id < self.config.num_shards:
            raise Refused(
                Refusal.INVALID,
                f"shard id {shard_id} is outside this cluster's 0..{self.config.num_shards - 1}",
            )
        check_protocol(request.protocol_version)
        check_endpoint(request.endpoint)
        if not 0 <= request.replica < self.config.replicas:
            raise Refused(
                Refusal.INVALID,
                f"replica {request.replica} is outside this cluster's "
                f"0..{self.config.replicas - 1} (--replicas {self.config.replicas})",
            )
        if self.layout is None:
            return pb.RegisterShardReply(ready=False, waiting_for=self.waiting_for())
        if (
            request.following
            and shard_id not in self.shards
            and time.monotonic() - self.booted < self.config.heartbeat_timeout
        ):
            # this coordinator restarted: the primary, which holds the newest state,
            # registers first if it is alive (a backup may lack what it acknowledged last)
            waiting = f"shard {shard_id}'s primary to register again"
            return pb.RegisterShardReply(ready=False, waiting_for=waiting)
        backup = self._register_backup(request)
        if backup is not None:
            return backup
        # a shard that kept (or restored) state at least as new as ours keeps it (after a
        # restart of the coordinator, the shards' state is all there is)
        initial_version = self.initial.versions[shard_id] if self.initial is not None else 0
        has_state = (
            request.layout_fingerprint == self.layout.fingerprint
            and request.version > 0
            and request.version >= initial_version
        )
        if not has_state and self.initial is None:
            return pb.RegisterShardReply(ready=False, waiting_for=self.waiting_for())
        start = request.version if has_state else initial_version
        if has_state and request.version > initial_version:
            self.training_began = True
        self._note_restarts(request, self.shards.get(shard_id), start)
        member = self.shards[shard_id] = self._shard_member(request)
        self.backups.get(shard_id, {}).pop(request.replica, None)
        log.info(
            "shard %d registered at %s (incarnation %x)",
            shard_id,
            member.address,
            member.incarnation,
        )
        return self._registered_reply(shard_id, send_initial=not has_state, version=initial_version)

    def _note_restarts(
        self, request: pb.RegisterShardRequest, before: Member | None, start: int
    ) -> None:
        """Remember which shard incarnations ended and the version their successors started
        from: the primary this one replaces, and the lineage of its checkpoint directory
        (what a coordinator that restarted since has no other way to know)."""
        shard_id = request.shard_id
        if before is not None and before.incarnation != request.endpoint.incarnation:
            self.restarts[(shard_id, before.incarnation & 0xFFFFFFFF)] = start
        lineage = list(request.lineage)[-MAX_LINEAGE:]
        for ended, successor in zip(lineage, lineage[1:], strict=False):
            # -1: this process does not know yet (it starts from what this reply gives it)
            began = start if successor.started_from < 0 else successor.started_from
            self.restarts.setdefault((shard_id, ended.incarnation & 0xFFFFFFFF), began)

    def _shard_member(self, request: pb.RegisterShardRequest) -> Member:
        """The member a shard's registration makes, its endpoint naming its range."""
        assert self.layout is not None
        rng = self.layout.ranges[request.shard_id]
        endpoint = pb.ShardEndpoint()
        endpoint.CopyFrom(request.endpoint)
        endpoint.shard_id, endpoint.start, endpoint.stop = request.shard_id, rng.start, rng.stop
        endpoint.replica = request.replica
        return Member(
            pb.ROLE_SHARD,
            request.shard_id,
            incarnation=request.endpoint.incarnation,
            address=endpoint.data_address,
            endpoint=endpoint,
            replica=request.replica,
        )

    def _registered_reply(self, shard_id: int, **role: Any) -> pb.RegisterShardReply:
        """A registered shard's range, layout and configuration (``role``: what it starts
        from, or the primary it replicates)."""
        assert self.layout is not None
        rng = self.layout.ranges[shard_id]
        return pb.RegisterShardReply(
            ready=True,
            num_shards=self.config.num_shards,
            start=rng.start,
            stop=rng.stop,
            layout_fingerprint=self.layout.fingerprint,
            config_json=self.config.to_json(),
            **role,
        )

    def _register_backup(self, request: pb.RegisterShardRequest) -> pb.RegisterShardReply | None:
        """With replicas: a process that should serve as a backup (its range has a live
        primary, another process) registers as one and is told whom to replicate from;
        None when it is to be the primary. A primary's own replica registering again means
        the primary process is gone: a backup that holds its state takes over first."""
        shard_id, replica = request.shard_id, request.replica
        primary = self.shards.get(shard_id)
        if self.config.replicas == 1 or primary is None or self.layout is None:
            return None
        if primary.replica == replica or self.member_state(primary) in ("dead", "left"):
            if not self._promote_a_backup(shard_id, f"replica {replica} registered again"):
                return None
            primary = self.shards[shard_id]
        assert primary.endpoint is not None
        self.backups.setdefault(shard_id, {})[replica] = self._shard_member(request)
        log.info(
            "shard %d replica %d registered as a backup of replica %d",
            shard_id,
            replica,
            primary.replica,
        )
        return self._registered_reply(shard_id, primary=primary.endpoint)

    def promotable(self, backup: Member) -> bool:
        """Whether ``backup`` holds every update its range's primary acknowledged: it is
        alive, caught up, and in the primary's last report of its chain with its current
        join (a backup announces each new join before it makes it, so a report from
        before does not count)."""
        primary = self.shards.get(backup.member_id)
        return (
            primary is not None
            and primary is not backup
            and backup.caught_up
            and self.member_state(backup) == "alive"
            and (backup.incarnation, backup.joins) in primary.chain
        )

    def _promote_a_backup(self, shard_id: int, why: str) -> bool:
        """Make a backup that holds all the primary acknowledged the primary."""
        ready = [b for b in self.backups.get(shard_id, {}).values() if self.promotable(b)]
        if not ready:
            return False
        self._promote(shard_id, max(ready, key=lambda b: b.stats.version), why)
        return True

    def _promote(self, shard_id: int, backup: Member, why: str) -> None:
        old = self.shards.get(shard_id)
        self.backups[shard_id].pop(backup.replica, None)
        self.shards[shard_id] = backup
        self.failovers += 1
        log.warning(
            "shard %d: replica %d promoted to primary (%s; replica %s was primary)",
            shard_id,
            backup.replica,
            why,
            old.replica if old is not None else "?",
        )

    def _check_failover(self) -> None:
        """Promote a backup wherever the primary fell silent (a partition, a crash the
        backups did not see); not once the run is over and members leave."""
        if self.done:
            return
        for shard_id, primary in list(self.shards.items()):
            if self.backups.get(shard_id) and self.member_state(primary) in ("dead", "left"):
                self._promote_a_backup(shard_id, f"the primary was {self.member_state(primary)}")

    def _shard_reply(self, member: Member) -> dict[str, Any]:
        """What a shard's heartbeat reply says of its role: primary (and its backups) or
        backup (and its primary)."""
        primary = self.shards.get(member.member_id)
        if primary is member:
            live = [
                b.endpoint
                for b in self.backups.get(member.member_id, {}).values()
                if b.endpoint is not None and self.member_state(b) not in ("dead", "left")
            ]
            # the primary drops the others from its chain on this reply: from now on they
            # may miss what it acknowledges
            kept = {e.incarnation for e in live}
            member.chain = frozenset(c for c in member.chain if c[0] in kept)
            # just started (restarted): backups not registered again yet are not gone
            settling = time.monotonic() - self.booted < self.config.heartbeat_timeout
            return {"primary": True, "replicas": live, "settling": settling}
        if primary is not None and primary.endpoint is not None:
            return {"primary": False, "replicas": [primary.endpoint]}
        return {"primary": False}

    def initial_arrays(self, shard_id: int, fingerprint: int) -> dict[str, FlatParams]:
        """What a shard without state starts from (FetchInitialShard)."""
        if (
            self.layout is None
            or self.initial is None
            or fingerprint != self.layout.fingerprint
            or not 0 <= shard_id < self.config.num_shards
        ):
            raise Refused(Refusal.MISMATCH, "unknown shard or another model's layout")
        return self.initial.arrays(shard_id)

    def register_worker(self, request: pb.RegisterWorkerRequest) -> pb.RegisterWorkerReply:
        check_protocol(request.protocol_version)
        if self.describe_model(request.layout):
            return pb.RegisterWorkerReply(ready=False, send_initial=True)
        waiting = self.waiting_for()
        if not self.shards_ready() or self._evaluator_gate():
            return pb.RegisterWorkerReply(ready=False, waiting_for=waiting)
        worker_id = self._choose_worker_slot(request.worker_id)
        self.training_began = True
        previous = self.workers.get(worker_id)
        self.workers[worker_id] = Member(
            pb.ROLE_WORKER, worker_id, incarnation=request.incarnation, address=request.host
        )
        if previous is not None and previous.incarnation != request.incarnation:
            log.info(
                "worker %d (was %s) replaced by a new process from %s",
                worker_id,
                self.member_state(previous),
                request.host or "?",
            )
        else:
            log.info("worker %d registered from %s", worker_id, request.host or "?")
        return pb.RegisterWorkerReply(
            ready=True,
            worker_id=worker_id,
            partition=worker_id % self.config.num_workers,
            num_partitions=self.config.num_workers,
            shards=self.shard_endpoints(),
            config_json=self.config.to_json(),
        )

    def _choose_worker_slot(self, wanted: int) -> int:
        """Slot ``wanted`` (claimed, replacing its holder), else the first free or dead slot,
        else a new slot beyond them (elastic join: it shares a data partition)."""
        if wanted >= 0:
            if wanted >= MAX_WORKERS:
                raise Refused(
                    Refusal.INVALID, f"worker id {wanted} is outside 0..{MAX_WORKERS - 1}"
                )
            return wanted
        for slot in range(min(max(self.workers, default=-1) + 2, MAX_WORKERS)):
            member = self.workers.get(slot)
            if member is None or self.member_state(member) in ("dead", "left"):
                return slot
        raise Refused(Refusal.EXHAUSTED, f"the cluster has {MAX_WORKERS} live workers")

    def register_evaluator(self, request: pb.RegisterEvaluatorRequest) -> pb.RegisterEvaluatorReply:
        check_protocol(request.protocol_version)
        if self.describe_model(request.layout):
            return pb.RegisterEvaluatorReply(ready=False, send_initial=True)
        if not self.shards_ready():
            return pb.RegisterEvaluatorReply(ready=False, waiting_for=self.waiting_for())
        self.evaluator = Member(
            pb.ROLE_EVALUATOR, 0, incarnation=request.incarnation, address=request.host
        )
        log.info("evaluator registered from %s", request.host or "?")
        return pb.RegisterEvaluatorReply(
            ready=True, shards=self.shard_endpoints(), config_json=self.config.to_json()
        )

    def shard_endpoints(self) -> list[pb.ShardEndpoint]:
        return [
            self.shards[k].endpoint  # type: ignore[misc]
            for k in sorted(self.shards)
            if self.shards[k].endpoint is not None
        ]

    def heartbeat(self, request: pb.HeartbeatRequest) -> pb.HeartbeatReply:
        self._check_failover()
        member = self._member(request.role, request.id, request.replica)
        if member is None:
            if request.leaving and request.role == pb.ROLE_WORKER:
                self._worker_left_unregistered(request)
            return pb.HeartbeatReply(reregister=True, shutdown=self.done, reason=self.done_reason)
        if member.incarnation != request.incarnation:
            if request.role == pb.ROLE_SHARD:
                return pb.HeartbeatReply(reregister=True)
            role = ROLES[request.role]  # its slot went to a newer process
            return pb.HeartbeatReply(
                shutdown=True, reason=f"{role} {request.id} was replaced by a newer process"
            )
        member.last_seen = time.monotonic()
        member.stats.CopyFrom(request.stats)
        member.ready = True
        shard_role: dict[str, Any] = {}
        if request.role == pb.ROLE_WORKER:
            self._note_acked(request.stats.counters)
        if request.role == pb.ROLE_SHARD:
            # a heartbeat handled late (its call timed out, say) says nothing new
            fresh = request.beat > member.beat or not request.beat
            primary = self.shards.get(request.id)
            if fresh:
                member.beat = request.beat
                member.caught_up, member.joins = request.caught_up, request.joins
            if fresh and primary is member:
                member.chain = frozenset((c.incarnation, c.joins) for c in request.chain)
            elif (
                fresh
                and request.lost_primary
                and not self.done  # primaries leave at the end of the run: no failover
                and primary is not None
                and primary.incarnation == request.lost_primary
                and self.promotable(member)
            ):
                self._promote(request.id, member, "its backup lost the connection to it")
            shard_role = self._shard_reply(member)
        if request.leaving:
            member.left = True
            if request.failure:
                name = f"{ROLES[request.role]} {request.id}"
                self.finish(f"{name} stopped: {request.failure}", failed=True, usage_error=True)
            self._check_step_budget()
        return pb.HeartbeatReply(
            shutdown=self._should_stop(member),
            reason=self.done_reason,
            shards=self.shard_endpoints(),
            **shard_role,
        )

    def _worker_left_unregistered(self, request: pb.HeartbeatRequest) -> None:
        """A worker this coordinator never registered (it restarted while the worker was
        finishing) says goodbye: keep its final numbers, so that the step budget and the
        loss accounting see it, unless its slot went to another live process."""
        if not 0 <= request.id < MAX_WORKERS:
            return
        holder = self.workers.get(request.id)
        if holder is not None and self.member_state(holder) not in ("dead", "left"):
            return
        member = Member(pb.ROLE_WORKER, request.id, incarnation=request.incarnation)
        member.stats.CopyFrom(request.stats)
        member.ready = member.left = True
        self.workers[request.id] = member
        self._note_acked(request.stats.counters)
        log.info(
            "worker %d left (it had not registered again since this coordinator started)",
            request.id,
        )
        self._check_step_budget()

    def _note_acked(self, counters: Any) -> None:
        """Take a worker's ``acked_shard{K}_{incarnation}`` counters (its highest
        acknowledged version per shard incarnation)."""
        for key, value in counters.items():
            if not key.startswith(ACKED_PREFIX):
                continue
            shard, _, incarnation = key.removeprefix(ACKED_PREFIX).partition("_")
            with contextlib.suppress(ValueError):
                slot = (int(shard), int(incarnation))
                if len(self.acked) < MAX_ACKED or slot in self.acked:
                    self.acked[slot] = max(self.acked.get(slot, 0), int(value))

    def lost_pushes(self) -> dict[int, int]:
        """Per shard: acknowledged pushes its restarts from checkpoints lost (the versions
        between the one it restarted from and the last one workers saw acknowledged)."""
        lost: dict[int, int] = {}
        for (shard_id, incarnation), start in self.restarts.items():
            gone = max(0, self.acked.get((shard_id, incarnation), 0) - start)
            lost[shard_id] = lost.get(shard_id, 0) + gone
        return lost

    def _member(self, role: int, member_id: int, replica: int = 0) -> Member | None:
        if role == pb.ROLE_SHARD:
            primary = self.shards.get(member_id)
            if primary is not None and primary.replica == replica:
                return primary
            return self.backups.get(member_id, {}).get(replica)
        if role == pb.ROLE_WORKER:
            return self.workers.get(member_id)
        if role == pb.ROLE_EVALUATOR:
            return self.evaluator
        raise Refused(Refusal.INVALID, f"unknown role {role}")

    def _should_stop(self, member: Member) -> bool:
        """Workers and the evaluator stop as soon as the run is over; shards once the
        final parameters are read (or nobody came for them)."""
        if not self.done:
            return False
        if member.role != pb.ROLE_SHARD:
            return True
        return self.final_taken or time.monotonic() - self.done_at > SHARD_GRACE

    # -- evaluations and the end of the run ----------------------------------------------------

    def report_evaluation(self, report: pb.EvaluationReport) -> pb.EvaluationReply:
        evaluator = self.evaluator
        if evaluator is None or report.incarnation != evaluator.incarnation:
            return pb.EvaluationReply(shutdown=True, reason="this evaluator is not registered")
        evaluator.last_seen = time.monotonic()
        if report.failure:
            self.finish(f"evaluation failed: {report.failure}", failed=True, usage_error=True)
            return pb.EvaluationReply(shutdown=True, reason=self.done_reason)
        self.evaluator_read = True
        if report.read:
            return pb.EvaluationReply(shutdown=self.done, reason=self.done_reason)
        final = report.evaluation.final
        if final != self.done:
            # a periodic evaluation that came too late, or a final one before the end
            return pb.EvaluationReply(shutdown=self.done, reason=self.done_reason)
        entry = pb.Evaluation()
        entry.CopyFrom(report.evaluation)
        entry.elapsed_seconds = time.monotonic() - self.started
        self.history.append(entry)
        if final:
            log.info(
                "final evaluation of %d examples: %s",
                entry.examples,
                ", ".join(f"{k} {v:.4g}" for k, v in sorted(entry.metrics.items())),
            )
        else:
            self._judge(dict(entry.metrics))
        return pb.EvaluationReply(shutdown=self.done, reason=self.done_reason)

    def _judge(self, metrics: dict[str, float]) -> None:
        """End the run if an evaluation meets the target (a target naming a metric the model
        does not return is the user's mistake, said at the first evaluation)."""
        target = self.target
        if target is None:
            return
        if target.metric not in metrics:
            hint = " (it comes from the spec's loss function)" if target.metric == "loss" else ""
            self.finish(
                f"--target {self.config.target} names metric {target.metric!r}{hint}, but the "
                f"model's metrics are: {', '.join(sorted(metrics)) or 'none'}; target one of "
                f"those or return {target.metric!r} from the spec's metrics",
                failed=True,
                usage_error=True,
            )
        elif target.reached(metrics):
            self.finish(f"target {target} reached ({target.metric} {metrics[target.metric]:.4g})")
            self.reached_target = True

    def _check_step_budget(self) -> None:
        config = self.config
        workers = list(self.workers.values())
        if (
            config.max_steps
            and len(workers) >= config.num_workers
            and all(w.left and w.stats.step >= config.max_steps for w in workers)
        ):  # workers leave only once their last push is acknowledged: nothing is in flight
            self.finish(f"step budget of {config.max_steps} per worker spent")

    def budget_spent(self) -> None:
        """The time budget ran out: end the run, saying what it was still waiting for."""
        elapsed = time.monotonic() - self.started
        waiting = self.waiting_for()
        if not self.shards_ready() and waiting:
            self.finish(f"gave up after {elapsed:.0f} s waiting for {waiting}")
        else:
            self.finish(f"time budget of {self.config.max_seconds:.0f} s spent")

    def finish(self, reason: str, *, failed: bool = False, usage_error: bool = False) -> None:
        """End the run: remember why; members learn it from their next heartbeat."""
        if self.done:
            return
        self.done_reason = reason
        self.done_at = time.monotonic()
        self.done = True
        self.failed = failed
        self.usage_error = usage_error
        self.finished.set()
        log.info("run finished: %s", reason)

    # -- status ------------------------------------------------------------------------------

    def status(self) -> pb.ClusterStatus:
        now = time.monotonic()
        members = [
            pb.MemberStatus(
                role=m.role,
                id=m.member_id,
                state=self.member_state(m) if m.ready else "starting",
                last_seen_seconds=now - m.last_seen,
                stats=m.stats,
                address=m.address,
                incarnation=m.incarnation,
                replica=m.replica,
                primary=m.role == pb.ROLE_SHARD and self.shards.get(m.member_id) is m,
                promotable=m.role == pb.ROLE_SHARD and self.promotable(m),
            )
            for m in sorted(self.all_members(), key=lambda m: (m.role, m.member_id, m.replica))
        ]
        layout = self.layout
        return pb.ClusterStatus(
            model=self.config.model,
            num_params=layout.size if layout else 0,
            layout_fingerprint=layout.fingerprint if layout else 0,
            num_shards=self.config.num_shards,
            num_workers=self.config.num_workers,
            elapsed_seconds=now - self.started,
            members=members,
            history=self.history,
            done=self.done,
            done_reason=self.done_reason,
            reached_target=self.reached_target,
            failed=self.failed,
            usage_error=self.usage_error,
            peak_rss_bytes=peak_rss_bytes(),
            waiting_for=self.waiting_for(),
            target=self.config.target,
            config_json=self.config.to_json(),
            shards=self.shard_endpoints(),
            refused=self.refused,
            failovers=self.failovers,
            lost_pushes=self.lost_pushes(),
            replicas=[
                b.endpoint
                for k in sorted(self.backups)
                for _, b in sorted(self.backups[k].items())
                if b.endpoint is not None
            ],
        )
