"""A model replica: the DistBelief Downpour loop.

Every ``n_fetch`` steps the worker refreshes its parameters from the shards (only
the shards whose broadcast version moved, and only what changed); every step it
computes a gradient with the ``jax.jit``-compiled step (in a thread, off the event
loop), takes a local SGD step and accumulates; every ``n_push`` steps it splits the
accumulated update by shard and into chunks and pushes it. Pushes are not awaited:
they stream out and are acknowledged while the next gradient is being computed,
with at most ``max_inflight`` unacknowledged pushes per shard.

Run one by hand with ``python -m dsgd.worker --coordinator HOST:PORT --model MOD:ATTR``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import socket
import sys
import time
from collections.abc import Iterator, Sequence
from typing import Any

import grpc
import numpy as np
import zmq.asyncio

from dsgd import wire
from dsgd.client import ShardClient
from dsgd.config import TrainConfig
from dsgd.control import CoordinatorLink, stats_message
from dsgd.errors import ConfigError, LayoutMismatch, PeerLost
from dsgd.model import CompiledModel, ModelSpec, batches, load_model
from dsgd.process import run_process, setup_logging, write_ready_file
from dsgd.proto import control_pb2 as pb
from dsgd.stats import RateMeter
from dsgd.types import FlatParams, ShardInfo

log = logging.getLogger("dsgd.worker")

DRAIN_TIMEOUT = 10.0


def worker_batches(
    compiled: CompiledModel, config: TrainConfig, partition: int, num_partitions: int
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """The batch stream of one data partition (deterministic in the seed and the partition)."""
    x, y = compiled.spec.dataset.partition(partition, num_partitions)
    batch_size = config.batch_size or compiled.spec.batch_size
    return batches(x, y, batch_size, seed=config.seed * 1_000_003 + partition)


class Worker:
    """One replica's training loop against a set of shards."""

    def __init__(
        self,
        compiled: CompiledModel,
        config: TrainConfig,
        worker_id: int,
        partition: int,
        num_partitions: int,
        shards: Sequence[ShardInfo],
        context: zmq.asyncio.Context,
    ) -> None:
        self.compiled = compiled
        self.config = config
        self.worker_id = worker_id
        self.partition = partition
        self.num_partitions = num_partitions
        self.shards = sorted(shards, key=lambda s: s.shard_id)
        expected = [(r.start, r.stop) for r in compiled.layout.ranges]
        announced = [(s.start, s.stop) for s in self.shards]
        if announced != expected:
            raise PeerLost(
                f"the coordinator announced shard ranges {announced}, this model's layout "
                f"needs {expected}; are worker and coordinator running the same model?"
            )
        self._ctx = context
        self.clients: list[ShardClient] = []
        size = compiled.layout.size
        self.server_params: FlatParams = np.empty(size, np.float32)  # as last fetched
        self.params: FlatParams = np.empty(size, np.float32)  # with local steps applied
        self.held_versions = [-1] * len(self.shards)
        # our own push moves a shard's version before its broadcast says so
        self._pushed_since_fetch = [False] * len(self.shards)
        self.step = 0
        self.seq = 0
        self.loss = float("nan")
        self.rate = RateMeter()
        self.counters: dict[str, float] = {
            "pushes": 0,
            "bytes_pushed": 0,
            "bytes_fetched": 0,
            "fetches": 0,
            "fetches_skipped": 0,
            "push_failures": 0,
            "chunks_rejected": 0,
        }
        self._free: list[FlatParams] = []  # update buffers not referenced by any push
        self._pending: dict[int, tuple[FlatParams, int]] = {}  # seq -> (buffer, shards left)

    # -- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        for shard in self.shards:
            client = ShardClient(
                shard.shard_id,
                shard.data_address,
                shard.pub_address,
                self.compiled.layout.fingerprint,
                self.worker_id,
                self._ctx,
                max_inflight=self.config.max_inflight,
            )
            await client.start()
            self.clients.append(client)

    async def aclose(self) -> None:
        for client in self.clients:
            await client.aclose()
        self.clients.clear()

    async def __aenter__(self) -> Worker:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    # -- the Downpour loop -----------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        """Train until ``stop`` is set or ``max_steps`` is reached, then drain pushes."""
        config = self.config
        await self.fetch()
        stream = worker_batches(self.compiled, config, self.partition, self.num_partitions)
        update = self._take_buffer()
        local_lr = np.float32(config.worker_lr)
        log.info(
            "worker %d training on partition %d/%d",
            self.worker_id,
            self.partition,
            self.num_partitions,
        )
        while not stop.is_set() and not (config.max_steps and self.step >= config.max_steps):
            if self.step and self.step % config.n_fetch == 0:
                try:
                    await self.fetch()
                except PeerLost:
                    if stop.is_set():  # the run ended while we waited: nothing is lost
                        break
                    raise
            x, y = next(stream)
            loss, grad = await asyncio.to_thread(self.compiled.gradient, self.params, x, y)
            update += grad
            if local_lr:
                self.params -= local_lr * grad
            self.step += 1
            self.rate.add()
            self.loss = loss if np.isnan(self.loss) else 0.95 * self.loss + 0.05 * loss
            if self.step % config.n_push == 0:
                await self.push(update)
                update = self._take_buffer()
        if self.step % config.n_push:
            await self.push(update)
        await self.drain()

    async def drain(self) -> None:
        try:
            async with asyncio.timeout(DRAIN_TIMEOUT):
                for client in self.clients:
                    await client.drain()
        except TimeoutError:
            log.warning(
                "worker %d: %d pushes still unacknowledged after %.0f s at shutdown",
                self.worker_id,
                len(self._pending),
                DRAIN_TIMEOUT,
            )

    # -- fetch -------------------------------------------------------------------------------

    async def fetch(self) -> bool:
        """Refresh the parameters from every shard whose version moved; True if any did."""
        changed = False
        for k, (client, shard) in enumerate(zip(self.clients, self.shards, strict=True)):
            held = self.held_versions[k]
            if held >= 0 and not self._pushed_since_fetch[k] and client.broadcast_version == held:
                self.counters["fetches_skipped"] += 1
                continue
            dest = self.server_params[shard.start : shard.stop]
            version, nbytes = await client.fetch(dest, since=held)
            self.held_versions[k] = version
            self._pushed_since_fetch[k] = False
            self.counters["fetches"] += 1
            self.counters["bytes_fetched"] += nbytes
            changed = True
        if changed:
            np.copyto(self.params, self.server_params)
        return changed

    # -- push --------------------------------------------------------------------------------

    def _take_buffer(self) -> FlatParams:
        if self._free:
            buffer = self._free.pop()
            buffer.fill(0.0)
            return buffer
        return np.zeros(self.compiled.layout.size, np.float32)

    async def push(self, update: FlatParams) -> None:
        """Split ``update`` by shard and into chunks and send it (without waiting for acks).

        The chunks reference ``update`` without copying, so the buffer goes back to the
        pool only once every shard has acknowledged the push.
        """
        self.seq += 1
        seq = self.seq
        self._pending[seq] = (update, len(self.clients))
        for k, (client, shard) in enumerate(zip(self.clients, self.shards, strict=True)):
            template = wire.Header(
                kind=wire.PUSH,
                fingerprint=self.compiled.layout.fingerprint,
                shard=shard.shard_id,
                worker=self.worker_id,
                seq=seq,
                base_version=max(self.held_versions[k], 0),
            )
            values = update[shard.start : shard.stop]
            messages = list(wire.dense_chunks(template, values, self.config.chunk_bytes))
            before = client.bytes_pushed
            await client.push(seq, messages, self._on_push_done)
            self._pushed_since_fetch[k] = True
            self.counters["bytes_pushed"] += client.bytes_pushed - before
        self.counters["pushes"] += 1

    def _on_push_done(self, seq: int, result: list[str] | BaseException) -> None:
        if isinstance(result, BaseException):
            self.counters["push_failures"] += 1
            if not isinstance(result, asyncio.CancelledError):
                log.warning("worker %d: push %d failed: %s", self.worker_id, seq, result)
        else:
            rejected = [s for s in result if s.startswith("rejected")]
            self.counters["chunks_rejected"] += len(rejected)
            if rejected:
                log.warning("worker %d: push %d: %s", self.worker_id, seq, rejected[0])
        buffer, left = self._pending[seq]
        if left > 1:
            self._pending[seq] = (buffer, left - 1)
        else:
            del self._pending[seq]
            self._free.append(buffer)

    # -- reporting ---------------------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        return {
            "version": int(sum(max(v, 0) for v in self.held_versions)),
            "step": self.step,
            "rate": self.rate.rate(),
            "loss": 0.0 if np.isnan(self.loss) else float(self.loss),
            "counters": {k: float(v) for k, v in self.counters.items()},
        }


