"""The shard checkpoint file: a safetensors file with a checksum inside it.

One file holds the tensors ``params`` and ``opt_state/<name>`` and, in the header's
string metadata, everything else: ids, range, version, layout fingerprint (16 hex
digits), optimizer, incarnation, wall-clock time, the caller's JSON metadata and
``sha256``, a digest of all of that *and* of every tensor's name, dtype, shape and
bytes. The digest lives inside the file, so a file and its checksum can never be out of
step, and it detects truncation and bit flips anywhere that matters (a flip the parser
shrugs off, in header padding, changes no content). No pickle anywhere.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.numpy

from dsgd.errors import CheckpointError
from dsgd.types import FlatParams, ShardRange

FORMAT = "dsgd.shard-checkpoint"
FORMAT_VERSION = 1
_PARAMS = "params"
_OPT_PREFIX = "opt_state/"
_MAX_HEADER_BYTES = 100_000_000  # safetensors' own limit
NAME_RE = re.compile(r"shard-(\d{3,})-v(\d{12,})\.safetensors")
TEMP_RE = re.compile(r"\.(shard-(\d{3,})-v\d+\.safetensors|manifest\.json)\.tmp-[0-9a-f]+")

PathLike = str | os.PathLike[str]


def checkpoint_name(shard_id: int, version: int) -> str:
    """The file name of shard ``shard_id``'s checkpoint at ``version``; names sort by version."""
    return f"shard-{shard_id:03d}-v{version:012d}.safetensors"


@dataclass(frozen=True, eq=False)
class Checkpoint:
    """One shard's state at one version, as written to or read from disk.

    ``path`` and ``sha256`` are set when the checkpoint was read from (or written to) a
    file; a fresh :func:`snapshot` has neither.
    """

    shard_id: int
    start: int
    stop: int
    num_shards: int
    version: int
    fingerprint: int
    optimizer: str
    incarnation: int
    created: float
    params: FlatParams
    opt_state: dict[str, FlatParams] = field(default_factory=dict)
    metadata: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None
    sha256: str = ""

    def __post_init__(self) -> None:
        """Reject states that could not be restored, before any byte reaches the disk."""
        if not 0 <= self.shard_id < self.num_shards:
            raise ValueError(f"shard id {self.shard_id} is not in [0, {self.num_shards})")
        if not 0 <= self.start <= self.stop:
            raise ValueError(f"bad shard range [{self.start}, {self.stop})")
        if self.version < 0 or not 0 <= self.fingerprint < 1 << 64:
            raise ValueError(f"bad version {self.version} or fingerprint {self.fingerprint}")
        if not 0 <= self.incarnation < 1 << 64:
            raise ValueError(f"bad incarnation {self.incarnation}")
        if not self.optimizer:
            raise ValueError("the optimizer name is empty")
        _check_array("params", self.params)
        if self.params.shape != (self.stop - self.start,):
            raise ValueError(
                f"params has shape {self.params.shape}, the range needs {self.stop - self.start}"
            )
        for name, array in self.opt_state.items():
            _check_array(f"optimizer state {name!r}", array)

    @property
    def range(self) -> ShardRange:
        return ShardRange(self.start, self.stop)


def _check_array(what: str, array: Any) -> None:
    if not isinstance(array, np.ndarray) or array.dtype != np.float32:
        got = getattr(array, "dtype", type(array).__name__)
        raise ValueError(f"{what} must be a float32 numpy array, got {got}")


def snapshot(
    *,
    shard_id: int,
    shard_range: tuple[int, int],
    num_shards: int,
    version: int,
    fingerprint: int,
    optimizer: str,
    incarnation: int,
    params: FlatParams,
    opt_state: Mapping[str, FlatParams],
    metadata: Mapping[str, Any] | None = None,
) -> Checkpoint:
    """Copy a shard's live state into a :class:`Checkpoint`, on the event loop.

    Only memcpys and a JSON round trip of ``metadata`` (which both validates it as strict
    JSON and detaches it from the caller's objects); all disk I/O happens in :func:`write`.
    """
    start, stop = shard_range
    return Checkpoint(
        shard_id=shard_id,
        start=start,
        stop=stop,
        num_shards=num_shards,
        version=version,
        fingerprint=fingerprint,
        optimizer=optimizer,
        incarnation=incarnation,
        created=time.time(),
        params=np.array(params, order="C", copy=True),
        opt_state={name: np.array(a, order="C", copy=True) for name, a in opt_state.items()},
        metadata=json.loads(json.dumps(dict(metadata or {}), allow_nan=False)),
    )


def _tensors(ckpt: Checkpoint) -> dict[str, np.ndarray]:
    tensors = {_PARAMS: ckpt.params}
    tensors.update({_OPT_PREFIX + name: a for name, a in ckpt.opt_state.items()})
    return {name: np.ascontiguousarray(a, dtype="<f4") for name, a in tensors.items()}


def _fields(ckpt: Checkpoint) -> dict[str, str]:
    return {
        "format": FORMAT,
        "format_version": str(FORMAT_VERSION),
        "shard_id": str(ckpt.shard_id),
        "start": str(ckpt.start),
        "stop": str(ckpt.stop),
        "num_shards": str(ckpt.num_shards),
        "version": str(ckpt.version),
        "fingerprint": f"{ckpt.fingerprint:016x}",
        "optimizer": ckpt.optimizer,
        "incarnation": str(ckpt.incarnation),
        "created": repr(float(ckpt.created)),
        "metadata": json.dumps(ckpt.metadata, sort_keys=True, allow_nan=False),
    }


