"""Property-based fuzzing of the data plane and the gRPC services: every peer is untrusted.

Data plane: a live shard (real ZeroMQ sockets on 127.0.0.1), and the shard's core on its
own, receive Hypothesis-generated malformed messages. Each message is a valid push broken
in catalogued ways (``tests/fuzzing/catalogue.py``: frames, every header field, sizes,
indices, NaN/Inf, ...) and the core states the order of its checks, so the reason the
shard must give is known: each one must be answered,
counted under exactly that reason, and change nothing; after every batch the shard still
serves a fetch of bit-identical parameters, its version and optimizer state unmoved.

Control plane: a live coordinator receives generated requests for every RPC of its
service (fields drawn from the protobuf descriptors, so new RPCs and fields are fuzzed
too) and bytes that are not protobuf at all. Every call must succeed or fail with a
deliberate status, never an unhandled exception (UNKNOWN, INTERNAL), and the server keeps
serving, health check included. The shard's control service gets the same treatment.

"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import itertools
import json
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

import grpc
import msgpack
import numpy as np
import pytest
import zmq
from google.protobuf import descriptor, message_factory
from google.protobuf.message import DecodeError
from google.protobuf.message import Message as ProtoMessage
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from bench import fuzz_shard
from dsgd import wire
from dsgd.config import TrainConfig
from dsgd.control import CHANNEL_OPTIONS, layout_message, start_grpc_server
from dsgd.coordinator.core import Coordinator
from dsgd.examples.digits import digits_mlp
from dsgd.model import CompiledModel
from dsgd.optim import SGD
from dsgd.proto import control_pb2 as pb
from dsgd.proto import control_pb2_grpc as pb_grpc
from dsgd.shard.core import ShardState
from tests.conftest import serve_coordinator
from tests.fuzzing import catalogue as fuzz
from tests.fuzzing.harness import CoreShard, FuzzedShard, LiveShard, initial_params

T = TypeVar("T")

FUZZ = settings(
    deadline=None,
    max_examples=60,
    suppress_health_check=[
        HealthCheck.function_scoped_fixture,  # one live server serves every example
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.large_base_example,
    ],
)


class HypothesisDraw:
    """The generator's choices (``catalogue.Draw``) made by Hypothesis, so it shrinks."""

    def __init__(self, data: st.DataObject) -> None:
        self.data = data

    def integer(self, lo: int, hi: int) -> int:
        return self.data.draw(st.integers(lo, hi))

    def choice(self, options: Sequence[T]) -> T:
        return self.data.draw(st.sampled_from(options))

    def raw(self, min_size: int, max_size: int) -> bytes:
        return self.data.draw(st.binary(min_size=min_size, max_size=max_size))

    def text(self, min_size: int, max_size: int) -> str:
        return self.data.draw(st.text(min_size=min_size, max_size=max_size))

    def sample(self, population: int, k: int) -> list[int]:
        distinct = st.lists(st.integers(0, population - 1), min_size=k, max_size=k, unique=True)
        return self.data.draw(distinct)


# -- data plane -------------------------------------------------------------------------------


@pytest.fixture
async def shard() -> AsyncIterator[LiveShard]:
    async with LiveShard() as live:
        yield live


async def assert_intact(live: FuzzedShard) -> None:
    checks = await live.verify()
    assert all(checks.values()), (checks, live.notes)


async def fire_batches(live: FuzzedShard, data: st.DataObject) -> None:
    await live.revive()  # a shard killed by an earlier example must not fail this one
    draw = HypothesisDraw(data)
    for _ in range(data.draw(st.integers(1, 6), label="batch size")):
        outcome = await live.probe(fuzz.malformed_message(draw))
        assert outcome.ok, outcome.describe()
    await assert_intact(live)


