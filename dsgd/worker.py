"""A worker process: joins a cluster, trains one model replica, leaves when the run ends.

Run one by hand with ``python -m dsgd.worker --coordinator HOST:PORT [--model MOD:ATTR]``.
The replica's training loop itself is :class:`dsgd.replica.Worker`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import secrets
import socket
import sys
import time
from typing import Any

import grpc
import zmq.asyncio

from dsgd import wire
from dsgd.config import TrainConfig
from dsgd.control import CoordinatorLink, stats_message
from dsgd.errors import ConfigError, LayoutMismatch, PeerLost
from dsgd.model import CompiledModel, ModelSpec, load_model
from dsgd.process import add_member_arguments, run_process, setup_logging, write_ready_file
from dsgd.proto import control_pb2 as pb
from dsgd.replica import DRAIN_TIMEOUT, Worker, worker_batches
from dsgd.types import ShardInfo

__all__ = ["Worker", "main", "run_worker", "worker_batches"]

log = logging.getLogger("dsgd.worker")


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
) -> dict[str, Any]:
    """Join the cluster at ``coordinator`` as a worker and train until the run ends.

    The model is ``spec`` when given (in-process clusters), else ``model``
    (``MOD:ATTR``), else the model the coordinator announces. Returns final stats.
    """
    link = CoordinatorLink(coordinator, give_up_after=connect_timeout)
    ctx = zmq.asyncio.Context()
    try:
        status = await link.call(link.stub.Status, pb.StatusRequest(), "reading the cluster layout")
        config = TrainConfig.from_json(status.config_json)
        if spec is None:
            spec = load_model(model or status.model, seed=config.seed)
        compiled = CompiledModel(spec, status.num_shards)
        if compiled.layout.fingerprint != status.layout_fingerprint:
            raise LayoutMismatch(
                f"this worker's model ({model or spec.name}: {compiled.layout.describe()}) differs "
                f"from the cluster's ({status.model}, fingerprint "
                f"{status.layout_fingerprint:016x}); start the worker with the cluster's --model"
            )
        incarnation = secrets.randbits(62) + 1
        request = pb.RegisterWorkerRequest(
            worker_id=worker_id,
            layout_fingerprint=compiled.layout.fingerprint,
            model=model or compiled.spec.name,
            host=host_label or socket.gethostname(),
            protocol_version=wire.PROTOCOL_VERSION,
            incarnation=incarnation,
        )
        reply = await _register_worker(link, request, stop)
        if reply is None:
            return {}
        worker = Worker(
            compiled,
            TrainConfig.from_json(reply.config_json),
            reply.worker_id,
            reply.partition,
            reply.num_partitions,
            _shard_infos(reply.shards),
            ctx,
            incarnation,
        )
        async with worker:
            write_ready_file(ready_file, {"worker_id": worker.worker_id})
            finished = asyncio.Event()
            request.worker_id = worker.worker_id  # registering again claims the same slot
            beats = asyncio.create_task(_heartbeats(link, worker, request, config, stop, finished))
            try:
                await _first(worker.run(stop), finished.wait(), stop)
            finally:
                beats.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await beats
                with contextlib.suppress(Exception):
                    await link.heartbeat_once(_heartbeat(worker, leaving=True))
            log.info(
                "worker %d done after %d steps (%d pushes)",
                worker.worker_id,
                worker.step,
                worker.counters["pushes"],
            )
            return worker.stats()
    finally:
        await link.aclose()
        ctx.term()


async def _first(run: Any, finished: Any, stop: asyncio.Event) -> None:
    """Run the training loop until it returns or the coordinator ends the run."""
    run_task = asyncio.ensure_future(run)
    finished_task = asyncio.ensure_future(finished)
    try:
        await asyncio.wait({run_task, finished_task}, return_when=asyncio.FIRST_COMPLETED)
        if not run_task.done():
            stop.set()  # the run loop sees it after the current step, then drains
            done, _ = await asyncio.wait({run_task}, timeout=DRAIN_TIMEOUT + 5.0)
            if not done:
                log.warning("training loop did not stop in time; cancelling it")
                run_task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await run_task
                return
        run_task.result()
    finally:
        finished_task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await finished_task


def _shard_infos(endpoints: Any) -> list[ShardInfo]:
    return [
        ShardInfo(e.shard_id, e.data_address, e.pub_address, e.start, e.stop, e.incarnation)
        for e in endpoints
    ]


async def _register_worker(
    link: CoordinatorLink, request: pb.RegisterWorkerRequest, stop: asyncio.Event
) -> Any:
    waited_since = time.monotonic()
    last_report = 0.0
    while not stop.is_set():
        try:
            reply = await link.call(link.stub.RegisterWorker, request, "registering a worker")
        except grpc.aio.AioRpcError as exc:
            raise ConfigError(f"the coordinator refused this worker: {exc.details()}") from None
        if reply.ready:
            return reply
        now = time.monotonic()
        if now - last_report > 5.0 and now - waited_since > 1.0:
            log.info("waiting for %s", reply.waiting_for)
            last_report = now
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 0.2)
    return None


def _heartbeat(worker: Worker, leaving: bool = False) -> pb.HeartbeatRequest:
    return pb.HeartbeatRequest(
        role=pb.ROLE_WORKER,
        id=worker.worker_id,
        incarnation=worker.incarnation,
        stats=stats_message(worker.stats()),
        leaving=leaving,
    )


async def _heartbeats(
    link: CoordinatorLink,
    worker: Worker,
    request: pb.RegisterWorkerRequest,
    config: TrainConfig,
    stop: asyncio.Event,
    finished: asyncio.Event,
) -> None:
    """Report progress; follow moved shards; stop when told; re-register with a new coordinator."""
    while not stop.is_set():
        reply = await link.heartbeat_once(_heartbeat(worker))
        if reply is not None and reply.shutdown:
            log.info("worker %d: coordinator ended the run (%s)", worker.worker_id, reply.reason)
            finished.set()
            return
        if reply is not None and reply.shards:
            await worker.update_endpoints(_shard_infos(reply.shards))
        if reply is not None and reply.reregister:
            log.info("worker %d: coordinator restarted; registering again", worker.worker_id)
            with contextlib.suppress(grpc.aio.AioRpcError, PeerLost):
                await link.call(link.stub.RegisterWorker, request, "registering again")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), config.heartbeat_interval)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m dsgd.worker", description="Join a dsgd cluster as one model replica."
    )
    add_member_arguments(parser, "write the assigned worker id here once training")
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
        )
        return 0

    return run_process("worker", worker_main)


if __name__ == "__main__":
    sys.exit(main())
