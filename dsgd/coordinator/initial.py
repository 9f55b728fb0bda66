"""Where a shard without state starts from: the model's initial parameters, or a checkpoint.

The coordinator holds this and streams it to each shard that registers empty-handed
(``FetchInitialShard``): parameters first, then the optimizer state, if any. Fresh
parameters come from the first worker or evaluator that registers (the coordinator never
loads the model), restored ones from a cluster checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from dsgd.checkpoint import ClusterCheckpoint
from dsgd.config import TrainConfig
from dsgd.errors import CheckpointError
from dsgd.layout import Layout
from dsgd.types import FlatParams, ShardRange


@dataclass
class InitialState:
    """What a shard without state starts from: fresh parameters, or a cluster checkpoint."""

    params: FlatParams
    ranges: tuple[ShardRange, ...]
    versions: list[int]
    opt_state: list[dict[str, FlatParams]]

    @classmethod
    def fresh(cls, params: FlatParams, layout: Layout) -> InitialState:
        """The model's initial parameters (as a member uploaded them), at version 0."""
        return cls(params, layout.ranges, [0] * layout.num_shards, [])

    @classmethod
    def from_checkpoint(cls, ckpt: ClusterCheckpoint, config: TrainConfig) -> InitialState:
        shards = ckpt.shards
        if len(shards) != config.num_shards:
            raise CheckpointError(
                f"checkpoint {ckpt.directory} has {len(shards)} shards; restore it with "
                f"--shards {len(shards)}"
            )
        if shards[0].optimizer != config.optimizer:
            raise CheckpointError(
                f"checkpoint {ckpt.directory} was trained with {shards[0].optimizer}; "
                f"restore it with --optimizer {shards[0].optimizer}"
            )
        return cls(
            np.concatenate([s.params for s in shards]),
            tuple(s.range for s in shards),
            [s.version for s in shards],
            [dict(s.opt_state) for s in shards],
        )

    def arrays(self, shard_id: int) -> dict[str, FlatParams]:
        """The named arrays streamed to shard ``shard_id``: params, then optimizer state."""
        rng = self.ranges[shard_id]
        out = {"params": self.params[rng.start : rng.stop]}
        if self.opt_state:
            out.update({f"opt_state/{k}": v for k, v in self.opt_state[shard_id].items()})
        return out
