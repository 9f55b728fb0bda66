"""The coordinator: membership, partitions, liveness, evaluation and the end of the run.

It is not on the data path: workers push to and fetch from the shards directly,
so training continues while the coordinator is down, and members re-register on
their own when it returns. It holds the cluster's :class:`~dsgd.config.TrainConfig`
and the model's initial parameters, which it streams to each shard that registers
without state. Periodically it fetches the shards' current parameters (like any
worker would) and evaluates them on the held-out split in a thread, ending the run
when the target accuracy is reached or the budget is spent.

Run it by hand with ``python -m dsgd.coordinator --model MOD:ATTR [--port P]``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import re
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import zmq.asyncio
from google.protobuf import json_format

from dsgd import wire
from dsgd.checkpoint import ClusterCheckpoint, read_cluster_checkpoint
from dsgd.client import ShardClient
from dsgd.config import TrainConfig, add_config_arguments, config_from_arguments
from dsgd.control import start_grpc_server
from dsgd.coordinator_service import CoordinatorService, Refused
from dsgd.errors import DsgdError, PeerLost
from dsgd.initial_state import InitialState
from dsgd.model import CompiledModel, ModelSpec, load_model
from dsgd.process import run_process, setup_logging, write_ready_file
from dsgd.proto import control_pb2 as pb
from dsgd.proto import control_pb2_grpc as pb_grpc
from dsgd.types import FlatParams

log = logging.getLogger("dsgd.coordinator")

SHARD_SILENT = 2.0  # seconds without a word from a shard before evaluation skips it
SHARD_GRACE = 15.0  # seconds shards keep serving after the run ends, for workers to drain
MAX_WORKERS = 4096


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


def check_protocol(version: int) -> None:
    if version != wire.PROTOCOL_VERSION:
        raise Refused(
            grpc.StatusCode.FAILED_PRECONDITION,
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
            raise Refused(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"shard {name} {value[:80]!r} is not a valid address",
            )


class Coordinator:
    """The coordinator's state and logic; :class:`CoordinatorService` adapts it to gRPC."""

    def __init__(
        self,
        config: TrainConfig,
        compiled: CompiledModel,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        final_params_path: Path | None = None,
        restore: ClusterCheckpoint | None = None,
    ) -> None:
        self.config = config
        self.compiled = compiled
        self.layout = compiled.layout
        self.initial = InitialState.fresh(compiled, config.num_shards)
        if restore is not None:
            self.initial = InitialState.from_checkpoint(restore, config)
        self.host = host
        self.port = port
        self.final_params_path = final_params_path
        self.started = time.monotonic()
        self.shards: dict[int, Member] = {}
        self.workers: dict[int, Member] = {}
        self.history: list[pb.Evaluation] = []
        self.done = False
        self.done_reason = ""
        self.done_at = 0.0
        self.reached_target = False
        self.final_params: FlatParams | None = None
        self.refused: dict[str, int] = {}
        self.shutdown_requested = asyncio.Event()
        self._server: grpc.aio.Server | None = None
        self._ctx = zmq.asyncio.Context()
        self._eval_clients: dict[int, tuple[int, ShardClient]] = {}  # shard -> (incarnation, c)
        self._tasks: list[asyncio.Task[None]] = []
        self._closed = False

    # -- lifecycle -------------------------------------------------------------------------

    async def start(self) -> int:
        """Listen for gRPC and start evaluating; return the bound port."""
        self._server, self.port = await start_grpc_server(
            self.host,
            self.port,
            lambda server: pb_grpc.add_CoordinatorServicer_to_server(
                CoordinatorService(self), server
            ),
            "coordinator",
            self.refused,
        )
        self._tasks.append(asyncio.create_task(self._evaluate_loop(), name="evaluate"))
        log.info(
            "coordinator on %s:%d: %s; %d worker(s), target accuracy %.3f",
            self.host,
            self.port,
            self.layout.describe(),
            self.config.num_workers,
            self.config.target_accuracy,
        )
        return self.port

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for _, client in self._eval_clients.values():
            await client.aclose()
        if self._server is not None:
            await self._server.stop(grace=0.5)
        self._ctx.term()

    async def wait_finished(self, linger: float = 30.0) -> None:
        """Return once the run is over and every member has left (or ``linger`` passed)."""
        while not (self.done or self.shutdown_requested.is_set()):
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.shutdown_requested.wait(), 0.2)
        deadline = time.monotonic() + linger
        while not self.shutdown_requested.is_set() and time.monotonic() < deadline:
            if all(self.member_state(m) in ("left", "dead") for m in self.all_members()):
                return
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.shutdown_requested.wait(), 0.1)

    # -- membership ------------------------------------------------------------------------

    def all_members(self) -> list[Member]:
        return [*self.shards.values(), *self.workers.values()]

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
        for shard_id in range(self.config.num_shards):
            shard = self.shards.get(shard_id)
            if shard is None:
                return f"shard {shard_id} to register (since {now - self.started:.0f} s)"
            if not shard.ready:
                since = now - shard.registered_at
                return f"shard {shard_id} to load its parameters (since {since:.0f} s)"
            if self.member_state(shard) == "dead":
                return f"shard {shard_id} (silent for {now - shard.last_seen:.0f} s)"
        live = [w for w in self.workers.values() if self.member_state(w) != "dead"]
        if len(live) < self.config.num_workers and not self.done:
            return (
                f"{self.config.num_workers - len(live)} of {self.config.num_workers} workers "
                f"to register (since {now - self.started:.0f} s)"
            )
        return ""

    def shards_ready(self) -> bool:
        return len(self.shards) == self.config.num_shards and all(
            s.ready for s in self.shards.values()
        )

    def register_shard(self, request: pb.RegisterShardRequest) -> pb.RegisterShardReply:
        shard_id = request.shard_id
        if not 0 <= shard_id < self.config.num_shards:
            raise Refused(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"shard id {shard_id} is outside this cluster's 0..{self.config.num_shards - 1}",
            )
        check_protocol(request.protocol_version)
        check_endpoint(request.endpoint)
        rng = self.layout.ranges[shard_id]
        endpoint = pb.ShardEndpoint()
        endpoint.CopyFrom(request.endpoint)
        endpoint.shard_id, endpoint.start, endpoint.stop = shard_id, rng.start, rng.stop
        # a shard that kept (or restored) state at least as new as ours keeps it
        has_state = (
            request.layout_fingerprint == self.layout.fingerprint
            and request.version > 0
            and request.version >= self.initial.versions[shard_id]
        )
        member = Member(
            pb.ROLE_SHARD,
            shard_id,
            incarnation=request.endpoint.incarnation,
            address=endpoint.data_address,
            endpoint=endpoint,
        )
        self.shards[shard_id] = member
        log.info(
            "shard %d registered at %s (incarnation %x)",
            shard_id,
            endpoint.data_address,
            endpoint.incarnation,
        )
        return pb.RegisterShardReply(
            num_shards=self.config.num_shards,
            start=rng.start,
            stop=rng.stop,
            layout_fingerprint=self.layout.fingerprint,
            config_json=self.config.to_json(),
            send_initial=not has_state,
            version=self.initial.versions[shard_id],
        )

    def register_worker(self, request: pb.RegisterWorkerRequest) -> pb.RegisterWorkerReply:
        check_protocol(request.protocol_version)
        if request.layout_fingerprint != self.layout.fingerprint:
            raise Refused(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"worker's model layout {request.layout_fingerprint:016x} differs from the "
                f"cluster's {self.layout.fingerprint:016x} ({self.config.model}); start the "
                "worker with the cluster's --model",
            )
        if not self.shards_ready():
            return pb.RegisterWorkerReply(ready=False, waiting_for=self.waiting_for())
        if not self.history:  # the first evaluation sees the parameters before any push
            return pb.RegisterWorkerReply(ready=False, waiting_for="the first evaluation")
        worker_id = self._choose_worker_slot(request.worker_id, request.incarnation)
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

    def _choose_worker_slot(self, wanted: int, incarnation: int) -> int:
        """Slot ``wanted`` (claimed, replacing its holder), else the first free or dead slot,
        else a new slot beyond them (elastic join: it shares a data partition)."""
        if wanted >= 0:
            if wanted >= MAX_WORKERS:
                raise Refused(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"worker id {wanted} is outside 0..{MAX_WORKERS - 1}",
                )
            return wanted
        for slot in range(max(self.workers, default=-1) + 2):
            member = self.workers.get(slot)
            if member is None or self.member_state(member) in ("dead", "left"):
                if slot >= MAX_WORKERS:
                    break
                return slot
        raise Refused(
            grpc.StatusCode.RESOURCE_EXHAUSTED, f"the cluster has {MAX_WORKERS} live workers"
        )

    def shard_endpoints(self) -> list[pb.ShardEndpoint]:
        return [
            self.shards[k].endpoint  # type: ignore[misc]
            for k in sorted(self.shards)
            if self.shards[k].endpoint is not None
        ]

    def heartbeat(self, request: pb.HeartbeatRequest) -> pb.HeartbeatReply:
        if request.role not in (pb.ROLE_SHARD, pb.ROLE_WORKER):
            raise Refused(grpc.StatusCode.INVALID_ARGUMENT, f"unknown role {request.role}")
        members = self.shards if request.role == pb.ROLE_SHARD else self.workers
        member = members.get(request.id)
        if member is None:
            return pb.HeartbeatReply(reregister=True)
        if member.incarnation != request.incarnation:
            if request.role == pb.ROLE_WORKER:  # its slot went to a newer process
                return pb.HeartbeatReply(
                    shutdown=True, reason=f"worker {request.id} was replaced by a newer process"
                )
            return pb.HeartbeatReply(reregister=True)
        member.last_seen = time.monotonic()
        member.stats.CopyFrom(request.stats)
        member.ready = True
        if request.leaving:
            member.left = True
        return pb.HeartbeatReply(
            shutdown=self._should_stop(member),
            reason=self.done_reason,
            shards=self.shard_endpoints(),
        )

    def _should_stop(self, member: Member) -> bool:
        """Workers stop as soon as the run is over; shards once no worker still needs them."""
        if not self.done:
            return False
        if member.role == pb.ROLE_WORKER:
            return True
        workers_gone = all(self.member_state(w) in ("left", "dead") for w in self.workers.values())
        return workers_gone or time.monotonic() - self.done_at > SHARD_GRACE

    # -- evaluation and the end of the run ----------------------------------------------------

    async def _evaluate_loop(self) -> None:
        next_eval = time.monotonic()
        while not self.done:
            await asyncio.sleep(max(0.0, next_eval - time.monotonic()))
            next_eval = time.monotonic() + self.config.eval_every
            try:
                await self._evaluate_once()
            except (DsgdError, OSError, zmq.ZMQError) as exc:
                log.warning("evaluation skipped: %s", exc)

    async def _evaluate_once(self) -> None:
        elapsed = time.monotonic() - self.started
        if not self.shards_ready():
            if elapsed > self.config.max_seconds:
                await self.finish(f"gave up after {elapsed:.0f} s waiting for {self.waiting_for()}")
            return
        flat, total_version = await self.fetch_parameters()
        metrics = await asyncio.to_thread(self.compiled.evaluate, flat)
        accuracy = float(metrics.get("accuracy", 0.0))
        self.history.append(
            pb.Evaluation(
                elapsed_seconds=time.monotonic() - self.started,
                test_accuracy=accuracy,
                test_loss=float(metrics.get("loss", 0.0)),
                total_version=total_version,
                metrics=metrics,
            )
        )
        workers = list(self.workers.values())
        if accuracy >= self.config.target_accuracy:
            await self.finish(f"target accuracy {self.config.target_accuracy:.3f} reached", flat)
            self.reached_target = True
        elif elapsed > self.config.max_seconds:
            await self.finish(f"time budget of {self.config.max_seconds:.0f} s spent", flat)
        elif (
            self.config.max_steps
            and len(workers) >= self.config.num_workers
            and all(w.left and w.stats.step >= self.config.max_steps for w in workers)
        ):  # workers leave only once their last push is acknowledged: nothing is in flight
            await self.finish(f"step budget of {self.config.max_steps} per worker spent", flat)

    async def fetch_parameters(self) -> tuple[FlatParams, int]:
        """The current full parameter vector, fetched from every shard like a worker would."""
        flat = np.empty(self.layout.size, np.float32)
        total = 0
        for shard_id, member in sorted(self.shards.items()):
            client = await self._eval_client(shard_id, member)
            if client.silent_for() > SHARD_SILENT:
                raise PeerLost(f"shard {shard_id} silent for {client.silent_for():.0f} s")
            endpoint = member.endpoint
            assert endpoint is not None
            version, _ = await client.fetch(flat[endpoint.start : endpoint.stop])
            total += version
        return flat, total

    async def _eval_client(self, shard_id: int, member: Member) -> ShardClient:
        known = self._eval_clients.get(shard_id)
        if known is not None and known[0] == member.incarnation:
            return known[1]
        if known is not None:
            await known[1].aclose()
        endpoint = member.endpoint
        assert endpoint is not None
        client = ShardClient(
            shard_id,
            endpoint.data_address,
            endpoint.pub_address,
            self.layout.fingerprint,
            -1,
            self._ctx,
            fetch_timeout=5.0,
        )
        await client.start()
        self._eval_clients[shard_id] = (member.incarnation, client)
        return client

    async def finish(
        self, reason: str, flat: FlatParams | None = None, *, fetch: bool = True
    ) -> None:
        """End the run: remember why, keep the final parameters, tell members to stop."""
        if self.done:
            return
        if flat is None and fetch and self.shards_ready():
            with contextlib.suppress(DsgdError, OSError):
                flat, _ = await self.fetch_parameters()
        self.final_params = flat
        if flat is not None and self.final_params_path is not None:
            await asyncio.to_thread(_save_npy, self.final_params_path, flat)
        self.done_reason = reason
        self.done_at = time.monotonic()
        self.done = True
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
            )
            for m in sorted(self.all_members(), key=lambda m: (m.role, m.member_id))
        ]
        return pb.ClusterStatus(
            model=self.config.model,
            num_params=self.layout.size,
            layout_fingerprint=self.layout.fingerprint,
            num_shards=self.config.num_shards,
            num_workers=self.config.num_workers,
            elapsed_seconds=now - self.started,
            members=members,
            history=self.history,
            done=self.done,
            done_reason=self.done_reason,
            reached_target=self.reached_target,
            waiting_for=self.waiting_for(),
            target_accuracy=self.config.target_accuracy,
            config_json=self.config.to_json(),
            shards=self.shard_endpoints(),
            refused=self.refused,
        )


