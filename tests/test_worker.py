"""The worker's replica and heartbeats over real sockets on 127.0.0.1: its counters,
following a replicated shard whose primary died to the backup promoted in its place, a
restarted unreplicated shard to its new process, and a restarted coordinator back in."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
import zmq.asyncio

from dsgd import wire
from dsgd.config import TrainConfig
from dsgd.control import CoordinatorLink, layout_message
from dsgd.errors import Closed
from dsgd.examples.digits import digits_mlp
from dsgd.model import CompiledModel
from dsgd.optim import SGD
from dsgd.proto import control_pb2 as pb
from dsgd.shard.client import ShardClient
from dsgd.shard.core import ShardCore, ShardState
from dsgd.shard.replication import Chain
from dsgd.shard.server import ShardServer
from dsgd.types import ShardInfo
from dsgd.worker.process import _heartbeats
from dsgd.worker.replica import Replica, WorkerCounters
from tests.conftest import serve_coordinator
from tests.test_replication import _confirm, _join

# the names a worker's heartbeat carries: dashboards, reports and benchmarks read them
WORKER_COUNTERS = {
    "pushes",
    "bytes_pushed",
    "bytes_pushed_dense_equivalent",
    "values_pushed",
    "bytes_fetched",
    "bytes_fetched_dense_equivalent",
    "fetches",
    "fetches_skipped",
    "fetches_failed",
    "fetches_unavailable",
    "pushes_deferred",
    "values_given_back",
    "chunks_rejected",
    "chunks_resent",
    "values_unpushed",
    "nonfinite_updates",
    "gradient_seconds",
    "exchange_seconds",
}
CHUNK = 4096  # the smallest chunk --chunk-bytes allows: a push of the digits MLP in several


def test_the_worker_counters_refuse_a_name_they_do_not_have() -> None:
    counters = WorkerCounters()
    with pytest.raises(AttributeError):
        counters.chunks_resnt += 1  # type: ignore[attr-defined]
    counters.chunks_resent += 3
    counters.gradient_seconds += 0.5
    flat = counters.as_dict()
    assert set(flat) == WORKER_COUNTERS
    assert flat["chunks_resent"] == 3.0 and flat["gradient_seconds"] == 0.5
    assert all(type(v) is float for v in flat.values())


async def test_a_promoted_backup_gets_the_unacknowledged_chunks_and_they_are_counted(
    zmq_ctx: zmq.asyncio.Context,
) -> None:
    """The primary applies a push but holds its ACKs (its backup never confirms), then dies;
    the worker follows the range to the promoted backup, which holds what the primary
    applied and its books. Every chunk is resent as it was, counted in ``chunks_resent``,
    and answered DUPLICATE: nothing is applied twice."""
    compiled = CompiledModel(digits_mlp(), num_shards=1)
    size, fingerprint = compiled.layout.size, compiled.layout.fingerprint
    config = TrainConfig(
        model="dsgd.examples.digits:digits_mlp", num_shards=1, replicas=2, chunk_bytes=CHUNK
    )
    opt = SGD(0.5)
    state = ShardState(compiled.initial_flat().copy(), opt.init(size))
    primary = ShardServer(ShardCore(0, fingerprint, opt, state, chunk_bytes=CHUNK))
    primary.chain = Chain()
    await primary.start_serving()
    backup = zmq_ctx.socket(zmq.DEALER)
    backup.connect(primary.data_address)
    shard = ShardInfo(0, primary.data_address, primary.pub_address, 0, size)
    replica = Replica(compiled, config, 3, 0, 1, [shard], zmq_ctx)
    promoted: ShardServer | None = None
    template = wire.Header(kind=wire.PUSH, fingerprint=fingerprint, shard=0)
    chunks = len(list(wire.dense_chunks(template, np.zeros(size, np.float32), CHUNK)))
    assert chunks > 1
    try:
        await _join(backup, fingerprint=fingerprint)
        await backup.send(_confirm(0, fingerprint))  # installed: every ACK now waits for it
        async with replica:
            replica.encoders[0].accumulate(np.ones(size, np.float32), 0)
            await replica.push()
            forwarded = 0
            while forwarded < chunks:  # the primary forwards each chunk once it applied it
                frames = await asyncio.wait_for(backup.recv_multipart(), 10.0)
                forwarded += wire.unpack_header(frames[0]).kind == wire.REPLICATE  # (or a probe)
            assert primary.core.counters.updates_applied == chunks
            assert replica.clients[0].inflight == 1  # applied, never acknowledged
            # the backup was caught up: it holds what the primary applied, and its books
            core = primary.core
            taken_over = ShardState(core.state.params.copy(), {}, core.state.version)
            promoted_core = ShardCore(0, fingerprint, opt, taken_over, chunk_bytes=CHUNK)
            promoted_core.import_books(core.export_books())
            await primary.aclose()
            promoted = ShardServer(promoted_core)
            await promoted.start_serving()
            moved = shard._replace(
                data_address=promoted.data_address, pub_address=promoted.pub_address
            )
            await replica.update_endpoints([moved])
            assert replica.counters.chunks_resent == chunks
            assert replica.stats()["counters"]["chunks_resent"] == float(chunks)
            await replica.drain()
            assert replica.clients[0].inflight == 0
        assert promoted_core.counters.duplicates == chunks
        assert promoted_core.counters.updates_applied == 0 and promoted_core.state.version == 1
        assert replica.counters.values_given_back == 0  # every chunk was acknowledged
    finally:
        backup.close(linger=0)
        await primary.aclose()
        if promoted is not None:
            await promoted.aclose()


async def test_a_restarted_shard_gets_a_new_link_and_nothing_acknowledged_is_forgotten(
    zmq_ctx: zmq.asyncio.Context,
) -> None:
    """Unreplicated: shard 0 dies with a push unacknowledged and comes back (a new process,
    new ports, from its checkpoint). The worker connects to it anew; what the dead process
    never acknowledged is back in the residual, pushed to the new one; and the versions the
    dead process did acknowledge are still reported (the coordinator counts what its
    restart lost from them)."""
    compiled = CompiledModel(digits_mlp(), num_shards=1)
    size, fingerprint = compiled.layout.size, compiled.layout.fingerprint
    config = TrainConfig(model="dsgd.examples.digits:digits_mlp", num_shards=1)
    opt = SGD(0.5)

    def serve() -> ShardServer:
        state = ShardState(compiled.initial_flat().copy(), opt.init(size))
        return ShardServer(ShardCore(0, fingerprint, opt, state))

    first, second = serve(), serve()
    await first.start_serving()
    shard = ShardInfo(0, first.data_address, first.pub_address, 0, size)
    replica = Replica(compiled, config, 1, 0, 1, [shard], zmq_ctx)
    try:
        async with replica:
            replica.encoders[0].accumulate(np.ones(size, np.float32), 0)
            await replica.push()
            await replica.drain()
            dead = first.core.incarnation & 0xFFFFFFFF
            assert replica.stats()["counters"][f"acked_shard0_{dead}"] == 1.0
            first.core.primary = False  # it refuses pushes from now on: never acknowledged
            replica.encoders[0].accumulate(np.full(size, 2.0, np.float32), 0)
            await replica.push()
            await first.aclose()
            await second.start_serving()
            moved = shard._replace(data_address=second.data_address, pub_address=second.pub_address)
            await replica.update_endpoints([moved])
            assert replica.clients[0].data_address == second.data_address
            assert replica.held_versions == [-1]  # fetched afresh from the new process
            residual = replica.encoders[0].residual
            np.testing.assert_array_equal(residual, np.full(size, 2.0, np.float32))
            await replica.push()
            await replica.drain()
            assert second.core.counters.values_applied == size
            counters = replica.stats()["counters"]
            assert counters[f"acked_shard0_{dead}"] == 1.0  # the closed link's, kept
            assert counters[f"acked_shard0_{second.core.incarnation & 0xFFFFFFFF}"] == 1.0
    finally:
        await first.aclose()
        await second.aclose()


async def test_after_a_coordinator_restart_the_worker_gets_back_in_and_follows_a_moved_shard(
    zmq_ctx: zmq.asyncio.Context,
) -> None:
    """The worker's heartbeats against a coordinator that restarted (it knows nobody) while
    shard 0 restarted elsewhere: the worker registers again in its own slot and moves to
    where the new coordinator says shard 0 now serves."""
    compiled = CompiledModel(digits_mlp(), num_shards=1)
    size, fingerprint = compiled.layout.size, compiled.layout.fingerprint
    config = TrainConfig(
        model="dsgd.examples.digits:digits_mlp", num_shards=1, num_workers=2, max_seconds=60
    )
    opt = SGD(0.5)
    state = ShardState(compiled.initial_flat().copy(), opt.init(size), version=40)
    old = ShardServer(ShardCore(0, fingerprint, opt, state))
    moved = ShardServer(ShardCore(0, fingerprint, opt, state))
    await old.start_serving()
    await moved.start_serving()
    stop = asyncio.Event()
    async with serve_coordinator(config) as (coordinator, address):
        # the restarted coordinator hears from shard 0 at its new address, holding state
        coordinator.describe_model(layout_message(compiled.layout))
        reply = coordinator.register_shard(
            pb.RegisterShardRequest(
                shard_id=0,
                endpoint=pb.ShardEndpoint(
                    data_address=moved.data_address,
                    pub_address=moved.pub_address,
                    incarnation=moved.core.incarnation,
                ),
                layout_fingerprint=fingerprint,
                version=40,
                protocol_version=wire.PROTOCOL_VERSION,
            )
        )
        assert reply.ready
        coordinator.heartbeat(
            pb.HeartbeatRequest(role=pb.ROLE_SHARD, id=0, incarnation=moved.core.incarnation)
        )
        shard = ShardInfo(0, old.data_address, old.pub_address, 0, size)
        replica = Replica(compiled, config, 1, 1, 2, [shard], zmq_ctx)
        request = pb.RegisterWorkerRequest(
            worker_id=1,
            layout_fingerprint=fingerprint,
            protocol_version=wire.PROTOCOL_VERSION,
            incarnation=replica.incarnation,
            layout=layout_message(compiled.layout),
        )
        link = CoordinatorLink(address, give_up_after=10.0, stop=stop)
        try:
            async with replica:
                beats = asyncio.create_task(_heartbeats(link, replica, request, config, stop))
                deadline = asyncio.get_running_loop().time() + 20.0
                while replica.clients[0].data_address != moved.data_address:
                    assert asyncio.get_running_loop().time() < deadline, "never followed"
                    await asyncio.sleep(0.05)
                stop.set()
                await asyncio.wait_for(beats, 10.0)
        finally:
            stop.set()
            await link.aclose()
            await old.aclose()
            await moved.aclose()
    member = coordinator.workers[1]
    assert member.incarnation == replica.incarnation and coordinator.training_began


async def test_a_fetch_the_dead_primary_never_answered_fails_at_the_retarget(
    zmq_ctx: zmq.asyncio.Context,
) -> None:
    """A fetch sent to a primary that died is not left to wait out the fetch timeout (it
    stalled a worker 10 s per failover): the retarget fails it, and a fetch from the new
    primary returns its parameters."""
    compiled = CompiledModel(digits_mlp(), num_shards=1)
    size, fingerprint = compiled.layout.size, compiled.layout.fingerprint
    mute = zmq_ctx.socket(zmq.ROUTER)  # takes requests, answers none: a dead process
    port = mute.bind_to_random_port("tcp://127.0.0.1")
    opt = SGD(0.5)
    state = ShardState(compiled.initial_flat().copy(), opt.init(size), version=7)
    promoted = ShardServer(ShardCore(0, fingerprint, opt, state))
    await promoted.start_serving()
    client = ShardClient(
        0,
        f"tcp://127.0.0.1:{port}",
        promoted.pub_address,
        fingerprint,
        1,
        zmq_ctx,
        fetch_timeout=600.0,
        replicated=True,
    )
    dest = np.zeros(size, np.float32)
    try:
        await client.start()
        waiting = asyncio.create_task(client.fetch(dest))
        await asyncio.wait_for(mute.recv_multipart(), 10.0)  # the request reached it
        await client.retarget(promoted.data_address, promoted.pub_address)
        with pytest.raises(Closed, match="moved"):
            await asyncio.wait_for(waiting, 10.0)
        version, _ = await asyncio.wait_for(client.fetch(dest), 10.0)
        assert version == 7
        np.testing.assert_array_equal(dest, compiled.initial_flat())
    finally:
        await client.aclose()
        await promoted.aclose()
        mute.close(linger=0)