async def run_worker(
    coordinator: str,
    stop: asyncio.Event,
    *,
    spec: ModelSpec | None = None,
    model: str | None = None,
    worker_id: int = -1,
    host_label: str = "",
    ready_file: str | None = None,
) -> dict[str, Any]:
    """Join the cluster at ``coordinator`` as a worker and train until the run ends.

    The model is ``spec`` when given (in-process clusters), else ``model``
    (``MOD:ATTR``), else the model the coordinator announces. Returns final stats.
    """
    link = CoordinatorLink(coordinator)
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
        reply = await _register_worker(link, compiled, worker_id, host_label, model, stop)
        if reply is None:
            return {}
        shards = [
            ShardInfo(e.shard_id, e.data_address, e.pub_address, e.start, e.stop, e.incarnation)
            for e in reply.shards
        ]
        worker = Worker(
            compiled,
            TrainConfig.from_json(reply.config_json),
            reply.worker_id,
            reply.partition,
            reply.num_partitions,
            shards,
            ctx,
        )
        async with worker:
            write_ready_file(ready_file, {"worker_id": worker.worker_id})
            finished = asyncio.Event()
            beats = asyncio.create_task(_heartbeats(link, worker, config, stop, finished))
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


async def _register_worker(
    link: CoordinatorLink,
    compiled: CompiledModel,
    worker_id: int,
    host_label: str,
    model: str | None,
    stop: asyncio.Event,
) -> Any:
    request = pb.RegisterWorkerRequest(
        worker_id=worker_id,
        layout_fingerprint=compiled.layout.fingerprint,
        model=model or compiled.spec.name,
        host=host_label or socket.gethostname(),
        protocol_version=wire.PROTOCOL_VERSION,
    )
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
        stats=stats_message(worker.stats()),
        leaving=leaving,
    )


