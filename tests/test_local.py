"""``dsgd.train``'s in-process cluster (dsgd/local.py): it runs the members the supervisor
would (replicated ranges included), honours or refuses every TrainConfig field, and a
replicated range survives a primary killed abruptly."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest

import dsgd
from dsgd import checkpoint
from dsgd.config import TrainConfig
from dsgd.control import blocking_channel
from dsgd.errors import ConfigError
from dsgd.examples.digits import digits_mlp
from dsgd.local import LocalCluster
from dsgd.proto import control_pb2 as pb
from dsgd.proto import control_pb2_grpc as pb_grpc

MLP = "dsgd.examples.digits:digits_mlp"


@pytest.mark.parametrize(
    ("keywords", "refused"),
    [
        ({"data": "/data/digits"}, "data are arguments of a model factory"),
        ({"model_args": "hidden=64"}, "model_args are arguments of a model factory"),
        ({"checkpoint_every": 1.0}, "checkpoint_every=1.0: an in-process cluster"),
        ({"checkpoint_keep": 5}, "checkpoint_keep=5: an in-process cluster"),
    ],
)
def test_a_field_the_in_process_cluster_would_not_honour_is_refused(
    keywords: dict[str, object], refused: str
) -> None:
    with pytest.raises(ConfigError, match=refused):
        dsgd.train(digits_mlp(), num_workers=1, num_shards=1, **keywords)


def test_sizes_left_out_are_the_configs() -> None:
    config = TrainConfig(model=MLP, num_workers=1, num_shards=3, max_steps=5, target="none")
    result = dsgd.train(digits_mlp(), config=config, evaluator=False)
    assert result.summary["workers"] == 1 and result.summary["shards"] == 3


def test_shards_checkpoint_to_checkpoint_dir_and_a_second_run_resumes_there(
    tmp_path: Path,
) -> None:
    def run() -> dict[str, object]:
        return dsgd.train(
            MLP,
            num_workers=1,
            num_shards=1,
            replicas=2,
            max_steps=20,
            target="none",
            evaluator=False,
            checkpoint_dir=tmp_path,
            checkpoint_every=0.5,
        ).summary

    first = run()
    assert first["shard_versions"] == [20]
    for replica in (0, 1):  # each replica of the range in its own directory
        saved = checkpoint.scan_latest(tmp_path / f"replica{replica}", 0).checkpoint
        assert saved is not None and saved.version == 20
    assert run()["shard_versions"] == [40]


def test_a_replicated_range_survives_its_primary_killed_abruptly() -> None:
    """replicas=2 really runs two shard threads per range: kill shard 0's primary
    mid-run as SIGKILL would (no goodbye, sockets closed at once); its backup takes over,
    the run spends its step budget, and no acknowledged update is lost."""
    budget = 600
    config = TrainConfig(
        model="digits-mlp:<in-process>",
        num_workers=1,
        num_shards=2,
        replicas=2,
        max_steps=budget,
        target="none",
        max_seconds=240,
    )
    cluster = LocalCluster(digits_mlp(), config)
    cluster.start()
    try:
        status = _wait_for(
            cluster.address,
            "training, every backup caught up",
            lambda s: min(_versions(s), default=0) >= 100 and _promotable(s) == 2,
        )
        assert not status.done, "the run ended before the kill: raise the step budget"
        primary = next(m for m in _shards(status) if m.primary and m.id == 0)
        cluster.crash(f"shard0-r{primary.replica}")
        result = cluster.wait()
    finally:
        cluster.close()
    summary = result.summary
    assert summary["steps"] == budget, summary
    assert summary["failovers"] >= 1, summary
    assert summary["lost_acknowledged_pushes"] == {}, summary
    assert summary["shard_versions"] == [budget, budget], summary  # every push applied once


def _wait_for(
    address: str, what: str, done: Callable[[pb.ClusterStatus], bool], timeout: float = 120.0
) -> pb.ClusterStatus:
    channel = blocking_channel(address)
    try:
        stub = pb_grpc.CoordinatorStub(channel)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                status = stub.Status(pb.StatusRequest(), timeout=5.0)
            except grpc.RpcError:
                status = None
            if status is not None and done(status):
                return status
            time.sleep(0.05)
    finally:
        channel.close()
    raise AssertionError(f"no {what} within {timeout:.0f} s")


def _shards(status: pb.ClusterStatus) -> list[pb.MemberStatus]:
    return [m for m in status.members if m.role == pb.ROLE_SHARD]


def _versions(status: pb.ClusterStatus) -> list[int]:
    return [m.stats.version for m in _shards(status) if m.primary]


def _promotable(status: pb.ClusterStatus) -> int:
    return sum(1 for m in _shards(status) if m.promotable and m.state == "alive")
