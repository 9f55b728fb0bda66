"""What every dsgd process does the same way: logging, signals, readiness, owned tasks,
one-line errors and exit codes."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
import threading
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

from dsgd import metrics
from dsgd.control import start_grpc_server
from dsgd.errors import (
    CheckpointError,
    Closed,
    ConfigError,
    DsgdError,
    LayoutMismatch,
    TaskCrashed,
)
from dsgd.security import add_security_arguments

EXIT_FAILURE = 1  # worth a restart: a peer was lost, or a task crashed
EXIT_USER_ERROR = 2  # a mistake a restart cannot fix: the supervisor gives up at once

T = TypeVar("T")
log = logging.getLogger("dsgd")


async def owned(what: str, work: Awaitable[T]) -> T:
    """Await ``work`` as the task doing ``what``: an unexpected exception becomes
    :class:`TaskCrashed` naming the task, so the process ends with a line that says which
    of its tasks died and why. dsgd's own errors and cancellation pass unchanged."""
    try:
        return await work
    except (DsgdError, asyncio.CancelledError):
        raise
    except Exception as exc:
        log.error("%s crashed", what, exc_info=exc)  # the traceback, for the log file
        raise TaskCrashed(f"{what} crashed: {type(exc).__name__}: {exc}") from exc


def root_cause(exc: BaseException) -> BaseException:
    """The first leaf of an exception group (a task group's failure), else ``exc``."""
    while isinstance(exc, BaseExceptionGroup):
        exc = exc.exceptions[0]
    return exc


def add_member_arguments(parser: argparse.ArgumentParser, ready: str) -> None:
    """The flags every cluster member (shard or worker) takes besides its own."""
    parser.add_argument("--coordinator", required=True, help="coordinator HOST:PORT")
    parser.add_argument("--ready-file", help=ready)
    parser.add_argument(
        "--connect-timeout", type=float, default=60.0, help="seconds to wait for the coordinator"
    )
    parser.add_argument("--log-level", default="INFO")
    add_operator_arguments(parser)
    add_security_arguments(parser)


def add_operator_arguments(parser: argparse.ArgumentParser) -> None:
    """What operators scrape and probe: ``--metrics-port`` and ``--health-port`` (every
    process); ``--metrics-host`` is the address both listen on.

    The health port serves ``grpc.health.v1`` alone, in the clear and without the token:
    for the workers and the evaluator, which serve no gRPC of their own, and for probes
    that cannot speak a secured cluster's mutual TLS (Kubernetes' gRPC probes)."""
    parser.add_argument(
        "--metrics-port", type=int, help="serve Prometheus metrics on this port (default: off)"
    )
    parser.add_argument(
        "--metrics-host",
        default="127.0.0.1",
        help="address the metrics (and --health-port) listen on; 0.0.0.0 for scrapers elsewhere",
    )
    parser.add_argument(
        "--health-port",
        type=int,
        help="serve grpc.health.v1 alone on this port, in the clear, for liveness and "
        "readiness probes",
    )


