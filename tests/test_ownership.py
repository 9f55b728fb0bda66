"""Every task has an owner: a task that fails ends its process (or the run) with its cause,
in one line, instead of dying silently, hanging, or orphaning what it started."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

import dsgd
from dsgd import checkpoint
from dsgd.config import TrainConfig
from dsgd.errors import ModelError, TaskCrashed
from dsgd.examples.digits import digits_mlp
from dsgd.model import CompiledModel
from dsgd.runtime import EXIT_FAILURE, exit_code, root_cause
from dsgd.shard.process import ShardProcess
from tests.conftest import ROOT, serve_coordinator
from tests.models import raising_metrics


def test_a_raising_metrics_function_ends_dsgd_train_with_its_cause() -> None:
    began = time.monotonic()
    with pytest.raises(ModelError, match=r"metrics_that_raise\) raised KeyError: 'top5'"):
        dsgd.train(raising_metrics(), num_workers=1, num_shards=1, max_seconds=300)
    assert time.monotonic() - began < 90


def test_the_time_budget_is_a_deadline_of_its_own(tmp_path: Path) -> None:
    """No member ever comes: the coordinator still ends the run when its budget is spent."""
    status = tmp_path / "status.json"
    proc = subprocess.run(
        [sys.executable, "-m", "dsgd.coordinator", "--max-seconds", "2", "--linger", "1"]
        + ["--status-file", str(status)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    text = status.read_text()
    assert "gave up after 2 s waiting for a worker or the evaluator" in text, text


def test_the_coordinator_and_the_shard_never_import_jax() -> None:
    probe = (
        "import sys, dsgd.coordinator.process, dsgd.shard.process, dsgd.supervisor; "
        "print(sorted(m for m in sys.modules if m == 'jax' or m.startswith('jax.')))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0 and proc.stdout.strip() == "[]", proc.stdout + proc.stderr


async def test_a_crashed_data_plane_ends_the_shard_cleanly(tmp_path: Path) -> None:
    """The shard leaves the way a clean exit does (final checkpoint, leaving heartbeat, gRPC
    stopped) and ends naming the task, instead of heartbeating "alive" with a dead data
    plane."""
    config = TrainConfig(model="dsgd.examples.digits:digits_mlp", num_shards=1)
    compiled = CompiledModel(digits_mlp(), 1)
    async with serve_coordinator(config, compiled) as (coordinator, address):
        process = ShardProcess(address, 0, checkpoint_dir=tmp_path)

        async def broken_serve() -> None:
            await asyncio.sleep(0.5)  # registered and heartbeating by now
            raise RuntimeError("the socket broke")

        process.server.serve = broken_serve  # type: ignore[method-assign]
        with pytest.raises(BaseExceptionGroup) as ended:
            async with asyncio.timeout(30):  # before: it heartbeats forever
                await process.run(asyncio.Event())
        cause = root_cause(ended.value)
        assert isinstance(cause, TaskCrashed)
        assert str(cause) == "the data plane crashed: RuntimeError: the socket broke"
        assert checkpoint.list_checkpoints(tmp_path, 0), "no final checkpoint"
        assert coordinator.member_state(coordinator.shards[0]) == "left"
        async with grpc.aio.insecure_channel(process.control_address) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            with pytest.raises(grpc.aio.AioRpcError):  # its control service is stopped
                await health.Check(health_pb2.HealthCheckRequest(), timeout=2)


def test_a_crashed_task_is_one_line_and_a_restartable_exit_code(
    capsys: pytest.CaptureFixture[str],
) -> None:
    group = ExceptionGroup("tasks", [TaskCrashed("heartbeats crashed: OSError: gone")])
    assert exit_code("shard 3", root_cause(group)) == EXIT_FAILURE
    assert capsys.readouterr().err == "dsgd shard 3: error: heartbeats crashed: OSError: gone\n"


SIGNAL_DURING_SPAWN = textwrap.dedent(
    """
    import os, signal, subprocess, sys
    from pathlib import Path
    from dsgd import supervisor
    from dsgd.config import TrainConfig

    started = []
    real_popen = subprocess.Popen

    def popen_then_signal(*args, **kwargs):
        child = real_popen(*args, **kwargs)
        started.append(child.pid)
        Path(sys.argv[2]).write_text(str(child.pid))
        os.kill(os.getpid(), signal.SIGTERM)  # lands before the supervisor records the child
        return child

    supervisor.subprocess.Popen = popen_then_signal
    sup = supervisor.Supervisor(TrainConfig(), Path(sys.argv[1]))
    sup.run_dir.mkdir(parents=True, exist_ok=True)
    signal.signal(signal.SIGTERM, sup._on_signal)
    try:
        sup.spawn("sleeper", [sys.executable, "-c", "import time; time.sleep(120)"])
    except supervisor.Interrupted:
        sup.stop_all()
        sys.exit(143)
    """
)


def test_a_signal_while_spawning_never_orphans_the_child(tmp_path: Path) -> None:
    pid_file = tmp_path / "child.pid"
    proc = subprocess.run(
        [sys.executable, "-c", SIGNAL_DURING_SPAWN, str(tmp_path / "run"), str(pid_file)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 143, proc.stderr
    assert "ignored SIGTERM" not in proc.stderr  # the child was stopped, not killed
    pid = int(pid_file.read_text())
    try:
        deadline = time.monotonic() + 10
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _alive(pid), "the child outlived its supervisor"
    finally:
        if _alive(pid):
            os.kill(pid, signal.SIGKILL)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie is dead: its parent (the supervisor script) has exited, init reaps it
    with open(f"/proc/{pid}/stat") as stat:
        return stat.read().split()[2] != "Z"


def test_slow_evaluations_and_checkpoints_are_spaced_out_so_they_cannot_starve_training() -> None:
    from dsgd.evaluator import DUTY
    from dsgd.shard.process import CHECKPOINT_DUTY
    from dsgd.stats import paced_interval

    assert paced_interval(1.0, 0.05, DUTY) == 1.0  # a quick model: every --eval-every
    assert paced_interval(1.0, 10.0, DUTY) == pytest.approx(10.0 / DUTY)  # 40 s for a 10 s one
    assert paced_interval(60.0, 10.0, DUTY) == 60.0
    # a 600 MB shard checkpoint that takes 2 s is written every 20 s, not every 5 s
    assert paced_interval(5.0, 2.0, CHECKPOINT_DUTY) == pytest.approx(20.0)
