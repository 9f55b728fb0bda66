"""The coordinator as a process: ``python -m dsgd.coordinator [--port P] [--model MOD:ATTR]``.

It serves the control plane until the run is over, keeps the time budget as its own
deadline (whatever the evaluator does), waits for the members to leave, then reads the
final parameters from the shards and lets them go. It never imports JAX: starting it
takes a fraction of a second and it does not load the model.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import zmq.asyncio
from google.protobuf import json_format

from dsgd import metrics
from dsgd.checkpoint import ClusterCheckpoint, read_cluster_checkpoint
from dsgd.config import TrainConfig, add_config_arguments, config_from_arguments
from dsgd.control import shard_infos, start_grpc_server
from dsgd.coordinator.core import Coordinator
from dsgd.coordinator.service import CoordinatorService
from dsgd.errors import CheckpointError, DsgdError
from dsgd.proto import control_pb2_grpc as pb_grpc
from dsgd.runtime import (
    add_operator_arguments,
    owned,
    run_process,
    setup_logging,
    write_ready_file,
)
from dsgd.security import Security, add_security_arguments, check_listen, from_arguments
from dsgd.shard.client import ParameterReader
from dsgd.types import FlatParams

log = logging.getLogger("dsgd.coordinator")

FINAL_READ_TIMEOUT = 30.0  # seconds to read the final parameters from the shards


async def run_coordinator(
    config: TrainConfig,
    stop: asyncio.Event,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    ready_file: str | None = None,
    final_params_path: Path | None = None,
    linger: float = 30.0,
    on_ready: Callable[[str], None] | None = None,
    restore: Path | None = None,
    security: Security | None = None,
    run_started: float | None = None,
) -> tuple[Coordinator, FlatParams | None]:
    """Coordinate one run until it is over (or ``stop``); return the coordinator and the
    final parameters (None when no shard could give them).

    ``on_ready(address)`` is called once the gRPC server listens. With ``security`` the
    control plane speaks mutual TLS and the final parameters are read over CURVE.
    ``run_started`` (Unix time) is when the run began, for a coordinator that restarts
    mid-run: the time budget and the clock of the run go on from there.
    """
    saved = None if restore is None else await _read_restore(restore, config)
    run_age = 0.0 if run_started is None else max(0.0, time.time() - run_started)
    coordinator = Coordinator(config, saved, run_age=run_age)
    metrics.add(metrics.ClusterCollector(asyncio.get_running_loop(), coordinator.status))
    server, bound = await start_grpc_server(
        host,
        port,
        lambda s: pb_grpc.add_CoordinatorServicer_to_server(
            CoordinatorService(coordinator, security), s
        ),
        "coordinator",
        coordinator.refused,
        security,
    )
    try:
        log.info(
            "coordinator on %s:%d: model %s, %d worker(s), %d shard(s), target %s",
            host,
            bound,
            config.model,
            config.num_workers,
            config.num_shards,
            config.target,
        )
        write_ready_file(ready_file, {"address": f"{host}:{bound}"})
        if on_ready is not None:
            on_ready(f"{host}:{bound}")
        final = await _run(coordinator, stop, linger, final_params_path, security)
        return coordinator, final
    finally:
        await server.stop(grace=0.5)


async def _read_restore(restore: Path, config: TrainConfig) -> ClusterCheckpoint:
    saved = await asyncio.to_thread(read_cluster_checkpoint, restore)
    if saved.manifest.model != config.model:
        raise CheckpointError(
            f"checkpoint {restore} holds another model ({saved.manifest.model}), not "
            f"{config.model}; restore it with --model {saved.manifest.model}"
        )
    log.info("restoring %s at shard versions %s", restore, saved.manifest.versions)
    return saved


async def _run(
    coordinator: Coordinator,
    stop: asyncio.Event,
    linger: float,
    final_params_path: Path | None,
    security: Security | None,
) -> FlatParams | None:
    """Until the run is over; then the members' leaving and the final parameters."""
    async with asyncio.TaskGroup() as group:
        budget = group.create_task(owned("the time budget", _budget(coordinator)))
        await _until_over(coordinator, stop)
        budget.cancel()
    if stop.is_set():
        return None
    await _wait_members(coordinator, linger, shards=False)
    final = await _final_parameters(coordinator, security)
    if final is not None and final_params_path is not None:
        await asyncio.to_thread(_save_npy, final_params_path, final)
    await _wait_members(coordinator, linger, shards=True)  # their last checkpoints
    return final


