"""The coordinator's decisions, called directly (no network): admission after a restart,
the run's clock, failover, and the accounting of pushes lost to shard restarts."""

from __future__ import annotations

import time
from typing import Any

import pytest

from dsgd import wire
from dsgd.config import TrainConfig
from dsgd.control import layout_message
from dsgd.coordinator.core import Coordinator
from dsgd.examples.digits import digits_mlp
from dsgd.model import CompiledModel
from dsgd.proto import control_pb2 as pb

MODEL = "dsgd.examples.digits:digits_mlp"


@pytest.fixture(scope="module")
def compiled() -> CompiledModel:
    return CompiledModel(digits_mlp(), num_shards=2)


def _shard(
    coordinator: Coordinator,
    compiled: CompiledModel,
    shard_id: int,
    incarnation: int,
    *,
    version: int = 0,
    lineage: tuple[tuple[int, int], ...] = (),
    replica: int = 0,
) -> pb.RegisterShardReply:
    endpoint = pb.ShardEndpoint(
        data_address=f"tcp://127.0.0.1:{5000 + 10 * shard_id + replica}",
        pub_address=f"tcp://127.0.0.1:{6000 + 10 * shard_id + replica}",
        incarnation=incarnation,
    )
    return coordinator.register_shard(
        pb.RegisterShardRequest(
            shard_id=shard_id,
            endpoint=endpoint,
            layout_fingerprint=compiled.layout.fingerprint if version else 0,
            version=version,
            protocol_version=wire.PROTOCOL_VERSION,
            replica=replica,
            lineage=[pb.Incarnation(incarnation=i, started_from=v) for i, v in lineage],
        )
    )


def _worker(
    coordinator: Coordinator, compiled: CompiledModel, worker_id: int, incarnation: int
) -> pb.RegisterWorkerReply:
    return coordinator.register_worker(
        pb.RegisterWorkerRequest(
            worker_id=worker_id,
            layout_fingerprint=compiled.layout.fingerprint,
            protocol_version=wire.PROTOCOL_VERSION,
            incarnation=incarnation,
            layout=layout_message(compiled.layout),
        )
    )


def _beat(coordinator: Coordinator, role: Any, member_id: int, incarnation: int, **stats: Any):
    return coordinator.heartbeat(
        pb.HeartbeatRequest(
            role=role, id=member_id, incarnation=incarnation, stats=pb.MemberStats(**stats)
        )
    )


def test_at_the_start_workers_wait_for_the_evaluators_first_read(compiled: CompiledModel) -> None:
    coordinator = Coordinator(TrainConfig(model=MODEL))
    coordinator.describe_model(layout_message(compiled.layout))
    coordinator.accept_initial(compiled.layout.fingerprint, compiled.initial_flat())
    assert _shard(coordinator, compiled, 0, 10).ready
    assert _shard(coordinator, compiled, 1, 11).ready
    _beat(coordinator, pb.ROLE_SHARD, 0, 10)
    _beat(coordinator, pb.ROLE_SHARD, 1, 11)
    reply = _worker(coordinator, compiled, 0, 20)
    assert not reply.ready and "evaluator to read" in reply.waiting_for


def test_a_restarted_coordinator_admits_workers_without_the_evaluator(
    compiled: CompiledModel,
) -> None:
    """Mid-run, the shards hold state newer than the start: workers that register again
    get in as soon as every shard is back, whatever the evaluator is doing (it may itself
    be waiting on a shard that moved)."""
    coordinator = Coordinator(TrainConfig(model=MODEL))
    # the first worker to come back describes the model and is asked for initial values
    first = _worker(coordinator, compiled, 0, 20)
    assert not first.ready and first.send_initial
    # shard 1 comes back with its state; shard 0 is not back yet: workers wait for it
    assert _shard(coordinator, compiled, 1, 11, version=700).ready
    waiting = _worker(coordinator, compiled, 0, 20)
    assert not waiting.ready and "shard 0" in waiting.waiting_for
    assert _shard(coordinator, compiled, 0, 12, version=650).ready
    for member_id, incarnation in ((0, 12), (1, 11)):
        _beat(coordinator, pb.ROLE_SHARD, member_id, incarnation)
    reply = _worker(coordinator, compiled, 0, 20)
    assert reply.ready and reply.worker_id == 0
    addresses = {e.shard_id: e.data_address for e in reply.shards}
    assert addresses == {0: "tcp://127.0.0.1:5000", 1: "tcp://127.0.0.1:5010"}
    assert coordinator.waiting_for().startswith("1 of 2 workers")


def test_a_restarted_coordinator_keeps_the_runs_clock() -> None:
    coordinator = Coordinator(TrainConfig(model=MODEL, max_seconds=300.0), run_age=120.0)
    assert coordinator.status().elapsed_seconds >= 120.0
    # ... but knows it just started: members may still be registering again
    assert time.monotonic() - coordinator.booted < 5.0


