"""The far ends of the benchmarked links: receiver processes, and the handles that feed them.

Every receiver is a separate process started with ``spawn`` (two processes on one host is
what the numbers are about; a thread would share the GIL with the sender). Each handle
is a context manager that starts its process, waits for it to report ready (never a
sleep), and on exit stops it, reaps it, and closes every socket and channel it owns.
Every blocking wait has a timeout, on both sides.

One transfer = the whole payload, chunk by chunk, and a one-byte acknowledgement once the
receiver has all of it; the benchmark times that round.
"""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import multiprocessing.connection
import socket
import struct
import tempfile
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import msgpack
import numpy as np
import zmq
from google.protobuf import wrappers_pb2

from bench._common import SPAWN, stop_process
from dsgd import wire
from dsgd.security import TLS_CHANNEL_OPTIONS, Security

READY = b"ready"
BEGIN = b"begin"
STOP = b"stop"


def _recv_exact(sock: socket.socket, view: memoryview) -> None:
    while view.nbytes:
        n = sock.recv_into(view)
        if n == 0:
            raise ConnectionError("peer closed the connection mid-message")
        view = view[n:]


# ---------------------------------------------------------------- raw TCP

TCP_HEADER = struct.Struct("<BQQ")  # mode, payload bytes, chunk bytes
TCP_STOP, TCP_REUSED, TCP_FRESH = 0, 1, 2


def tcp_receiver(port: int, max_payload: int, timeout_s: float) -> None:
    """Receive each chunk with ``recv_into``: into one preallocated, already-faulted buffer
    (``TCP_REUSED``), or into a freshly allocated buffer per chunk (``TCP_FRESH``), which
    is what any receiver that allocates per frame pays."""
    idle_timeout_s = max(600.0, 10 * timeout_s)  # between transfers the sender may be busy
    with socket.create_connection(("127.0.0.1", port), timeout=timeout_s) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        dest = np.ones(max_payload, np.uint8)
        view = memoryview(dest)
        head = bytearray(TCP_HEADER.size)
        while True:
            sock.settimeout(idle_timeout_s)
            _recv_exact(sock, memoryview(head))
            sock.settimeout(timeout_s)
            mode, payload, chunk = TCP_HEADER.unpack(head)
            if mode == TCP_STOP:
                return
            for start in range(0, payload, chunk):
                n = min(chunk, payload - start)
                if mode == TCP_REUSED:
                    _recv_exact(sock, view[start : start + n])
                else:
                    _recv_exact(sock, memoryview(np.empty(n, np.uint8)))
            sock.sendall(b"\x01")


class TcpPeer:
    """A TCP loopback connection to a :func:`tcp_receiver` process."""

    def __init__(self, max_payload: int, timeout_s: float) -> None:
        self.timeout_s = timeout_s
        with socket.create_server(("127.0.0.1", 0)) as listener:
            listener.settimeout(timeout_s)
            port = listener.getsockname()[1]
            self.process = SPAWN.Process(
                target=tcp_receiver, args=(port, max_payload, timeout_s), daemon=True
            )
            self.process.start()
            try:
                self.sock, _ = listener.accept()
            except BaseException:
                self.process.kill()
                stop_process(self.process, timeout_s)
                raise
        self.sock.settimeout(timeout_s)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._ack = memoryview(bytearray(1))

    def transfer(self, data: memoryview, chunk: int, mode: int) -> None:
        """``sendall`` each chunk of ``data``; return once the receiver has all of it."""
        self.sock.sendall(TCP_HEADER.pack(mode, data.nbytes, chunk))
        for start in range(0, data.nbytes, chunk):
            self.sock.sendall(data[start : start + chunk])
        _recv_exact(self.sock, self._ack)

    def close(self) -> None:
        try:
            self.sock.sendall(TCP_HEADER.pack(TCP_STOP, 0, 0))
        except OSError:
            pass
        stop_process(self.process, self.timeout_s)
        self.sock.close()

    def __enter__(self) -> TcpPeer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ---------------------------------------------------------------- ZeroMQ

