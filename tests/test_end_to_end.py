"""Whole clusters on 127.0.0.1: the wire and the apply are exact, and training converges."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

import dsgd
from dsgd.config import TrainConfig
from dsgd.examples.digits import digits_mlp
from dsgd.model import CompiledModel
from dsgd.worker.replica import worker_batches
from tests.conftest import ROOT, ProcessGroup, cluster_status

MLP = "dsgd.examples.digits:digits_mlp"


def test_one_worker_one_shard_sgd_equals_a_single_process_loop() -> None:
    steps, lr = 40, 0.05
    result = dsgd.train(
        MLP,
        num_workers=1,
        num_shards=1,
        optimizer="sgd",
        lr=lr,
        local_lr=0.0,
        n_fetch=1,
        n_push=1,
        overlap=False,
        max_steps=steps,
        target="none",
        eval_every=0.2,
    )
    assert result.summary["steps"] == steps and result.summary["pushes"] == steps

    spec = digits_mlp(seed=0)
    compiled = CompiledModel(spec, 1)
    config = TrainConfig(model=MLP, num_workers=1, num_shards=1)
    stream = worker_batches(compiled, config, partition=0, num_partitions=1)
    flat = compiled.initial_flat()
    for _ in range(steps):
        x, y = next(stream)
        _, grad = compiled.gradient(flat, x, y)
        flat = flat - np.float32(lr) * grad
    expected = compiled.layout.unflatten(flat)
    for name in expected:
        np.testing.assert_allclose(result.params[name], expected[name], rtol=1e-5, atol=1e-6)


def test_in_process_cluster_with_sharding_trains_the_mlp() -> None:
    result = dsgd.train(
        digits_mlp(seed=1), num_workers=2, num_shards=3, target_accuracy=0.93, max_seconds=90
    )
    assert result.summary["reached_target"], result.summary
    assert result.summary["test_accuracy"] >= 0.93
    assert len(result.summary["updates_applied"]) == 3
    assert all(n > 0 for n in result.summary["updates_applied"])
    assert result.history and result.history[-1]["test_accuracy"] >= 0.93
    # workers are admitted once the evaluator has read the parameters: the first
    # evaluation is of the initial ones
    assert int(result.status["history"][0].get("total_version", 0)) == 0
    shapes = jax.tree_util.tree_map(np.shape, result.params)
    assert shapes == jax.tree_util.tree_map(np.shape, digits_mlp().init_params)


def test_two_shards_three_worker_processes_reach_95_percent(tmp_path: Path) -> None:
    out = tmp_path / "summary.json"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "dsgd",
            "start",
            "--workers",
            "3",
            "--shards",
            "2",
            "--target-accuracy",
            "0.95",
            "--max-seconds",
            "150",
            "--eval-sample",
            "100",
            "--run-dir",
            str(tmp_path / "run"),
            "--out",
            str(out),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary == json.loads(out.read_text())
    assert summary["reached_target"] and summary["best_accuracy"] >= 0.95
    # periodic evaluations judged a sample; the final parameters were judged on all of it
    held_out = len(digits_mlp().dataset.x_test)
    assert summary["final_evaluation"] and summary["test_examples"] == held_out > 100
    assert summary["test_accuracy"] >= 0.85  # the whole split, a little behind the sample
    assert summary["workers"] == 3 and summary["shards"] == 2
    for key in ("wall_seconds", "pushes", "bytes_pushed", "bytes_fetched"):
        assert summary[key] > 0, key
    assert len(summary["updates_applied"]) == 2 and min(summary["updates_applied"]) > 0
    assert "test acc" in proc.stderr  # progress was shown
    logs = sorted(p.name for p in (tmp_path / "run").glob("*.log"))
    assert logs == ["coordinator.log", "evaluator.log", "shard0.log", "shard1.log"] + [
        f"worker{k}.log" for k in range(3)
    ]


def wait_for_training(address: str, timeout: float = 90) -> dict:
    """Wait until every registered worker has taken steps (the cluster is training)."""
    deadline = time.monotonic() + timeout
    status: dict = {}
    while time.monotonic() < deadline:
        status = cluster_status(address)
        workers = [m for m in status.get("members", []) if m["role"] == "ROLE_WORKER"]
        if workers and all(int(m.get("stats", {}).get("step", 0)) > 0 for m in workers):
            return status
        time.sleep(0.2)
    raise AssertionError(f"the cluster at {address} did not start training: {status}")


def test_every_process_exits_cleanly_on_sigterm(processes: ProcessGroup) -> None:
    coordinator, address = processes.start_coordinator("--model", MLP, "--max-seconds", "120")
    join = ("--coordinator", address)
    shard_ready = processes.tmp / "shard.ready"
    shard = processes.start(
        "shard", "dsgd.shard", *join, "--shard-id", "0", "--ready-file", str(shard_ready)
    )
    processes.start("shard1", "dsgd.shard", *join, "--shard-id", "1")
    evaluator = processes.start("evaluator", "dsgd.evaluator", *join)
    worker_ready = processes.tmp / "worker.ready"
    worker = processes.start("worker", "dsgd.worker", *join, "--ready-file", str(worker_ready))
    processes.wait_file(shard_ready, shard)
    processes.wait_file(worker_ready, worker)
    wait_for_training(address)  # pushes are in flight
    for proc in (worker, evaluator, shard, coordinator):
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0, processes.log(proc)
        assert "Traceback" not in processes.log(proc)


def test_supervisor_stops_the_cluster_on_sigterm(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, "-m", "dsgd", "start", "--model", MLP, "--target-accuracy", "1.0"]
        + ["--max-seconds", "120", "--run-dir", str(run_dir)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        ready = run_dir / "coordinator.ready"
        deadline = time.monotonic() + 60
        while not ready.exists() and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.05)
        wait_for_training(json.loads(ready.read_text())["address"])
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "stopping the cluster" in err
    for log in run_dir.glob("*.log"):
        assert "Traceback" not in log.read_text(), log.name


@pytest.mark.parametrize(
    "args, message",
    [
        (["start", "--workers", "0"], "--workers must be >= 1"),
        (["start", "--lr", "-1"], "--lr must be a positive number"),
        (["start", "--staleness", "sometimes"], "--staleness must be"),
        (["status", "--coordinator", "nowhere"], "must look like HOST:PORT"),
        (["status", "--coordinator", "127.0.0.1:1"], "no coordinator answered"),
    ],
)
def test_user_mistakes_get_one_line_errors(args: list[str], message: str) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "dsgd", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_worker_with_unimportable_model_says_so(processes: ProcessGroup) -> None:
    _, address = processes.start_coordinator("--model", MLP)
    worker = processes.start(
        "worker", "dsgd.worker", "--coordinator", address, "--model", "no.such.module:factory"
    )
    assert worker.wait(timeout=60) == 2
    log = processes.log(worker)
    assert "cannot import model module 'no.such.module'" in log and "Traceback" not in log


def test_worker_with_another_model_is_refused(processes: ProcessGroup) -> None:
    _, address = processes.start_coordinator("--model", MLP)
    processes.start("evaluator", "dsgd.evaluator", "--coordinator", address)  # describes MLP
    deadline = time.monotonic() + 60
    while not cluster_status(address).get("num_params") and time.monotonic() < deadline:
        time.sleep(0.2)
    worker = processes.start(
        "worker",
        "dsgd.worker",
        "--coordinator",
        address,
        "--model",
        "dsgd.examples.digits:digits_cnn",
    )
    assert worker.wait(timeout=60) == 2
    assert "start it with the cluster's --model" in processes.log(worker)


def test_status_command_prints_the_cluster_table(processes: ProcessGroup) -> None:
    _, address = processes.start_coordinator("--model", MLP)
    processes.start("shard0", "dsgd.shard", "--coordinator", address, "--shard-id", "0")
    processes.start("evaluator", "dsgd.evaluator", "--coordinator", address)  # describes MLP
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        status = cluster_status(address)
        if status.get("members") and "shard 1" in status.get("waiting_for", ""):
            break
        time.sleep(0.2)
    assert status["members"][0]["role"] == "ROLE_SHARD"
    assert "shard 1 to register" in status["waiting_for"]
    table = subprocess.run(
        [sys.executable, "-m", "dsgd", "status", "--coordinator", address],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert table.returncode == 0 and "shard" in table.stdout and "waiting for" in table.stdout


def test_unreachable_coordinator_is_one_line_not_a_hang() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "dsgd.worker", "--coordinator", "127.0.0.1:1"]
        + ["--model", MLP, "--connect-timeout", "1"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 1
    last = proc.stderr.strip().splitlines()[-1]
    assert "coordinator at 127.0.0.1:1 unreachable" in last and "is it running" in last
    assert "Traceback" not in proc.stderr


def test_coordinator_port_in_use_says_so(tmp_path: Path) -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = subprocess.run(
            [sys.executable, "-m", "dsgd.coordinator", "--model", MLP, "--port", str(port)],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert proc.returncode == 2
    assert f"127.0.0.1:{port}" in proc.stderr and "choose another port" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_restoring_another_models_checkpoint_is_refused(tmp_path: Path) -> None:
    from dsgd import checkpoint

    snap = checkpoint.snapshot(
        shard_id=0,
        shard_range=(0, 4),
        num_shards=1,
        version=3,
        fingerprint=42,
        optimizer="adagrad",
        incarnation=1,
        params=np.zeros(4, np.float32),
        opt_state={},
    )
    checkpoint.write(snap, tmp_path)
    checkpoint.write_manifest(tmp_path, model="other:model", fingerprint=42, versions=[3])
    proc = subprocess.run(
        [sys.executable, "-m", "dsgd.coordinator", "--model", MLP, "--shards", "1"]
        + ["--restore", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    assert "another model" in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
