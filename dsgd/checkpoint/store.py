"""Checkpoints of one shard in a directory: atomic writes, retention, and restore.

The shard snapshots its state on the event loop (:func:`~dsgd.checkpoint.snapshot`, a
memcpy; the loop is single-threaded, so the copy is consistent) and writes it in a
thread (:func:`write` or :func:`save_async`). A write goes to a hidden temporary file in
the same directory, is fsynced, renamed over the final name and the directory fsynced,
so a crash leaves either the old set of files or the new one, never a half file under a
real name. Restore (:func:`latest_valid`) takes the newest file that verifies.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path

from dsgd.checkpoint.cluster import MANIFEST_NAME
from dsgd.checkpoint.fileformat import (
    NAME_RE,
    TEMP_RE,
    Checkpoint,
    PathLike,
    checkpoint_name,
    decode,
    fingerprint_error,
    read_header,
    write_file,
)
from dsgd.errors import CheckpointError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WriteResult:
    """What :func:`write` did: the file it wrote and the older files it deleted."""

    path: Path
    version: int
    sha256: str
    nbytes: int
    deleted: tuple[Path, ...] = ()


@dataclass(frozen=True)
class ScanResult:
    """The newest valid checkpoint of a shard (or None) and why each newer file was skipped."""

    checkpoint: Checkpoint | None
    rejected: tuple[tuple[Path, str], ...] = ()


_locks: dict[tuple[str, int], threading.Lock] = {}
_locks_guard = threading.Lock()


def _shard_lock(directory: Path, shard_id: int) -> threading.Lock:
    """Serialize writes of one shard into one directory, so pruning never races a write."""
    with _locks_guard:
        return _locks.setdefault((os.path.realpath(directory), shard_id), threading.Lock())


def write(checkpoint: Checkpoint, directory: PathLike, keep: int = 3) -> WriteResult:
    """Write ``checkpoint`` atomically into ``directory`` and keep the ``keep`` newest.

    Blocking (disk I/O and hashing): call it from a thread, e.g. via :func:`save_async`.
    After the new file is durable, this shard's files beyond the newest ``keep`` are
    deleted, except those a ``manifest.json`` in the directory names. So are files with a
    higher version written by another incarnation (or unreadable): versions only grow
    within one incarnation, so such a file belongs to a run this shard abandoned (it
    restored from an older checkpoint because that one was corrupt, or was told to start
    over) and would otherwise win the next restore. Temporary files left by a crashed
    write of this shard are removed as well. Writes of one shard to one directory are
    serialized; the caller should still await each before starting the next.
    """
    if keep < 1:
        raise ValueError(f"keep must be >= 1, got {keep}")
    folder = Path(directory)
    final = folder / checkpoint_name(checkpoint.shard_id, checkpoint.version)
    with _shard_lock(folder, checkpoint.shard_id):
        try:
            folder.mkdir(parents=True, exist_ok=True)
            sha256 = write_file(checkpoint, final)
            nbytes = final.stat().st_size
        except OSError as exc:
            raise CheckpointError(f"cannot write checkpoint {final}: {exc}") from exc
        deleted = _prune(folder, checkpoint, keep)
    log.debug("wrote %s (%d bytes), deleted %d old checkpoint(s)", final, nbytes, len(deleted))
    return WriteResult(final, checkpoint.version, sha256, nbytes, tuple(deleted))


async def save_async(checkpoint: Checkpoint, directory: PathLike, keep: int = 3) -> WriteResult:
    """:func:`write` in a worker thread, so the event loop never waits on the disk.

    If the awaiting task is cancelled the write still completes (or fails) atomically in
    its thread; only the result is lost.
    """
    return await asyncio.to_thread(write, checkpoint, directory, keep)


def _prune(folder: Path, written: Checkpoint, keep: int) -> list[Path]:
    """Delete what :func:`write` promises to delete; failures are logged, not raised."""
    shard_id = written.shard_id
    doomed: list[Path] = []
    kept = 0
    try:
        protected = _manifest_files(folder)
        for v, path in list_checkpoints(folder, shard_id):
            if path.name in protected:
                continue
            if v > written.version and _incarnation(path) != written.incarnation:
                log.warning("deleting %s: a newer version from an abandoned run", path)
                doomed.append(path)
            elif kept < keep:
                kept += 1
            else:
                doomed.append(path)
        for entry in os.scandir(folder):
            match = TEMP_RE.fullmatch(entry.name)
            if match and match.group(2) is not None and int(match.group(2)) == shard_id:
                doomed.append(Path(entry.path))
    except OSError as exc:
        log.warning("could not list %s to delete old checkpoints: %s", folder, exc)
    deleted = []
    for path in doomed:
        try:
            path.unlink()
            deleted.append(path)
        except FileNotFoundError:
            pass
        except OSError as exc:
            log.warning("could not delete old checkpoint %s: %s", path, exc)
    return deleted


def _incarnation(path: Path) -> int | None:
    """The incarnation that wrote ``path`` (None if its header is unreadable)."""
    try:
        return int(read_header(path)["incarnation"])
    except (CheckpointError, KeyError, ValueError):
        return None


def _manifest_files(folder: Path) -> set[str]:
    """Files a cluster manifest in ``folder`` refers to: pruning must not break it."""
    try:
        body = json.loads((folder / MANIFEST_NAME).read_text())
        return {str(shard["file"]) for shard in body["shards"]}
    except FileNotFoundError:
        return set()
    except (OSError, ValueError, KeyError, TypeError) as exc:
        log.warning("unreadable %s (%s); pruning as if it were absent", MANIFEST_NAME, exc)
        return set()


# -- reading -----------------------------------------------------------------------------


def list_checkpoints(directory: PathLike, shard_id: int) -> list[tuple[int, Path]]:
    """``(version, path)`` of every checkpoint file of ``shard_id``, newest first (no reads)."""
    try:
        entries = list(os.scandir(directory))
    except FileNotFoundError:
        return []
    found = []
    for entry in entries:
        match = NAME_RE.fullmatch(entry.name)
        if match and int(match.group(1)) == shard_id:
            found.append((int(match.group(2)), Path(entry.path)))
    return sorted(found, reverse=True)


def scan_latest(directory: PathLike, shard_id: int, fingerprint: int | None = None) -> ScanResult:
    """Find the newest valid checkpoint of ``shard_id``, newest first, skipping bad files.

    A truncated, corrupted or misnamed file is skipped with its reason and the previous
    one tried. A *valid* file of another model (when ``fingerprint`` is given) raises
    :class:`CheckpointError` instead: restoring another model's newest state, or
    silently falling back to an older one, would both be wrong.
    """
    rejected: list[tuple[Path, str]] = []
    for version, path in list_checkpoints(directory, shard_id):
        try:
            ckpt = decode(path.read_bytes(), path)
        except (OSError, ValueError) as exc:
            rejected.append((path, str(exc)))
            continue
        if (ckpt.shard_id, ckpt.version) != (shard_id, version):
            rejected.append((path, f"holds shard {ckpt.shard_id} v{ckpt.version} (renamed?)"))
            continue
        if fingerprint is not None and ckpt.fingerprint != fingerprint:
            raise fingerprint_error(
                f"checkpoint {path}", ckpt.fingerprint, ckpt.num_shards, fingerprint
            )
        return ScanResult(ckpt, tuple(rejected))
    return ScanResult(None, tuple(rejected))


def latest_valid(
    directory: PathLike,
    shard_id: int,
    fingerprint: int | None = None,
    *,
    required: bool = False,
) -> Checkpoint | None:
    """:func:`scan_latest`, logging each skipped file; None when nothing is usable.

    With ``required=True``, no usable checkpoint raises :class:`CheckpointError` with a
    one-line message listing why each file was rejected.
    """
    result = scan_latest(directory, shard_id, fingerprint)
    for path, reason in result.rejected:
        log.warning("skipping checkpoint %s: %s", path, reason)
    if result.checkpoint is None and required:
        if not result.rejected:
            raise CheckpointError(f"no checkpoint of shard {shard_id} in {directory}")
        reasons = "; ".join(f"{path.name}: {reason}" for path, reason in result.rejected)
        raise CheckpointError(f"no valid checkpoint of shard {shard_id} in {directory}: {reasons}")
    return result.checkpoint


# -- lineage ------------------------------------------------------------------------------

LINEAGE_KEEP = 64  # incarnations remembered per shard


def lineage_path(directory: PathLike, shard_id: int) -> Path:
    return Path(directory) / f"shard{shard_id}.lineage.json"


def read_lineage(directory: PathLike, shard_id: int) -> list[tuple[int, int]]:
    """``(incarnation, started_from)`` of each process that served ``shard_id`` from this
    directory, oldest first ([] when there is none, or it is unreadable: the lineage only
    feeds the accounting of lost pushes, never the state)."""
    try:
        raw = json.loads(lineage_path(directory, shard_id).read_text())
        return [(int(inc), int(start)) for inc, start in raw][-LINEAGE_KEEP:]
    except (OSError, ValueError, TypeError):
        return []


def write_lineage(directory: PathLike, shard_id: int, lineage: list[tuple[int, int]]) -> None:
    """Replace the shard's lineage file atomically (blocking: small, written at startup)."""
    path = lineage_path(directory, shard_id)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps([list(entry) for entry in lineage[-LINEAGE_KEEP:]]))
    tmp.replace(path)