@FUZZ
@given(data=st.data())
async def test_unbroken_messages_are_applied(data: st.DataObject) -> None:
    """The oracle's premise: before any fault, the generated message is a valid push."""
    draw = HypothesisDraw(data)
    async with LiveShard(optimizer=SGD(1e-30)) as live:  # tiny steps: no overflow
        for seq in range(1, data.draw(st.integers(1, 4)) + 1):
            message = fuzz.base_message(draw)
            message.header["seq"] = seq
            frames = await live.exchange(message.serialize())
            assert frames is not None, live.crashes
            reply = wire.unpack_header(frames[0])
            assert (reply.kind, reply.status) == (wire.ACK, "applied"), message.header
        assert live.core.state.version == seq


@settings(FUZZ, max_examples=200)
@given(data=st.data())
async def test_broken_messages_are_refused_for_their_reason_and_change_nothing(
    shard: LiveShard, data: st.DataObject
) -> None:
    await fire_batches(shard, data)


@settings(FUZZ, max_examples=300)
@given(data=st.data())
async def test_the_core_alone_refuses_broken_messages_for_their_reason(
    data: st.DataObject,
) -> None:
    """The same catalogue straight at ShardCore.handle: the checks live in the core."""
    async with CoreShard() as core:
        await fire_batches(core, data)


@pytest.mark.slow
@settings(FUZZ, max_examples=2_500)
@given(data=st.data())
async def test_broken_messages_at_length(shard: LiveShard, data: st.DataObject) -> None:
    await fire_batches(shard, data)


@FUZZ
@given(frames=st.lists(st.binary(max_size=2_000), min_size=1, max_size=8))
async def test_random_frames_are_refused(shard: LiveShard, frames: list[bytes]) -> None:
    await shard.revive()
    message = fuzz.Message.of_frames([fuzz.not_a_header(frames[0]), *frames[1:]])
    outcome = await shard.probe(message, expected="malformed")
    assert outcome.ok, outcome.describe()
    await assert_intact(shard)


MSGPACK_SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**63), 2**64 - 1),
    st.floats(),
    st.text(max_size=300),
    st.binary(max_size=64),
)
MSGPACK_VALUES = st.recursive(
    MSGPACK_SCALARS,
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(
            st.sampled_from(fuzz.HEADER_FIELDS) | st.text(max_size=8), inner, max_size=6
        )
    ),
    max_leaves=12,
)
HEADERISH = st.dictionaries(
    st.sampled_from(fuzz.HEADER_FIELDS) | st.text(max_size=8), MSGPACK_VALUES, max_size=20
)


@FUZZ
@given(header=MSGPACK_VALUES | HEADERISH, payload=st.lists(st.binary(max_size=256), max_size=3))
async def test_any_msgpack_header_but_a_valid_one_is_refused(
    shard: LiveShard, header: Any, payload: list[bytes]
) -> None:
    assume(not (isinstance(header, dict) and header.get("fingerprint") == fuzz.FINGERPRINT))
    await shard.revive()
    message = fuzz.Message.of_frames([msgpack.packb(header, use_bin_type=True), *payload])
    outcome = await shard.probe(message, expected="")  # any reason, but exactly one
    assert outcome.ok, outcome.describe()
    await assert_intact(shard)


@FUZZ
@given(data=st.data())
async def test_a_shard_without_parameters_refuses_everything(data: st.DataObject) -> None:
    async with LiveShard(installed=False) as bare:
        draw = HypothesisDraw(data)
        for _ in range(data.draw(st.integers(1, 6))):
            outcome = await bare.probe(fuzz.malformed_message(draw))
            assert outcome.ok, outcome.describe()
        await assert_intact(bare)


@pytest.mark.parametrize("target", [[], ["--core"]], ids=["live", "core"])
def test_the_fuzz_benchmark_writes_its_counts(tmp_path: Path, target: list[str]) -> None:
    args = ["--messages", "300", "--seed", "5", "--out", str(tmp_path), *target]
    assert fuzz_shard.main(args) == 0
    result = json.loads((tmp_path / fuzz_shard.JSON_NAME).read_text())
    assert result["messages"] == 300 and result["crashes"] == 0 and result["ok"]
    assert result["params_identical"] and sum(result["rejections"].values()) == 300
    assert result["rejections"] == result["expected_rejections"]


