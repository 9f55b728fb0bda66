"""Cluster checkpoints: one file per shard plus a ``manifest.json`` written last."""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dsgd.checkpoint.fileformat import (
    FORMAT_VERSION,
    NAME_RE,
    Checkpoint,
    PathLike,
    checkpoint_name,
    fingerprint_error,
    read_checkpoint,
    read_header,
    replace_durably,
    temp_path,
)
from dsgd.errors import CheckpointError

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "dsgd.cluster-checkpoint"


@dataclass(frozen=True)
class Manifest:
    """A cluster checkpoint's table of contents: the file and checksum of every shard.

    Written last, after every shard file is durable, so a directory without a manifest is
    an unfinished cluster checkpoint and can never be mistaken for a complete one.
    """

    model: str
    fingerprint: int
    versions: tuple[int, ...]
    files: tuple[str, ...]
    sha256: tuple[str, ...]
    created: float
    config: dict[str, Any] = field(default_factory=dict)

    @property
    def num_shards(self) -> int:
        return len(self.versions)

    def _body(self) -> dict[str, Any]:
        shards = zip(self.versions, self.files, self.sha256, strict=True)
        return {
            "format": MANIFEST_FORMAT,
            "format_version": FORMAT_VERSION,
            "model": self.model,
            "num_shards": self.num_shards,
            "fingerprint": f"{self.fingerprint:016x}",
            "created": self.created,
            "config": self.config,
            "shards": [
                {"shard_id": i, "version": v, "file": f, "sha256": s}
                for i, (v, f, s) in enumerate(shards)
            ],
        }

    def to_json(self) -> str:
        """The manifest as JSON, with a ``checksum`` (sha256) of everything else in it."""
        body = self._body()
        body["checksum"] = hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()
        return json.dumps(body, indent=2, sort_keys=True, allow_nan=False) + "\n"

    @classmethod
    def from_json(cls, text: str) -> Manifest:
        """Parse and verify a manifest; raises ValueError saying what is wrong."""
        try:
            body = json.loads(text)
            checksum = body.pop("checksum")
            if hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest() != checksum:
                raise ValueError("checksum mismatch")
            if body["format"] != MANIFEST_FORMAT or body["format_version"] > FORMAT_VERSION:
                raise ValueError(f"unknown format {body['format']} v{body['format_version']}")
            shards = body["shards"]
            if [s["shard_id"] for s in shards] != list(range(body["num_shards"])):
                raise ValueError("the shard list does not match num_shards")
            if not all(NAME_RE.fullmatch(str(s["file"])) for s in shards):
                raise ValueError("a shard file name is not a checkpoint name")
            return cls(
                model=body["model"],
                fingerprint=int(body["fingerprint"], 16),
                versions=tuple(int(s["version"]) for s in shards),
                files=tuple(str(s["file"]) for s in shards),
                sha256=tuple(str(s["sha256"]) for s in shards),
                created=float(body["created"]),
                config=dict(body["config"]),
            )
        except (KeyError, TypeError, AttributeError, json.JSONDecodeError) as exc:
            raise ValueError(f"malformed: {exc!r}") from None


@dataclass(frozen=True, eq=False)
class ClusterCheckpoint:
    """A verified cluster checkpoint: its manifest and every shard's checkpoint, in order."""

    directory: Path
    manifest: Manifest
    shards: tuple[Checkpoint, ...]


def write_manifest(
    directory: PathLike,
    *,
    model: str,
    fingerprint: int,
    versions: Sequence[int],
    config: Mapping[str, Any] | str | None = None,
) -> Manifest:
    """Write ``manifest.json`` atomically, naming shard ``i``'s file at ``versions[i]``.

    Blocking; call it after every shard file is durable in ``directory``. Each file's
    header is read (not its tensors) to check it is the right shard, version and model
    and to record its checksum, so a manifest never vouches for a file it has not seen.
    """
    if not versions:
        raise ValueError("a cluster checkpoint needs at least one shard")
    folder = Path(directory)
    paths = [folder / checkpoint_name(i, version) for i, version in enumerate(versions)]
    missing = [path.name for path in paths if not path.exists()]
    if missing:
        raise CheckpointError(f"cannot write the manifest of {folder}: {missing} missing")
    files, digests = [], []
    for shard_id, (version, path) in enumerate(zip(versions, paths, strict=True)):
        meta = read_header(path)
        found = (meta.get("shard_id"), meta.get("version"), meta.get("num_shards"))
        if found != (str(shard_id), str(version), str(len(versions))):
            raise CheckpointError(f"{path} holds shard/version/num_shards {found}, not as named")
        if meta.get("fingerprint") != f"{fingerprint:016x}":
            raise fingerprint_error(
                f"checkpoint {path}",
                int(meta.get("fingerprint", "0"), 16),
                len(versions),
                fingerprint,
            )
        files.append(path.name)
        digests.append(meta["sha256"])
    manifest = Manifest(
        model=model,
        fingerprint=fingerprint,
        versions=tuple(int(v) for v in versions),
        files=tuple(files),
        sha256=tuple(digests),
        created=time.time(),
        config=json.loads(config) if isinstance(config, str) else dict(config or {}),
    )
    final = folder / MANIFEST_NAME
    tmp = temp_path(final)
    try:
        tmp.write_text(manifest.to_json())
        replace_durably(tmp, final)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise CheckpointError(f"cannot write {final}: {exc}") from exc
    return manifest


def read_cluster_checkpoint(
    directory: PathLike, fingerprint: int | None = None
) -> ClusterCheckpoint:
    """Read and verify a cluster checkpoint: manifest, every shard, and their consistency."""
    folder = Path(directory)
    path = folder / MANIFEST_NAME
    try:
        manifest = Manifest.from_json(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(
            f"no {MANIFEST_NAME} in {folder}: not a cluster checkpoint, "
            "or one whose writing never finished"
        ) from None
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise CheckpointError(f"{path} is unusable: {exc}") from None
    if fingerprint is not None and manifest.fingerprint != fingerprint:
        raise fingerprint_error(
            f"cluster checkpoint {folder}", manifest.fingerprint, manifest.num_shards, fingerprint
        )
    shards: list[Checkpoint] = []
    for shard_id, name in enumerate(manifest.files):
        file = folder / name
        if not file.exists():
            raise CheckpointError(
                f"cluster checkpoint {folder} is missing shard {shard_id} ({name})"
            )
        ckpt = read_checkpoint(file)
        expected_start = shards[-1].stop if shards else 0
        checks = [
            (ckpt.sha256 == manifest.sha256[shard_id], "its checksum differs from the manifest's"),
            (ckpt.shard_id == shard_id, f"it holds shard {ckpt.shard_id}"),
            (ckpt.version == manifest.versions[shard_id], f"it holds version {ckpt.version}"),
            (ckpt.fingerprint == manifest.fingerprint, "it belongs to another model"),
            (ckpt.num_shards == manifest.num_shards, f"it is one of {ckpt.num_shards} shards"),
            (ckpt.start == expected_start, f"its range does not start at {expected_start}"),
            (not shards or ckpt.optimizer == shards[0].optimizer, "its optimizer differs"),
        ]
        problems = [message for ok, message in checks if not ok]
        if problems:
            raise CheckpointError(
                f"cluster checkpoint {folder}: {name} is inconsistent: {'; '.join(problems)}"
            )
        shards.append(ckpt)
    return ClusterCheckpoint(folder, manifest, tuple(shards))