def _save_npy(path: Path, flat: FlatParams) -> None:
    tmp = path.with_suffix(".tmp.npy")
    np.save(tmp, flat, allow_pickle=False)
    tmp.replace(path)


async def run_coordinator(
    config: TrainConfig,
    stop: asyncio.Event,
    *,
    spec: ModelSpec | None = None,
    host: str = "127.0.0.1",
    port: int = 0,
    ready_file: str | None = None,
    final_params_path: Path | None = None,
    linger: float = 30.0,
    on_ready: Callable[[str], None] | None = None,
    restore: Path | None = None,
) -> Coordinator:
    """Coordinate one run until it is over (or ``stop``); return the closed coordinator.

    ``on_ready(address)`` is called once the gRPC server listens.
    """
    if spec is None:
        spec = load_model(config.model, seed=config.seed)
    compiled = await asyncio.to_thread(CompiledModel, spec, config.num_shards)
    saved = None
    if restore is not None:
        saved = await asyncio.to_thread(
            read_cluster_checkpoint, restore, compiled.layout.fingerprint
        )
        log.info("restoring %s at shard versions %s", restore, saved.manifest.versions)
    coordinator = Coordinator(
        config,
        compiled,
        host=host,
        port=port,
        final_params_path=final_params_path,
        restore=saved,
    )
    try:
        bound = await coordinator.start()
        write_ready_file(ready_file, {"address": f"{host}:{bound}"})
        if on_ready is not None:
            on_ready(f"{host}:{bound}")
        finished = asyncio.create_task(coordinator.wait_finished(linger))
        stopped = asyncio.create_task(stop.wait())
        await asyncio.wait({finished, stopped}, return_when=asyncio.FIRST_COMPLETED)
        for task in (finished, stopped):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if not coordinator.done:
            await coordinator.finish("stopped by signal", fetch=False)
    finally:
        await coordinator.aclose()
    return coordinator


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m dsgd.coordinator", description="Run the dsgd coordinator."
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=int, default=0, help="gRPC port (0: any free port)")
    parser.add_argument("--ready-file", help="write the bound address here (JSON) once serving")
    parser.add_argument("--final-params", type=Path, help="save the final parameters (.npy)")
    parser.add_argument("--status-file", type=Path, help="write the final status (JSON) here")
    parser.add_argument("--linger", type=float, default=30.0, help="seconds to wait for members")
    parser.add_argument("--config-file", type=Path, help="TrainConfig JSON (overrides the flags)")
    parser.add_argument("--restore", type=Path, help="start from this cluster checkpoint")
    parser.add_argument("--log-level", default="INFO")
    add_config_arguments(parser)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging("coordinator", args.log_level)

    async def coordinator_main(stop: asyncio.Event) -> int:
        if args.config_file:
            config = TrainConfig.from_json(args.config_file.read_text())
        else:
            config = config_from_arguments(args)
        coordinator = await run_coordinator(
            config,
            stop,
            host=args.host,
            port=args.port,
            ready_file=args.ready_file,
            final_params_path=args.final_params,
            linger=args.linger,
            restore=args.restore,
        )
        if args.status_file:
            text = json_format.MessageToJson(coordinator.status(), preserving_proto_field_name=True)
            args.status_file.write_text(text)
        return 0

    return run_process("coordinator", coordinator_main)


if __name__ == "__main__":
    sys.exit(main())
