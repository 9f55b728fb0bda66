"""Control-plane plumbing shared by every process: gRPC servers, channels and the member link.

Every gRPC server dsgd starts also serves the standard ``grpc.health.v1`` service.
A member (shard or worker) talks to the coordinator through a :class:`CoordinatorLink`:
calls carry deadlines, failures are retried with backoff, and while the coordinator
is unreachable the link says so ("waiting for coordinator at ... since 12 s").
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any, TypeVar

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from dsgd import metrics
from dsgd.errors import Closed, ConfigError, ModelError, PeerLost
from dsgd.layout import Layout
from dsgd.proto import control_pb2 as pb
from dsgd.proto import control_pb2_grpc as pb_grpc
from dsgd.security import TLS_CHANNEL_OPTIONS, RequireToken, Security
from dsgd.stats import RateLimitedLog, peak_rss_bytes
from dsgd.types import FlatParams, ShardInfo

log = logging.getLogger("dsgd.control")

T = TypeVar("T")
RPC_TIMEOUT = 5.0
HEARTBEAT_TIMEOUT = 1.5  # a member's heartbeats (its leaving one, too) wait no longer
UPLOAD_TIMEOUT = 300.0  # seconds for streaming a model's initial parameters
TENSOR_CHUNK_ELEMENTS = (1 << 20) // 4  # 1 MiB of float32 per streamed message
MAX_MESSAGE_BYTES = 8 << 20
CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.enable_retries", 0),
]


class _Undecodable:
    """Stands in for a request whose bytes are not the message the method takes."""

    def __init__(self, error: str) -> None:
        self.error = error


class RefuseUndecodable(grpc.aio.ServerInterceptor):
    """Refuses requests that are not valid protobuf with INVALID_ARGUMENT, counted and logged
    (rate-limited), instead of letting grpc answer UNKNOWN with a traceback per call."""

    def __init__(self, counters: dict[str, int] | None = None) -> None:
        self.counters = counters if counters is not None else {}
        self._log = RateLimitedLog(log)

    async def intercept_service(
        self, continuation: Callable[[Any], Awaitable[Any]], details: Any
    ) -> Any:
        handler = await continuation(details)
        if handler is None or handler.request_deserializer is None:
            return handler
        decode = handler.request_deserializer

        def safe_decode(data: bytes) -> Any:
            try:
                return decode(data)
            except Exception as exc:  # DecodeError and friends: the peer sent garbage
                return _Undecodable(f"{type(exc).__name__}: {exc}")

        async def check(request: Any, context: grpc.aio.ServicerContext) -> None:
            if isinstance(request, _Undecodable):
                key = "undecodable"
                self.counters[key] = self.counters.get(key, 0) + 1
                self._log.warning(key, f"refused an undecodable {details.method} request")
                await context.abort(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"request is not a valid {details.method} message ({request.error[:100]})",
                )

        for kind, wrap in _WRAPPERS.items():
            behaviour = getattr(handler, kind)
            if behaviour is not None:
                make = getattr(grpc, f"{kind}_rpc_method_handler")
                return make(
                    wrap(behaviour, check),
                    request_deserializer=safe_decode,
                    response_serializer=handler.response_serializer,
                )
        return handler


Check = Callable[[Any, grpc.aio.ServicerContext], Awaitable[None]]


def _unary_unary(behaviour: Any, check: Check) -> Any:
    async def checked(request: Any, context: grpc.aio.ServicerContext) -> Any:
        await check(request, context)
        return await behaviour(request, context)

    return checked


def _unary_stream(behaviour: Any, check: Check) -> Any:
    async def checked(request: Any, context: grpc.aio.ServicerContext) -> Any:
        await check(request, context)
        async for item in behaviour(request, context):
            yield item

    return checked


def _stream_unary(behaviour: Any, check: Check) -> Any:
    async def checked(requests: Any, context: grpc.aio.ServicerContext) -> Any:
        async def each() -> AsyncIterator[Any]:
            async for request in requests:
                await check(request, context)
                yield request

        return await behaviour(each(), context)

    return checked


_WRAPPERS = {
    "unary_unary": _unary_unary,
    "unary_stream": _unary_stream,
    "stream_unary": _stream_unary,
}


async def start_grpc_server(
    host: str,
    port: int,
    register: Callable[[grpc.aio.Server], None],
    what: str,
    refused: dict[str, int] | None = None,
    security: Security | None = None,
) -> tuple[grpc.aio.Server, int]:
    """Start a grpc.aio server with health checking; return it and its bound port.

    Requests that are not valid protobuf are refused (and counted into ``refused``). With
    ``security`` the server speaks mutual TLS only and refuses calls without the cluster
    token (counted as ``refused["token"]``), the health service's excepted.
    """
    refused = refused if refused is not None else {}
    interceptors: list[grpc.aio.ServerInterceptor] = [RefuseUndecodable(refused)]
    if security is not None:
        interceptors.insert(0, RequireToken(security.token, refused))
    server = grpc.aio.server(options=CHANNEL_OPTIONS, interceptors=interceptors)
    register(server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    try:
        if security is None:
            bound = server.add_insecure_port(f"{host}:{port}")
        else:
            bound = server.add_secure_port(f"{host}:{port}", security.server_credentials())
    except RuntimeError:
        bound = 0
    if bound == 0:
        await server.stop(None)
        raise ConfigError(
            f"cannot listen for the {what} on {host}:{port} (port in use or address not "
            "local); choose another port or stop the process using it"
        )
    await server.start()
    await health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    return server, bound


def check_address(address: str) -> str:
    """Validate ``HOST:PORT`` (one-line ConfigError otherwise)."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"address {address!r} must look like HOST:PORT, e.g. 127.0.0.1:7070")
    return address