@pytest.mark.slow
async def test_ten_thousand_malformed_messages_at_a_live_shard() -> None:
    result = await fuzz_shard.run(10_000, seed=0)
    assert result["crashes"] == 0 and result["hangs"] == 0, result["crash_reports"]
    assert result["unexpected_outcomes"] == 0, result["unexpected_examples"]
    assert result["params_identical"] and result["ok"], result["checks"]
    assert sum(result["rejections"].values()) == 10_000
    assert set(result["rejections"]) == {
        "malformed",
        "layout",
        "kind",
        "worker",
        "range",
        "order",
        "nonfinite",
    }


def _push(values: np.ndarray | None = None, **fields: Any) -> list[Any]:
    """A valid dense push (worker 1, seq 1) of ``values``, with header ``fields`` changed."""
    values = np.ones(4, np.float32) if values is None else values
    header = wire.Header(
        kind=wire.PUSH,
        fingerprint=fuzz.FINGERPRINT,
        shard=fuzz.SHARD_ID,
        worker=1,
        seq=1,
        count=values.size,
        **fields,
    )
    return wire.encode(header, values)


async def test_a_frame_beyond_the_wire_limit_is_cut_off_by_the_transport(
    shard: LiveShard,
) -> None:
    assert shard.server is not None
    dealer = shard.ctx.socket(zmq.DEALER)
    dealer.setsockopt(zmq.LINGER, 0)
    monitor = dealer.get_monitor_socket(zmq.EVENT_DISCONNECTED)
    waits: list[asyncio.Future[Any]] = []
    try:
        dealer.connect(shard.server.data_address)
        values = np.zeros(wire.MAX_FRAME_BYTES // 4 + 1, np.float32)
        await dealer.send_multipart(_push(values), copy=False)
        waits = [dealer.recv_multipart(), monitor.recv_multipart()]
        done, _ = await asyncio.wait(waits, timeout=60, return_when=asyncio.FIRST_COMPLETED)
        assert waits[0] not in done, "the shard took in and answered an oversized frame"
        assert waits[1] in done, "the peer was not disconnected"
    finally:
        for wait in waits:
            wait.cancel()
        dealer.disable_monitor()
        monitor.close(linger=0)
        dealer.close(linger=0)
    await assert_intact(shard)


async def test_a_push_claiming_a_negative_base_version_is_refused(shard: LiveShard) -> None:
    outcome = await shard.probe(fuzz.Message.of_frames(_push(base_version=-(2**62))))
    assert outcome.ok, outcome.describe()
    await assert_intact(shard)


async def test_a_finite_push_that_would_overflow_the_optimizer_is_refused(
    shard: LiveShard,
) -> None:
    huge = np.full(4, np.finfo(np.float32).max, np.float32)
    outcome = await shard.probe(fuzz.Message.of_frames(_push(huge)))
    assert outcome.ok, outcome.describe()
    await assert_intact(shard)


# -- control plane: the coordinator ----------------------------------------------------------

MODEL = "dsgd.examples.digits:digits_mlp"
NUM_SHARDS = 2
COORDINATOR_METHODS = list(pb.DESCRIPTOR.services_by_name["Coordinator"].methods)
RPC_TIMEOUT = 20.0
# What an unhandled exception (or a hang) looks like from the client's side.
UNDELIBERATE = {
    grpc.StatusCode.UNKNOWN,
    grpc.StatusCode.INTERNAL,
    grpc.StatusCode.UNIMPLEMENTED,
    grpc.StatusCode.DATA_LOSS,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.CANCELLED,
}
REFUSALS = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION}
ODD_STRINGS = [
    "",
    "garbage",
    "tcp://",
    "tcp://127.0.0.1:1",
    "tcp://127.0.0.1:99999",
    "tcp://[::1]:0",
    "ipc:///nonexistent/socket",
    "127.0.0.1:1",
    "\x00",
    "a\x00b:1",
    "é:1",
    "x" * 5_000,
    "dsgd.examples.digits:digits_mlp",
]
GARBAGE = [b"\xff\xff\xff", b"\x08", b"\x0a\x05ab", b"\x12\xff\xff\xff\xff\x0f", b"\x80" * 11]