def setup_logging(role: str, level: str = "INFO") -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format=f"%(asctime)s {role} %(levelname)s %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )
    # JAX and absl are chatty at INFO about platform selection
    for noisy in ("jax", "absl", "jax._src.xla_bridge"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def write_ready_file(path: str | None, info: dict[str, Any]) -> None:
    """Report readiness (bound addresses) atomically, so a launcher never reads half a file."""
    if not path:
        return
    target = Path(path)
    tmp = target.with_name(target.name + ".tmp")
    tmp.write_text(json.dumps({"pid": os.getpid(), **info}))
    tmp.replace(target)


STOP_GRACE = 1.2  # seconds after SIGINT/SIGTERM before the main task is cancelled
STOP_DEADLINE = 1.9  # ... and before the process exits regardless (a thread may be busy)


def run_process(
    role: str,
    main: Callable[[asyncio.Event], Awaitable[int]],
    ops: argparse.Namespace | None = None,
) -> int:
    """Run ``main(stop)`` on a fresh event loop; SIGINT/SIGTERM set ``stop``.

    ``ops`` holds the flags of :func:`add_operator_arguments`: with ``--metrics-port`` the
    process serves its Prometheus metrics (:mod:`dsgd.metrics`) while it runs, with
    ``--health-port`` the ``grpc.health.v1`` service.

    A process asked to stop ends within 2 s whatever it is doing: ``main`` gets
    ``STOP_GRACE`` seconds to leave cleanly, is then cancelled (its cleanup still runs),
    and at ``STOP_DEADLINE`` the process exits even if a thread is still busy (a long
    compile, say), saying so. Stopping is a clean exit (code 0).

    A user or configuration mistake ends the process with one line on stderr and exit
    code 2; a peer that cannot be reached or a crashed task, with one line and exit code
    1 (a supervisor restarts it). A crash's traceback goes to the log, never a user's.
    """
    stopping, finished = threading.Event(), threading.Event()  # set by a signal; at the end

    async def runner() -> int:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        assert task is not None

        def on_signal(signum: int, frame: Any = None) -> None:
            # a plain handler, not the loop's: it runs between any two bytecodes of the main
            # thread, so the deadline starts even while the loop is busy in a long step; and
            # it acts even when ``stop`` is already set (the run ended, the member is leaving)
            if stopping.is_set():
                return
            stopping.set()
            threading.Thread(target=_exit_at_deadline, args=(role, finished), daemon=True).start()
            with contextlib.suppress(RuntimeError):  # the loop already closed: we are ending
                loop.call_soon_threadsafe(_begin_stopping, loop, stop, task, signum)

        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, on_signal)
        host = getattr(ops, "metrics_host", "127.0.0.1")
        metrics_port = getattr(ops, "metrics_port", None)
        health_port = getattr(ops, "health_port", None)
        exporter = health = None
        try:
            if metrics_port is not None:
                exporter = metrics.serve(host, metrics_port, member=role != "coordinator")
            if health_port is not None:
                health, _ = await start_grpc_server(
                    host, health_port, lambda server: None, "health service"
                )
            return await main(stop)
        except Exception as exc:
            if stop.is_set() and isinstance(root_cause(exc), Closed):
                return 0  # the run ended (or a signal came) while a call was waiting
            raise
        finally:
            if health is not None:
                await health.stop(None)
            if exporter is not None:
                exporter.shutdown()

    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        return asyncio.run(runner())
    except BaseException as exc:  # every way out gets its exit code here
        cause = root_cause(exc)
        if stopping.is_set() and isinstance(cause, Closed | asyncio.CancelledError):
            log.info("%s stopped (%s)", role, cause or "cancelled")
            return 0
        return exit_code(role, cause)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        finished.set()


def _begin_stopping(
    loop: asyncio.AbstractEventLoop, stop: asyncio.Event, task: asyncio.Task[Any], signum: int
) -> None:
    log.info("%s received; stopping", signal.Signals(signum).name)
    stop.set()
    loop.call_later(STOP_GRACE, _cancel_if_running, task)


def _cancel_if_running(task: asyncio.Task[Any]) -> None:
    if not task.done():
        log.warning("still stopping after %.1f s; cancelling what is left", STOP_GRACE)
        task.cancel()


def _exit_at_deadline(role: str, finished: threading.Event) -> None:
    if finished.wait(STOP_DEADLINE):
        return
    # os.write, not logging: the stuck main thread may hold a handler's lock
    line = f"dsgd {role}: still busy {STOP_DEADLINE} s after the stop signal; exiting now\n"
    os.write(2, line.encode())
    os._exit(0)


def exit_code(role: str, exc: BaseException) -> int:
    """Say in one line why ``role`` ends on ``exc``; return the exit code that says it."""
    if isinstance(exc, KeyboardInterrupt):
        return 130
    if isinstance(exc, SystemExit):
        return int(exc.code or 0)
    if not isinstance(exc, Exception):
        raise exc
    if isinstance(exc, DsgdError):
        message = str(exc)
    else:  # a bug: the traceback goes to the log, the console gets the cause
        log.error("%s failed", role, exc_info=exc)
        message = f"crashed: {type(exc).__name__}: {exc}"
    print(f"dsgd {role}: error: {message}", file=sys.stderr)  # noqa: T201
    if isinstance(exc, ConfigError | LayoutMismatch | CheckpointError):
        return EXIT_USER_ERROR
    return EXIT_FAILURE