def open_channel(address: str, security: Security | None = None) -> grpc.aio.Channel:
    """A grpc.aio channel to ``address``: mutual TLS with the cluster token under
    ``security``, else plaintext."""
    check_address(address)
    if security is None:
        return grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS)
    return grpc.aio.secure_channel(
        address, security.channel_credentials(), options=CHANNEL_OPTIONS + TLS_CHANNEL_OPTIONS
    )


def blocking_channel(address: str, security: Security | None = None) -> grpc.Channel:
    """:func:`open_channel` for code without an event loop (the CLI, the supervisor)."""
    check_address(address)
    if security is None:
        return grpc.insecure_channel(address, options=CHANNEL_OPTIONS)
    return grpc.secure_channel(
        address, security.channel_credentials(), options=CHANNEL_OPTIONS + TLS_CHANNEL_OPTIONS
    )


def coordinator_channel(
    address: str, security: Security | None = None
) -> tuple[grpc.aio.Channel, pb_grpc.CoordinatorStub]:
    channel = open_channel(address, security)
    return channel, pb_grpc.CoordinatorStub(channel)


class CoordinatorLink:
    """A member's calls to the coordinator, retried until ``give_up_after`` seconds pass."""

    def __init__(
        self,
        address: str,
        *,
        give_up_after: float = 60.0,
        stop: asyncio.Event | None = None,
        security: Security | None = None,
    ) -> None:
        self.address = address
        self.give_up_after = give_up_after
        self.stop = stop  # once set, every wait of the link ends at once with Closed
        self.channel, self.stub = coordinator_channel(address, security)
        self.reachable = True
        self._down_since: float | None = None

    async def unless_stopped(self, work: Awaitable[T], what: str) -> T:
        """Await ``work``, or raise :class:`Closed` as soon as ``stop`` is set."""
        if self.stop is None:
            return await work
        if self.stop.is_set():
            if asyncio.iscoroutine(work):
                work.close()
            elif hasattr(work, "cancel"):
                work.cancel()  # a gRPC call object: it started when it was made
            raise Closed(f"stopped while {what}")
        task = asyncio.ensure_future(work)
        stopped = asyncio.ensure_future(self.stop.wait())
        try:
            await asyncio.wait({task, stopped}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopped.cancel()
            if not task.done():
                task.cancel()
        if not task.done() or task.cancelled():
            raise Closed(f"stopped while {what}")
        return task.result()

    async def call(self, rpc: Callable[..., Awaitable[T]], request: Any, what: str) -> T:
        """Call ``rpc(request)`` with a deadline, retrying transient failures with backoff;
        :class:`Closed` as soon as ``stop`` is set."""
        delay = 0.05
        last_report = 0.0
        while True:
            try:
                reply = await self.unless_stopped(rpc(request, timeout=RPC_TIMEOUT), what)
            except grpc.aio.AioRpcError as exc:
                if exc.code() not in (
                    grpc.StatusCode.UNAVAILABLE,
                    grpc.StatusCode.DEADLINE_EXCEEDED,
                ):
                    raise
                now = time.monotonic()
                if self._down_since is None:
                    self._down_since = now
                waited = now - self._down_since
                self.reachable = False
                if waited > self.give_up_after:
                    raise PeerLost(
                        f"coordinator at {self.address} unreachable for {waited:.0f} s "
                        f"({what}); is it running and is the address right?"
                    ) from None
                if now - last_report > 5.0 and waited > 1.0:
                    log.warning(
                        "waiting for coordinator at %s since %.0f s (%s)",
                        self.address,
                        waited,
                        what,
                    )
                    last_report = now
                await self.unless_stopped(asyncio.sleep(delay), what)
                delay = min(delay * 2, 1.0)
                continue
            self._down_since = None
            self.reachable = True
            return reply

    async def register(
        self,
        rpc: Callable[..., Awaitable[T]],
        request: Any,
        stop: asyncio.Event,
        what: str,
        initial: Callable[[], FlatParams] | None = None,
    ) -> T | None:
        """Register (``rpc(request)``) until the cluster is ready for this member.

        Uploads the initial parameters (``initial()``, for members that load the model)
        when the coordinator asks for them, says what the cluster is waiting for every
        few seconds, and returns None if ``stop`` is set first. A refusal is a one-line
        ConfigError.
        """
        waited_since = time.monotonic()
        last_report = 0.0
        while not stop.is_set():
            try:
                reply: Any = await self.call(rpc, request, f"registering {what}")
            except grpc.aio.AioRpcError as exc:
                raise ConfigError(f"the coordinator refused {what}: {exc.details()}") from None
            if reply.ready:
                return reply
            if reply.send_initial and initial is not None:
                await self.upload_initial(request.layout.fingerprint, initial())
                continue
            now = time.monotonic()
            if now - last_report > 5.0 and now - waited_since > 1.0:
                log.info("waiting for %s", reply.waiting_for)
                last_report = now
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.2)
        return None

    async def upload_initial(self, fingerprint: int, flat: FlatParams) -> None:
        """Stream the model's initial parameters to the coordinator (1 MiB pieces)."""
        try:
            await self.unless_stopped(
                self.stub.UploadInitial(
                    tensor_chunks("params", flat, fingerprint), timeout=UPLOAD_TIMEOUT
                ),
                "uploading the initial parameters",
            )
        except grpc.aio.AioRpcError as exc:
            if exc.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                return  # registering again says whether it is still wanted
            refusal = f"the coordinator refused the initial parameters: {exc.details()}"
            raise ModelError(refusal) from None

    async def heartbeat_once(self, request: pb.HeartbeatRequest) -> pb.HeartbeatReply | None:
        """One heartbeat; None when the coordinator is unreachable (training goes on)."""
        metrics.observe(request)
        try:
            # short while the coordinator is away: a leaving member must not wait on it
            timeout = HEARTBEAT_TIMEOUT if self.reachable else 0.5
            reply: pb.HeartbeatReply = await self.stub.Heartbeat(request, timeout=timeout)
        except grpc.aio.AioRpcError as exc:
            if self.reachable:
                log.warning(
                    "coordinator at %s unreachable (%s); training continues",
                    self.address,
                    exc.code().name,
                )
            self.reachable = False
            return None
        if not self.reachable:
            log.info("coordinator at %s is back", self.address)
        self.reachable = True
        return reply

    async def aclose(self) -> None:
        await self.channel.close()


