"""The processes of a bench.failover run and what this process sees of them.

:class:`Run` starts dsgd's own coordinator, shard and worker processes (``python -m
dsgd.<role>``, as a user starts them) and notices a worker that exits; :class:`Broadcasts`
records every shard process's version broadcasts from a thread; the rest reads the
coordinator's status: where the primary is, whether the replicas are all in the chain,
and each worker's step as its heartbeats report it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import zmq

from bench._fixed_gradient import LR, MODEL
from dsgd import wire
from dsgd.config import TrainConfig
from dsgd.control import CoordinatorLink
from dsgd.errors import ProtocolError
from dsgd.proto import control_pb2 as pb

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT = 60.0
HEARTBEAT = TrainConfig().heartbeat_interval
SAMPLE = 0.1  # seconds between samples of the workers' steps
# what the workers report and each kill's record carries (deltas), when present
WORKER_COUNTERS = (
    "chunks_resent",
    "pushes_resent",
    "values_given_back",
    "pushes_deferred",
    "fetches_failed",
    "chunks_rejected",
    "values_unpushed",
)


class WorkerExited(RuntimeError):
    """A worker process ended before the run did (or badly at the end)."""


@dataclass
class Run:
    """The processes of one run."""

    tmp: Path
    replicas: int
    workers: int
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    argv: dict[str, list[str]] = field(default_factory=dict)
    address: str = ""
    over: bool = False  # the faults are over: a worker may leave at its step budget
    # (time, worker id, step) each time the coordinator's status showed a worker's step move
    moves: list[tuple[float, int, int]] = field(default_factory=list)

    def start(self, name: str, *args: str) -> None:
        self.argv[name] = [sys.executable, "-m", *args]
        self._spawn(name)

    def _spawn(self, name: str) -> None:
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
        }
        log = open(self.tmp / f"{name}.log", "ab")  # noqa: SIM115 - the child owns it
        self.procs[name] = subprocess.Popen(
            self.argv[name], stdout=log, stderr=log, cwd=ROOT, env=env
        )
        log.close()

    def restart(self, name: str) -> None:
        self.procs[name].wait(timeout=TIMEOUT)
        (self.tmp / f"{name}.ready").unlink(missing_ok=True)
        self._spawn(name)

    def check_workers(self) -> None:
        """Raise WorkerExited if a worker process ended before the run did."""
        for w in range(self.workers):
            proc = self.procs[f"worker{w}"]
            code = proc.poll()
            if code is not None and (code != 0 or not self.over):
                log = (self.tmp / f"worker{w}.log").read_text(errors="replace")
                why = "its step budget ran out (raise --steps)" if "done after" in log else ""
                raise WorkerExited(
                    f"worker {w} exited with code {code} during the faults {why}\n{log[-3000:]}"
                )

    def stop_all(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGCONT)  # (one stopped by a backup fault)
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs.values():
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def wait_file(path: Path, proc: subprocess.Popen[bytes], timeout: float = TIMEOUT) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists():
            return json.loads(path.read_text())
        if proc.poll() is not None:
            raise RuntimeError(f"{path.stem} exited with code {proc.returncode}")
        time.sleep(0.005)
    raise TimeoutError(f"no {path} within {timeout:.0f} s")


def start_cluster(run: Run, args: argparse.Namespace, steps: int) -> None:
    ready = run.tmp / "coordinator.ready"
    run.start(
        "coordinator",
        "dsgd.coordinator",
        *("--ready-file", str(ready), "--final-params", str(run.tmp / "final.npy")),
        *("--status-file", str(run.tmp / "status.json")),
        *("--model", MODEL, "--model-arg", f"params={args.params}"),
        *("--model-arg", f"workers={run.workers}", "--workers", str(run.workers)),
        *("--shards", "1", "--replicas", str(run.replicas), "--no-evaluator"),
        *("--optimizer", "sgd", "--lr", str(LR), "--target", "none"),
        *("--n-fetch", "1", "--n-push", "1", "--density", "1"),  # no local step, dense
        *("--max-steps", str(steps), "--max-seconds", "3600"),
        *("--checkpoint-every", str(args.checkpoint_every)),
    )
    run.address = wait_file(ready, run.procs["coordinator"])["address"]
    for j in range(run.replicas):
        name = f"shard-r{j}"
        run.start(
            name,
            "dsgd.shard",
            *("--coordinator", run.address, "--shard-id", "0", "--replica", str(j)),
            *("--checkpoint-dir", str(run.tmp / f"checkpoints-{j}")),
            *("--ready-file", str(run.tmp / f"{name}.ready")),
        )
    for w in range(run.workers):
        run.start(
            f"worker{w}",
            "dsgd.worker",
            *("--coordinator", run.address, "--worker-id", str(w)),
            *("--ready-file", str(run.tmp / f"worker{w}.ready")),  # once a push is applied
        )


class Broadcasts:
    """Every shard process's version broadcasts, as this process received them: a thread
    with one SUB socket connected to each PUB, recording (time, incarnation, version)."""

    def __init__(self) -> None:
        self.records: list[tuple[float, int, int]] = []
        self._connect: queue.SimpleQueue[str] = queue.SimpleQueue()
        self._stop = threading.Event()
        self._ctx = zmq.Context()
        self._thread = threading.Thread(target=self._listen, name="broadcasts", daemon=True)
        self._thread.start()

    def connect(self, pub_address: str) -> None:
        self._connect.put(pub_address)

    def _listen(self) -> None:
        sub = self._ctx.socket(zmq.SUB)
        sub.setsockopt(zmq.LINGER, 0)
        sub.setsockopt(zmq.SUBSCRIBE, b"")
        try:
            while not self._stop.is_set():
                while not self._connect.empty():
                    sub.connect(self._connect.get())
                if not sub.poll(2):
                    continue
                while True:
                    try:
                        frame = sub.recv(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    now = time.monotonic()
                    try:
                        header = wire.unpack_header(frame)
                    except ProtocolError:
                        continue
                    if header.kind == wire.VERSION:
                        self.records.append((now, header.incarnation, header.version))
        finally:
            sub.close()

    def version(self, incarnation: int, before: float) -> int:
        """The last version ``incarnation`` broadcast before ``before`` (-1: none)."""
        seen = [v for t, i, v in list(self.records) if i == incarnation and t < before]
        return seen[-1] if seen else -1

    def first_above(self, incarnation: int, version: int, after: float) -> float | None:
        """When ``incarnation`` first broadcast a version above ``version`` after ``after``."""
        return next(
            (t for t, i, v in list(self.records) if i == incarnation and v > version and t > after),
            None,
        )

    def longest_stall(self, incarnation: int, start: float, end: float) -> float:
        """The longest time between ``start`` and ``end`` in which ``incarnation``'s
        broadcast version did not move."""
        moves, last = [start], None
        for t, i, v in list(self.records):
            if i == incarnation and start < t < end and v != last:
                if last is not None:
                    moves.append(t)
                last = v
        moves.append(end)
        return max(b - a for a, b in zip(moves, moves[1:], strict=False))

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._ctx.term()


async def status_of(link: CoordinatorLink) -> pb.ClusterStatus:
    return await link.call(link.stub.Status, pb.StatusRequest(), "status")


def primary_of(status: pb.ClusterStatus) -> pb.MemberStatus | None:
    return next((m for m in status.members if m.role == pb.ROLE_SHARD and m.primary), None)


def workers_of(status: pb.ClusterStatus) -> list[pb.MemberStatus]:
    return [m for m in status.members if m.role == pb.ROLE_WORKER]


def counters(status: pb.ClusterStatus) -> dict[str, float]:
    """The workers' counters of WORKER_COUNTERS, summed (the ones they report)."""
    out: dict[str, float] = {}
    for m in workers_of(status):
        for name in WORKER_COUNTERS:
            if name in m.stats.counters:
                out[name] = out.get(name, 0.0) + m.stats.counters[name]
    return out