async def _heartbeats(
    link: CoordinatorLink,
    worker: Worker,
    config: TrainConfig,
    stop: asyncio.Event,
    finished: asyncio.Event,
) -> None:
    while not stop.is_set():
        reply = await link.heartbeat_once(_heartbeat(worker))
        if reply is not None and reply.shutdown:
            log.info("worker %d: coordinator ended the run (%s)", worker.worker_id, reply.reason)
            finished.set()
            return
        if reply is not None and reply.reregister:
            log.info("worker %d: coordinator restarted; registering again", worker.worker_id)
            with contextlib.suppress(grpc.aio.AioRpcError, ConfigError):
                await link.call(
                    link.stub.RegisterWorker,
                    pb.RegisterWorkerRequest(
                        worker_id=worker.worker_id,
                        layout_fingerprint=worker.compiled.layout.fingerprint,
                        protocol_version=wire.PROTOCOL_VERSION,
                    ),
                    "registering again",
                )
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), config.heartbeat_interval)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m dsgd.worker", description="Join a dsgd cluster as one model replica."
    )
    parser.add_argument("--coordinator", required=True, help="coordinator HOST:PORT")
    parser.add_argument(
        "--model", help="package.module:factory (default: the model the coordinator runs)"
    )
    parser.add_argument("--worker-id", type=int, default=-1, help="slot to take (default: any)")
    parser.add_argument("--ready-file", help="write the assigned worker id here once training")
    parser.add_argument("--log-level", default="INFO")
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
        )
        return 0

    return run_process("worker", worker_main)


if __name__ == "__main__":
    sys.exit(main())
