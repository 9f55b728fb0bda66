"""The launcher behind ``scripts/start_cluster.sh``: one process that runs a local cluster.

It starts the coordinator, then the shards, the evaluator and the workers, each as its
own process on 127.0.0.1 with its own log file; prints live progress; restarts any
process that crashes (with backoff: a restarted shard resumes from its latest
checkpoint, a restarted worker takes its old data partition, a restarted
coordinator comes back on the same port and members re-register); and, when the run
ends, prints a one-line JSON summary as the last line of stdout. Ctrl-C or SIGTERM
stops every process cleanly.

Exit codes: 0 target reached, 1 a process failed for good, 2 a usage error,
3 the budget was spent before the target, 130/143 interrupted.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import grpc
from google.protobuf import json_format

from dsgd.config import FINAL_EVALUATION_SECONDS, TrainConfig, parse_target
from dsgd.control import blocking_channel
from dsgd.errors import ConfigError, DsgdError
from dsgd.members import Member, MemberRole, cluster_members
from dsgd.proto import control_pb2 as pb
from dsgd.proto import control_pb2_grpc as pb_grpc
from dsgd.report import progress_line, summarize
from dsgd.runtime import EXIT_USER_ERROR
from dsgd.security import Security

START_TIMEOUT = 120.0  # seconds for the coordinator to report ready (JAX import + compile)
STOP_TIMEOUT = 4.0  # seconds between SIGTERM and SIGKILL (members stop within 2 s)
MEMBER_EXIT_TIMEOUT = 8.0  # seconds members get to leave once the run is over
# ... and the evaluator, which evaluates the final parameters on the whole split first
EVALUATOR_EXIT_TIMEOUT = MEMBER_EXIT_TIMEOUT + FINAL_EVALUATION_SECONDS
BUDGET_MARGIN = 4.0  # seconds past --max-seconds before the supervisor ends a run itself
POLL_INTERVAL = 0.1
PROGRESS_INTERVAL = 2.0
BACKOFF_FIRST = 0.2  # seconds before the first restart; doubles per quick crash
BACKOFF_MAX = 10.0
STABLE_AFTER = 30.0  # a process up this long is healthy again: backoff starts over


PROGRESS = {
    "coordinator": "serving",
    "shard": "registering",
    "evaluator": "reporting an evaluation",
    "worker": "having a push applied",
}  # what a member's ready file says it has done: a restart that gets there made progress


@dataclass
class Child:
    """One supervised process and its restart bookkeeping.

    ``ready_path`` is the member's ``--ready-file``: written once it makes progress
    (see PROGRESS), removed before every start, so an exit without it is a crash that
    got nowhere; ``crash_loop`` counts those in a row."""

    name: str
    argv: list[str]
    log_path: Path
    ready_path: Path
    process: subprocess.Popen[bytes] | None = None
    restarts: int = 0
    crash_loop: int = 0
    started_at: float = 0.0
    backoff: float = BACKOFF_FIRST
    restart_at: float | None = None  # when a crashed process is due to be started again
    log_file: IO[bytes] | None = field(default=None, repr=False)

    @property
    def role(self) -> str:
        return self.name.rstrip("0123456789").split("-")[0].rstrip("0123456789")

    def start(self) -> None:
        self.ready_path.unlink(missing_ok=True)
        if self.log_file is None:
            self.log_file = open(self.log_path, "ab")  # noqa: SIM115 - closed in close()
        env = member_environment(os.environ)
        self.process = subprocess.Popen(
            self.argv,
            stdout=self.log_file,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            start_new_session=True,  # the supervisor, not the terminal, decides when it stops
        )
        self.started_at = time.monotonic()
        self.restart_at = None

    def poll(self) -> int | None:
        return None if self.process is None else self.process.poll()

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def terminate(self) -> None:
        if self.running:
            assert self.process is not None
            self.process.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        if self.running:
            assert self.process is not None
            self.process.kill()

    def close(self) -> None:
        if self.process is not None:
            self.process.wait()
        if self.log_file is not None:
            self.log_file.close()
            self.log_file = None

    def log_lines(self, lines: int = 15) -> list[str]:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return []
        return text.splitlines()[-lines:]

    def error_line(self) -> str:
        """The one-line error the process printed last (``dsgd ROLE: error: ...``), if any."""
        for line in reversed(self.log_lines(50)):
            if line.startswith("dsgd ") and ": error: " in line:
                return line.split(": error: ", 1)[1]
        return ""


class Interrupted(Exception):
    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class ChildFailed(DsgdError):
    """A member failed for good: the message quotes its own error and its last log lines.
    ``usage``: it stopped on the user's mistake (exit code 2 for the whole run)."""

    def __init__(self, message: str, child: Child, *, usage: bool = False) -> None:
        self.usage = usage
        cause = child.error_line()
        tail = "\n".join("    " + line for line in child.log_lines())
        super().__init__(
            message
            + (f": {cause}" if cause else "")
            + f"; see {child.log_path}"
            + (f"\n  last lines:\n{tail}" if tail else "")
        )


