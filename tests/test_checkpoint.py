"""Checkpoints: round trips, atomic writes, corruption detection, retention, clusters, streams."""

from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from dsgd.checkpoint import (
    MANIFEST_NAME,
    STREAM_CHUNK_BYTES,
    Checkpoint,
    checkpoint_name,
    file_sha256,
    latest_valid,
    list_checkpoints,
    read_checkpoint,
    read_cluster_checkpoint,
    read_header,
    reassemble,
    save_async,
    scan_latest,
    snapshot,
    stream_file,
    write,
    write_manifest,
)
from dsgd.errors import CheckpointError
from dsgd.optim import SGD, Adagrad

FP = 0x1234_5678_9ABC_DEF0
ODD_FLOATS = np.array([-0.0, np.inf, -np.inf, np.nan, 1e-45, 3.4e38], np.float32)


def make(
    version: int = 7,
    *,
    shard_id: int = 0,
    num_shards: int = 2,
    start: int = 0,
    size: int = 16,
    fingerprint: int = FP,
    adagrad: bool = True,
    seed: int = 0,
) -> Checkpoint:
    rng = np.random.default_rng(seed)
    params = rng.standard_normal(size).astype(np.float32)
    params[: len(ODD_FLOATS)] = ODD_FLOATS[:size]
    optimizer = Adagrad(0.1) if adagrad else SGD(0.1)
    state = optimizer.init(size)
    for array in state.values():
        array += rng.random(size, dtype=np.float32)
    ckpt = snapshot(
        shard_id=shard_id,
        shard_range=(start, start + size),
        num_shards=num_shards,
        version=version,
        fingerprint=fingerprint,
        optimizer=optimizer.name,
        incarnation=(1 << 62) + 5,
        params=params,
        opt_state=state,
        metadata={"config": {"lr": 0.1, "model": "m:f"}, "note": "héllo", "list": [1, None]},
    )
    return replace(ckpt, created=1_700_000_000.123456 + seed)  # comparable across calls


def same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


def assert_same(got: Checkpoint, want: Checkpoint) -> None:
    for name in (
        "shard_id",
        "start",
        "stop",
        "num_shards",
        "version",
        "fingerprint",
        "optimizer",
        "incarnation",
        "created",
        "metadata",
    ):
        assert getattr(got, name) == getattr(want, name), name
    assert same_bits(got.params, want.params)
    assert got.opt_state.keys() == want.opt_state.keys()
    for key in want.opt_state:
        assert same_bits(got.opt_state[key], want.opt_state[key])


def flip(path: Path, offset: int, mask: int = 0x01) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= mask
    path.write_bytes(bytes(data))


def header_size(path: Path) -> int:
    return 8 + int.from_bytes(path.read_bytes()[:8], "little")


def leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if ".tmp" in p.name)


# -- one file ----------------------------------------------------------------------------


@pytest.mark.parametrize("adagrad", [True, False])
def test_round_trip_keeps_every_field_and_bit(tmp_path: Path, adagrad: bool) -> None:
    ckpt = make(adagrad=adagrad, shard_id=1, start=16)
    result = write(ckpt, tmp_path, keep=3)
    assert result.path == tmp_path / "shard-001-v000000000007.safetensors"
    assert result.nbytes == result.path.stat().st_size
    loaded = read_checkpoint(result.path)
    assert_same(loaded, ckpt)
    assert loaded.path == result.path and loaded.sha256 == result.sha256
    assert loaded.range == (16, 32)
    assert loaded.params.flags.writeable, "a restored shard applies updates in place"
    assert read_header(result.path)["fingerprint"] == f"{FP:016x}"


def test_snapshot_copies_and_validates() -> None:
    params = np.ones(4, np.float32)
    state = {"accumulator": np.ones(4, np.float32)}
    metadata = {"nested": {"a": 1}}
    kw: dict[str, Any] = dict(
        shard_id=0, shard_range=(0, 4), num_shards=1, version=1, fingerprint=FP
    )
    ckpt = snapshot(
        **kw, optimizer="adagrad", incarnation=1, params=params, opt_state=state, metadata=metadata
    )
    params += 1
    state["accumulator"] += 1
    metadata["nested"]["a"] = 2
    assert ckpt.params.tolist() == [1.0] * 4
    assert ckpt.opt_state["accumulator"].tolist() == [1.0] * 4
    assert ckpt.metadata == {"nested": {"a": 1}}
    with pytest.raises(TypeError):
        snapshot(
            **kw,
            optimizer="sgd",
            incarnation=1,
            params=params,
            opt_state={},
            metadata={"x": object()},
        )
    with pytest.raises(ValueError, match="float32"):
        snapshot(
            **kw, optimizer="sgd", incarnation=1, params=params.astype(np.float64), opt_state={}
        )
    with pytest.raises(ValueError, match="range needs 4"):
        snapshot(**kw, optimizer="sgd", incarnation=1, params=params[:3], opt_state={})