@pytest.fixture(scope="module")
def compiled() -> CompiledModel:
    return CompiledModel(digits_mlp(), num_shards=NUM_SHARDS)


@contextlib.asynccontextmanager
async def live_coordinator(
    compiled: CompiledModel,
) -> AsyncIterator[tuple[Coordinator, grpc.aio.Channel]]:
    """A coordinator that knows the model and has evaluated once (so workers may join);
    its shards are whatever the fuzzer registers."""
    config = TrainConfig(model=MODEL, num_shards=NUM_SHARDS, eval_every=3600.0)
    async with serve_coordinator(config, compiled) as (coordinator, address):
        coordinator.history.append(pb.Evaluation(test_accuracy=0.1))
        channel = grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS)
        try:
            yield coordinator, channel
        finally:
            await channel.close()


def _rpc(channel: grpc.aio.Channel, method: Any, raw: bool) -> Any:
    path = f"/{method.containing_service.full_name}/{method.name}"
    if method.client_streaming:
        kind = channel.stream_unary
    else:
        kind = channel.unary_stream if method.server_streaming else channel.unary_unary
    if raw:
        return kind(path)
    reply = message_factory.GetMessageClass(method.output_type)
    return kind(path, request_serializer=_serialize, response_deserializer=reply.FromString)


def _serialize(message: ProtoMessage) -> bytes:
    return message.SerializeToString()


async def invoke(
    channel: grpc.aio.Channel, method: Any, request: ProtoMessage | bytes
) -> tuple[grpc.StatusCode, str, list[Any]]:
    """Call ``method`` (unary, or streaming either way); (status, details, replies)."""
    rpc = _rpc(channel, method, raw=isinstance(request, bytes))
    try:
        if method.client_streaming:  # a stream of one request
            replies = [await rpc(iter([request]), timeout=RPC_TIMEOUT)]
        elif method.server_streaming:
            replies = [reply async for reply in rpc(request, timeout=RPC_TIMEOUT)]
        else:
            replies = [await rpc(request, timeout=RPC_TIMEOUT)]
    except grpc.aio.AioRpcError as exc:
        return exc.code(), exc.details() or "", []
    return grpc.StatusCode.OK, "", replies


async def assert_still_serving(channel: grpc.aio.Channel, service: str = "Coordinator") -> None:
    if service == "Coordinator":
        status = await pb_grpc.CoordinatorStub(channel).Status(pb.StatusRequest(), timeout=20)
        assert status.num_shards == NUM_SHARDS
    health = health_pb2_grpc.HealthStub(channel)
    answer = await health.Check(health_pb2.HealthCheckRequest(service=""), timeout=20)
    assert answer.status == health_pb2.HealthCheckResponse.SERVING


# Protobuf messages drawn from their descriptors: every field, any value its type allows,
# with the values that matter here (ids around the cluster's, the real fingerprint) often.

FD = descriptor.FieldDescriptor
INT_RANGES = {
    FD.TYPE_INT32: (-(2**31), 2**31 - 1),
    FD.TYPE_SINT32: (-(2**31), 2**31 - 1),
    FD.TYPE_SFIXED32: (-(2**31), 2**31 - 1),
    FD.TYPE_INT64: (-(2**63), 2**63 - 1),
    FD.TYPE_SINT64: (-(2**63), 2**63 - 1),
    FD.TYPE_SFIXED64: (-(2**63), 2**63 - 1),
    FD.TYPE_UINT32: (0, 2**32 - 1),
    FD.TYPE_FIXED32: (0, 2**32 - 1),
    FD.TYPE_UINT64: (0, 2**64 - 1),
    FD.TYPE_FIXED64: (0, 2**64 - 1),
}
TEXT = st.sampled_from(ODD_STRINGS) | st.text(max_size=64)