class Supervisor:
    """Runs one local cluster to completion."""

    def __init__(
        self,
        config: TrainConfig,
        run_dir: Path,
        *,
        out: Path | None = None,
        checkpoint_dir: Path | None = None,
        restore: Path | None = None,
        max_restarts: int = 20,
        crash_loop_limit: int = 3,
        secure: Path | None = None,
    ) -> None:
        self.config = config
        self.security = None if secure is None else Security.load(secure)  # checked up front
        self.run_dir = run_dir
        self.out = out
        self.checkpoint_dir = checkpoint_dir or run_dir / "checkpoints"
        self.restore = restore
        self.max_restarts = max_restarts
        self.crash_loop_limit = crash_loop_limit
        self.children: list[Child] = []
        self.started = time.monotonic()
        self.coordinator_address = ""
        self._channel: grpc.Channel | None = None
        self._stub: pb_grpc.CoordinatorStub | None = None
        self._holding_signals = False
        self._evaluator_left_at: float | None = None  # seconds after the end of the run
        self._overdue = ""  # why the supervisor ended a run the coordinator did not end
        self._held_signal: int | None = None

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
            return EXIT_USER_ERROR if exc.usage else 1
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            if self._channel is not None:
                self._channel.close()

    def _on_signal(self, signum: int, frame: Any) -> None:
        if self._holding_signals:
            self._held_signal = signum
            return
        raise Interrupted(signum)

    @contextlib.contextmanager
    def signals_held(self) -> Iterator[None]:
        """Act on SIGINT/SIGTERM only once the block is done, so a process started inside it
        is always recorded before a stop can interrupt: its child runs in a session of its
        own, and a child the supervisor does not know about would outlive it. (Deferred
        here rather than masked: a child inherits a blocked mask and would ignore SIGTERM.)
        """
        self._holding_signals = True
        try:
            yield
        finally:
            self._holding_signals = False
            held, self._held_signal = self._held_signal, None
            if held is not None:
                raise Interrupted(held)

    def _run(self) -> int:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.checkpoint_dir.mkdir(parents=True, exist_ok=True)
        config_path = self.run_dir / "config.json"
        config_path.write_text(self.config.to_json())
        self.say(
            f"dsgd: {self.config.num_workers} worker(s), {self.config.num_shards} shard(s), "
            f"model {self.config.model}; logs in {self.run_dir}/"
        )
        python = [sys.executable, "-m"]
        if self.security is not None:
            keys = self.security.directory
            self.say(f"dsgd: both planes authenticated and encrypted with the keys in {keys}")
        ready = self.run_dir / "coordinator.ready"
        ready.unlink(missing_ok=True)
        coordinator_argv = [
            *python,
            "dsgd.coordinator",
            "--config-file",
            str(config_path),
            "--ready-file",
            str(ready),
            "--status-file",
            str(self.run_dir / "status.json"),
            "--final-params",
            str(self.run_dir / "final_params.npy"),
        ]
        if self.restore is not None:
            coordinator_argv += ["--restore", str(self.restore)]
        began = time.time()
        coordinator = self.spawn("coordinator", coordinator_argv, ready)
        self.coordinator_address = self.wait_ready(coordinator)["address"]
        # a restarted coordinator must come back where the members look for it, and go
        # on with the run's clock and time budget
        coordinator.argv += ["--port", self.coordinator_address.rsplit(":", 1)[1]]
        coordinator.argv += ["--run-started", repr(began)]
        self._channel = blocking_channel(self.coordinator_address, self.security)
        self._stub = pb_grpc.CoordinatorStub(self._channel)
        for member in cluster_members(self.config):
            self.spawn(member.name, self.member_argv(member))
        status = self.watch()
        return self.finish(status)

    def member_argv(self, member: Member) -> list[str]:
        """The command line that starts ``member`` (:meth:`spawn` adds its ready file and
        the keys)."""
        argv = [sys.executable, "-m", f"dsgd.{member.role.value}"]
        argv += ["--coordinator", self.coordinator_address]
        if member.role is MemberRole.SHARD:
            argv += ["--shard-id", str(member.shard_id), "--replica", str(member.replica)]
            argv += ["--checkpoint-dir", str(member.checkpoint_dir(self.checkpoint_dir))]
        elif member.role is MemberRole.WORKER:
            argv += ["--worker-id", str(member.worker_id)]
        return argv

    def spawn(self, name: str, argv: list[str], ready: Path | None = None) -> Child:
        """Start ``argv`` as member ``name``; members other than the coordinator get a
        ``--ready-file`` (their sign of progress)."""
        if ready is None:
            ready = self.run_dir / f"{name}.ready"
            argv = [*argv, "--ready-file", str(ready)]
        if self.security is not None:
            argv = [*argv, "--secure", str(self.security.directory)]
        child = Child(name, argv, self.run_dir / f"{name}.log", ready)
        with self.signals_held():
            child.start()
            self.children.append(child)
        self.write_pids()
        return child

    def write_pids(self) -> None:
        """``pids.json``: the current process of every member (for operators and fault tests)."""
        pids = {c.name: c.process.pid for c in self.children if c.process is not None}
        tmp = self.run_dir / "pids.json.tmp"
        tmp.write_text(json.dumps(pids))
        tmp.replace(self.run_dir / "pids.json")

    def wait_ready(self, child: Child) -> dict[str, Any]:
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if child.ready_path.exists():
                return dict(json.loads(child.ready_path.read_text()))
            code = child.poll()
            if code is not None:
                raise ChildFailed(f"{child.name} exited with code {code}", child)
            time.sleep(0.05)
        raise ChildFailed(f"{child.name} did not start within {START_TIMEOUT:.0f} s", child)

    def tend(self, run_over: bool) -> None:
        """Restart crashed children (with backoff). Fatal: a usage error, too many crashes,
        or a crash loop (``crash_loop_limit`` exits in a row without progress)."""
        now = time.monotonic()
        for child in self.children:
            if child.restart_at is not None and run_over and child.name != "coordinator":
                child.restart_at = None  # the run ended while it waited: nothing to restart for
            if child.restart_at is not None:
                if now >= child.restart_at:
                    with self.signals_held():
                        child.start()
                    self.write_pids()
                continue
            code = child.poll()
            if child.name == "coordinator" and code == 0:
                continue  # it exits 0 only once the run is over (watch() sees that)
            if code is None or (run_over and child.name != "coordinator"):
                continue  # still running; or the run is over: nothing to restart it for
            if code == EXIT_USER_ERROR:
                raise ChildFailed(f"{child.name} stopped on a usage error", child, usage=True)
            if code == 0 and child.name != "coordinator":
                continue  # a member that left on its own (the run is ending)
            progressed = child.ready_path.exists()
            child.crash_loop = 0 if progressed else child.crash_loop + 1
            if child.crash_loop >= self.crash_loop_limit:
                raise ChildFailed(
                    f"{child.name} exited with code {code} {child.crash_loop} times in a row "
                    f"without {PROGRESS[child.role]}; it would fail the same way again",
                    child,
                )
            if child.restarts >= self.max_restarts:
                raise ChildFailed(
                    f"{child.name} crashed {child.restarts + 1} times (last exit code {code})",
                    child,
                )
            if now - child.started_at > STABLE_AFTER:
                child.backoff = BACKOFF_FIRST
            child.restarts += 1
            child.restart_at = now + child.backoff
            self.say(
                f"dsgd: {child.name} exited with code {code}; restarting in "
                f"{child.backoff:.1f} s (restart {child.restarts})"
            )
            child.backoff = min(child.backoff * 2, BACKOFF_MAX)

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
        overdue = self.started + self.config.max_seconds + BUDGET_MARGIN
        while True:
            self.tend(run_over=done_at is not None)
            status = self.query() or status
            now = time.monotonic()
            if self.children[0].poll() == 0:
                return status  # the coordinator is done (finish() reads its status.json)
            if done_at is None and now > overdue:
                self._overdue = (
                    f"time budget of {self.config.max_seconds:.0f} s spent and the "
                    f"coordinator had not ended the run {BUDGET_MARGIN:.0f} s later; "
                    "the supervisor stopped it"
                    + (f" (it was waiting for {status.waiting_for})" if status else "")
                )
                self.say(f"dsgd: {self._overdue}; stopping every member")
                return status
            if status is not None and now - last_progress >= PROGRESS_INTERVAL:
                self.say(progress_line(status))
                last_progress = now
            if status is not None and status.done and done_at is None:
                done_at = now
                self.say(f"dsgd: {status.done_reason}; waiting for members to leave")
            if done_at is not None and self._members_gone(now - done_at):
                return self.query() or status
            time.sleep(POLL_INTERVAL)

    def _members_gone(self, since_done: float) -> bool:
        """Whether to stop waiting for members to leave, ``since_done`` seconds after the
        end of the run: once all have exited, or the time each may take is up (the
        evaluator's final evaluation, then MEMBER_EXIT_TIMEOUT for the rest to follow)."""
        running = [c for c in self.children[1:] if c.poll() is None]
        if not running or since_done > EVALUATOR_EXIT_TIMEOUT + MEMBER_EXIT_TIMEOUT:
            return True
        if any(c.role == "evaluator" for c in running):
            return since_done > EVALUATOR_EXIT_TIMEOUT
        if self._evaluator_left_at is None:
            self._evaluator_left_at = since_done
        return since_done > max(MEMBER_EXIT_TIMEOUT, self._evaluator_left_at + MEMBER_EXIT_TIMEOUT)

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
        if self._overdue:
            summary["done_reason"] = self._overdue
        summary["restarts"] = {c.name: c.restarts for c in self.children if c.restarts}
        summary["run_dir"] = str(self.run_dir)
        line = json.dumps(summary)
        if self.out is not None:
            self.out.write_text(line + "\n")
        print(line, flush=True)  # noqa: T201 - the summary is the program's output
        if status.failed:
            self.say(f"dsgd: error: {status.done_reason}")
            return EXIT_USER_ERROR if status.usage_error else 1
        if self._overdue:
            return 3
        if status.reached_target or parse_target(self.config.target) is None:
            return 0
        self.say(f"dsgd: target {self.config.target} not reached ({status.done_reason})")
        return 3

    def stop_all(self) -> None:
        """SIGTERM every child still running (workers first), then SIGKILL stragglers."""
        self._holding_signals = True  # a second Ctrl-C must not cut this short
        for child in reversed(self.children):
            child.restart_at = None
            child.terminate()
        deadline = time.monotonic() + STOP_TIMEOUT
        for child in self.children:
            while child.running and time.monotonic() < deadline:
                time.sleep(0.02)
            if child.running:
                self.say(f"dsgd: {child.name} ignored SIGTERM for {STOP_TIMEOUT:.0f} s; killing it")
                child.kill()
            child.close()


