"""The coordinator's gRPC face: requests in, :class:`~dsgd.coordinator.Coordinator` calls out.

Refusals become gRPC statuses with a one-line reason and are counted. The cluster
checkpoint is relayed here: each shard snapshots and streams its file over its own
control service, and the pieces flow on to the caller, then a manifest.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import grpc

from dsgd.control import CHANNEL_OPTIONS
from dsgd.initial_state import TENSOR_CHUNK_ELEMENTS
from dsgd.proto import control_pb2 as pb
from dsgd.proto import control_pb2_grpc as pb_grpc

if TYPE_CHECKING:
    from dsgd.coordinator import Coordinator

SHARD_CHECKPOINT_TIMEOUT = 300.0


class Refused(Exception):
    """A request refused with a gRPC status and a one-line reason."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code


class CoordinatorService(pb_grpc.CoordinatorServicer):
    """gRPC adaptor: translates calls to :class:`Coordinator` methods and refusals to statuses."""

    def __init__(self, coordinator: Coordinator) -> None:
        self.c = coordinator

    async def RegisterShard(self, request: Any, context: Any) -> pb.RegisterShardReply:
        try:
            return self.c.register_shard(request)
        except Refused as exc:
            await self._refuse(exc, context)
            raise

    async def _refuse(self, exc: Refused, context: Any) -> None:
        self.c.refused[exc.code.name] = self.c.refused.get(exc.code.name, 0) + 1
        await context.abort(exc.code, str(exc))

    async def FetchInitialShard(self, request: Any, context: Any) -> AsyncIterator[pb.TensorChunk]:
        if request.layout_fingerprint != self.c.layout.fingerprint or not (
            0 <= request.shard_id < self.c.config.num_shards
        ):
            await self._refuse(
                Refused(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    "unknown shard or another model's layout",
                ),
                context,
            )
        for name, values in self.c.initial.arrays(request.shard_id).items():
            for start in range(0, max(values.size, 1), TENSOR_CHUNK_ELEMENTS):
                piece = values[start : start + TENSOR_CHUNK_ELEMENTS]
                yield pb.TensorChunk(
                    name=name, offset=start, total=values.size, data=piece.tobytes()
                )

    async def RegisterWorker(self, request: Any, context: Any) -> pb.RegisterWorkerReply:
        try:
            return self.c.register_worker(request)
        except Refused as exc:
            await self._refuse(exc, context)
            raise

    async def Heartbeat(self, request: Any, context: Any) -> pb.HeartbeatReply:
        try:
            return self.c.heartbeat(request)
        except Refused as exc:
            await self._refuse(exc, context)
            raise

    async def Status(self, request: Any, context: Any) -> pb.ClusterStatus:
        return self.c.status()

    async def SaveCheckpoint(self, request: Any, context: Any) -> AsyncIterator[pb.CheckpointPiece]:
        c = self.c
        if not c.shards_ready():
            await context.abort(
                grpc.StatusCode.UNAVAILABLE,
                f"cannot checkpoint while waiting for {c.waiting_for()}",
            )
        for shard_id in range(c.config.num_shards):
            endpoint = c.shards[shard_id].endpoint
            if endpoint is None or not endpoint.control_address:
                await context.abort(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    f"shard {shard_id} has no control service to checkpoint through",
                )
            assert endpoint is not None
            async with grpc.aio.insecure_channel(
                endpoint.control_address, options=CHANNEL_OPTIONS
            ) as channel:
                stub = pb_grpc.ShardStub(channel)
                try:
                    async for piece in stub.Checkpoint(
                        pb.CheckpointRequest(reason=request.reason or "cluster checkpoint"),
                        timeout=SHARD_CHECKPOINT_TIMEOUT,
                    ):
                        yield piece
                except grpc.aio.AioRpcError as exc:
                    await context.abort(
                        grpc.StatusCode.UNAVAILABLE,
                        f"shard {shard_id} failed to checkpoint: {exc.details()}",
                    )
        manifest = {
            "model": c.config.model,
            "fingerprint": c.layout.fingerprint,
            "config": c.config.to_json(),
        }
        yield pb.CheckpointPiece(manifest_json=json.dumps(manifest))

    async def Shutdown(self, request: Any, context: Any) -> pb.ShutdownReply:
        if not self.c.done:
            await self.c.finish(request.reason or "shutdown requested")
        self.c.shutdown_requested.set()
        return pb.ShutdownReply()
