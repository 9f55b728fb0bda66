"""A live shard over real ZeroMQ sockets on 127.0.0.1: apply, acknowledge, fetch, reject."""

from __future__ import annotations

import asyncio
import time
from dataclasses import replace
from typing import Any

import msgpack
import numpy as np
import pytest
import zmq.asyncio

from dsgd import wire
from dsgd.shard.client import PushResult, ShardClient
from dsgd.shard.core import ShardCore
from dsgd.shard.server import ShardServer
from tests.conftest import FINGERPRINT, make_shard


class Harness:
    """A shard being served, and a client (worker 7) talking to it."""

    def __init__(self, served: ShardServer, client: ShardClient) -> None:
        self.served, self.client = served, client
        self.server: ShardCore = served.core  # what the shard holds and counted
        self.done: dict[int, PushResult] = {}

    def on_done(self, result: PushResult) -> None:
        self.done[result.seq] = result

    def header(self, seq: int, base_version: int = 0, **kw: Any) -> wire.Header:
        fields = dict(kind=wire.PUSH, fingerprint=FINGERPRINT, shard=0, worker=7, seq=seq)
        fields.update(base_version=base_version, **kw)
        return wire.Header(**fields)

    async def push_dense(self, seq: int, values: np.ndarray, base_version: int = 0) -> list[Any]:
        chunks = list(wire.dense_chunks(self.header(seq, base_version), values, 1 << 14))
        assert await self.client.push(seq, chunks, self.on_done, permit_timeout=5.0)
        async with asyncio.timeout(10):
            await self.client.drain()
        return self.done[seq].statuses

    async def send_raw(self, frames: list[Any]) -> None:
        assert self.client._dealer is not None
        await self.client._dealer.send(frames)

    async def fetch(self) -> np.ndarray:
        dest = np.empty(self.server.state.params.size, np.float32)
        await self.client.fetch(dest)
        return dest


@pytest.fixture
async def harness(zmq_ctx: zmq.asyncio.Context, request: pytest.FixtureRequest):
    kwargs = getattr(request, "param", {})
    server = await make_shard(**kwargs)
    client = ShardClient(0, server.data_address, server.pub_address, FINGERPRINT, 7, zmq_ctx)
    await client.start()
    yield Harness(server, client)
    assert server.serving  # nothing a test sent crashed it
    await client.aclose()
    await server.aclose()


async def test_fetch_returns_the_range(harness: Harness) -> None:
    np.testing.assert_array_equal(await harness.fetch(), harness.server.state.params)


async def test_dense_push_applies_sgd_and_is_acknowledged(harness: Harness) -> None:
    before = harness.server.state.params.copy()
    grad = np.random.default_rng(1).standard_normal(before.size).astype(np.float32)
    statuses = await harness.push_dense(1, grad)
    assert statuses == ["applied"] * len(statuses) and len(statuses) > 1
    np.testing.assert_allclose(harness.server.state.params, before - np.float32(0.1) * grad)
    assert harness.server.state.version == 1  # the version counts pushes, not chunks
    np.testing.assert_array_equal(await harness.fetch(), harness.server.state.params)


async def test_duplicate_and_reordered_chunks_apply_exactly_once(harness: Harness) -> None:
    before = harness.server.state.params.copy()
    grad = np.ones(before.size, np.float32)
    messages = [c.frames for c in wire.dense_chunks(harness.header(5), grad, 1 << 14)]
    for frames in [*reversed(messages), *messages]:  # out of order, then all again
        await harness.send_raw([bytes(f) for f in frames])
    fresh = await harness.fetch()  # served after every chunk above (same socket, in order)
    np.testing.assert_allclose(fresh, before - np.float32(0.1))
    assert harness.server.counters.duplicates == len(messages)
    assert harness.server.state.version == 1


