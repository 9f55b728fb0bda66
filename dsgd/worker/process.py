"""A worker process: joins a cluster, trains one model replica, leaves when the run ends.

Run one by hand with ``python -m dsgd.worker --coordinator HOST:PORT [--model MOD:ATTR]``.
The replica's training loop itself is :class:`dsgd.worker.replica.Replica`; this module
registers it (describing the model's layout, and uploading its initial parameters when
the coordinator asks), runs it beside its heartbeats, and leaves.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import secrets
import socket
import time
from functools import partial
from typing import Any

import grpc
import numpy as np
import zmq.asyncio

from dsgd import wire
from dsgd.config import TrainConfig
from dsgd.control import CoordinatorLink, layout_message, shard_infos, stats_message
from dsgd.errors import ConfigError, LayoutMismatch, PeerLost
from dsgd.model import CompiledModel, ModelSpec, load_model
from dsgd.proto import control_pb2 as pb
from dsgd.runtime import (
    add_member_arguments,
    owned,
    root_cause,
    run_process,
    setup_logging,
    write_ready_file,
)
from dsgd.security import Security, from_arguments
from dsgd.types import FlatParams
from dsgd.worker.replica import Replica

LOST_BEAT_INTERVAL = 0.02  # s between heartbeats while a replicated shard's primary is lost
LOST_FAST_BEATS = 2.0  # ... for at most this long (then at the usual interval)

log = logging.getLogger("dsgd.worker")


async def load_cluster_model(
    link: CoordinatorLink, spec: ModelSpec | None, model: str | None
) -> tuple[TrainConfig, CompiledModel]:
    """The cluster's configuration, and the model (``spec``, else ``model``, else the one the
    coordinator names) compiled for its shard count; refused if its layout differs."""
    status = await link.call(link.stub.Status, pb.StatusRequest(), "reading the cluster layout")
    config = TrainConfig.from_json(status.config_json)
    if spec is None:
        spec = load_model(
            model or status.model, seed=config.seed, data=config.data, args=config.model_args
        )
    compiled = CompiledModel(spec, status.num_shards)
    known = status.layout_fingerprint
    if known and compiled.layout.fingerprint != known:
        raise LayoutMismatch(
            f"this model ({model or spec.name}: {compiled.layout.describe()}) differs from the "
            f"cluster's ({status.model}, fingerprint {known:016x}); start it with the "
            "cluster's --model"
        )
    return config, compiled


async def run_worker(
    coordinator: str,
    stop: asyncio.Event,
    *,
    spec: ModelSpec | None = None,
    model: str | None = None,
    worker_id: int = -1,
    host_label: str = "",
    ready_file: str | None = None,
    connect_timeout: float = 60.0,
    security: Security | None = None,
) -> dict[str, Any]:
    """Join the cluster at ``coordinator`` as a worker and train until the run ends.

    The model is ``spec`` when given (in-process clusters), else ``model``
    (``MOD:ATTR``), else the model the coordinator announces. Returns final stats.
    """
    link = CoordinatorLink(coordinator, give_up_after=connect_timeout, stop=stop, security=security)
    ctx = zmq.asyncio.Context()
    try:
        config, compiled = await load_cluster_model(link, spec, model)
        await _prepare(link, compiled, config)
        request = pb.RegisterWorkerRequest(
            worker_id=worker_id,
            layout_fingerprint=compiled.layout.fingerprint,
            model=model or compiled.spec.name,
            host=host_label or socket.gethostname(),
            protocol_version=wire.PROTOCOL_VERSION,
            incarnation=secrets.randbits(62) + 1,
            layout=layout_message(compiled.layout),
        )
        reply = await link.register(
            link.stub.RegisterWorker, request, stop, "this worker", compiled.initial_flat
        )
        if reply is None:
            return {}
        if spec is None:  # loaded here, so nothing else reads its initial values again
            compiled.drop_initial()
        replica = Replica(
            compiled,
            TrainConfig.from_json(reply.config_json),
            reply.worker_id,
            reply.partition,
            reply.num_partitions,
            shard_infos(reply.shards),
            ctx,
            request.incarnation,
            security,
        )
        request.worker_id = replica.worker_id  # registering again claims the same slot
        # ready (for launchers: this worker makes progress) once a push has been applied
        ready = {"worker_id": replica.worker_id}
        replica.on_first_push = partial(write_ready_file, ready_file, ready)
        async with replica:
            await _train(link, replica, request, config, stop)
        return replica.stats()
    finally:
        await link.aclose()
        ctx.term()


async def _prepare(link: CoordinatorLink, compiled: CompiledModel, config: TrainConfig) -> None:
    """Compile (or choose the eager path for) the gradient on one batch before registering:
    the compile overlaps the cluster's start instead of delaying the first step, and a
    model that cannot work fails before it takes a slot."""
    log.info("model %s: %s; preparing its gradient", compiled.spec.name, compiled.layout.describe())
    data = compiled.spec.dataset
    batch = min(config.batch_size or compiled.spec.batch_size, len(data.x_train))
    x, y = np.asarray(data.x_train[:batch]), data.y_train[:batch]
    if compiled.spec.augment is not None:
        x = compiled.spec.augment(x, np.random.default_rng(0))
    began = time.monotonic()
    path = await link.unless_stopped(
        asyncio.to_thread(compiled.prepare_gradient, x, y), "compiling the gradient"
    )
    log.info("gradient ready (%s) in %.1f s", path, time.monotonic() - began)


async def _train(
    link: CoordinatorLink,
    replica: Replica,
    request: pb.RegisterWorkerRequest,
    config: TrainConfig,
    stop: asyncio.Event,
) -> None:
    """Train beside the heartbeats (which set ``stop`` when the run ends), then leave.

    A model function that raises ends the run: the leaving heartbeat says why, so the
    coordinator stops every member instead of waiting for this one to come back."""
    failure = ""
    try:
        async with asyncio.TaskGroup() as group:
            beats = owned("heartbeats", _heartbeats(link, replica, request, config, stop))
            heartbeats = group.create_task(beats)
            await owned("training", replica.run(stop))
            heartbeats.cancel()
    except BaseException as exc:
        cause = root_cause(exc)
        if isinstance(cause, ConfigError):
            failure = str(cause)
            raise cause from None
        raise
    finally:
        with contextlib.suppress(grpc.aio.AioRpcError):
            await link.heartbeat_once(_heartbeat(replica, leaving=True, failure=failure))
    log.info(
        "worker %d done after %d steps (%d pushes)",
        replica.worker_id,
        replica.step,
        replica.counters.pushes,
    )


def _heartbeat(replica: Replica, leaving: bool = False, failure: str = "") -> pb.HeartbeatRequest:
    return pb.HeartbeatRequest(
        role=pb.ROLE_WORKER,
        id=replica.worker_id,
        incarnation=replica.incarnation,
        stats=stats_message(replica.stats()),
        leaving=leaving,
        failure=failure,
    )


async def _heartbeats(
    link: CoordinatorLink,
    replica: Replica,
    request: pb.RegisterWorkerRequest,
    config: TrainConfig,
    stop: asyncio.Event,
) -> None:
    """Report progress; follow moved shards; end training when the coordinator says the run
    is over (``stop``); register again with a restarted coordinator."""
    lost_since: float | None = None
    while not stop.is_set():
        reply = await link.heartbeat_once(_heartbeat(replica))
        if reply is not None and reply.shutdown:
            log.info("worker %d: coordinator ended the run (%s)", replica.worker_id, reply.reason)
            stop.set()  # the replica sees it after its current step, then drains
            return
        if reply is not None and reply.shards:
            await replica.update_endpoints(shard_infos(reply.shards))
        if reply is not None and reply.reregister and not reply.shutdown:
            await _register_again(link, replica, request, stop)
        # a replicated shard's primary dropped: beat fast until the reply names the backup
        # that took over (the failover waits for this), for at most LOST_FAST_BEATS
        now = time.monotonic()
        lost_since = (lost_since or now) if replica.shard_lost() else None
        fast = lost_since is not None and now - lost_since < LOST_FAST_BEATS
        interval = LOST_BEAT_INTERVAL if fast else config.heartbeat_interval
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(_stop_or_lost(stop, replica, fast), interval)


async def _register_again(
    link: CoordinatorLink,
    replica: Replica,
    request: pb.RegisterWorkerRequest,
    stop: asyncio.Event,
) -> None:
    """The coordinator does not know this worker (it restarted): register again, in the
    same slot, until it admits it (training goes on meanwhile), then follow the shards
    where it says they are (a shard may have moved while it was down)."""
    log.info("worker %d: coordinator restarted; registering again", replica.worker_id)
    again = None

    def initial() -> FlatParams:
        # it lost its parameters: give it the ones this worker trains from
        return replica.server_params

    # (only once every shard's share has been fetched; another member gives them otherwise)
    with contextlib.suppress(PeerLost):  # down again for long: the next heartbeat retries
        again = await link.register(
            link.stub.RegisterWorker,
            request,
            stop,
            f"worker {replica.worker_id} again",
            None if replica.fetch_missing() else initial,
        )
    if again is not None:
        await replica.update_endpoints(shard_infos(again.shards))
        log.info("worker %d: registered again", replica.worker_id)


async def _stop_or_lost(stop: asyncio.Event, replica: Replica, fast: bool) -> None:
    """Until ``stop`` is set, or (when not beating fast already) a shard's primary drops."""
    waits = [asyncio.ensure_future(stop.wait())]
    if not fast:  # (a loss already seen waits for the next beat, not in a spin)
        waits += [
            asyncio.ensure_future(c.lost.wait())
            for c in replica.clients
            if c.lost is not None and not c.lost.is_set()
        ]
    try:
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for wait in waits:
            wait.cancel()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m dsgd.worker", description="Join a dsgd cluster as one model replica."
    )
    add_member_arguments(parser, "write the worker id here once its first push is applied")
    parser.add_argument(
        "--model", help="package.module:factory (default: the model the coordinator runs)"
    )
    parser.add_argument("--worker-id", type=int, default=-1, help="slot to take (default: any)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging("worker" if args.worker_id < 0 else f"worker{args.worker_id}", args.log_level)

    async def worker_main(stop: asyncio.Event) -> int:
        await run_worker(
            args.coordinator,
            stop,
            model=args.model,
            worker_id=args.worker_id,
            ready_file=args.ready_file,
            connect_timeout=args.connect_timeout,
            security=from_arguments(args),
        )
        return 0

    return run_process("worker", worker_main, args)
