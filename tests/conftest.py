"""Shared fixtures: ZeroMQ contexts, shards on random ports, processes that are always reaped."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import numpy as np
import pytest
import zmq.asyncio

from dsgd.optim import SGD, ServerOptimizerT
from dsgd.shard import ShardServer, ShardState

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
) -> ShardServer:
    params = np.random.default_rng(seed).standard_normal(size).astype(np.float32)
    opt = optimizer or SGD(0.1)
    server = ShardServer(
        0,
        FINGERPRINT,
        opt,
        ShardState(params, opt.init(size)),
        staleness=staleness,
        chunk_bytes=chunk_bytes,
    )
    await server.start()
    return server


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


def cluster_status(address: str) -> dict:
    """``dsgd status --json`` of the cluster at ``address`` ({} if no coordinator answers)."""
    proc = run_dsgd("status", "--coordinator", address, "--json", timeout=60)
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
