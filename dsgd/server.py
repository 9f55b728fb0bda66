"""One parameter shard as a process: ``python -m dsgd.server --coordinator HOST:PORT --shard-id K``.

The shard binds its data and broadcast sockets, registers with the coordinator
(which answers with its range, the layout fingerprint and the cluster's
configuration), streams in its initial values over gRPC, then serves until the
coordinator says the run is over or it receives SIGINT/SIGTERM. The shard never
imports JAX.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import sys

import numpy as np
import zmq.asyncio

from dsgd.config import TrainConfig
from dsgd.control import CoordinatorLink, stats_message
from dsgd.errors import ProtocolError
from dsgd.optim import make_optimizer
from dsgd.process import run_process, setup_logging, write_ready_file
from dsgd.proto import control_pb2 as pb
from dsgd.shard import ShardServer, ShardState
from dsgd.wire import PROTOCOL_VERSION

log = logging.getLogger("dsgd.server")


async def run_shard(
    coordinator: str,
    shard_id: int,
    stop: asyncio.Event,
    *,
    host: str = "127.0.0.1",
    advertise_host: str | None = None,
    data_port: int = 0,
    pub_port: int = 0,
    ready_file: str | None = None,
) -> None:
    """Serve shard ``shard_id`` of the cluster whose coordinator is at ``coordinator``."""
    ctx = zmq.asyncio.Context()
    link = CoordinatorLink(coordinator)
    server = ShardServer(
        shard_id,
        host=host,
        data_port=data_port,
        pub_port=pub_port,
        advertise_host=advertise_host,
        context=ctx,
    )
    serve_task: asyncio.Task[None] | None = None
    try:
        await server.start()
        config = await _register(link, server, stop)
        if config is None:
            return
        serve_task = asyncio.create_task(server.serve(), name="shard-serve")
        write_ready_file(
            ready_file, {"data_address": server.data_address, "pub_address": server.pub_address}
        )
        await _heartbeat_until_done(link, server, config, stop)
    finally:
        if serve_task is not None:
            serve_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await serve_task
        with contextlib.suppress(Exception):
            await link.heartbeat_once(_heartbeat(server, leaving=True))
        await server.aclose()
        await link.aclose()
        ctx.term()


async def _register(
    link: CoordinatorLink, server: ShardServer, stop: asyncio.Event
) -> TrainConfig | None:
    """Register (again) and, when the coordinator asks, load the initial values."""
    endpoint = pb.ShardEndpoint(
        shard_id=server.shard_id,
        data_address=server.data_address,
        pub_address=server.pub_address,
        incarnation=server.incarnation,
    )
    request = pb.RegisterShardRequest(
        shard_id=server.shard_id,
        endpoint=endpoint,
        layout_fingerprint=server.fingerprint,
        version=server.state.version,
        protocol_version=PROTOCOL_VERSION,
    )
    what = f"registering shard {server.shard_id}"
    reply = await link.call(link.stub.RegisterShard, request, what)
    config = TrainConfig.from_json(reply.config_json)
    if stop.is_set():
        return None
    if reply.send_initial or not server.installed:
        size = reply.stop - reply.start
        params = np.empty(size, np.float32)
        filled = 0
        stream = link.stub.FetchInitialShard(
            pb.FetchInitialShardRequest(
                shard_id=server.shard_id, layout_fingerprint=reply.layout_fingerprint
            ),
            timeout=60.0,
        )
        async for chunk in stream:
            piece = np.frombuffer(chunk.data, np.float32)
            if chunk.total != size or chunk.offset + piece.size > size:
                raise ProtocolError("the coordinator streamed initial values of the wrong size")
            params[chunk.offset : chunk.offset + piece.size] = piece
            filled += piece.size
        if filled != size:
            raise ProtocolError(f"received {filled} of {size} initial values")
        optimizer = make_optimizer(config.optimizer, config.lr)
        server.install(
            reply.layout_fingerprint,
            optimizer,
            ShardState(params, optimizer.init(size)),
            staleness=config.staleness,
            chunk_bytes=config.chunk_bytes,
        )
        log.info("shard %d loaded %d initial values", server.shard_id, size)
    # report at once, so the coordinator marks this shard ready without waiting a period
    await link.heartbeat_once(_heartbeat(server))
    return config


def _heartbeat(server: ShardServer, leaving: bool = False) -> pb.HeartbeatRequest:
    stats = {
        "version": server.state.version,
        "rate": server.apply_rate.rate(),
        "counters": server.stats(),
    }
    return pb.HeartbeatRequest(
        role=pb.ROLE_SHARD,
        id=server.shard_id,
        incarnation=server.incarnation,
        stats=stats_message(stats),
        leaving=leaving,
    )


async def _heartbeat_until_done(
    link: CoordinatorLink, server: ShardServer, config: TrainConfig, stop: asyncio.Event
) -> None:
    while not stop.is_set():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), config.heartbeat_interval)
        if stop.is_set():
            return
        reply = await link.heartbeat_once(_heartbeat(server))
        if reply is None:
            continue
        if reply.shutdown:
            log.info("shard %d: coordinator ended the run (%s)", server.shard_id, reply.reason)
            return
        if reply.reregister:
            log.info("shard %d: coordinator restarted; registering again", server.shard_id)
            await _register(link, server, stop)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m dsgd.server", description="Run one dsgd parameter shard."
    )
    parser.add_argument("--coordinator", required=True, help="coordinator HOST:PORT")
    parser.add_argument("--shard-id", type=int, required=True, help="which shard slot to serve")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--advertise-host", help="address peers use to reach this shard")
    parser.add_argument("--data-port", type=int, default=0, help="push/fetch port (0: any)")
    parser.add_argument("--pub-port", type=int, default=0, help="version broadcast port (0: any)")
    parser.add_argument("--ready-file", help="write bound addresses here (JSON) once serving")
    parser.add_argument("--log-level", default="INFO")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging(f"shard{args.shard_id}", args.log_level)

    async def shard_main(stop: asyncio.Event) -> int:
        await run_shard(
            args.coordinator,
            args.shard_id,
            stop,
            host=args.host,
            advertise_host=args.advertise_host,
            data_port=args.data_port,
            pub_port=args.pub_port,
            ready_file=args.ready_file,
        )
        return 0

    return run_process(f"shard {args.shard_id}", shard_main)


if __name__ == "__main__":
    sys.exit(main())
