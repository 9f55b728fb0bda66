"""Shared fixtures: ZeroMQ contexts, shards on random ports, processes that are always reaped."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zmq.asyncio

from dsgd.config import TrainConfig
from dsgd.control import layout_message, start_grpc_server
from dsgd.coordinator.core import Coordinator
from dsgd.coordinator.service import CoordinatorService
from dsgd.optim import SGD, ServerOptimizerT
from dsgd.proto import control_pb2_grpc as pb_grpc
from dsgd.security import Security
from dsgd.shard.core import ShardCore, ShardState
from dsgd.shard.server import ShardServer

ROOT = Path(__file__).resolve().parents[1]
FINGERPRINT = 0x1234_5678_9ABC


@pytest.fixture
async def zmq_ctx() -> AsyncIterator[zmq.asyncio.Context]:
    ctx = zmq.asyncio.Context()
    yield ctx
    ctx.destroy(linger=0)


async def make_shard(
    size: int = 10_000,
    optimizer: ServerOptimizerT | None = None,
    *,
    staleness: str = "none",
    chunk_bytes: int = 1 << 16,
    seed: int = 0,
    security: Security | None = None,
) -> ShardServer:
    """A shard core with random parameters, served on 127.0.0.1 (close it with aclose());
    with ``security``, over CURVE with its admission of keys."""
    params = np.random.default_rng(seed).standard_normal(size).astype(np.float32)
    opt = optimizer or SGD(0.1)
    core = ShardCore(
        0,
        FINGERPRINT,
        opt,
        ShardState(params, opt.init(size)),
        staleness=staleness,
        chunk_bytes=chunk_bytes,
    )
    server = ShardServer(core, security=security)
    await server.start_serving()
    return server


@contextlib.asynccontextmanager
async def serve_coordinator(
    config: TrainConfig, compiled: Any = None
) -> AsyncIterator[tuple[Coordinator, str]]:
    """A coordinator core behind its real gRPC service on 127.0.0.1, in this event loop;
    with ``compiled`` (a CompiledModel) it already knows the model and its initial values."""
    coordinator = Coordinator(config)
    if compiled is not None:
        coordinator.describe_model(layout_message(compiled.layout))
        coordinator.accept_initial(compiled.layout.fingerprint, compiled.initial_flat())
    server, port = await start_grpc_server(
        "127.0.0.1",
        0,
        lambda s: pb_grpc.add_CoordinatorServicer_to_server(CoordinatorService(coordinator), s),
        "test coordinator",
        coordinator.refused,
    )
    try:
        yield coordinator, f"127.0.0.1:{port}"
    finally:
        await server.stop(grace=0.5)


def free_port() -> int:
    """A loopback port nothing listens on now (for flags that want a fixed port)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def run_dsgd(
    *args: str, timeout: float = 120, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run ``python -m dsgd ARGS`` to completion in the repository root."""
    return subprocess.run(
        [sys.executable, "-m", "dsgd", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


def cluster_status(address: str, secure: Path | None = None) -> dict:
    """``dsgd status --json`` of the cluster at ``address`` ({} if no coordinator answers);
    ``secure``: the key directory of a cluster started with --secure."""
    keys = ("--secure", str(secure)) if secure is not None else ()
    proc = run_dsgd("status", "--coordinator", address, "--json", *keys, timeout=60)
    return json.loads(proc.stdout) if proc.returncode == 0 else {}


class ProcessGroup:
    """Processes started by a test; every one is stopped (and reaped) at teardown."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.procs: list[subprocess.Popen[str]] = []
        self.logs: dict[int, Path] = {}

    def start(self, name: str, *args: str) -> subprocess.Popen[str]:
        log = self.tmp / f"{name}.log"
        with open(log, "w") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", *args],
                cwd=ROOT,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                text=True,
            )
        self.procs.append(proc)
        self.logs[proc.pid] = log
        return proc

    def log(self, proc: subprocess.Popen[str]) -> str:
        return self.logs[proc.pid].read_text()

    def wait_file(self, path: Path, proc: subprocess.Popen[str], timeout: float = 60) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if path.exists():
                return json.loads(path.read_text())
            if proc.poll() is not None:
                raise AssertionError(f"process exited with {proc.returncode}:\n{self.log(proc)}")
            time.sleep(0.05)
        raise AssertionError(f"{path} did not appear within {timeout} s:\n{self.log(proc)}")

    def start_coordinator(self, *flags: str) -> tuple[subprocess.Popen[str], str]:
        ready = self.tmp / "coordinator.ready"
        proc = self.start(
            "coordinator",
            "dsgd.coordinator",
            "--ready-file",
            str(ready),
            "--status-file",
            str(self.tmp / "status.json"),
            *flags,
        )
        return proc, self.wait_file(ready, proc)["address"]

    def stop_all(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@pytest.fixture
def processes(tmp_path: Path) -> Iterator[ProcessGroup]:
    group = ProcessGroup(tmp_path)
    yield group
    group.stop_all()