def _scalar(field: Any, special: tuple[int, ...], depth: int) -> st.SearchStrategy[Any]:
    if field.type in INT_RANGES:
        lo, hi = INT_RANGES[field.type]
        known = sorted({v for v in (*special, lo, hi) if lo <= v <= hi})
        return st.sampled_from(known) | st.integers(lo, hi)
    if field.type == FD.TYPE_BOOL:
        return st.booleans()
    if field.type in (FD.TYPE_DOUBLE, FD.TYPE_FLOAT):
        return st.floats(width=64 if field.type == FD.TYPE_DOUBLE else 32)
    if field.type == FD.TYPE_STRING:
        return TEXT
    if field.type == FD.TYPE_BYTES:
        return st.binary(max_size=64)
    if field.type == FD.TYPE_ENUM:
        numbers = [v.number for v in field.enum_type.values]
        return st.sampled_from(numbers) | st.integers(-(2**31), 2**31 - 1)
    assert field.type == FD.TYPE_MESSAGE, field.full_name
    return proto_messages(field.message_type, special, depth + 1)


@functools.cache
def proto_messages(
    message: Any, special: tuple[int, ...], depth: int = 0
) -> st.SearchStrategy[ProtoMessage]:
    """Messages of type ``message`` (a descriptor) with any subset of fields set."""
    cls = message_factory.GetMessageClass(message)
    if depth > 3:
        return st.just(cls())
    fields: dict[str, st.SearchStrategy[Any]] = {}
    for field in message.fields:
        entry = field.message_type
        if entry is not None and entry.GetOptions().map_entry:
            key = _scalar(entry.fields_by_name["key"], special, depth)
            value = _scalar(entry.fields_by_name["value"], special, depth)
            fields[field.name] = st.dictionaries(key, value, max_size=4)
        elif field.is_repeated:
            fields[field.name] = st.lists(_scalar(field, special, depth), max_size=3)
        else:
            fields[field.name] = _scalar(field, special, depth)
    return st.fixed_dictionaries({}, optional=fields).map(functools.partial(_build, cls))


def _build(cls: Any, values: dict[str, Any]) -> ProtoMessage:
    built = cls()
    for name, value in values.items():
        field = cls.DESCRIPTOR.fields_by_name[name]
        target = getattr(built, name) if field.is_repeated or field.message_type else None
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            for key, item in value.items():
                if isinstance(item, ProtoMessage):
                    target[key].CopyFrom(item)
                else:
                    target[key] = item
        elif field.is_repeated:
            target.extend(value)
        elif field.message_type is not None:
            target.CopyFrom(value)
        else:
            setattr(built, name, value)
    return built


def _specials(coordinator: Coordinator) -> tuple[int, ...]:
    fingerprint = coordinator.layout.fingerprint
    return (-1, 0, 1, 2, 3, 4095, 4096, wire.PROTOCOL_VERSION, 99, fingerprint, fingerprint + 1)


