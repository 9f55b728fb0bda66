"""Replicated shards: the primary's chain, a backup that follows it over real sockets, and
real processes killed with SIGKILL, with the parameters checked exact afterwards."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zmq.asyncio

from dsgd import wire
from dsgd.optim import SGD
from dsgd.shard.client import PushResult, ShardClient
from dsgd.shard.core import ShardCore, ShardState
from dsgd.shard.replication import Chain, Follower
from dsgd.shard.server import ShardServer
from dsgd.wire import AckStatus
from tests.conftest import FINGERPRINT, ROOT
from tests.test_faults import SLOW_TRAINING, Cluster

SIZE = 50_000
CHUNK = 1 << 16


# -- the primary's bookkeeping ------------------------------------------------------------


def test_an_ack_waits_for_every_backup_and_a_pruned_backup_releases_it() -> None:
    chain = Chain()
    assert chain.hold(b"w", ["ack0"]) == [(b"w", ["ack0"])]  # no backups: at once
    chain.join(b"b1", replica=1, incarnation=11)
    chain.join(b"b2", replica=2, incarnation=22)
    forwards = chain.forward(["push"])
    assert [identity for identity, _ in forwards] == [b"b1", b"b2"]
    assert forwards[0][1][1:] == ["push"]  # the push's own frames, after the numbering
    assert chain.hold(b"w", ["ack1"]) == []
    assert chain.confirm(b"b1", 1) == []  # one backup has it, the other not yet
    assert chain.confirm(b"stranger", 1) == []  # not a backup: counts for nothing
    assert chain.confirm(b"b2", 1) == [(b"w", ["ack1"])]
    chain.forward(["push"])
    assert chain.hold(b"w", ["ack2"]) == []
    chain.confirm(b"b1", 2)
    # backup 2 died: the coordinator's list no longer holds it, and the ACK goes out
    assert chain.prune({(1, 11)}) == [(b"w", ["ack2"])]
    # a newer process of replica 1 replaces the older one
    chain.join(b"b1-new", replica=1, incarnation=12)
    assert list(chain.backups) == [b"b1-new"]


def _core(size: int = SIZE) -> ShardCore:
    opt = SGD(0.5)
    params = np.random.default_rng(0).standard_normal(size).astype(np.float32)
    return ShardCore(0, FINGERPRINT, opt, ShardState(params, opt.init(size)), chunk_bytes=CHUNK)


def _push(seq: int, worker: int = 1, size: int = SIZE) -> list[wire.Chunk]:
    values = np.full(size, float(seq), np.float32)
    header = wire.Header(
        kind=wire.PUSH, fingerprint=FINGERPRINT, shard=0, worker=worker, seq=seq, incarnation=7
    )
    return list(wire.dense_chunks(header, values, CHUNK))


def test_the_books_travel_so_a_resent_chunk_is_applied_once() -> None:
    primary, backup = _core(), _core()
    chunks = _push(1)
    for chunk in chunks[:2]:
        primary.handle(chunk.frames)
        backup.handle(chunk.frames, replicated=True)
    other = _core()
    other.install(FINGERPRINT, SGD(0.5), ShardState(backup.state.params.copy(), {}, 1))
    other.import_books(backup.export_books())
    before = other.state.params.copy()
    ack = wire.decode(other.handle(chunks[0].frames, replicated=True)[0])[0]
    assert ack.status == AckStatus.DUPLICATE and np.array_equal(other.state.params, before)
    ack = wire.decode(other.handle(chunks[2].frames, replicated=True)[0])[0]
    assert ack.status == AckStatus.APPLIED  # never applied before: applied now
    # a backup refuses pushes that do not come from its primary
    backup.primary = False
    refusal = wire.decode(backup.handle(_push(2)[0].frames)[0])[0]
    assert refusal.kind == wire.ERROR and backup.rejected["backup"] == 1


# -- a primary and a backup over real sockets ------------------------------------------------


async def test_a_backup_follows_its_primary_and_every_ack_means_both_applied(
    zmq_ctx: zmq.asyncio.Context,
) -> None:
    primary = ShardServer(_core())
    primary.chain = Chain()
    await primary.start_serving()
    backup_core = ShardCore(0, FINGERPRINT)
    backup_core.primary = False

    def install(params: np.ndarray, opt: dict[str, Any], version: int, books: bytes) -> None:
        backup_core.install(FINGERPRINT, SGD(0.5), ShardState(params, opt, version))
        backup_core.import_books(books)

    client = ShardClient(0, primary.data_address, primary.pub_address, FINGERPRINT, 1, zmq_ctx)
    await client.start()
    loop = asyncio.get_running_loop()

    async def push(seq: int) -> PushResult:
        done: asyncio.Future[PushResult] = loop.create_future()
        assert await client.push(seq, _push(seq), done.set_result, 10.0)
        return await asyncio.wait_for(done, 10.0)

    follower = Follower(backup_core, primary.data_address, 1, zmq_ctx, install, SIZE)
    following = asyncio.create_task(follower.run())
    try:
        assert (await push(1)).complete  # before the backup: acknowledged by the primary
        await asyncio.wait_for(follower.caught_up.wait(), 10.0)
        await asyncio.sleep(0.2)  # the join is in
        for seq in range(2, 6):
            assert (await push(seq)).complete
            # acknowledged: so the backup applied it already
            assert np.array_equal(backup_core.state.params, primary.core.state.params)
        assert backup_core.state.version == primary.core.state.version == 5
        assert primary.chain.forwarded >= 4 and primary.chain.holding == 0
        # the primary dies: the backup says so
        await primary.aclose()
        why = await asyncio.wait_for(following, 10.0)
        assert "dropped" in why
    finally:
        following.cancel()
        await client.aclose()
        await primary.aclose()


# -- real processes, SIGKILL ---------------------------------------------------------------


def _failover(tmp_path: Path, *argv: str) -> dict[str, Any]:
    out = tmp_path / "failover.json"
    proc = subprocess.run(
        [sys.executable, "-m", "bench.failover", *argv, "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.exists(), proc.stdout[-3000:] + proc.stderr[-3000:]
    return dict(json.loads(out.read_text()))


@pytest.mark.slow
def test_primaries_killed_at_random_lose_no_acknowledged_update(tmp_path: Path) -> None:
    """R = 2, two workers pushing: SIGKILL the primary 6 times at random points; every
    replica's parameters equal applying each acknowledged push exactly once."""
    result = _failover(tmp_path, "--kills", "6", "--params", "100000", "--seed", "3")
    assert result["coordinator_failovers"] == 6
    assert result["lost_per_kill"] == [0] * 6
    assert result["exact"] and len(result["replicas_exact"]) == 2, result
    assert min(result["acknowledged_pushes"]) > 0
    assert result["failover_worst_s"] < 10.0  # a bound on a hang; bench.failover measures