def _digest(fields: Mapping[str, str], tensors: Mapping[str, np.ndarray]) -> str:
    """sha256 of the metadata fields and every tensor's name, dtype, shape and bytes."""
    h = hashlib.sha256(json.dumps(dict(fields), sort_keys=True).encode())
    for name in sorted(tensors):
        array = np.ascontiguousarray(tensors[name])
        desc = json.dumps([name, array.dtype.str, list(array.shape), array.nbytes]).encode()
        h.update(len(desc).to_bytes(8, "little") + desc)
        h.update(array.data)
    return h.hexdigest()


def fsync(path: Path) -> None:
    """Flush a file's (or a directory's entries') data to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def temp_path(final: Path) -> Path:
    """A hidden, unique sibling of ``final``: same directory, so the rename is atomic."""
    return final.with_name(f".{final.name}.tmp-{secrets.token_hex(8)}")


def replace_durably(tmp: Path, final: Path) -> None:
    """fsync ``tmp``, rename it over ``final``, fsync the directory; remove ``tmp`` on error."""
    try:
        fsync(tmp)
        os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync(final.parent)


def write_file(checkpoint: Checkpoint, final: Path) -> str:
    """Write ``checkpoint`` to ``final`` atomically and durably; returns its sha256.

    Blocking: encoding hashes every byte, and the write is fsynced twice.
    """
    tensors = _tensors(checkpoint)
    fields = _fields(checkpoint)
    fields["sha256"] = _digest(fields, tensors)
    tmp = temp_path(final)
    try:
        safetensors.numpy.save_file(tensors, tmp, metadata=fields)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    replace_durably(tmp, final)
    return fields["sha256"]


def _parse_header(data: bytes) -> dict[str, str]:
    """The header's string metadata; raises ValueError saying what is wrong."""
    if len(data) < 8:
        raise ValueError(f"truncated: {len(data)} bytes, too short for a header")
    size = int.from_bytes(data[:8], "little")
    if size > _MAX_HEADER_BYTES or 8 + size > len(data):
        raise ValueError(
            f"truncated or corrupted: header of {size} bytes in a {len(data)}-byte file"
        )
    try:
        header = json.loads(data[8 : 8 + size])
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"corrupted header: {exc}") from None
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ValueError("not a dsgd shard checkpoint (no dsgd metadata in the header)")
    if not all(isinstance(v, str) for v in meta.values()):
        raise ValueError("corrupted header: non-string metadata")
    version = meta.get("format_version", "")
    if not version.isdigit() or int(version) > FORMAT_VERSION:
        raise ValueError(f"format version {version!r}: written by a newer dsgd?")
    return meta


def decode(data: bytes, path: Path) -> Checkpoint:
    """Parse and verify a checkpoint file's bytes; raises ValueError saying what is wrong."""
    fields = _parse_header(data)
    try:
        tensors = safetensors.numpy.load(data)
    except (safetensors.SafetensorError, ValueError, TypeError) as exc:
        raise ValueError(f"truncated or corrupted: {exc}") from None
    odd = sorted(name for name, a in tensors.items() if a.dtype != np.float32)
    if odd:
        raise ValueError(f"corrupted: tensors {odd} are not float32")
    stored = fields.pop("sha256", "")
    computed = _digest(fields, tensors)
    if stored != computed:
        raise ValueError(f"checksum mismatch (stored {stored[:12]}, computed {computed[:12]})")
    params = tensors.pop(_PARAMS, None)
    strays = [name for name in tensors if not name.startswith(_OPT_PREFIX)]
    if params is None or strays:
        raise ValueError(f"unexpected tensors: no {_PARAMS!r} or extra {strays}")
    try:
        return Checkpoint(
            shard_id=int(fields["shard_id"]),
            start=int(fields["start"]),
            stop=int(fields["stop"]),
            num_shards=int(fields["num_shards"]),
            version=int(fields["version"]),
            fingerprint=int(fields["fingerprint"], 16),
            optimizer=fields["optimizer"],
            incarnation=int(fields["incarnation"]),
            created=float(fields["created"]),
            params=params,
            opt_state={name[len(_OPT_PREFIX) :]: a for name, a in tensors.items()},
            metadata=json.loads(fields["metadata"]),
            path=path,
            sha256=stored,
        )
    except (KeyError, ValueError, TypeError) as exc:
        raise ValueError(f"bad metadata: {exc!r}") from None


def read_checkpoint(path: PathLike) -> Checkpoint:
    """Read and verify one checkpoint file; :class:`CheckpointError` says why it is unusable."""
    file = Path(path)
    try:
        data = file.read_bytes()
    except OSError as exc:
        raise CheckpointError(f"cannot read checkpoint {file}: {exc}") from exc
    try:
        return decode(data, file)
    except ValueError as exc:
        raise CheckpointError(f"checkpoint {file} is unusable: {exc}") from None


def read_header(path: PathLike) -> dict[str, str]:
    """A checkpoint's header metadata, reading only the header (the checksum is not verified)."""
    file = Path(path)
    try:
        with file.open("rb") as f:
            head = f.read(8)
            size = int.from_bytes(head, "little") if len(head) == 8 else 0
            data = head + f.read(min(size, _MAX_HEADER_BYTES))
        return _parse_header(data)
    except OSError as exc:
        raise CheckpointError(f"cannot read checkpoint {file}: {exc}") from exc
    except ValueError as exc:
        raise CheckpointError(f"checkpoint {file} is unusable: {exc}") from None


def fingerprint_error(what: str, found: int, shards: int, expected: int) -> CheckpointError:
    """The one-line error for state saved from another model, saying how to get past it."""
    return CheckpointError(
        f"{what} belongs to another model or shard count (layout fingerprint {found:016x} over "
        f"{shards} shard(s); this run's is {expected:016x}); use another --checkpoint-dir, "
        f"or delete the old checkpoints to start over"
    )