def check_reply(
    coordinator: Coordinator,
    method: Any,
    request: ProtoMessage,
    known_before: bool,
    outcome: tuple[grpc.StatusCode, str, list[Any]],
) -> None:
    """Deliberate statuses only, and the refusals each RPC promises."""
    code, details, replies = outcome
    assert code not in UNDELIBERATE, f"{method.name}({request}) -> {code.name}: {details}"
    fingerprint = coordinator.layout.fingerprint
    if method.name == "RegisterShard":
        if not 0 <= request.shard_id < NUM_SHARDS:
            assert code == grpc.StatusCode.INVALID_ARGUMENT, (request, code)
        elif code == grpc.StatusCode.OK:
            rng = coordinator.layout.ranges[request.shard_id]
            assert (replies[0].start, replies[0].stop) == (rng.start, rng.stop)
            assert replies[0].layout_fingerprint == fingerprint
        else:
            assert code in REFUSALS, (request, code, details)
    elif method.name in ("RegisterWorker", "RegisterEvaluator"):
        if request.layout != layout_message(coordinator.layout):
            assert code in REFUSALS, (request, code, details)
    elif method.name == "UploadInitial":
        assert code in REFUSALS or (code == grpc.StatusCode.OK and not replies[0].accepted)
    elif method.name == "FetchInitialShard":
        if request.layout_fingerprint != fingerprint or not 0 <= request.shard_id < NUM_SHARDS:
            assert code == grpc.StatusCode.FAILED_PRECONDITION, (request, code)
        else:
            assert code == grpc.StatusCode.OK, details
            size = coordinator.layout.ranges[request.shard_id].size
            params = [r for r in replies if r.name == "params"]
            assert sum(len(r.data) for r in params) == 4 * size
    elif method.name == "Heartbeat" and request.role in ROLES:
        if not known_before:  # from a member the coordinator never registered
            assert code == grpc.StatusCode.OK and replies[0].reregister, (request, code)
    elif method.name in ("Status", "Shutdown"):
        assert code == grpc.StatusCode.OK, details


ROLES = (pb.ROLE_SHARD, pb.ROLE_WORKER, pb.ROLE_EVALUATOR)


def _known(coordinator: Coordinator, request: ProtoMessage) -> bool:
    if request.role == pb.ROLE_EVALUATOR:
        return coordinator.evaluator is not None
    members = coordinator.shards if request.role == pb.ROLE_SHARD else coordinator.workers
    return request.id in members


async def register_both_shards(
    channel: grpc.aio.Channel, draw: st.DataObject, specials: tuple[int, ...]
) -> None:
    """Register every shard slot with generated endpoints and make each one ready."""
    stub = pb_grpc.CoordinatorStub(channel)
    endpoints = proto_messages(pb.ShardEndpoint.DESCRIPTOR, specials)
    for shard_id in range(NUM_SHARDS):
        endpoint = draw.draw(endpoints)
        request = pb.RegisterShardRequest(
            shard_id=shard_id, endpoint=endpoint, protocol_version=wire.PROTOCOL_VERSION
        )
        with contextlib.suppress(grpc.aio.AioRpcError):  # a refusal is fine here
            await stub.RegisterShard(request, timeout=RPC_TIMEOUT)
            beat = pb.HeartbeatRequest(
                role=pb.ROLE_SHARD, id=shard_id, incarnation=endpoint.incarnation
            )
            await stub.Heartbeat(beat, timeout=RPC_TIMEOUT)


async def fuzz_coordinator(compiled: CompiledModel, data: st.DataObject) -> None:
    async with live_coordinator(compiled) as (coordinator, channel):
        specials = _specials(coordinator)
        if data.draw(st.booleans(), label="start from a ready cluster"):
            await register_both_shards(channel, data, specials)
        for _ in range(data.draw(st.integers(1, 6), label="calls")):
            method = data.draw(st.sampled_from(COORDINATOR_METHODS), label="rpc")
            request = data.draw(proto_messages(method.input_type, specials), label="request")
            known = method.name == "Heartbeat" and _known(coordinator, request)
            outcome = await invoke(channel, method, request)
            check_reply(coordinator, method, request, known, outcome)
        await assert_still_serving(channel)


@settings(FUZZ, max_examples=100)
@given(data=st.data())
async def test_every_coordinator_rpc_answers_generated_requests_deliberately(
    compiled: CompiledModel, data: st.DataObject
) -> None:
    await fuzz_coordinator(compiled, data)


@pytest.mark.slow
@settings(FUZZ, max_examples=1_000)
@given(data=st.data())
async def test_coordinator_rpcs_at_length(compiled: CompiledModel, data: st.DataObject) -> None:
    await fuzz_coordinator(compiled, data)


