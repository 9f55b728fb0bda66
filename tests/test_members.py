"""The member list both launchers start from (dsgd/members.py), and the supervisor's
command lines made from it."""

from __future__ import annotations

from pathlib import Path

from dsgd.config import TrainConfig
from dsgd.members import Member, MemberRole, cluster_members
from dsgd.supervisor import Supervisor

MLP = "dsgd.examples.digits:digits_mlp"


def test_an_unreplicated_cluster_is_one_process_per_range_then_evaluator_then_workers() -> None:
    members = cluster_members(TrainConfig(model=MLP, num_workers=3, num_shards=2))
    assert members == [
        Member("shard0", MemberRole.SHARD, shard_id=0),
        Member("shard1", MemberRole.SHARD, shard_id=1),
        Member("evaluator", MemberRole.EVALUATOR),
        Member("worker0", MemberRole.WORKER, worker_id=0),
        Member("worker1", MemberRole.WORKER, worker_id=1),
        Member("worker2", MemberRole.WORKER, worker_id=2),
    ]
    assert members[0].checkpoint_dir(Path("ckpt")) == Path("ckpt")


def test_a_replicated_range_is_replicas_processes_each_with_its_own_checkpoints() -> None:
    config = TrainConfig(model=MLP, num_workers=1, num_shards=2, replicas=2, evaluator=False)
    members = cluster_members(config)
    shards = [m for m in members if m.role is MemberRole.SHARD]
    assert [(m.name, m.shard_id, m.replica) for m in shards] == [
        ("shard0-r0", 0, 0),
        ("shard0-r1", 0, 1),
        ("shard1-r0", 1, 0),
        ("shard1-r1", 1, 1),
    ]
    assert [m.checkpoint_dir(Path("ckpt")) for m in shards] == [
        Path("ckpt/replica0"),
        Path("ckpt/replica1"),
    ] * 2
    assert [m.name for m in members if m.role is not MemberRole.SHARD] == ["worker0"]
    assert len({m.name for m in members}) == len(members)


def test_the_supervisor_starts_each_member_with_its_own_options(tmp_path: Path) -> None:
    config = TrainConfig(model=MLP, num_workers=1, num_shards=1, replicas=2)
    supervisor = Supervisor(config, tmp_path / "run", checkpoint_dir=tmp_path / "ckpt")
    supervisor.coordinator_address = "127.0.0.1:5000"
    argv = {m.name: supervisor.member_argv(m)[1:] for m in cluster_members(config)}
    join = ["--coordinator", "127.0.0.1:5000"]
    assert argv == {
        "shard0-r0": ["-m", "dsgd.shard", *join, "--shard-id", "0", "--replica", "0"]
        + ["--checkpoint-dir", str(tmp_path / "ckpt" / "replica0")],
        "shard0-r1": ["-m", "dsgd.shard", *join, "--shard-id", "0", "--replica", "1"]
        + ["--checkpoint-dir", str(tmp_path / "ckpt" / "replica1")],
        "evaluator": ["-m", "dsgd.evaluator", *join],
        "worker0": ["-m", "dsgd.worker", *join, "--worker-id", "0"],
    }
