"""The launcher behind ``scripts/start_cluster.sh``: one process that runs a local cluster.

It starts the coordinator, then the shards, then the workers, each as its own
process on 127.0.0.1 with its own log file; prints live progress; and, when the
run ends, prints a one-line JSON summary as the last line of stdout. Ctrl-C or
SIGTERM stops every process cleanly; a process that fails stops the run with the
reason and the tail of its log.

Exit codes: 0 target reached, 1 a process failed, 2 a usage error,
3 the budget was spent before the target, 130/143 interrupted.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import grpc
from google.protobuf import json_format

from dsgd.config import TrainConfig
from dsgd.errors import ConfigError, DsgdError
from dsgd.proto import control_pb2 as pb
from dsgd.proto import control_pb2_grpc as pb_grpc
from dsgd.report import progress_line, summarize

START_TIMEOUT = 120.0  # seconds for a process to report ready (JAX import + compile included)
STOP_TIMEOUT = 10.0  # seconds between SIGTERM and SIGKILL
MEMBER_EXIT_TIMEOUT = 20.0  # seconds members get to leave once the run is over
POLL_INTERVAL = 0.25
PROGRESS_INTERVAL = 2.0


@dataclass
class Child:
    name: str
    argv: list[str]
    log_path: Path
    process: subprocess.Popen[bytes] | None = None
    log_file: IO[bytes] | None = field(default=None, repr=False)

    def start(self) -> None:
        self.log_file = open(self.log_path, "ab")  # noqa: SIM115 - closed in close()
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.process = subprocess.Popen(
            self.argv,
            stdout=self.log_file,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            start_new_session=True,  # the supervisor, not the terminal, decides when it stops
        )

    def poll(self) -> int | None:
        return None if self.process is None else self.process.poll()

    def terminate(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()

    def close(self) -> None:
        if self.process is not None:
            self.process.wait()
        if self.log_file is not None:
            self.log_file.close()
            self.log_file = None

    def log_tail(self, lines: int = 15) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join("    " + line for line in text.splitlines()[-lines:])


class Interrupted(Exception):
    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class Supervisor:
    """Runs one local cluster to completion."""

    def __init__(self, config: TrainConfig, run_dir: Path, *, out: Path | None = None) -> None:
        self.config = config
        self.run_dir = run_dir
        self.out = out
        self.children: list[Child] = []
        self.started = time.monotonic()
        self.coordinator_address = ""
        self._channel: grpc.Channel | None = None
        self._stub: pb_grpc.CoordinatorStub | None = None

    def say(self, message: str) -> None:
        print(message, file=sys.stderr, flush=True)  # noqa: T201

    # -- running -----------------------------------------------------------------------------

    def run(self) -> int:
        previous = {
            sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGINT, signal.SIGTERM)
        }
        try:
            return self._run()
        except Interrupted as exc:
            self.say(f"dsgd: {exc} received; stopping the cluster")
            self.stop_all()
            return 128 + exc.signum
        except ChildFailed as exc:
            self.say(f"dsgd: error: {exc}")
            self.stop_all()
            return 1
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            if self._channel is not None:
                self._channel.close()

    def _on_signal(self, signum: int, frame: Any) -> None:
        raise Interrupted(signum)

    def _run(self) -> int:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        config_path = self.run_dir / "config.json"
        config_path.write_text(self.config.to_json())
        self.say(
            f"dsgd: {self.config.num_workers} worker(s), {self.config.num_shards} shard(s), "
            f"model {self.config.model}; logs in {self.run_dir}/"
        )
        python = sys.executable
        ready = self.run_dir / "coordinator.ready"
        ready.unlink(missing_ok=True)
        coordinator = self.spawn(
            "coordinator",
            [
                python,
                "-m",
                "dsgd.coordinator",
                "--config-file",
                str(config_path),
                "--ready-file",
                str(ready),
                "--status-file",
                str(self.run_dir / "status.json"),
                "--final-params",
                str(self.run_dir / "final_params.npy"),
            ],
        )
        info = self.wait_ready(coordinator, ready)
        self.coordinator_address = info["address"]
        self._channel = grpc.insecure_channel(self.coordinator_address)
        self._stub = pb_grpc.CoordinatorStub(self._channel)
        for k in range(self.config.num_shards):
            self.spawn(
                f"shard{k}",
                [
                    python,
                    "-m",
                    "dsgd.server",
                    "--coordinator",
                    self.coordinator_address,
                    "--shard-id",
                    str(k),
                ],
            )
        for k in range(self.config.num_workers):
            self.spawn(
                f"worker{k}",
                [
                    python,
                    "-m",
                    "dsgd.worker",
                    "--coordinator",
                    self.coordinator_address,
                    "--worker-id",
                    str(k),
                ],
            )
        status = self.watch()
        return self.finish(status)

    def spawn(self, name: str, argv: list[str]) -> Child:
        child = Child(name, argv, self.run_dir / f"{name}.log")
        child.start()
        self.children.append(child)
        return child

    def wait_ready(self, child: Child, ready: Path) -> dict[str, Any]:
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if ready.exists():
                return dict(json.loads(ready.read_text()))
            self.check_children()
            time.sleep(0.05)
        raise ChildFailed(f"{child.name} did not start within {START_TIMEOUT:.0f} s", child)

    def check_children(self, allow_exit: bool = False) -> None:
        for child in self.children:
            code = child.poll()
            if code is not None and (code != 0 or not allow_exit):
                raise ChildFailed(f"{child.name} exited with code {code}", child)

    def query(self) -> pb.ClusterStatus | None:
        assert self._stub is not None
        try:
            return self._stub.Status(pb.StatusRequest(), timeout=2.0)
        except grpc.RpcError:
            return None

    def watch(self) -> pb.ClusterStatus | None:
        """Print progress until the run is over and every member has left."""
        last_progress = 0.0
        done_at: float | None = None
        status: pb.ClusterStatus | None = None
        while True:
            members_exited = all(c.poll() == 0 for c in self.children[1:])
            self.check_children(allow_exit=done_at is not None)
            status = self.query() or status
            now = time.monotonic()
            if status is not None and now - last_progress >= PROGRESS_INTERVAL:
                self.say(progress_line(status))
                last_progress = now
            if status is not None and status.done and done_at is None:
                done_at = now
                self.say(f"dsgd: {status.done_reason}; waiting for members to leave")
            if done_at is not None and (members_exited or now - done_at > MEMBER_EXIT_TIMEOUT):
                return self.query() or status
            time.sleep(POLL_INTERVAL)

    def finish(self, status: pb.ClusterStatus | None) -> int:
        assert self._stub is not None
        try:
            self._stub.Shutdown(pb.ShutdownRequest(reason="run complete"), timeout=5.0)
        except grpc.RpcError:
            pass
        self.stop_all()
        status_file = self.run_dir / "status.json"
        if status_file.exists():
            status = json_format.Parse(status_file.read_text(), pb.ClusterStatus())
        if status is None:
            raise ChildFailed("the coordinator reported no final status", self.children[0])
        summary = summarize(status, time.monotonic() - self.started)
        summary["run_dir"] = str(self.run_dir)
        line = json.dumps(summary)
        if self.out is not None:
            self.out.write_text(line + "\n")
        print(line, flush=True)  # noqa: T201 - the summary is the program's output
        if status.reached_target or self.config.target_accuracy <= 0:
            return 0
        self.say(f"dsgd: target accuracy not reached ({status.done_reason})")
        return 3

    def stop_all(self) -> None:
        """SIGTERM every child still running (workers first), then SIGKILL stragglers."""
        for child in reversed(self.children):
            child.terminate()
        deadline = time.monotonic() + STOP_TIMEOUT
        for child in self.children:
            while child.poll() is None and time.monotonic() < deadline:
                time.sleep(0.02)
            if child.poll() is None:
                self.say(f"dsgd: {child.name} ignored SIGTERM for {STOP_TIMEOUT:.0f} s; killing it")
                child.kill()
            child.close()


class ChildFailed(DsgdError):
    def __init__(self, message: str, child: Child) -> None:
        tail = child.log_tail()
        super().__init__(
            f"{message}; see {child.log_path}" + (f"\n  last lines:\n{tail}" if tail else "")
        )


def default_run_dir() -> Path:
    return Path("runs") / time.strftime("%Y%m%d-%H%M%S")


def start(config: TrainConfig, run_dir: Path | None = None, out: Path | None = None) -> int:
    if out is not None and not out.parent.exists():
        raise ConfigError(f"--out {out}: directory {out.parent} does not exist")
    return Supervisor(config, run_dir or default_run_dir(), out=out).run()