@FUZZ
@given(data=st.data())
async def test_bytes_that_are_not_protobuf_do_not_stop_the_coordinator(
    compiled: CompiledModel, data: st.DataObject
) -> None:
    async with live_coordinator(compiled) as (_, channel):
        for _ in range(data.draw(st.integers(1, 4))):
            method = data.draw(st.sampled_from(COORDINATOR_METHODS))
            payload = data.draw(st.sampled_from(GARBAGE) | st.binary(max_size=300))
            code, details, _ = await invoke(channel, method, payload)
            try:
                message_factory.GetMessageClass(method.input_type).FromString(payload)
            except DecodeError:
                assert code == grpc.StatusCode.INVALID_ARGUMENT, (method.name, code)
            else:  # a valid request after all: the ordinary rules apply
                assert code not in UNDELIBERATE, (method.name, payload, code, details)
        await assert_still_serving(channel)


async def test_undecodable_requests_are_refused_as_invalid_arguments(
    compiled: CompiledModel,
) -> None:
    async with live_coordinator(compiled) as (_, channel):
        for method in COORDINATOR_METHODS:
            code, details, _ = await invoke(channel, method, b"\xff\xff\xff")
            assert code == grpc.StatusCode.INVALID_ARGUMENT, (method.name, code, details)


async def test_a_shard_registering_at_a_malformed_address_is_refused(
    compiled: CompiledModel,
) -> None:
    async with live_coordinator(compiled) as (_, channel):
        stub = pb_grpc.CoordinatorStub(channel)
        endpoint = pb.ShardEndpoint(data_address="not-an-address", pub_address="garbage")
        request = pb.RegisterShardRequest(
            shard_id=0, endpoint=endpoint, protocol_version=wire.PROTOCOL_VERSION
        )
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.RegisterShard(request, timeout=RPC_TIMEOUT)
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_shutdown_with_a_shard_at_a_malformed_address_is_answered(
    compiled: CompiledModel,
) -> None:
    async with live_coordinator(compiled) as (_, channel):
        stub = pb_grpc.CoordinatorStub(channel)
        for shard_id in range(NUM_SHARDS):
            endpoint = pb.ShardEndpoint(
                data_address="not-an-address", pub_address="garbage", incarnation=5
            )
            request = pb.RegisterShardRequest(
                shard_id=shard_id, endpoint=endpoint, protocol_version=wire.PROTOCOL_VERSION
            )
            with contextlib.suppress(grpc.aio.AioRpcError):  # refusing it is a fix too
                await stub.RegisterShard(request, timeout=RPC_TIMEOUT)
                beat = pb.HeartbeatRequest(role=pb.ROLE_SHARD, id=shard_id, incarnation=5)
                await stub.Heartbeat(beat, timeout=RPC_TIMEOUT)
        code, details, _ = await invoke(
            channel,
            pb.DESCRIPTOR.services_by_name["Coordinator"].methods_by_name["Shutdown"],
            pb.ShutdownRequest(reason="fuzz"),
        )
        assert code == grpc.StatusCode.OK, (code, details)


async def test_registration_from_another_protocol_version_is_refused(
    compiled: CompiledModel,
) -> None:
    async with live_coordinator(compiled) as (coordinator, channel):
        stub = pb_grpc.CoordinatorStub(channel)
        endpoint = pb.ShardEndpoint(
            data_address="tcp://127.0.0.1:1", pub_address="tcp://127.0.0.1:2", incarnation=5
        )
        shard = pb.RegisterShardRequest(shard_id=0, endpoint=endpoint, protocol_version=99)
        assert coordinator.layout is not None
        worker = pb.RegisterWorkerRequest(
            worker_id=-1,
            layout_fingerprint=coordinator.layout.fingerprint,
            protocol_version=99,
            incarnation=1,
            layout=layout_message(coordinator.layout),
        )
        for call, request in ((stub.RegisterShard, shard), (stub.RegisterWorker, worker)):
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await call(request, timeout=RPC_TIMEOUT)
            assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION


def _counts_named(value: Any, words: tuple[str, ...], named: bool = False) -> int:
    """The sum of the numbers in ``value`` (nested dicts/lists) under a key with one of
    ``words`` in it (JSON renders int64 as strings)."""
    if isinstance(value, dict):
        return sum(
            _counts_named(item, words, named or any(w in key.lower() for w in words))
            for key, item in value.items()
        )
    if isinstance(value, list):
        return sum(_counts_named(item, words, named) for item in value)
    if named and not isinstance(value, bool):
        with contextlib.suppress(TypeError, ValueError):
            return int(float(value))
    return 0


async def test_refused_requests_are_counted_in_status(compiled: CompiledModel) -> None:
    from google.protobuf import json_format

    async with live_coordinator(compiled) as (_, channel):
        stub = pb_grpc.CoordinatorStub(channel)
        for shard_id in (-1, NUM_SHARDS, 2**31 - 1):
            with pytest.raises(grpc.aio.AioRpcError):
                await stub.RegisterShard(pb.RegisterShardRequest(shard_id=shard_id), timeout=20)
        with pytest.raises(grpc.aio.AioRpcError):
            await stub.RegisterWorker(pb.RegisterWorkerRequest(layout_fingerprint=1), timeout=20)
        status = await stub.Status(pb.StatusRequest(), timeout=20)
        shown = json_format.MessageToDict(status, preserving_proto_field_name=True)
        assert _counts_named(shown, ("refus", "reject")) >= 4, shown.keys()


# -- control plane: the shard's control service ---------------------------------------------


@contextlib.asynccontextmanager
async def live_shard_control(installed: bool) -> AsyncIterator[grpc.aio.Channel]:
    """A shard's control service (checkpoints on demand) in front of an unstarted shard."""
    from dsgd.shard.process import ShardControl, ShardProcess

    process = ShardProcess("127.0.0.1:1", 0)  # never registers: only its control service runs
    if installed:
        process.core.install(fuzz.FINGERPRINT, SGD(0.1), ShardState(initial_params(), {}, 7))
    server, port = await start_grpc_server(
        "127.0.0.1",
        0,
        lambda s: pb_grpc.add_ShardServicer_to_server(ShardControl(process), s),
        "fuzzed shard control",
    )
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=CHANNEL_OPTIONS)
    try:
        yield channel
    finally:
        await channel.close()
        await server.stop(grace=0.5)
        await process.link.aclose()
        process.ctx.term()


SHARD_METHODS = list(pb.DESCRIPTOR.services_by_name["Shard"].methods)


@settings(FUZZ, max_examples=20)
@given(
    installed=st.booleans(),
    requests=st.lists(
        proto_messages(pb.CheckpointRequest.DESCRIPTOR, ()) | st.sampled_from(GARBAGE),
        min_size=1,
        max_size=3,
    ),
)
async def test_the_shard_control_service_answers_generated_requests_deliberately(
    installed: bool, requests: list[ProtoMessage | bytes]
) -> None:
    async with live_shard_control(installed) as channel:
        for method, request in itertools.product(SHARD_METHODS, requests):
            code, details, pieces = await invoke(channel, method, request)
            if isinstance(request, bytes):
                assert code != grpc.StatusCode.OK  # GARBAGE is never valid protobuf
                continue
            assert code not in UNDELIBERATE, (method.name, request, code, details)
            if not installed:
                assert code == grpc.StatusCode.UNAVAILABLE, (code, details)
                continue
            assert code == grpc.StatusCode.OK, details
            whole = b"".join(p.data for p in pieces)
            assert pieces[-1].last and pieces[-1].sha256 == hashlib.sha256(whole).hexdigest()
        await assert_still_serving(channel, service="Shard")