async def _budget(coordinator: Coordinator) -> None:
    """The time budget is a deadline of its own, whatever else the run is doing."""
    elapsed = time.monotonic() - coordinator.started
    await asyncio.sleep(max(0.0, coordinator.config.max_seconds - elapsed))
    coordinator.budget_spent()


async def _until_over(coordinator: Coordinator, stop: asyncio.Event) -> None:
    """Return once the run is over, or on ``stop`` (which ends the run)."""
    over = asyncio.ensure_future(coordinator.finished.wait())
    stopped = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({over, stopped}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        over.cancel()
        stopped.cancel()
    coordinator.finish("stopped by signal")


async def _wait_members(coordinator: Coordinator, linger: float, *, shards: bool) -> None:
    """Wait (at most ``linger`` seconds) until the workers and the evaluator have left,
    or with ``shards``, everyone."""
    deadline = time.monotonic() + linger
    while not coordinator.shutdown_requested.is_set() and time.monotonic() < deadline:
        members = [m for m in coordinator.all_members() if shards or m.endpoint is None]
        if all(coordinator.member_state(m) in ("left", "dead") for m in members):
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(coordinator.shutdown_requested.wait(), 0.1)


async def _final_parameters(
    coordinator: Coordinator, security: Security | None
) -> FlatParams | None:
    """Read the final parameters from the shards, then let them leave."""
    layout = coordinator.layout
    try:
        if layout is None or not coordinator.shards_ready():
            return None
        ctx = zmq.asyncio.Context()
        reader = ParameterReader(
            layout.fingerprint, ctx, fetch_timeout=FINAL_READ_TIMEOUT, security=security
        )
        try:
            flat = np.empty(layout.size, np.float32)
            await reader.read(shard_infos(coordinator.shard_endpoints()), flat)
            return flat
        except DsgdError as exc:
            log.warning("could not read the final parameters: %s", exc)
            return None
        finally:
            await reader.aclose()
            ctx.term()
    finally:
        coordinator.final_taken = True


def _save_npy(path: Path, flat: FlatParams) -> None:
    tmp = path.with_suffix(".tmp.npy")
    np.save(tmp, flat, allow_pickle=False)
    tmp.replace(path)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m dsgd.coordinator", description="Run the dsgd coordinator."
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=int, default=0, help="gRPC port (0: any free port)")
    parser.add_argument("--ready-file", help="write the bound address here (JSON) once serving")
    parser.add_argument("--final-params", type=Path, help="save the final parameters (.npy)")
    parser.add_argument("--status-file", type=Path, help="write the final status (JSON) here")
    parser.add_argument("--linger", type=float, default=60.0, help="seconds to wait for members")
    parser.add_argument("--config-file", type=Path, help="TrainConfig JSON (overrides the flags)")
    parser.add_argument("--restore", type=Path, help="start from this cluster checkpoint")
    parser.add_argument(
        "--run-started",
        type=float,
        help="Unix time the run began (a restarted coordinator keeps the run's time budget)",
    )
    parser.add_argument("--log-level", default="INFO")
    add_operator_arguments(parser)
    add_security_arguments(parser)
    add_config_arguments(parser)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging("coordinator", args.log_level)

    async def coordinator_main(stop: asyncio.Event) -> int:
        security = from_arguments(args)
        check_listen(args.host, security, args.insecure, "coordinator")
        if args.config_file:
            config = TrainConfig.from_json(args.config_file.read_text())
        else:
            config = config_from_arguments(args)
        coordinator, _ = await run_coordinator(
            config,
            stop,
            host=args.host,
            port=args.port,
            ready_file=args.ready_file,
            final_params_path=args.final_params,
            linger=args.linger,
            restore=args.restore,
            security=security,
            run_started=args.run_started,
        )
        if args.status_file:
            text = json_format.MessageToJson(coordinator.status(), preserving_proto_field_name=True)
            args.status_file.write_text(text)
        return 0

    return run_process("coordinator", coordinator_main, args)