def tensor_chunks(name: str, values: FlatParams, fingerprint: int = 0) -> Iterator[pb.TensorChunk]:
    """``values`` as TensorChunk messages of at most 1 MiB each (one even when empty)."""
    for start in range(0, max(values.size, 1), TENSOR_CHUNK_ELEMENTS):
        piece = values[start : start + TENSOR_CHUNK_ELEMENTS]
        yield pb.TensorChunk(
            name=name,
            offset=start,
            total=values.size,
            data=piece.tobytes(),
            layout_fingerprint=fingerprint,
        )


def layout_message(layout: Layout) -> pb.ModelLayout:
    return pb.ModelLayout(
        paths=layout.paths,
        shapes=[pb.LeafShape(dims=shape) for shape in layout.shapes],
        num_shards=layout.num_shards,
        fingerprint=layout.fingerprint,
    )


def layout_from_message(message: pb.ModelLayout) -> Layout:
    """The :class:`Layout` a member described (without JAX: it cannot unflatten)."""
    layout = Layout(
        tuple(message.paths),
        tuple(tuple(int(d) for d in shape.dims) for shape in message.shapes),
        int(message.num_shards),
    )
    if len(layout.paths) != len(layout.shapes) or not layout.paths:
        raise ValueError("a layout needs one shape per leaf path, and at least one leaf")
    if any(d < 0 for shape in layout.shapes for d in shape) or layout.size < 1:
        raise ValueError("a layout's shapes must be non-negative and hold parameters")
    if not 1 <= layout.num_shards <= layout.size:
        raise ValueError(f"cannot split {layout.size} parameters over {layout.num_shards} shards")
    if layout.fingerprint != message.fingerprint:
        raise ValueError("the layout's fingerprint does not match its paths and shapes")
    return layout


def shard_infos(endpoints: Any) -> list[ShardInfo]:
    """ShardInfo tuples from ShardEndpoint messages."""
    return [
        ShardInfo(e.shard_id, e.data_address, e.pub_address, e.start, e.stop, e.incarnation)
        for e in endpoints
    ]


def stats_message(stats: dict[str, Any]) -> pb.MemberStats:
    """A MemberStats from the ``stats()`` dict of a worker or shard."""
    return pb.MemberStats(
        version=int(stats.get("version", 0)),
        step=int(stats.get("step", 0)),
        rate=float(stats.get("rate", 0.0)),
        loss=float(stats.get("loss", 0.0)),
        counters={
            **{k: float(v) for k, v in stats.get("counters", {}).items()},
            "peak_rss_bytes": peak_rss_bytes(),  # of the process (all roles, in dsgd.train)
        },
        notes={k: str(v) for k, v in stats.get("notes", {}).items()},
    )
