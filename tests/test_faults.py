"""Failures with real processes and real signals: workers, shards and the coordinator die."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zmq

from dsgd import checkpoint, wire
from dsgd.checkpoint import read_cluster_checkpoint
from dsgd.examples.digits import digits_cnn
from dsgd.model import CompiledModel
from dsgd.shard.process import ShardProcess
from tests.conftest import ROOT, ProcessGroup, cluster_status

SLOW_TRAINING = ["--lr", "0.003", "--checkpoint-every", "0.5", "--max-seconds", "240"]


class Cluster:
    """``dsgd start`` in the background, with helpers to watch and hurt it."""

    def __init__(self, tmp: Path, *flags: str) -> None:
        self.run_dir = tmp / "run"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "dsgd", "start", "--run-dir", str(self.run_dir), *flags],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    def pids(self) -> dict[str, int]:
        return dict(json.loads((self.run_dir / "pids.json").read_text()))

    def address(self) -> str:
        return str(json.loads((self.run_dir / "coordinator.ready").read_text())["address"])

    def status(self) -> dict[str, Any] | None:
        return cluster_status(self.address()) or None

    def wait_for(self, what: str, predicate: Any, timeout: float = 120) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.proc.communicate()[1][-3000:]
            if (self.run_dir / "coordinator.ready").exists():
                status = self.status()
                if status is not None and predicate(status):
                    return status
            time.sleep(0.2)
        raise AssertionError(f"timed out waiting for {what}")

    def shard_versions(self, status: dict[str, Any]) -> list[int]:
        shards = [m for m in status.get("members", []) if m["role"] == "ROLE_SHARD"]
        return [int(m.get("stats", {}).get("version", 0)) for m in shards]

    def training(self, at_least: int = 50) -> dict[str, Any]:
        return self.wait_for(
            f"shard versions >= {at_least}",
            lambda s: len(self.shard_versions(s)) == 2 and min(self.shard_versions(s)) >= at_least,
        )

    def finish(self, timeout: float = 240) -> tuple[int, dict[str, Any], str]:
        out, err = self.proc.communicate(timeout=timeout)
        summary = json.loads(out.strip().splitlines()[-1]) if out.strip() else {}
        return self.proc.returncode, summary, err

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.communicate(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.communicate()

    def log(self, name: str) -> str:
        return (self.run_dir / f"{name}.log").read_text()


@pytest.fixture
def cluster_factory(tmp_path: Path):
    started: list[Cluster] = []

    def make(*flags: str) -> Cluster:
        cluster = Cluster(tmp_path, *flags)
        started.append(cluster)
        return cluster

    yield make
    for cluster in started:
        cluster.kill()


@pytest.mark.slow
def test_sigkill_a_worker_mid_training_and_the_run_still_reaches_its_target(
    cluster_factory: Any,
) -> None:
    cluster = cluster_factory(*SLOW_TRAINING)
    cluster.training()
    os.kill(cluster.pids()["worker1"], signal.SIGKILL)
    code, summary, err = cluster.finish()
    assert code == 0, err[-3000:]
    assert summary["reached_target"] and summary["restarts"] == {"worker1": 1}
    assert "worker1 exited with code -9" in err
    assert "replaced by a new process" in cluster.log("coordinator")


@pytest.mark.slow
def test_sigkill_a_shard_mid_training_it_resumes_from_its_checkpoint(
    cluster_factory: Any,
) -> None:
    cluster = cluster_factory(*SLOW_TRAINING)
    cluster.training(at_least=200)
    os.kill(cluster.pids()["shard0"], signal.SIGKILL)
    code, summary, err = cluster.finish()
    assert code == 0, err[-3000:]
    assert summary["reached_target"] and summary["restarts"] == {"shard0": 1}
    restored = [line for line in cluster.log("shard0").splitlines() if "restored version" in line]
    assert restored, cluster.log("shard0")
    assert int(restored[-1].split("restored version ")[1].split()[0]) > 0
    assert "moved to" in cluster.log("worker0")  # workers followed the new incarnation


@pytest.mark.slow
def test_training_goes_on_without_the_coordinator_and_members_rejoin_it(
    processes: ProcessGroup,
) -> None:
    model = ["--model", "dsgd.examples.digits:digits_mlp", "--target-accuracy", "1.0"]
    model += ["--no-evaluator"]  # what is under test is the coordinator's absence
    coordinator, address = processes.start_coordinator(*model, "--max-seconds", "300")
    port = address.rsplit(":", 1)[1]
    ready = processes.tmp / "shard0.ready"
    shard = processes.start(
        "shard0",
        "dsgd.shard",
        "--coordinator",
        address,
        "--shard-id",
        "0",
        "--ready-file",
        str(ready),
    )
    processes.start("shard1", "dsgd.shard", "--coordinator", address, "--shard-id", "1")
    worker_ready = processes.tmp / "worker0.ready"
    worker = processes.start(
        "worker0", "dsgd.worker", "--coordinator", address, "--ready-file", str(worker_ready)
    )
    pub = processes.wait_file(ready, shard)["pub_address"]
    processes.wait_file(worker_ready, worker)
    deadline = time.monotonic() + 60
    while _broadcast_version(pub, 0) < 10 and time.monotonic() < deadline:
        time.sleep(0.2)

    coordinator.send_signal(signal.SIGKILL)
    coordinator.wait(timeout=30)
    first = _broadcast_version(pub, 0)
    deadline = time.monotonic() + 30
    while _broadcast_version(pub, 0) < first + 20 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _broadcast_version(pub, 0) >= first + 20, "no pushes while the coordinator was down"

    (processes.tmp / "coordinator.ready").unlink()
    _, again = processes.start_coordinator(*model, "--max-seconds", "300", "--port", port)
    assert again == address
    deadline = time.monotonic() + 60
    members: list[str] = []
    while time.monotonic() < deadline:
        status = cluster_status(address)
        members = sorted(
            f"{m['role']}:{m.get('id', 0)}:{m['state']}" for m in status.get("members", [])
        )
        if members == ["ROLE_SHARD:0:alive", "ROLE_SHARD:1:alive", "ROLE_WORKER:0:alive"]:
            break
        time.sleep(0.3)
    assert members == ["ROLE_SHARD:0:alive", "ROLE_SHARD:1:alive", "ROLE_WORKER:0:alive"]


def _broadcast_version(pub_address: str, shard: int, timeout: float = 10.0) -> int:
    ctx = zmq.Context()
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.LINGER, 0)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    sub.setsockopt(zmq.RCVTIMEO, int(timeout * 1000))
    sub.connect(pub_address)
    try:
        while True:
            header = wire.unpack_header(sub.recv())
            if header.kind == wire.VERSION and header.shard == shard:
                return header.version
    finally:
        sub.close()
        ctx.term()


@pytest.mark.slow
def test_checkpoint_save_and_restore_resume_where_the_run_was(
    cluster_factory: Any, tmp_path: Path
) -> None:
    cluster = cluster_factory(*SLOW_TRAINING, "--target-accuracy", "1.0")
    cluster.training(at_least=100)
    saved = tmp_path / "saved"
    proc = subprocess.run(
        [sys.executable, "-m", "dsgd", "checkpoint", "save", str(saved)]
        + ["--coordinator", cluster.address()],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    cluster.kill()
    ckpt = read_cluster_checkpoint(saved)
    assert min(ckpt.manifest.versions) >= 100
    compiled = CompiledModel(digits_cnn(), 2)
    flat = np.concatenate([s.params for s in ckpt.shards])
    saved_accuracy = compiled.evaluate(flat)["accuracy"]

    restored = Cluster(tmp_path / "again", "--lr", "0.003", "--restore", str(saved))
    try:
        code, summary, err = restored.finish()
    finally:
        restored.kill()
    assert code == 0, err[-3000:]
    status = json.loads((restored.run_dir / "status.json").read_text())
    first = status["history"][0]
    assert first["test_accuracy"] == pytest.approx(saved_accuracy, abs=1e-9)
    assert int(first["total_version"]) == sum(ckpt.manifest.versions)


async def test_a_corrupted_newest_checkpoint_falls_back_to_the_previous_one(
    tmp_path: Path,
) -> None:
    def save(version: int) -> Path:
        snap = checkpoint.snapshot(
            shard_id=0,
            shard_range=(0, 8),
            num_shards=1,
            version=version,
            fingerprint=42,
            optimizer="sgd",
            incarnation=1,
            params=np.full(8, version, np.float32),
            opt_state={},
        )
        return checkpoint.write(snap, tmp_path).path

    save(5)
    newest = save(9)
    data = bytearray(newest.read_bytes())
    data[-3] ^= 0xFF
    newest.write_bytes(bytes(data))
    process = ShardProcess("127.0.0.1:1", 0, checkpoint_dir=tmp_path)
    try:
        process.restore_local()
    finally:
        await process.server.aclose()
        await process.link.aclose()
        process.ctx.term()
    assert process.restored is not None and process.restored.version == 5
    np.testing.assert_array_equal(process.restored.params, np.full(8, 5, np.float32))


def test_a_worker_joins_a_running_cluster_and_leaves_it(processes: ProcessGroup) -> None:
    flags = ["--model", "dsgd.examples.digits:digits_mlp", "--target-accuracy", "1.0"]
    flags += ["--no-evaluator"]
    _, address = processes.start_coordinator(*flags, "--workers", "1", "--shards", "1")
    processes.start("shard0", "dsgd.shard", "--coordinator", address, "--shard-id", "0")
    first_ready = processes.tmp / "first.ready"
    first = processes.start(
        "first", "dsgd.worker", "--coordinator", address, "--ready-file", str(first_ready)
    )
    assert processes.wait_file(first_ready, first)["worker_id"] == 0
    joiner_ready = processes.tmp / "joiner.ready"
    joiner = processes.start(
        "joiner", "dsgd.worker", "--coordinator", address, "--ready-file", str(joiner_ready)
    )
    assert processes.wait_file(joiner_ready, joiner)["worker_id"] == 1  # beyond the 1 slot

    def workers() -> dict[int, str]:
        members = cluster_status(address).get("members", [])
        return {m.get("id", 0): m["state"] for m in members if m["role"] == "ROLE_WORKER"}

    deadline = time.monotonic() + 30
    while workers() != {0: "alive", 1: "alive"} and time.monotonic() < deadline:
        time.sleep(0.2)
    assert workers() == {0: "alive", 1: "alive"}
    joiner.send_signal(signal.SIGTERM)
    assert joiner.wait(timeout=30) == 0
    deadline = time.monotonic() + 30
    while workers() != {0: "alive", 1: "left"} and time.monotonic() < deadline:
        time.sleep(0.2)
    assert workers() == {0: "alive", 1: "left"}


COMPOSED_STEPS = 6000


def _kill_and_wait_restart(cluster: Cluster, name: str) -> None:
    """SIGKILL member ``name`` and wait until the supervisor has started it again."""
    pid = cluster.pids()[name]
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 60
    while cluster.pids().get(name) == pid and time.monotonic() < deadline:
        assert cluster.proc.poll() is None, cluster.proc.communicate()[1][-3000:]
        time.sleep(0.1)
    assert cluster.pids().get(name) != pid, f"{name} was not restarted"


def _wait_connected(cluster: Cluster, shard_incarnation: str = "") -> dict[str, Any]:
    """Every worker and both shards alive in the coordinator's view (shard 0 under a new
    incarnation when ``shard_incarnation`` names the old one)."""

    def connected(status: dict[str, Any]) -> bool:
        members = status.get("members", [])
        workers = [m for m in members if m["role"] == "ROLE_WORKER" and m["state"] == "alive"]
        shards = {m.get("id", 0): m for m in members if m["role"] == "ROLE_SHARD"}
        return (
            len(workers) == 3
            and len(shards) == 2
            and all(s["state"] == "alive" for s in shards.values())
            and shards[0].get("incarnation", "") != shard_incarnation
        )

    return cluster.wait_for("a fully connected cluster", connected, timeout=60)


@pytest.mark.slow
@pytest.mark.parametrize("coordinator_first", [False, True], ids=["coordinator-last", "first"])
def test_composed_restarts_converge_and_the_run_ends_on_its_step_budget(
    cluster_factory: Any, coordinator_first: bool
) -> None:
    """A worker, a shard and the coordinator SIGKILLed in a row (the coordinator last, or
    first), each restarted by the supervisor while the others are still coming back: the
    cluster reconnects, every shard keeps receiving updates, the run ends on its own step
    budget soon after the workers' last step, and nothing a worker held is dropped
    unreported."""
    cluster = cluster_factory(
        "--workers", "3", "--target", "none", "--max-steps", str(COMPOSED_STEPS),
        "--checkpoint-every", "0.5", "--max-seconds", "400",
    )  # fmt: skip
    status = cluster.training(at_least=300)
    shard0 = next(m for m in status["members"] if m["role"] == "ROLE_SHARD" and not m.get("id"))
    order = ["worker1", "shard0", "coordinator"]
    if coordinator_first:
        order = ["coordinator", "worker1", "shard0"]
    for name in order:
        _kill_and_wait_restart(cluster, name)
    _wait_connected(cluster, shard_incarnation=shard0["incarnation"])

    last_step_at: float | None = None
    while cluster.proc.poll() is None:
        status = cluster.status() or {}
        workers = [m for m in status.get("members", []) if m["role"] == "ROLE_WORKER"]
        steps = [int(m.get("stats", {}).get("step", 0)) for m in workers]
        if last_step_at is None and len(steps) == 3 and min(steps) >= COMPOSED_STEPS:
            last_step_at = time.monotonic()
        if last_step_at is not None and time.monotonic() - last_step_at > 90:
            break
        time.sleep(0.5)
    code, summary, err = cluster.finish(timeout=120)
    ended_at = time.monotonic()
    assert code == 0, err[-3000:]
    assert "step budget" in summary["done_reason"], summary
    assert last_step_at is None or ended_at - last_step_at < 60, summary
    versions = summary["shard_versions"]
    assert max(versions) <= 2 * min(versions), summary
    final = json.loads((cluster.run_dir / "status.json").read_text())
    workers = [m for m in final["members"] if m["role"] == "ROLE_WORKER"]
    assert sorted(int(m.get("id", 0)) for m in workers) == [0, 1, 2]
    assert all(int(m["stats"]["step"]) >= COMPOSED_STEPS for m in workers), workers
    # what a worker still held at exit is counted, and here nothing was: the shards came back
    assert summary["values_unpushed"] == 0, summary
    # shard 0 restarted from a checkpoint: its loss is accounted, by a coordinator that
    # restarted after it too
    assert "0" in summary["lost_acknowledged_pushes"], summary


@pytest.mark.slow
def test_a_run_the_coordinator_cannot_end_is_ended_by_the_supervisor_with_a_reason(
    cluster_factory: Any,
) -> None:
    """The coordinator hangs (SIGSTOP) before the time budget runs out: the supervisor ends
    the run itself soon after the budget, says why, and exits 3 (a budget ran out), not 0."""
    cluster = cluster_factory("--target", "none", "--max-seconds", "20", "--no-evaluator")
    cluster.training(at_least=20)
    os.kill(cluster.pids()["coordinator"], signal.SIGSTOP)
    code, summary, err = cluster.finish(timeout=120)
    assert code == 3, err[-3000:]
    assert "the supervisor stopped it" in summary["done_reason"], summary
    assert "the supervisor stopped it" in err
