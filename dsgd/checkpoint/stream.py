"""Moving a checkpoint file in pieces (over gRPC) and putting it back together safely."""

from __future__ import annotations

import hashlib
import os
import secrets
from collections.abc import Iterable, Iterator
from dataclasses import replace
from pathlib import Path

from dsgd.checkpoint.fileformat import Checkpoint, PathLike, checkpoint_name, decode, fsync
from dsgd.errors import CheckpointError

STREAM_CHUNK_BYTES = 1 << 20
"""Pieces stay at or under 1 MiB, like the data plane's chunks."""


def stream_file(path: PathLike, chunk_bytes: int = STREAM_CHUNK_BYTES) -> Iterator[bytes]:
    """The bytes of a checkpoint file in pieces of at most ``chunk_bytes`` (blocking reads)."""
    if chunk_bytes < 1:
        raise ValueError(f"chunk_bytes must be >= 1, got {chunk_bytes}")
    with Path(path).open("rb") as f:
        while piece := f.read(chunk_bytes):
            yield piece


def file_sha256(path: PathLike) -> str:
    """sha256 of a whole file, for a receiver to check a streamed copy against."""
    h = hashlib.sha256()
    for piece in stream_file(path):
        h.update(piece)
    return h.hexdigest()


def reassemble(
    chunks: Iterable[bytes], directory: PathLike, *, expected_sha256: str | None = None
) -> Checkpoint:
    """Write streamed pieces into ``directory`` atomically, under the name its contents imply.

    The file becomes visible only after its whole-file sha256 (when given) and its own
    embedded checksum both verify; otherwise :class:`CheckpointError` and nothing is left.
    """
    folder = Path(directory)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".incoming-{secrets.token_hex(8)}.safetensors.tmp"
    h = hashlib.sha256()
    try:
        with tmp.open("xb") as f:
            for piece in chunks:
                h.update(piece)
                f.write(piece)
            f.flush()
            os.fsync(f.fileno())
        if expected_sha256 is not None and h.hexdigest() != expected_sha256:
            raise CheckpointError(
                f"received checkpoint is corrupted: sha256 {h.hexdigest()[:12]}, "
                f"expected {expected_sha256[:12]}"
            )
        try:
            ckpt = decode(tmp.read_bytes(), tmp)
        except ValueError as exc:
            raise CheckpointError(f"received checkpoint is unusable: {exc}") from None
        final = folder / checkpoint_name(ckpt.shard_id, ckpt.version)
        os.replace(tmp, final)
        fsync(folder)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return replace(ckpt, path=final)
