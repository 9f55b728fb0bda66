"""Shard and cluster checkpoints: atomic, checksummed safetensors files.

A shard snapshots its state on its event loop (:func:`snapshot`) and writes it in a
thread (:func:`save_async`); on restart it restores :func:`latest_valid`. A cluster
checkpoint is one file per shard plus a manifest written last
(:func:`write_manifest`, :func:`read_cluster_checkpoint`); files travel over gRPC in
pieces (:func:`stream_file`, :func:`reassemble`).
"""

from dsgd.checkpoint.cluster import (
    MANIFEST_NAME,
    ClusterCheckpoint,
    Manifest,
    read_cluster_checkpoint,
    write_manifest,
)
from dsgd.checkpoint.fileformat import (
    Checkpoint,
    checkpoint_name,
    read_checkpoint,
    read_header,
    snapshot,
)
from dsgd.checkpoint.store import (
    ScanResult,
    WriteResult,
    latest_valid,
    list_checkpoints,
    read_lineage,
    save_async,
    scan_latest,
    write,
    write_lineage,
)
from dsgd.checkpoint.stream import STREAM_CHUNK_BYTES, file_sha256, reassemble, stream_file

__all__ = [
    "MANIFEST_NAME",
    "STREAM_CHUNK_BYTES",
    "Checkpoint",
    "ClusterCheckpoint",
    "Manifest",
    "ScanResult",
    "WriteResult",
    "checkpoint_name",
    "file_sha256",
    "latest_valid",
    "list_checkpoints",
    "read_lineage",
    "read_checkpoint",
    "read_cluster_checkpoint",
    "read_header",
    "reassemble",
    "save_async",
    "scan_latest",
    "snapshot",
    "stream_file",
    "write",
    "write_lineage",
    "write_manifest",
]
