"""The coordinator's gRPC face: requests in, :class:`~dsgd.coordinator.core.Coordinator`
calls out, :class:`~dsgd.errors.Refused` out as gRPC statuses (counted, one line each).

Two calls are more than a decision: the initial parameters arrive as a client stream
and are assembled here, and the cluster checkpoint is relayed here (each shard snapshots
and streams its file over its own control service; the pieces flow on to the caller,
then a manifest).
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Callable
from typing import Any, TypeVar

import grpc
import numpy as np

from dsgd.control import open_channel, tensor_chunks
from dsgd.coordinator.core import Coordinator
from dsgd.errors import Refusal, Refused
from dsgd.proto import control_pb2 as pb
from dsgd.proto import control_pb2_grpc as pb_grpc
from dsgd.security import Security

SHARD_CHECKPOINT_TIMEOUT = 300.0
STATUS_CODES = {
    Refusal.INVALID: grpc.StatusCode.INVALID_ARGUMENT,
    Refusal.MISMATCH: grpc.StatusCode.FAILED_PRECONDITION,
    Refusal.EXHAUSTED: grpc.StatusCode.RESOURCE_EXHAUSTED,
    Refusal.UNAVAILABLE: grpc.StatusCode.UNAVAILABLE,
}

Request = TypeVar("Request")
Reply = TypeVar("Reply")


class CoordinatorService(pb_grpc.CoordinatorServicer):
    """gRPC adaptor: translates calls to :class:`Coordinator` methods and refusals to statuses."""

    def __init__(self, coordinator: Coordinator, security: Security | None = None) -> None:
        self.c = coordinator
        self.security = security  # for the calls it makes to shards' control services

    async def _answer(
        self, decide: Callable[[Request], Reply], request: Request, context: Any
    ) -> Reply:
        try:
            return decide(request)
        except Refused as exc:
            await self._refuse(exc, context)
            raise  # abort() raises; this is for the type checker

    async def _refuse(self, exc: Refused, context: Any) -> None:
        code = STATUS_CODES[exc.why]
        self.c.refused[code.name] = self.c.refused.get(code.name, 0) + 1
        await context.abort(code, str(exc))

    async def RegisterShard(self, request: Any, context: Any) -> pb.RegisterShardReply:
        return await self._answer(self.c.register_shard, request, context)

    async def RegisterWorker(self, request: Any, context: Any) -> pb.RegisterWorkerReply:
        return await self._answer(self.c.register_worker, request, context)

    async def RegisterEvaluator(self, request: Any, context: Any) -> pb.RegisterEvaluatorReply:
        return await self._answer(self.c.register_evaluator, request, context)

    async def Heartbeat(self, request: Any, context: Any) -> pb.HeartbeatReply:
        return await self._answer(self.c.heartbeat, request, context)

    async def ReportEvaluation(self, request: Any, context: Any) -> pb.EvaluationReply:
        return await self._answer(self.c.report_evaluation, request, context)

    async def Status(self, request: Any, context: Any) -> pb.ClusterStatus:
        return self.c.status()

    async def UploadInitial(self, requests: Any, context: Any) -> pb.UploadInitialReply:
        try:
            fingerprint, params = await self._assemble(requests)
            return pb.UploadInitialReply(accepted=self.c.accept_initial(fingerprint, params))
        except Refused as exc:
            await self._refuse(exc, context)
            raise

    async def _assemble(self, requests: AsyncIterator[pb.TensorChunk]) -> tuple[int, np.ndarray]:
        """The streamed initial parameters: in order, of the layout's size, nothing else."""
        layout = self.c.layout
        if layout is None:
            raise Refused(Refusal.MISMATCH, "the coordinator does not know the model's layout")
        params = np.empty(layout.size, np.float32)
        filled, fingerprint = 0, 0
        async for chunk in requests:
            if len(chunk.data) % 4:
                raise Refused(Refusal.INVALID, "initial values are not float32")
            piece = np.frombuffer(chunk.data, np.float32)
            if (
                chunk.name != "params"
                or chunk.total != layout.size
                or chunk.offset != filled
                or filled + piece.size > layout.size
            ):
                raise Refused(Refusal.INVALID, "initial values out of order or of the wrong size")
            params[filled : filled + piece.size] = piece
            filled += piece.size
            fingerprint = chunk.layout_fingerprint
            self.c.upload_progress = time.monotonic()
        if filled != layout.size:
            raise Refused(Refusal.INVALID, f"received {filled} of {layout.size} initial values")
        return fingerprint, params

    async def FetchInitialShard(self, request: Any, context: Any) -> AsyncIterator[pb.TensorChunk]:
        try:
            arrays = self.c.initial_arrays(request.shard_id, request.layout_fingerprint)
        except Refused as exc:
            await self._refuse(exc, context)
            raise
        for name, values in arrays.items():
            for chunk in tensor_chunks(name, values):
                yield chunk

    async def SaveCheckpoint(self, request: Any, context: Any) -> AsyncIterator[pb.CheckpointPiece]:
        c = self.c
        if not c.shards_ready() or c.layout is None:
            await context.abort(
                grpc.StatusCode.UNAVAILABLE,
                f"cannot checkpoint while waiting for {c.waiting_for()}",
            )
        assert c.layout is not None
        for shard_id in range(c.config.num_shards):
            async for piece in _shard_checkpoint(
                c, shard_id, request.reason, context, self.security
            ):
                yield piece
        manifest = {
            "model": c.config.model,
            "fingerprint": c.layout.fingerprint,
            "config": c.config.to_json(),
        }
        yield pb.CheckpointPiece(manifest_json=json.dumps(manifest))

    async def Shutdown(self, request: Any, context: Any) -> pb.ShutdownReply:
        self.c.finish(request.reason or "shutdown requested")
        if not request.wait_for_members:
            self.c.shutdown_requested.set()
        return pb.ShutdownReply()


async def _shard_checkpoint(
    c: Coordinator, shard_id: int, reason: str, context: Any, security: Security | None
) -> AsyncIterator[pb.CheckpointPiece]:
    """Relay one shard's checkpoint stream from its own control service."""
    endpoint = c.shards[shard_id].endpoint
    if endpoint is None or not endpoint.control_address:
        await context.abort(
            grpc.StatusCode.FAILED_PRECONDITION,
            f"shard {shard_id} has no control service to checkpoint through",
        )
    assert endpoint is not None
    async with open_channel(endpoint.control_address, security) as channel:
        stub = pb_grpc.ShardStub(channel)
        try:
            async for piece in stub.Checkpoint(
                pb.CheckpointRequest(reason=reason or "cluster checkpoint"),
                timeout=SHARD_CHECKPOINT_TIMEOUT,
            ):
                yield piece
        except grpc.aio.AioRpcError as exc:
            await context.abort(
                grpc.StatusCode.UNAVAILABLE,
                f"shard {shard_id} failed to checkpoint: {exc.details()}",
            )