# What the receiver does with each chunk (the sender says which, per transfer):
ZMQ_INTO = "into"  # header frame, then recv_into the array slice the header names
ZMQ_COPY = "copy"  # header frame, then recv() into fresh bytes, copied into the array
ZMQ_APPLY = "apply"  # header frame, then a zero-copy frame added into params right away
ZMQ_REASSEMBLE = "reassemble"  # keep every zero-copy frame; concatenate; add into params
ZMQ_MSGPACK = "msgpack"  # one frame: a msgpack map carrying offset, count and the data
ZMQ_PROTOBUF = "protobuf"  # one frame: a protobuf BytesValue carrying the data


def _into(sock: zmq.Socket[Any], count: int, dest: np.ndarray, params: np.ndarray) -> None:
    dest_bytes = memoryview(dest).cast("B")
    for _ in range(count):
        h = wire.unpack_header(sock.recv())
        sock.recv_into(dest_bytes[h.offset * 4 : (h.offset + h.count) * 4])


def _copy(sock: zmq.Socket[Any], count: int, dest: np.ndarray, params: np.ndarray) -> None:
    for _ in range(count):
        h = wire.unpack_header(sock.recv())
        dest[h.offset : h.offset + h.count] = np.frombuffer(sock.recv(), np.float32)


def _apply(sock: zmq.Socket[Any], count: int, dest: np.ndarray, params: np.ndarray) -> None:
    for _ in range(count):
        h = wire.unpack_header(sock.recv())
        frame = sock.recv(copy=False)
        params[h.offset : h.offset + h.count] += np.frombuffer(frame.buffer, np.float32)


def _reassemble(sock: zmq.Socket[Any], count: int, dest: np.ndarray, params: np.ndarray) -> None:
    frames = []
    for _ in range(count):
        wire.unpack_header(sock.recv())
        frames.append(np.frombuffer(sock.recv(copy=False).buffer, np.float32))
    params += np.concatenate(frames)


def _msgpack(sock: zmq.Socket[Any], count: int, dest: np.ndarray, params: np.ndarray) -> None:
    for _ in range(count):
        msg = msgpack.unpackb(sock.recv(copy=False).buffer)
        offset = msg["offset"]
        dest[offset : offset + msg["count"]] = np.frombuffer(msg["data"], np.float32)


def _protobuf(sock: zmq.Socket[Any], count: int, dest: np.ndarray, params: np.ndarray) -> None:
    dest_bytes = np.frombuffer(memoryview(dest).cast("B"), np.uint8)
    position = 0
    for _ in range(count):
        value = wrappers_pb2.BytesValue.FromString(sock.recv(copy=False).buffer).value
        dest_bytes[position : position + len(value)] = np.frombuffer(value, np.uint8)
        position += len(value)


_ZMQ_RECEIVERS: dict[str, Callable[[zmq.Socket[Any], int, np.ndarray, np.ndarray], None]] = {
    ZMQ_INTO: _into,
    ZMQ_COPY: _copy,
    ZMQ_APPLY: _apply,
    ZMQ_REASSEMBLE: _reassemble,
    ZMQ_MSGPACK: _msgpack,
    ZMQ_PROTOBUF: _protobuf,
}


