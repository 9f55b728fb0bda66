"""The worker's replica: its counters, and following a replicated shard whose primary died
to the backup promoted in its place, over real sockets on 127.0.0.1."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
import zmq.asyncio

from dsgd import wire
from dsgd.config import TrainConfig
from dsgd.examples.digits import digits_mlp
from dsgd.model import CompiledModel
from dsgd.optim import SGD
from dsgd.shard.core import ShardCore, ShardState
from dsgd.shard.replication import Chain
from dsgd.shard.server import ShardServer
from dsgd.types import ShardInfo
from dsgd.worker.replica import Replica, WorkerCounters
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
