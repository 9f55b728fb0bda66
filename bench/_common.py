"""What every benchmark shares: where the repository is, peer processes started and
stopped the same way, the plotting setup, and the result writer."""

from __future__ import annotations

import json
import multiprocessing as mp
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]

SPAWN = mp.get_context("spawn")
"""Peer processes start fresh (spawn, never fork): a forked copy of a process with ZeroMQ
or gRPC threads is not safe, and a fresh one measures what a real peer would."""


def stop_process(process: Any, timeout_s: float) -> None:
    """Join a peer process, killing it if it does not end within ``timeout_s``."""
    process.join(timeout=timeout_s)
    if process.is_alive():
        process.kill()
        process.join(timeout=timeout_s)
    process.close()


def pyplot() -> Any:
    """matplotlib's pyplot on the Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def write_json(path: Path, doc: Any, *, strict: bool = True) -> Path:
    """Write a benchmark's results as indented JSON; ``strict``: refuse NaN and Inf, which
    strict JSON readers reject (results that may hold them say so)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=2, allow_nan=not strict) + "\n")
    return path