@pytest.mark.slow
def test_without_replicas_the_acknowledged_pushes_a_restart_loses_are_counted(
    tmp_path: Path,
) -> None:
    result = _failover(
        tmp_path, "--kills", "2", "--replicas", "1", "--params", "100000", "--checkpoint-every", "3"
    )
    assert result["coordinator_failovers"] == 0
    assert all(lost > 0 for lost in result["lost_per_kill"]), result  # visible, not silent
    assert not result["exact"]  # and they really were lost


@pytest.mark.slow
def test_training_with_replicas_reaches_its_target_through_primary_kills(
    tmp_path: Path,
) -> None:
    cluster = Cluster(tmp_path, *SLOW_TRAINING, "--replicas", "2")
    try:
        cluster.wait_for("training", lambda s: _versions(s) and min(_versions(s)) >= 100)
        for kill in range(2):
            status = cluster.status()
            assert status is not None
            primary = next(m for m in status["members"] if m.get("primary"))
            name = f"shard{primary.get('id', 0)}-r{primary.get('replica', 0)}"
            os.kill(cluster.pids()[name], signal.SIGKILL)
            cluster.wait_for(
                "the failover and the rejoin",
                lambda s, k=kill: int(s.get("failovers", 0)) >= k + 1 and _backups_alive(s),
            )
        code, summary, err = cluster.finish()
        assert code == 0, err[-3000:]
        assert summary["reached_target"] and summary["failovers"] >= 2, summary
        assert summary["lost_acknowledged_pushes"] == {}
    finally:
        cluster.kill()


def _versions(status: dict[str, Any]) -> list[int]:
    shards = [
        m for m in status.get("members", []) if m["role"] == "ROLE_SHARD" and m.get("primary")
    ]
    return [int(m.get("stats", {}).get("version", 0)) for m in shards]


def _backups_alive(status: dict[str, Any]) -> bool:
    shards = [m for m in status.get("members", []) if m["role"] == "ROLE_SHARD"]
    return len(shards) == 4 and all(m.get("state") == "alive" for m in shards)