def zmq_receiver(
    endpoints: list[str],
    ack_endpoint: str,
    max_payload: int,
    timeout_s: float,
    curve: tuple[bytes, bytes, bytes] | None = None,
) -> None:
    """One PULL socket connected to every sender endpoint (tcp and ipc); each transfer is
    ``[BEGIN, (mode, count)]`` then ``count`` messages, acknowledged once all are in.
    ``curve`` (server public key, own public and secret key) makes it a CURVE client."""
    idle_timeout_ms = int(max(600.0, 10 * timeout_s) * 1000)
    ctx = zmq.Context()
    pull, ack = ctx.socket(zmq.PULL), ctx.socket(zmq.PUSH)
    if curve is not None:
        pull.curve_serverkey, pull.curve_publickey, pull.curve_secretkey = curve
    pull.linger = ack.linger = 0
    pull.rcvtimeo = ack.sndtimeo = int(timeout_s * 1000)
    dest = np.ones(max_payload // 4, np.float32)
    params = np.ones(max_payload // 4, np.float32)
    try:
        for endpoint in endpoints:
            pull.connect(endpoint)
        ack.connect(ack_endpoint)
        ack.send(READY)
        while True:
            pull.rcvtimeo = idle_timeout_ms
            kind, *rest = pull.recv_multipart()
            if kind == STOP:
                return
            pull.rcvtimeo = int(timeout_s * 1000)
            mode, count = msgpack.unpackb(rest[0])
            _ZMQ_RECEIVERS[mode](pull, count, dest, params)
            ack.send(b"")
    finally:
        pull.close()
        ack.close()
        ctx.term()


class ZmqPeer:
    """PUSH sockets (one per transport) bound here, feeding one :func:`zmq_receiver`.

    With ``curve`` the PUSH sockets are CURVE servers and the receiver a CURVE client, as a
    secured cluster's shards and workers are (encryption and authentication per message;
    the per-connection key check of :class:`dsgd.security.Admission` costs nothing per
    byte and is left out).
    """

    def __init__(
        self,
        max_payload: int,
        timeout_s: float,
        transports: Iterable[str] = ("tcp", "ipc"),
        curve: bool = False,
    ) -> None:
        self.timeout_s = timeout_s
        self.ctx = zmq.Context()
        self._tmp = tempfile.TemporaryDirectory(prefix="dsgd-bench-")
        self.pushes: dict[str, zmq.Socket[Any]] = {}
        self.process: Any = None
        server_public, server_secret = zmq.curve_keypair()
        client_keys = (server_public, *zmq.curve_keypair()) if curve else None
        try:
            endpoints = []
            for transport in transports:
                push = self.ctx.socket(zmq.PUSH)
                if curve:
                    push.curve_server = True
                    push.curve_secretkey = server_secret
                push.linger = 0
                push.sndtimeo = int(timeout_s * 1000)
                self.pushes[transport] = push
                if transport == "tcp":
                    port = push.bind_to_random_port("tcp://127.0.0.1")
                    endpoints.append(f"tcp://127.0.0.1:{port}")
                elif transport == "ipc":
                    endpoints.append(f"ipc://{self._tmp.name}/bench.ipc")
                    push.bind(endpoints[-1])
                else:
                    raise ValueError(f"unknown ZeroMQ transport {transport!r}")
            self.acks = self.ctx.socket(zmq.PULL)
            self.acks.linger = 0
            self.acks.rcvtimeo = int(timeout_s * 1000)
            ack_port = self.acks.bind_to_random_port("tcp://127.0.0.1")
            self.process = SPAWN.Process(
                target=zmq_receiver,
                args=(
                    endpoints,
                    f"tcp://127.0.0.1:{ack_port}",
                    max_payload,
                    timeout_s,
                    client_keys,
                ),
                daemon=True,
            )
            self.process.start()
            if self.acks.recv() != READY:
                raise RuntimeError("ZeroMQ receiver did not report ready")
        except BaseException:
            self.close()
            raise

    def transfer(
        self, transport: str, mode: str, count: int, messages: Iterable[Any], copy: bool
    ) -> None:
        """Send ``count`` messages (each a list of frames) for the receiver to take in
        ``mode``; return once it acknowledges the last."""
        push = self.pushes[transport]
        push.send_multipart([BEGIN, msgpack.packb((mode, count))])
        for frames in messages:
            push.send_multipart(frames, copy=copy)
        self.acks.recv()

    def close(self) -> None:
        if self.process is not None:
            if self.pushes:
                try:
                    next(iter(self.pushes.values())).send(STOP)
                except zmq.ZMQError:
                    pass
            stop_process(self.process, self.timeout_s)
            self.process = None
        for push in self.pushes.values():
            push.close()
        if hasattr(self, "acks"):
            self.acks.close()
        self.ctx.term()
        self._tmp.cleanup()

    def __enter__(self) -> ZmqPeer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ---------------------------------------------------------------- gRPC

GRPC_OPTIONS = [
    ("grpc.max_send_message_length", -1),
    ("grpc.max_receive_message_length", -1),
]
SERVICE = "bench.Bench"
# method name -> (client streaming?, protobuf BytesValue rather than raw bytes?)
GRPC_METHODS = {
    "Unary": (False, False),
    "Stream": (True, False),
    "UnaryPb": (False, True),
    "StreamPb": (True, True),
}


class _Sink:
    """Where the server puts what it receives: a reused, already-faulted buffer."""

    def __init__(self, size: int) -> None:
        self.dest = np.ones(size, np.uint8)

    def store(self, data: bytes, position: int) -> int:
        if position + len(data) > self.dest.size:
            position = 0
        self.dest[position : position + len(data)] = np.frombuffer(data, np.uint8)
        return position + len(data)


def _payload(request: Any) -> bytes:
    return request.value if isinstance(request, wrappers_pb2.BytesValue) else request


def _generic_handler(sink: _Sink, aio: bool) -> grpc.GenericRpcHandler:
    def unary(request: Any, context: Any) -> bytes:
        sink.store(_payload(request), 0)
        return b""

    def stream(requests: Iterator[Any], context: Any) -> bytes:
        position = 0
        for request in requests:
            position = sink.store(_payload(request), position)
        return b""

    async def unary_aio(request: Any, context: Any) -> bytes:
        return unary(request, context)

    async def stream_aio(requests: AsyncIterator[Any], context: Any) -> bytes:
        position = 0
        async for request in requests:
            position = sink.store(_payload(request), position)
        return b""

    handlers = {}
    for name, (streaming, pb) in GRPC_METHODS.items():
        deserializer = wrappers_pb2.BytesValue.FromString if pb else None
        if streaming:
            handlers[name] = grpc.stream_unary_rpc_method_handler(
                stream_aio if aio else stream, request_deserializer=deserializer
            )
        else:
            handlers[name] = grpc.unary_unary_rpc_method_handler(
                unary_aio if aio else unary, request_deserializer=deserializer
            )
    return grpc.method_handlers_generic_handler(SERVICE, handlers)


def grpc_server(
    flavor: str, conn: mp.connection.Connection, max_payload: int, keys: Path | None = None
) -> None:
    """A sync (thread pool) or ``grpc.aio`` server; reports its port on ``conn`` and
    serves until ``conn`` says stop or closes. With ``keys`` (a key directory) it serves
    mutual TLS as a secured cluster's coordinator and shards do."""
    try:
        if flavor == "aio":
            asyncio.run(_serve_aio(conn, max_payload, keys))
        else:
            _serve_sync(conn, max_payload, keys)
    finally:
        conn.close()


def _wait_for_stop(conn: mp.connection.Connection) -> None:
    try:
        conn.recv()
    except EOFError:
        pass


def _add_port(server: Any, keys: Path | None) -> int:
    if keys is None:
        return int(server.add_insecure_port("127.0.0.1:0"))
    return int(server.add_secure_port("127.0.0.1:0", Security.load(keys).server_credentials()))


def _serve_sync(conn: mp.connection.Connection, max_payload: int, keys: Path | None) -> None:
    with futures.ThreadPoolExecutor(max_workers=2) as pool:
        server = grpc.server(pool, options=GRPC_OPTIONS)
        server.add_generic_rpc_handlers((_generic_handler(_Sink(max_payload), aio=False),))
        port = _add_port(server, keys)
        server.start()
        try:
            conn.send(port)
            _wait_for_stop(conn)
        finally:
            server.stop(grace=None).wait()


async def _serve_aio(conn: mp.connection.Connection, max_payload: int, keys: Path | None) -> None:
    server = grpc.aio.server(options=GRPC_OPTIONS)
    server.add_generic_rpc_handlers((_generic_handler(_Sink(max_payload), aio=True),))
    port = _add_port(server, keys)
    await server.start()
    try:
        conn.send(port)
        await asyncio.get_running_loop().run_in_executor(None, _wait_for_stop, conn)
    finally:
        await server.stop(grace=None)


def _channel(api: Any, address: str, credentials: grpc.ChannelCredentials | None) -> Any:
    """A ``grpc`` or ``grpc.aio`` channel: plaintext, or TLS checked as dsgd's clients do."""
    if credentials is None:
        return api.insecure_channel(address, options=GRPC_OPTIONS)
    return api.secure_channel(address, credentials, options=GRPC_OPTIONS + TLS_CHANNEL_OPTIONS)


class GrpcPeer:
    """A channel to a :func:`grpc_server` process of the same flavor (``sync`` or ``aio``).

    The ``aio`` flavor drives its channel from a private event loop, one
    ``run_until_complete`` per transfer, so sync and aio cases interleave in one round.
    With ``keys`` (a key directory) both ends speak mutual TLS and every call carries the
    cluster token, as dsgd's control plane does under ``--secure``.
    """

    def __init__(
        self, flavor: str, max_payload: int, timeout_s: float, keys: Path | None = None
    ) -> None:
        if flavor not in ("sync", "aio"):
            raise ValueError(f"unknown gRPC flavor {flavor!r}")
        self.flavor = flavor
        self.timeout_s = timeout_s
        self.loop: asyncio.AbstractEventLoop | None = None
        self.channel: Any = None
        self._conn, child = SPAWN.Pipe()
        self.process = SPAWN.Process(
            target=grpc_server, args=(flavor, child, max_payload, keys), daemon=True
        )
        try:
            try:
                self.process.start()
            finally:
                child.close()
            if not self._conn.poll(timeout_s):
                raise TimeoutError(f"gRPC {flavor} server did not report its port")
            address = f"127.0.0.1:{self._conn.recv()}"
            credentials = None if keys is None else Security.load(keys).channel_credentials()
            if flavor == "sync":
                self.channel = _channel(grpc, address, credentials)
                grpc.channel_ready_future(self.channel).result(timeout=timeout_s)
            else:
                self.loop = asyncio.new_event_loop()
                self.channel = self.loop.run_until_complete(self._open_aio(address, credentials))
            self._calls = {name: self._callable(name, pb) for name, (_, pb) in GRPC_METHODS.items()}
        except BaseException:
            self.close()
            raise

    async def _open_aio(
        self, address: str, credentials: grpc.ChannelCredentials | None
    ) -> grpc.aio.Channel:
        channel: grpc.aio.Channel = _channel(grpc.aio, address, credentials)
        try:
            await asyncio.wait_for(channel.channel_ready(), self.timeout_s)
        except BaseException:
            await channel.close()
            raise
        return channel

    def _callable(self, name: str, pb: bool) -> Any:
        streaming = GRPC_METHODS[name][0]
        factory = self.channel.stream_unary if streaming else self.channel.unary_unary
        serializer = wrappers_pb2.BytesValue.SerializeToString if pb else None
        return factory(f"/{SERVICE}/{name}", request_serializer=serializer)

    def unary(self, requests: Callable[[], Iterable[Any]], pb: bool = False) -> None:
        """One unary call per request, each awaited before the next."""
        call = self._calls["UnaryPb" if pb else "Unary"]
        if self.loop is None:
            for request in requests():
                call(request, timeout=self.timeout_s)
            return

        async def calls() -> None:
            for request in requests():
                await call(request, timeout=self.timeout_s)

        self.loop.run_until_complete(calls())

    def stream(self, requests: Callable[[], Iterable[Any]], pb: bool = False) -> None:
        """One client-streaming call carrying every request."""
        call = self._calls["StreamPb" if pb else "Stream"]
        if self.loop is None:
            call(iter(requests()), timeout=self.timeout_s)
            return

        async def streamed() -> None:  # the call is made on the loop it runs on
            await call(iter(requests()), timeout=self.timeout_s)

        self.loop.run_until_complete(streamed())

    def close(self) -> None:
        if self.channel is not None:
            if self.loop is None:
                self.channel.close()
            else:
                self.loop.run_until_complete(self.channel.close())
            self.channel = None
        if self.loop is not None:
            self.loop.close()
            self.loop = None
        if self.process is not None:
            try:
                self._conn.send("stop")
            except OSError:
                pass
            if self.process.pid is not None:
                stop_process(self.process, self.timeout_s)
            else:
                self.process.close()
            self.process = None
        self._conn.close()

    def __enter__(self) -> GrpcPeer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