def test_write_leaves_no_temporary_files(tmp_path: Path) -> None:
    for version in range(3):
        write(make(version), tmp_path, keep=5)
    assert leftovers(tmp_path) == []
    assert [v for v, _ in list_checkpoints(tmp_path, 0)] == [2, 1, 0]


def test_failed_write_keeps_previous_checkpoint_and_no_temp(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write(make(1), tmp_path)

    def crash(src: object, dst: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(CheckpointError, match="No space left"):
        write(make(2), tmp_path)
    monkeypatch.undo()
    assert leftovers(tmp_path) == []
    assert [v for v, _ in list_checkpoints(tmp_path, 0)] == [1]
    assert latest_valid(tmp_path, 0, FP).version == 1  # type: ignore[union-attr]


def test_crash_mid_write_falls_back_to_previous(tmp_path: Path) -> None:
    good = write(make(1), tmp_path)
    # A crash that left a partial file under a final name (e.g. a filesystem without
    # atomic rename), and a partial temporary file from an interrupted write.
    partial = write(make(2), tmp_path / "scratch").path.read_bytes()
    (tmp_path / checkpoint_name(0, 2)).write_bytes(partial[: len(partial) // 2])
    (tmp_path / f".{checkpoint_name(0, 3)}.tmp-00ff").write_bytes(partial[:100])
    result = scan_latest(tmp_path, 0, FP)
    assert result.checkpoint is not None and result.checkpoint.path == good.path
    assert [(p.name, "truncated" in why) for p, why in result.rejected] == [
        (checkpoint_name(0, 2), True)
    ]
    assert_same(latest_valid(tmp_path, 0, FP), make(1))  # type: ignore[arg-type]
    # The next successful write removes the interrupted write's temporary file.
    write(make(4), tmp_path)
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("cut", ["header", "payload", "last_byte", "empty"])
def test_truncated_file_is_detected(tmp_path: Path, cut: str) -> None:
    path = write(make(3), tmp_path).path
    data = path.read_bytes()
    size = {
        "header": header_size(path) // 2,
        "payload": (header_size(path) + len(data)) // 2,
        "last_byte": len(data) - 1,
        "empty": 0,
    }[cut]
    path.write_bytes(data[:size])
    with pytest.raises(CheckpointError, match="truncated"):
        read_checkpoint(path)
    assert latest_valid(tmp_path, 0) is None


def test_every_single_bit_flip_is_detected_or_harmless(tmp_path: Path) -> None:
    """Flip each bit-0 and bit-7 of every byte: the file is rejected or reads back unchanged."""
    want = make(5, size=8)
    path = write(want, tmp_path).path
    pristine = path.read_bytes()
    accepted = 0
    for offset in range(len(pristine)):
        for mask in (0x01, 0x80):
            flip(path, offset, mask)
            try:
                got = read_checkpoint(path)
            except CheckpointError:
                pass
            else:
                accepted += 1
                assert_same(got, want)
            path.write_bytes(pristine)
    assert accepted <= 2 * (header_size(path) - 8)  # only header padding can be harmless


def test_bit_flip_in_payload_and_header_are_reported(tmp_path: Path) -> None:
    write(make(1), tmp_path)
    path = write(make(2), tmp_path).path
    flip(path, len(path.read_bytes()) - 3)  # inside the last tensor's bytes
    with pytest.raises(CheckpointError, match="checksum mismatch"):
        read_checkpoint(path)
    assert latest_valid(tmp_path, 0, FP).version == 1  # type: ignore[union-attr]

    path = write(make(3), tmp_path).path
    at = path.read_bytes().index(b'"version":"3"') + len(b'"version":"')
    flip(path, at, 0x02)  # "3" -> "1": still valid JSON, a different version
    with pytest.raises(CheckpointError, match="checksum mismatch"):
        read_checkpoint(path)


def test_keep_last_k(tmp_path: Path) -> None:
    deleted: list[Path] = []
    for version in range(1, 7):
        deleted.extend(write(make(version), tmp_path, keep=3).deleted)
    write(make(9, shard_id=1), tmp_path, keep=1)  # another shard's files are left alone
    assert [v for v, _ in list_checkpoints(tmp_path, 0)] == [6, 5, 4]
    assert sorted(p.name for p in deleted) == [checkpoint_name(0, v) for v in (1, 2, 3)]
    write(make(7), tmp_path, keep=1)
    assert [v for v, _ in list_checkpoints(tmp_path, 0)] == [7]
    assert [v for v, _ in list_checkpoints(tmp_path, 1)] == [9]
    with pytest.raises(ValueError):
        write(make(8), tmp_path, keep=0)


def test_write_deletes_newer_checkpoints_of_an_abandoned_run(tmp_path: Path) -> None:
    """Restored from v2 (v3 was corrupt), the new run's next checkpoint must win a restore."""
    write(make(2), tmp_path, keep=3)
    bad = write(make(3), tmp_path, keep=3).path
    flip(bad, len(bad.read_bytes()) - 1)
    restored = latest_valid(tmp_path, 0, FP)
    assert restored is not None and restored.version == 2
    new_run = replace(make(2, seed=1), incarnation=77)
    result = write(new_run, tmp_path, keep=3)
    assert bad in result.deleted and not bad.exists()
    assert_same(latest_valid(tmp_path, 0, FP), new_run)  # type: ignore[arg-type]


def test_out_of_order_write_of_one_run_keeps_the_newer(tmp_path: Path) -> None:
    write(make(5), tmp_path, keep=2)
    result = write(make(4), tmp_path, keep=2)  # same incarnation, written late
    assert result.deleted == ()
    assert latest_valid(tmp_path, 0, FP).version == 5  # type: ignore[union-attr]
    write(make(3), tmp_path, keep=2)
    assert [v for v, _ in list_checkpoints(tmp_path, 0)] == [5, 4]


def test_wrong_fingerprint_raises_one_clear_line(tmp_path: Path) -> None:
    write(make(4, fingerprint=0xBEEF), tmp_path)
    with pytest.raises(CheckpointError) as info:
        latest_valid(tmp_path, 0, FP)
    message = str(info.value)
    assert "\n" not in message
    assert "another model" in message and "--checkpoint-dir" in message
    assert f"{0xBEEF:016x}" in message and f"{FP:016x}" in message
    assert latest_valid(tmp_path, 0) is not None  # no fingerprint given: no check


def test_empty_or_missing_directory(tmp_path: Path) -> None:
    assert latest_valid(tmp_path, 0, FP) is None
    assert latest_valid(tmp_path / "nope", 0, FP) is None
    with pytest.raises(CheckpointError, match="no checkpoint of shard 0"):
        latest_valid(tmp_path, 0, FP, required=True)


def test_required_lists_why_each_file_was_rejected(tmp_path: Path) -> None:
    for version in (1, 2):
        path = write(make(version), tmp_path, keep=5).path
        path.write_bytes(path.read_bytes()[:-10])
    renamed = write(make(3), tmp_path, keep=5).path
    renamed.rename(tmp_path / checkpoint_name(0, 4))
    (tmp_path / "shard-000-vgarbage.safetensors").write_bytes(b"ignored: not a checkpoint name")
    with pytest.raises(CheckpointError) as info:
        latest_valid(tmp_path, 0, FP, required=True)
    message = str(info.value)
    assert "\n" not in message and message.startswith("no valid checkpoint of shard 0")
    for version in (1, 2, 4):
        assert checkpoint_name(0, version) in message
    assert "renamed?" in message and "truncated" in message


async def test_save_async_writes_off_the_loop(tmp_path: Path) -> None:
    result = await save_async(make(11), tmp_path, keep=2)
    assert_same(read_checkpoint(result.path), make(11))


# -- clusters ----------------------------------------------------------------------------


def write_cluster(directory: Path, sizes: tuple[int, ...] = (5, 6, 7)) -> list[Checkpoint]:
    shards, start = [], 0
    for shard_id, size in enumerate(sizes):
        ckpt = make(10 + shard_id, shard_id=shard_id, num_shards=len(sizes), start=start, size=size)
        write(ckpt, directory, keep=1)
        shards.append(ckpt)
        start += size
    return shards


def test_cluster_round_trip(tmp_path: Path) -> None:
    shards = write_cluster(tmp_path)
    config = {"lr": 0.05, "model": "dsgd.examples.digits:digits_cnn"}
    written = write_manifest(
        tmp_path, model="m:f", fingerprint=FP, versions=[10, 11, 12], config=json.dumps(config)
    )
    assert leftovers(tmp_path) == []
    cluster = read_cluster_checkpoint(tmp_path, FP)
    assert cluster.manifest == written
    assert cluster.manifest.num_shards == 3 and cluster.manifest.config == config
    assert cluster.manifest.versions == (10, 11, 12) and cluster.manifest.model == "m:f"
    for got, want in zip(cluster.shards, shards, strict=True):
        assert_same(got, want)
    # A later periodic write with keep=1 must not prune the files the manifest names.
    write(make(13, shard_id=0, num_shards=3, size=5), tmp_path, keep=1)
    read_cluster_checkpoint(tmp_path, FP)


def test_cluster_errors_are_one_line(tmp_path: Path) -> None:
    def error(match: str) -> None:
        with pytest.raises(CheckpointError, match=match) as info:
            read_cluster_checkpoint(tmp_path, FP)
        assert "\n" not in str(info.value)

    error("no manifest.json")
    write_cluster(tmp_path)
    with pytest.raises(CheckpointError, match="shard-003-v000000000099.safetensors.*missing"):
        write_manifest(tmp_path, model="m:f", fingerprint=FP, versions=[10, 11, 12, 99])
    write_manifest(tmp_path, model="m:f", fingerprint=FP, versions=[10, 11, 12])
    with pytest.raises(CheckpointError, match="another model"):
        read_cluster_checkpoint(tmp_path, fingerprint=1)

    shard1 = tmp_path / checkpoint_name(1, 11)
    saved = shard1.read_bytes()
    shard1.unlink()
    error("missing shard 1")
    shard1.write_bytes(saved[:-1])
    error("truncated")
    write(make(11, shard_id=1, num_shards=3, start=5, size=6, seed=9), tmp_path)
    error("checksum differs from the manifest")
    shard1.write_bytes(saved)

    manifest = tmp_path / MANIFEST_NAME
    manifest.write_text(manifest.read_text().replace('"version": 12', '"version": 13'))
    error("checksum mismatch")


def test_write_manifest_checks_the_files_it_names(tmp_path: Path) -> None:
    write_cluster(tmp_path)
    with pytest.raises(CheckpointError, match="another model"):
        write_manifest(tmp_path, model="m:f", fingerprint=1, versions=[10, 11, 12])
    with pytest.raises(CheckpointError, match="not as named"):
        write_manifest(tmp_path, model="m:f", fingerprint=FP, versions=[10, 11])
    assert not (tmp_path / MANIFEST_NAME).exists()


# -- streaming ---------------------------------------------------------------------------


def test_stream_and_reassemble_round_trip(tmp_path: Path) -> None:
    big = make(21, size=700_000)  # 5.6 MB with its accumulator: several chunks
    source = write(big, tmp_path / "src").path
    chunks = list(stream_file(source))
    assert len(chunks) > 2 and all(0 < len(c) <= STREAM_CHUNK_BYTES for c in chunks)
    got = reassemble(iter(chunks), tmp_path / "dst", expected_sha256=file_sha256(source))
    assert got.path == tmp_path / "dst" / source.name
    assert got.path.read_bytes() == source.read_bytes()
    assert_same(got, big)
    assert leftovers(tmp_path / "dst") == []


@pytest.mark.parametrize("damage", ["flip", "drop_last", "wrong_digest"])
def test_reassemble_rejects_damage_and_leaves_nothing(tmp_path: Path, damage: str) -> None:
    source = write(make(22, size=100_000), tmp_path / "src").path
    chunks = list(stream_file(source, chunk_bytes=64 << 10))
    digest: str | None = None
    if damage == "flip":
        chunks[1] = bytes([chunks[1][0] ^ 0x10]) + chunks[1][1:]
    elif damage == "drop_last":
        chunks.pop()
    else:
        digest = "0" * 64
    with pytest.raises(CheckpointError, match="corrupted|truncated|checksum"):
        reassemble(chunks, tmp_path / "dst", expected_sha256=digest)
    assert list((tmp_path / "dst").iterdir()) == []