# malloc backs each large buffer (XLA's temporaries, fresh arrays) with a new mmap: at
# 75M parameters, the page faults of its first touch cost about 0.3 s per step (a third
# of it). Transparent huge pages for those mappings fault 512 times less often.
MALLOC_TUNABLES = "glibc.malloc.hugetlb=1"


def member_environment(base: Mapping[str, str]) -> dict[str, str]:
    """The environment a member process starts with: unbuffered output, and malloc on
    transparent huge pages unless the user set glibc's tunables themselves."""
    env = dict(base, PYTHONUNBUFFERED="1")
    env.setdefault("GLIBC_TUNABLES", MALLOC_TUNABLES)
    return env


def default_run_dir() -> Path:
    return Path("runs") / time.strftime("%Y%m%d-%H%M%S")


def start(
    config: TrainConfig,
    run_dir: Path | None = None,
    out: Path | None = None,
    checkpoint_dir: Path | None = None,
    restore: Path | None = None,
    crash_loop_limit: int = 3,
    secure: Path | None = None,
) -> int:
    if crash_loop_limit < 1:
        raise ConfigError(f"--crash-loop-limit must be >= 1, got {crash_loop_limit}")
    if out is not None and not out.parent.exists():
        raise ConfigError(f"--out {out}: directory {out.parent} does not exist")
    if restore is not None and not (restore / "manifest.json").exists():
        raise ConfigError(
            f"--restore {restore}: no manifest.json there; "
            "point it at a directory written by `dsgd checkpoint save`"
        )
    return Supervisor(
        config,
        run_dir or default_run_dir(),
        out=out,
        checkpoint_dir=checkpoint_dir,
        restore=restore,
        crash_loop_limit=crash_loop_limit,
        secure=secure,
    ).run()