async def poll(run: Run, what: str, check: Any, limit: float = TIMEOUT) -> Any:
    """``await check()`` until it returns something true; a worker that exits meanwhile
    ends the benchmark (WorkerExited), so does ``limit``."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        run.check_workers()
        found = await check()
        if found:
            return found
        await asyncio.sleep(0.02)
    raise TimeoutError(f"timed out waiting for {what}")


async def replicated(run: Run, link: CoordinatorLink, failovers: int = 0) -> Any:
    """The status once every replica is alive, in the chain, and ``failovers`` happened."""
    status = await status_of(link)
    shards = [m for m in status.members if m.role == pb.ROLE_SHARD]
    primary = primary_of(status)
    if primary is None or sum(1 for m in shards if m.state == "alive") < run.replicas:
        return None
    if status.failovers < failovers:
        return None
    backups = sum(1 for m in shards if m.promotable)  # in the chain, holding all acknowledged
    return status if run.replicas == 1 or backups >= run.replicas - 1 else None


async def listen_to(run: Run, name: str, broadcasts: Broadcasts) -> None:
    """Subscribe to ``name``'s broadcasts once it is up (its ready file names its PUB)."""
    ready = run.tmp / f"{name}.ready"
    deadline = time.monotonic() + TIMEOUT
    while not ready.exists():
        if time.monotonic() > deadline or run.procs[name].poll() is not None:
            raise RuntimeError(f"{name} did not start (see {name}.log)")
        await asyncio.sleep(0.002)
    broadcasts.connect(json.loads(ready.read_text())["pub_address"])


async def sample_steps(run: Run, link: CoordinatorLink) -> None:
    """Every SAMPLE seconds, note each worker's step as the coordinator's status shows it
    (the workers report it in every heartbeat) when it moved; end the benchmark if a
    worker process exits."""
    last: dict[int, int] = {}
    while True:
        run.check_workers()
        status = await status_of(link)
        now = time.monotonic()
        for m in workers_of(status):
            if last.get(m.id) != m.stats.step:
                last[m.id] = int(m.stats.step)
                run.moves.append((now, m.id, int(m.stats.step)))
        await asyncio.sleep(SAMPLE)


def stalls(run: Run, start: float, end: float) -> list[float]:
    """Per worker, the longest time without a step in a stretch that overlaps
    [start, end] (from the status samples: a worker that trains shows a new step at
    every heartbeat, HEARTBEAT s apart)."""
    out = []
    for w in range(run.workers):
        times = [t for t, i, _ in list(run.moves) if i == w]
        before = [t for t in times if t <= start][-1:] or [start]
        inside = [t for t in times if start < t < end]
        after = [t for t in times if t >= end][:1] or [end]
        points = before + inside + after
        out.append(max(b - a for a, b in zip(points, points[1:], strict=False)))
    return out


async def training(run: Run) -> None:
    """Until every worker has shown two new steps within the last 3 heartbeats."""

    async def steady() -> bool:
        if run.over and all(
            p.poll() is not None for n, p in run.procs.items() if n.startswith("worker")
        ):
            return True
        recent = time.monotonic() - 3 * HEARTBEAT
        moved = [
            sum(1 for t, i, _ in list(run.moves) if i == w and t > recent)
            for w in range(run.workers)
        ]
        return min(moved) >= 2

    await poll(run, "every worker to train", steady, limit=4 * TIMEOUT)
