"""ZeroMQ sockets for the data plane: local twins of TCP endpoints, and sockets driven
from an asyncio loop in batches.

**Local twins.** A server bound to ``tcp://host:port`` also listens on an ``ipc://`` path
derived from that address and from what identifies this host to its peers: the boot, the
network namespace and the user. A client given the TCP address connects to the twin when
it exists and accepts connections, so peers on one machine skip the TCP stack (the
parameter-server cycle spends about a quarter less kernel time per byte), and peers in
other network namespaces or on other hosts, which derive another path, use TCP as before.
``DSGD_LOCAL_IPC=0`` turns twins off (both ends use TCP only).

**Batches.**
pyzmq's asyncio sockets make every ``recv`` and ``send`` a Future with its own readiness
bookkeeping (several ZeroMQ calls each, and on Python 3.11 a ``getpid`` system call for
every Future). Profiled in the parameter-server cycle, that machinery held the GIL longer
than the messages' own handling. A :class:`LoopSocket` waits for readiness once, then
takes every message that is ready with non-blocking calls, and sends without waiting
unless the peer's queue is full.

ZeroMQ's file descriptor is edge-triggered: it signals that the socket's state *may*
have changed, and any call on the socket (reading ``EVENTS``, but also a send) may reset
it. So every wait checks ``EVENTS`` first and only then sleeps on the descriptor, and
after every send or receive the socket checks whether another task's wait is over.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import os
import socket
import tempfile
from pathlib import Path
from typing import Any

import zmq

FULL_QUEUE_BACKOFF = 0.001  # seconds between send attempts while a peer's queue stays full
LOCAL_IPC_ENV = "DSGD_LOCAL_IPC"
# plain ints: pyzmq's flag enums make every `&` a Python-level call on the hot path
_POLLIN, _POLLOUT, _NOBLOCK, _EVENTS = (
    int(c) for c in (zmq.POLLIN, zmq.POLLOUT, zmq.NOBLOCK, zmq.EVENTS)
)


@functools.cache
def _host_key() -> str | None:
    """This boot, network namespace and user; None where they cannot be told (not Linux)."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        netns = os.stat("/proc/self/ns/net").st_ino
    except OSError:
        return None
    return f"{boot}/{netns}/{os.getuid()}"


def local_twin(tcp_address: str) -> str | None:
    """The ``ipc://`` twin of a server's ``tcp://`` address on this host, or None where
    twins are off (``DSGD_LOCAL_IPC=0``) or unavailable."""
    key = _host_key()
    if key is None or os.environ.get(LOCAL_IPC_ENV, "1") == "0" or not zmq.has("ipc"):
        return None
    digest = hashlib.sha256(f"{key}|{tcp_address}".encode()).hexdigest()[:24]
    return f"ipc://{Path(tempfile.gettempdir()) / f'dsgd-{os.getuid()}' / digest}"


def bind_twin(sock: zmq.Socket[Any], tcp_address: str) -> str | None:
    """Also listen on the local twin of ``tcp_address``; its address, or None if none.

    The twin's directory is private to the user; a failure to bind it only costs speed.
    """
    twin = local_twin(tcp_address)
    if twin is None:
        return None
    path = Path(twin.removeprefix("ipc://"))
    try:
        path.parent.mkdir(mode=0o700, exist_ok=True)
        sock.bind(twin)
    except (OSError, zmq.ZMQError):
        return None
    return twin


def connect_address(tcp_address: str) -> str:
    """Where a client should connect for a server announced at ``tcp_address``: its local
    twin when one listens on this host, else the TCP address itself."""
    twin = local_twin(tcp_address)
    if twin is None:
        return tcp_address
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(twin.removeprefix("ipc://"))  # refused: a twin left by a dead server
    except OSError:
        return tcp_address
    finally:
        probe.close()
    return twin


class LoopSocket:
    """A plain (blocking-API) ZeroMQ socket used without blocking from one event loop."""

    def __init__(self, sock: zmq.Socket[Any]) -> None:
        self.sock = sock
        self._fd = int(sock.getsockopt(zmq.FD))
        self._loop: asyncio.AbstractEventLoop | None = None
        self._waiters: list[tuple[int, asyncio.Future[None]]] = []  # (event, waiter)

    def recv_ready(self, limit: int) -> list[list[zmq.Frame]]:
        """Up to ``limit`` multipart messages that are already queued (maybe none)."""
        ready: list[list[zmq.Frame]] = []
        recv = self.sock.recv
        while len(ready) < limit:
            try:
                frame = recv(_NOBLOCK, copy=False)
            except zmq.Again:
                break
            message = [frame]
            while frame.more:  # the rest of a multipart message is there already
                frame = recv(_NOBLOCK, copy=False)
                message.append(frame)
            ready.append(message)
        self._poke()
        return ready

    async def readable(self) -> None:
        """Return once a message is queued for :meth:`recv_ready`."""
        await self._wait(_POLLIN)

    def try_send(self, frames: list[Any]) -> bool:
        """Queue one multipart message (zero-copy) if the peer's queue has room; False if
        not, or if the peer is gone (a ROUTER's unknown peer)."""
        try:
            self.sock.send_multipart(frames, _NOBLOCK, copy=False)
        except zmq.ZMQError:  # (zmq.Again among them)
            return False
        self._poke()
        return True

    async def send(self, frames: list[Any]) -> None:
        """Queue one multipart message (zero-copy), waiting only while the peer's queue is
        full. Raises ``zmq.ZMQError`` as ``send_multipart`` does (e.g. an unknown peer of
        a ROUTER with ``ROUTER_MANDATORY``)."""
        while True:
            try:
                self.sock.send_multipart(frames, _NOBLOCK, copy=False)
                self._poke()
                return
            except zmq.Again:
                # a ROUTER may report POLLOUT while this one peer is full: do not spin
                await self._wait(_POLLOUT)
                await asyncio.sleep(FULL_QUEUE_BACKOFF)

    async def _wait(self, event: int) -> None:
        while not int(self.sock.getsockopt(_EVENTS)) & event:
            loop = self._loop or asyncio.get_running_loop()
            if self._loop is None:
                self._loop = loop
                loop.add_reader(self._fd, self._wake)
            entry = (event, loop.create_future())
            self._waiters.append(entry)
            try:
                await entry[1]
            finally:
                if entry in self._waiters:
                    self._waiters.remove(entry)

    def _poke(self) -> None:
        """After a call that may have reset the descriptor: end the waits now satisfied."""
        if self._waiters:
            self._wake(int(self.sock.getsockopt(_EVENTS)))

    def _wake(self, events: int = _POLLIN | _POLLOUT) -> None:
        if not self._waiters:
            # nobody waits: stop watching (the descriptor stays readable until EVENTS is
            # read, and the loop would call this again and again); the next wait resumes
            self._unwatch()
            return
        for event, waiter in list(self._waiters):
            if event & events:
                if not waiter.done():
                    waiter.set_result(None)
                self._waiters.remove((event, waiter))

    def _unwatch(self) -> None:
        if self._loop is not None:
            if not self._loop.is_closed():
                self._loop.remove_reader(self._fd)
            self._loop = None

    def close(self) -> None:
        """Stop watching and close the socket (pending messages are dropped)."""
        self._unwatch()
        for _, waiter in self._waiters:
            waiter.cancel()
        self._waiters.clear()
        self.sock.close(linger=0)
