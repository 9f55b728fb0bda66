"""What every dsgd process does the same way: logging, signals, readiness, one-line errors."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from dsgd.errors import CheckpointError, ConfigError, DsgdError, LayoutMismatch

EXIT_FAILURE = 1
EXIT_USER_ERROR = 2


def add_member_arguments(parser: argparse.ArgumentParser, ready: str) -> None:
    """The flags every cluster member (shard or worker) takes besides its own."""
    parser.add_argument("--coordinator", required=True, help="coordinator HOST:PORT")
    parser.add_argument("--ready-file", help=ready)
    parser.add_argument(
        "--connect-timeout", type=float, default=60.0, help="seconds to wait for the coordinator"
    )
    parser.add_argument("--log-level", default="INFO")


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


def run_process(role: str, main: Callable[[asyncio.Event], Awaitable[int]]) -> int:
    """Run ``main(stop)`` on a fresh event loop; SIGINT/SIGTERM set ``stop``.

    A user or configuration mistake ends the process with one line on stderr and exit
    code 2; a peer that cannot be reached, with one line and exit code 1 (a supervisor
    restarts it); never a traceback.
    """

    async def runner() -> int:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        return await main(stop)

    try:
        return asyncio.run(runner())
    except (ConfigError, LayoutMismatch, CheckpointError) as exc:
        print(f"dsgd {role}: error: {exc}", file=sys.stderr)  # noqa: T201
        return EXIT_USER_ERROR
    except DsgdError as exc:  # a peer lost or misbehaving: worth a restart, not a traceback
        print(f"dsgd {role}: error: {exc}", file=sys.stderr)  # noqa: T201
        return EXIT_FAILURE
    except KeyboardInterrupt:
        return 130