def test_lost_pushes_are_counted_from_the_lineage_shards_report(compiled: CompiledModel) -> None:
    """Shard 0's first process (incarnation 100) acknowledged up to version 450 and died;
    its successor (200) started from the checkpoint at 300; then the coordinator
    restarted. The new coordinator learns both from the successor's registration and the
    workers' heartbeats: 150 acknowledged pushes lost, counted once however often the
    shard registers."""
    coordinator = Coordinator(TrainConfig(model=MODEL, evaluator=False))
    coordinator.describe_model(layout_message(compiled.layout))
    lineage = ((100, 0), (200, 300))
    assert _shard(coordinator, compiled, 0, 200, version=900, lineage=lineage).ready
    assert _shard(coordinator, compiled, 1, 300, version=880).ready
    for member_id, incarnation in ((0, 200), (1, 300)):
        _beat(coordinator, pb.ROLE_SHARD, member_id, incarnation)
    assert _worker(coordinator, compiled, 0, 20).ready
    acked = {"acked_shard0_100": 450.0, "acked_shard0_200": 900.0, "acked_shard1_300": 880.0}
    _beat(coordinator, pb.ROLE_WORKER, 0, 20, counters=acked)
    assert coordinator.lost_pushes() == {0: 150}
    # registering again (another coordinator restart, say) counts nothing twice
    assert _shard(coordinator, compiled, 0, 200, version=950, lineage=lineage).ready
    assert coordinator.lost_pushes() == {0: 150}
    assert coordinator.status().lost_pushes == {0: 150}


def test_a_first_registration_starts_from_what_the_coordinator_gives(
    compiled: CompiledModel,
) -> None:
    """A process that does not know its start yet (-1: no checkpoint) starts from the
    coordinator's initial values: its predecessor's acknowledged pushes are all lost."""
    coordinator = Coordinator(TrainConfig(model=MODEL, evaluator=False))
    coordinator.describe_model(layout_message(compiled.layout))
    coordinator.accept_initial(compiled.layout.fingerprint, compiled.initial_flat())
    reply = _shard(coordinator, compiled, 0, 200, lineage=((100, 0), (200, -1)))
    assert reply.ready and reply.send_initial
    assert _shard(coordinator, compiled, 1, 300).ready
    for member_id, incarnation in ((0, 200), (1, 300)):
        _beat(coordinator, pb.ROLE_SHARD, member_id, incarnation)
    assert _worker(coordinator, compiled, 0, 20).ready
    _beat(coordinator, pb.ROLE_WORKER, 0, 20, counters={"acked_shard0_100": 75.0})
    assert coordinator.lost_pushes() == {0: 75}


def test_a_silent_primary_is_replaced_by_a_caught_up_backup_but_not_after_the_run(
    compiled: CompiledModel,
) -> None:
    config = TrainConfig(model=MODEL, num_shards=2, replicas=2, evaluator=False)
    for done in (False, True):
        coordinator = Coordinator(config)
        coordinator.describe_model(layout_message(compiled.layout))
        coordinator.accept_initial(compiled.layout.fingerprint, compiled.initial_flat())
        assert not _shard(coordinator, compiled, 0, 100).HasField("primary")
        assert _shard(coordinator, compiled, 0, 101, replica=1).primary.incarnation == 100
        coordinator.heartbeat(
            pb.HeartbeatRequest(
                role=pb.ROLE_SHARD, id=0, incarnation=101, replica=1, joins=1, caught_up=True
            )
        )
        coordinator.heartbeat(
            pb.HeartbeatRequest(
                role=pb.ROLE_SHARD,
                id=0,
                incarnation=100,
                chain=[pb.ChainMember(replica=1, incarnation=101, joins=1)],
            )
        )
        if done:
            coordinator.finish("test over")
        coordinator.shards[0].last_seen -= config.heartbeat_timeout + 1
        reply = coordinator.heartbeat(
            pb.HeartbeatRequest(
                role=pb.ROLE_SHARD, id=0, incarnation=101, replica=1, joins=1, caught_up=True
            )
        )
        if done:  # primaries leave at the end of the run: no failover then
            assert coordinator.failovers == 0 and not reply.primary
        else:
            assert coordinator.failovers == 1 and reply.primary
            assert coordinator.shards[0].incarnation == 101


def test_a_worker_that_leaves_before_registering_again_still_counts(
    compiled: CompiledModel,
) -> None:
    """The coordinator restarted while the workers were taking their last steps: a worker
    whose goodbye is the first this coordinator hears of it is kept with its final numbers,
    so the step budget ends the run instead of waiting for it to register."""
    coordinator = Coordinator(TrainConfig(model=MODEL, num_workers=2, max_steps=50))
    coordinator.describe_model(layout_message(compiled.layout))
    for shard_id, incarnation in ((0, 10), (1, 11)):
        assert _shard(coordinator, compiled, shard_id, incarnation, version=400).ready
    for worker_id, incarnation in ((0, 20), (1, 21)):
        reply = coordinator.heartbeat(
            pb.HeartbeatRequest(
                role=pb.ROLE_WORKER,
                id=worker_id,
                incarnation=incarnation,
                leaving=True,
                stats=pb.MemberStats(step=50, counters={"acked_shard0_10": 400.0}),
            )
        )
    assert reply.reregister  # (it is gone: nothing comes of it)
    assert coordinator.done and "step budget" in coordinator.done_reason
    assert coordinator.acked[(0, 10)] == 400
