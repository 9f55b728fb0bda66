"""Who a cluster is made of: the one list both launchers start from.

The supervisor (``scripts/start_cluster.sh``) turns each :class:`Member` into a command
line, :func:`dsgd.train` into a thread; building the list in one place keeps the two
from drifting apart (a replicated range started as R processes by one and as one by the
other, say). The coordinator is not in the list: it is started first, and the members
are started once its address is known.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from pathlib import Path

from dsgd.config import TrainConfig


class MemberRole(enum.Enum):
    """What a member runs; the value is its role's name (``python -m dsgd.<value>``)."""

    SHARD = "shard"
    EVALUATOR = "evaluator"
    WORKER = "worker"


@dataclass(frozen=True)
class Member:
    """One process (or in-process thread) of a cluster, other than the coordinator.

    ``name`` identifies it to people and tools: its log file, its thread, its entry in
    the supervisor's ``pids.json``: ``shard0`` (``shard0-r1`` for replica 1 of a
    replicated range), ``evaluator``, ``worker3``.
    """

    name: str
    role: MemberRole
    shard_id: int = -1  # a shard's range
    replica: int = 0  # which of its range's processes a shard is (0..replicas-1)
    worker_id: int = -1  # a worker's slot (its data partition)
    # a replicated shard's directory under the cluster's checkpoint directory: two
    # processes of one range must not write the same files ("": the directory itself)
    checkpoint_subdir: str = ""

    def checkpoint_dir(self, base: Path) -> Path:
        """Where this shard checkpoints and restores from, given the cluster's directory."""
        return base / self.checkpoint_subdir if self.checkpoint_subdir else base


def cluster_members(config: TrainConfig) -> list[Member]:
    """The members ``config`` asks for, in the order they start: every range's shard
    processes (``replicas`` of them), the evaluator if there is one, then the workers."""
    replicated = config.replicas > 1
    members = [
        Member(
            name=f"shard{shard_id}" + (f"-r{replica}" if replicated else ""),
            role=MemberRole.SHARD,
            shard_id=shard_id,
            replica=replica,
            checkpoint_subdir=f"replica{replica}" if replicated else "",
        )
        for shard_id in range(config.num_shards)
        for replica in range(config.replicas)
    ]
    if config.evaluator:
        members.append(Member(name="evaluator", role=MemberRole.EVALUATOR))
    members += [
        Member(name=f"worker{k}", role=MemberRole.WORKER, worker_id=k)
        for k in range(config.num_workers)
    ]
    return members