async def test_a_burst_of_chunks_is_acknowledged_by_fewer_messages_covering_each_once(
    harness: Harness, zmq_ctx: zmq.asyncio.Context
) -> None:
    """Chunks queued before the shard reads them are answered at the end of its batch,
    one ACK per run of consecutive chunks, and every chunk is covered exactly once."""
    before = harness.server.state.params.copy()
    grad = np.ones(before.size, np.float32)
    chunks = list(wire.dense_chunks(harness.header(9), grad, 1 << 12))  # 10 chunks
    peer = zmq_ctx.socket(zmq.DEALER)
    peer.setsockopt(zmq.LINGER, 0)
    peer.connect(harness.served.data_address)
    try:
        order = [*range(len(chunks) - 1, 5, -1), *range(6)]  # two runs, out of order
        for i in order:
            await peer.send_multipart(chunks[i].frames)
        # block the loop, and the shard in it, so that every chunk queues up
        time.sleep(0.5)  # noqa: ASYNC251
        covered: list[int] = []
        acks = 0
        async with asyncio.timeout(10):
            while len(covered) < len(chunks):
                ack = wire.unpack_header(await peer.recv())
                assert ack.kind == wire.ACK and ack.status == "applied"
                covered += wire.acked_chunks(ack)
                acks += 1
    finally:
        peer.close()
    assert sorted(covered) == list(range(len(chunks)))
    assert acks < len(chunks)
    np.testing.assert_allclose(harness.server.state.params, before - np.float32(0.1))


def _frames(header: wire.Header, values: bytes, **changes: Any) -> list[bytes]:
    return [wire.pack_header(replace(header, **changes)), values]


NAN = np.full(16, np.nan, np.float32).tobytes()
INF = np.full(16, -np.inf, np.float32).tobytes()


@pytest.mark.parametrize(
    "mutate, counter",
    [
        (lambda h, v: [b"\xc1garbage", v], "malformed"),
        (lambda h, v: [msgpack.packb([1, 2, 3]), v], "malformed"),
        (lambda h, v: [wire.pack_header(h), v[:-4]], "malformed"),
        (lambda h, v: [wire.pack_header(h)], "malformed"),
        (lambda h, v: _frames(h, v, protocol=99), "malformed"),
        (lambda h, v: _frames(h, v, fingerprint=FINGERPRINT + 1), "layout"),
        (lambda h, v: _frames(h, v, shard=3), "layout"),
        (lambda h, v: _frames(h, v, offset=10_000 - 8), "range"),
        (lambda h, v: _frames(h, NAN), "nonfinite"),
        (lambda h, v: _frames(h, INF), "nonfinite"),
        (lambda h, v: _frames(h, v, worker=-3), "worker"),
        (lambda h, v: _frames(h, b"", kind=wire.PARAMS, count=0), "kind"),
    ],
)
async def test_bad_message_is_rejected_counted_and_changes_nothing(
    harness: Harness, mutate: Any, counter: str
) -> None:
    before = harness.server.state.params.copy()
    header = harness.header(1, count=16, offset=0)
    await harness.send_raw(mutate(header, np.ones(16, np.float32).tobytes()))
    np.testing.assert_array_equal(await harness.fetch(), before)  # still serving
    assert harness.server.rejected[counter] == 1
    np.testing.assert_array_equal(harness.server.state.params, before)
    assert harness.server.state.version == 0


async def test_sparse_push_rejects_out_of_range_and_unsorted_indices(harness: Harness) -> None:
    size = harness.server.state.params.size
    before = harness.server.state.params.copy()
    bad = [np.array([1, size], np.uint32), np.array([5, 3], np.uint32), np.array([4, 4], np.uint32)]
    for seq, idx in enumerate(bad, start=1):
        vals = np.ones(idx.size, np.float32)
        ((_, _, frames),) = wire.sparse_chunks(harness.header(seq), idx, vals)
        await harness.send_raw([bytes(f) for f in frames])
    await harness.fetch()
    assert harness.server.rejected["range"] == 1 and harness.server.rejected["order"] == 2
    np.testing.assert_array_equal(harness.server.state.params, before)


