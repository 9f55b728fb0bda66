"""dsgd.sockets: batched non-blocking ZeroMQ sockets on an event loop, and local twins."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zmq
import zmq.asyncio

from dsgd import sockets
from dsgd.shard.client import ShardClient
from dsgd.sockets import LoopSocket, bind_twin, connect_address, local_twin
from tests.conftest import FINGERPRINT, make_shard


@pytest.fixture
async def pair(zmq_ctx: zmq.asyncio.Context) -> AsyncIterator[tuple[LoopSocket, LoopSocket]]:
    """A ROUTER and a DEALER connected over tcp on 127.0.0.1, both as LoopSockets."""
    router: zmq.Socket[Any] = zmq.Socket(zmq_ctx, zmq.ROUTER)
    port = router.bind_to_random_port("tcp://127.0.0.1")
    dealer: zmq.Socket[Any] = zmq.Socket(zmq_ctx, zmq.DEALER)
    dealer.connect(f"tcp://127.0.0.1:{port}")
    ends = LoopSocket(router), LoopSocket(dealer)
    yield ends
    for end in ends:
        end.close()


async def test_a_waiting_receiver_wakes_although_another_task_sends_meanwhile(
    pair: tuple[LoopSocket, LoopSocket],
) -> None:
    """A send may consume the descriptor's signal of a reply that arrived meanwhile; the
    receiving task (as in a ShardClient: one task reads, others send) must still wake."""
    router, dealer = pair
    rounds = 400
    replies: asyncio.Queue[bytes] = asyncio.Queue()

    async def echo() -> None:
        while True:
            await router.readable()
            for identity, body in router.recv_ready(64):
                await router.send([identity, body])

    async def receive() -> None:
        while True:
            await dealer.readable()
            for (body,) in dealer.recv_ready(64):
                replies.put_nowait(body.bytes)

    tasks = [asyncio.create_task(echo()), asyncio.create_task(receive())]
    try:
        async with asyncio.timeout(30):
            for i in range(rounds):  # one request in flight at a time, like a fetch
                await dealer.send([b"%d" % i])
                assert await replies.get() == b"%d" % i
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def test_recv_ready_takes_only_what_is_queued_up_to_the_limit(
    pair: tuple[LoopSocket, LoopSocket],
) -> None:
    router, dealer = pair
    assert router.recv_ready(10) == []
    for i in range(5):
        await dealer.send([b"%d" % i])
    async with asyncio.timeout(10):
        got: list[bytes] = []
        while len(got) < 5:
            await router.readable()
            batch = router.recv_ready(3)
            assert len(batch) <= 3
            got += [body.bytes for _, body in batch]
    assert got == [b"0", b"1", b"2", b"3", b"4"]
    assert router.recv_ready(10) == []


async def test_send_waits_while_the_peers_queue_is_full_then_delivers_in_order(
    zmq_ctx: zmq.asyncio.Context,
) -> None:
    pull: zmq.Socket[Any] = zmq.Socket(zmq_ctx, zmq.PULL)
    pull.setsockopt(zmq.RCVHWM, 1)
    port = pull.bind_to_random_port("tcp://127.0.0.1")
    push: zmq.Socket[Any] = zmq.Socket(zmq_ctx, zmq.PUSH)
    push.setsockopt(zmq.SNDHWM, 1)
    push.connect(f"tcp://127.0.0.1:{port}")
    sender, receiver = LoopSocket(push), LoopSocket(pull)
    payload = np.zeros(1 << 18, np.uint8)  # 256 KiB: a few fill the socket buffers too
    try:
        sending = asyncio.create_task(_send_all(sender, payload, 40))
        await asyncio.sleep(0.5)
        assert not sending.done()  # blocked on the full queue, the loop still running
        got: list[int] = []
        async with asyncio.timeout(30):
            while len(got) < 40:
                await receiver.readable()
                got += [int(header.bytes) for header, _ in receiver.recv_ready(8)]
            await sending
        assert got == list(range(40))
    finally:
        sender.close()
        receiver.close()


async def _send_all(sock: LoopSocket, payload: np.ndarray, count: int) -> None:
    for i in range(count):
        await sock.send([b"%d" % i, payload.data])


# -- local twins -------------------------------------------------------------------------


@pytest.fixture
def twinned(zmq_ctx: zmq.asyncio.Context) -> Any:
    """A ROUTER on tcp 127.0.0.1 with its local twin; yields (tcp address, twin)."""
    router: zmq.Socket[Any] = zmq.Socket(zmq_ctx, zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    address = f"tcp://127.0.0.1:{router.bind_to_random_port('tcp://127.0.0.1')}"
    twin = bind_twin(router, address)
    yield address, twin
    router.close()


def test_a_client_on_the_same_host_connects_to_the_twin(twinned: tuple[str, str | None]) -> None:
    address, twin = twinned
    assert twin is not None and twin.startswith("ipc://")
    assert Path(twin.removeprefix("ipc://")).parent.stat().st_mode & 0o077 == 0  # private
    assert connect_address(address) == twin
    assert local_twin(address) == twin  # derived the same way on both ends


def test_a_peer_in_another_namespace_or_host_derives_another_twin_and_uses_tcp(
    twinned: tuple[str, str | None], monkeypatch: pytest.MonkeyPatch
) -> None:
    address, twin = twinned
    monkeypatch.setattr(sockets, "_host_key", lambda: "another-boot/another-netns/0")
    assert local_twin(address) != twin
    assert connect_address(address) == address


def test_twins_can_be_turned_off(
    twinned: tuple[str, str | None], monkeypatch: pytest.MonkeyPatch
) -> None:
    address, _ = twinned
    monkeypatch.setenv(sockets.LOCAL_IPC_ENV, "0")
    assert connect_address(address) == address


def test_a_twin_left_behind_by_a_dead_server_is_not_used() -> None:
    address = "tcp://127.0.0.1:9"  # nothing of ours listens there
    twin = local_twin(address)
    if twin is None:
        pytest.skip("local twins are unavailable on this platform")
    path = Path(twin.removeprefix("ipc://"))
    path.parent.mkdir(mode=0o700, exist_ok=True)
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        stale.bind(str(path))  # the file exists, but nothing accepts connections
        assert connect_address(address) == address
    finally:
        stale.close()
        path.unlink(missing_ok=True)


async def test_a_shard_client_on_the_same_host_talks_to_the_shard_over_its_twin(
    zmq_ctx: zmq.asyncio.Context,
) -> None:
    server = await make_shard(size=50_000)
    client = ShardClient(0, server.data_address, server.pub_address, FINGERPRINT, 1, zmq_ctx)
    try:
        await client.start()
        assert client.connected_to == server.local_addresses[0] != server.data_address
        dest = np.empty(50_000, np.float32)
        async with asyncio.timeout(10):
            await client.fetch(dest)
        np.testing.assert_array_equal(dest, server.core.state.params)
    finally:
        await client.aclose()
        await server.aclose()