async def test_sparse_pull_returns_exactly_the_changed_parameters(harness: Harness) -> None:
    size = harness.server.state.params.size
    mine = await harness.fetch()
    before = mine.copy()
    idx = np.array([3, 700, 701, size - 1], np.uint32)
    ((_, _, frames),) = wire.sparse_chunks(harness.header(1), idx, np.ones(4, np.float32))
    await harness.send_raw([bytes(f) for f in frames])
    sent: list[np.ndarray] = []
    original = harness.client._on_params

    def spy(header: wire.Header, arrays: list[np.ndarray], nbytes: int) -> None:
        sent.append(arrays[0].copy())
        original(header, arrays, nbytes)

    harness.client._on_params = spy  # type: ignore[method-assign]
    version, _ = await harness.client.fetch(mine, since=0)
    np.testing.assert_array_equal(mine, harness.server.state.params)
    assert version == 1
    np.testing.assert_array_equal(np.concatenate(sent), idx)  # the indices sent
    np.testing.assert_array_equal(np.flatnonzero(mine != before), idx)
    assert harness.server.counters.fetches_sparse == 1


async def test_a_fetch_between_the_chunks_of_a_push_gets_the_rest_next_time(
    harness: Harness,
) -> None:
    """Hogwild: a fetch may see a push in part. It then names the version before that
    push, so the next fetch of what changed since brings the chunks applied after it."""
    size = harness.server.state.params.size
    mine = await harness.fetch()
    idx = np.arange(0, size, 7, dtype=np.uint32)
    header = replace(harness.header(1), worker=8)  # another worker's push, in 3 chunks
    chunks = list(wire.sparse_chunks(header, idx, np.ones(idx.size, np.float32), 8 * 60))
    assert len(chunks) >= 3
    await harness.send_raw([bytes(f) for f in chunks[0].frames])
    version, _ = await harness.client.fetch(mine, since=0)
    assert version == 0 and harness.server.state.version == 1  # before the partial push
    for chunk in chunks[1:]:
        await harness.send_raw([bytes(f) for f in chunk.frames])
    version, _ = await harness.client.fetch(mine, since=version)
    assert version == 1  # complete now
    np.testing.assert_array_equal(mine, harness.server.state.params)
    assert harness.server.counters.fetches_sparse == 2


@pytest.mark.parametrize("harness", [{"staleness": "drop:2"}], indirect=True)
async def test_drop_policy_refuses_stale_pushes(harness: Harness) -> None:
    grad = np.ones(harness.server.state.params.size, np.float32)
    for seq in range(1, 5):
        await harness.push_dense(seq, grad, base_version=0)
    # versions when each arrived: 0, 1, 2 (accepted: staleness <= 2), then 3 > 2: dropped
    assert harness.done[4].statuses[0] == wire.AckStatus.STALE
    assert harness.server.state.version == 3
    assert harness.server.counters.dropped_stale >= 1


@pytest.mark.parametrize("harness", [{"staleness": "scale"}], indirect=True)
async def test_scale_policy_divides_the_step_by_one_plus_staleness(harness: Harness) -> None:
    grad = np.ones(harness.server.state.params.size, np.float32)
    await harness.push_dense(1, grad, base_version=0)
    before = harness.server.state.params.copy()
    await harness.push_dense(2, grad, base_version=0)  # staleness 1: half the step
    np.testing.assert_allclose(harness.server.state.params, before - np.float32(0.05), rtol=1e-6)


async def test_version_is_broadcast(harness: Harness) -> None:
    await harness.push_dense(1, np.ones(harness.server.state.params.size, np.float32))
    async with asyncio.timeout(5):
        while harness.client.broadcast_version != 1:  # noqa: ASYNC110 - polling a plain int
            await asyncio.sleep(0.01)
    assert harness.client.incarnation == harness.server.incarnation


async def test_uninstalled_shard_refuses_with_a_reason(zmq_ctx: zmq.asyncio.Context) -> None:
    async with ShardServer(ShardCore(0), context=zmq_ctx) as server:
        client = ShardClient(0, server.data_address, server.pub_address, FINGERPRINT, 1, zmq_ctx)
        await client.start()
        try:
            with pytest.raises(Exception, match="no parameters yet"):
                await client.fetch(np.empty(4, np.float32))
        finally:
            await client.aclose()


async def test_port_in_use_is_a_clear_error(harness: Harness) -> None:
    from dsgd.errors import ConfigError

    port = int(harness.served.data_address.rsplit(":", 1)[1])
    other = ShardServer(ShardCore(0), data_port=port)
    with pytest.raises(ConfigError, match="choose another port"):
        await other.start()
    await other.aclose()
