"""The evaluator: judges the parameters on the held-out split, off every server's loop.

    python -m dsgd.evaluator --coordinator HOST:PORT [--model MOD:ATTR]

It registers with the coordinator (describing the model, as a worker does), reads the
whole parameter vector from the shards every ``eval_every`` seconds as a worker's full
fetch would, evaluates it in a thread and reports each result; the coordinator decides
whether the target is reached. Workers are admitted once the first read is done (not
the first evaluation: at 75M parameters that takes many seconds). Periodic evaluations
use a fixed sample of ``--eval-sample`` held-out examples; once the run is over, the
final parameters are evaluated on the whole split, which the summary reports. A model
function that raises ends the run: the evaluator reports why and exits with a usage
error, since a restart would fail the same way. The supervisor starts one evaluator;
``dsgd.train`` runs it in a thread.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import secrets
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass

import grpc
import numpy as np
import zmq.asyncio

from dsgd import wire
from dsgd.config import FINAL_EVALUATION_SECONDS, TrainConfig
from dsgd.control import CoordinatorLink, layout_message, shard_infos, stats_message
from dsgd.errors import Closed, ModelError, PeerLost, ProtocolError
from dsgd.layout import aligned_empty
from dsgd.model import EAGER, CompiledModel, ModelSpec
from dsgd.proto import control_pb2 as pb
from dsgd.runtime import add_member_arguments, owned, run_process, setup_logging, write_ready_file
from dsgd.security import Security, from_arguments
from dsgd.shard.client import ParameterReader
from dsgd.stats import CounterRecord, RateMeter, paced_interval
from dsgd.types import ShardInfo
from dsgd.worker.process import load_cluster_model

log = logging.getLogger("dsgd.evaluator")


DUTY = 0.25  # the most of its time the evaluator spends evaluating (it shares the cores)
# the evaluator process's scheduling niceness: where it shares cores with workers, the
# workers' steps come first
NICENESS = 10


@dataclass(slots=True)
class EvaluatorCounters(CounterRecord):
    """The evaluator's cumulative counters, reported in its heartbeat under these names."""

    evaluations: int = 0
    evaluations_skipped: int = 0  # the parameters could not be read (a shard did not answer)
    eval_seconds: float = 0.0  # spent evaluating, in all


class Evaluator:
    """Reads the parameters, evaluates them, reports; until the run is over."""

    def __init__(
        self,
        compiled: CompiledModel,
        config: TrainConfig,
        shards: Sequence[ShardInfo],
        context: zmq.asyncio.Context,
        incarnation: int,
        security: Security | None = None,
    ) -> None:
        self.compiled = compiled
        self.config = config
        self.shards = list(shards)
        self.incarnation = incarnation
        self.reader = ParameterReader(compiled.layout.fingerprint, context, security=security)
        self.flat = aligned_empty(compiled.layout.size)
        self.rate = RateMeter()
        self.counters = EvaluatorCounters()
        self.last: dict[str, float] = {}
        self.sample = compiled.evaluation_sample(config.eval_sample, config.seed)
        self.over = asyncio.Event()  # the run is over (the final evaluation is still to come)
        self.finished = asyncio.Event()  # nothing more to evaluate: heartbeats may end

    async def aclose(self) -> None:
        await self.reader.aclose()

    async def run(
        self, link: CoordinatorLink, stop: asyncio.Event, ready_file: str | None = None
    ) -> None:
        """Evaluate every ``eval_every`` seconds until the run is over (or ``stop``), then
        the whole split once; write ``ready_file`` once the first evaluation is reported."""
        try:
            await self._periodic(link, stop, ready_file)
            if self.over.is_set() and not stop.is_set() and self.sample is not None:
                await self._final(link)
        finally:
            self.finished.set()

    async def _periodic(
        self, link: CoordinatorLink, stop: asyncio.Event, ready_file: str | None
    ) -> None:
        next_at = time.monotonic()
        while not (stop.is_set() or self.over.is_set()):
            await _wait_any((stop, self.over), next_at - time.monotonic())
            if stop.is_set() or self.over.is_set():
                return
            began = time.monotonic()
            evaluation = await self.evaluate_once(link, self.sample)
            if evaluation is None:  # a shard did not answer: try again soon (it may have
                next_at = began + self.config.eval_every  # moved), not paced by the wait
                continue
            next_at = began + paced_interval(self.config.eval_every, time.monotonic() - began, DUTY)
            report = pb.EvaluationReport(incarnation=self.incarnation, evaluation=evaluation)
            reply = await link.call(link.stub.ReportEvaluation, report, "reporting an evaluation")
            if self.counters.evaluations == 1:
                write_ready_file(ready_file, {"role": "evaluator"})
            if reply.shutdown:
                log.info("evaluator: the run is over (%s)", reply.reason)
                self.over.set()

    async def _final(self, link: CoordinatorLink) -> None:
        """Evaluate the final parameters on the whole held-out split and report it, unless
        that would take longer than FINAL_EVALUATION_SECONDS (going by the sample's cost)."""
        assert self.sample is not None
        total = len(self.compiled.spec.dataset.x_test)
        counters = self.counters
        per_example = counters.eval_seconds / max(1, counters.evaluations * len(self.sample))
        expected = per_example * total
        if counters.evaluations and expected > FINAL_EVALUATION_SECONDS:
            log.warning(
                "no final evaluation: the whole split (%d examples) would take about %.0f s; "
                "the last result covers a sample of %d",
                total,
                expected,
                len(self.sample),
            )
            return
        evaluation = await self.evaluate_once(link, None)
        if evaluation is None:
            return
        evaluation.final = True
        report = pb.EvaluationReport(incarnation=self.incarnation, evaluation=evaluation)
        await link.call(link.stub.ReportEvaluation, report, "reporting the final evaluation")
        shown = ", ".join(f"{k} {v:.4g}" for k, v in sorted(evaluation.metrics.items()))
        log.info("final evaluation of all %d held-out examples: %s", total, shown)

    async def evaluate_once(
        self, link: CoordinatorLink, rows: np.ndarray | None
    ) -> pb.Evaluation | None:
        """Read the current parameters and evaluate them on ``rows`` of the held-out split
        (None: all of it); None if a shard did not answer. The first read is reported at
        once: workers wait for it, so that the first evaluation sees the initial parameters.

        A model function that raises is reported to the coordinator (ending the run)
        and raised as a ModelError.
        """
        try:
            total_version = await self.reader.read(self.shards, self.flat)
        except (PeerLost, ProtocolError, Closed) as exc:
            self.counters.evaluations_skipped += 1
            log.warning("evaluation skipped: %s", exc)
            return None
        if not self.counters.evaluations:
            read = pb.EvaluationReport(incarnation=self.incarnation, read=True)
            await link.call(link.stub.ReportEvaluation, read, "reporting the first read")
        began = time.perf_counter()
        try:
            metrics = await asyncio.to_thread(self.compiled.evaluate, self.flat, rows)
        except ModelError as exc:
            report = pb.EvaluationReport(incarnation=self.incarnation, failure=str(exc))
            with contextlib.suppress(grpc.aio.AioRpcError, PeerLost):
                await link.call(link.stub.ReportEvaluation, report, "reporting a failure")
            raise
        seconds = time.perf_counter() - began
        if not self.counters.evaluations and self.compiled.outputs_path == EAGER:
            log.warning("JAX cannot trace apply, so it is evaluated eagerly on NumPy arrays")
        examples = len(self.compiled.spec.dataset.x_test) if rows is None else len(rows)
        self.counters.evaluations += 1
        self.counters.eval_seconds += seconds
        self.rate.add()
        self.last = metrics
        return pb.Evaluation(
            test_accuracy=float(metrics.get("accuracy", 0.0)),
            test_loss=float(metrics.get("loss", 0.0)),
            total_version=total_version,
            metrics=metrics,
            eval_seconds=seconds,
            examples=examples,
        )

    def heartbeat(self, leaving: bool = False) -> pb.HeartbeatRequest:
        stats = {"rate": self.rate.rate(), "counters": self.counters.as_dict()}
        return pb.HeartbeatRequest(
            role=pb.ROLE_EVALUATOR,
            id=0,
            incarnation=self.incarnation,
            stats=stats_message(stats),
            leaving=leaving,
        )


async def _heartbeats(
    link: CoordinatorLink,
    evaluator: Evaluator,
    request: pb.RegisterEvaluatorRequest,
    stop: asyncio.Event,
) -> None:
    """Report liveness (through the final evaluation too); follow moved shards; say
    when the run is over."""
    while not (stop.is_set() or evaluator.finished.is_set()):
        reply = await link.heartbeat_once(evaluator.heartbeat())
        if reply is not None and reply.shutdown:
            evaluator.over.set()
        if reply is not None and reply.shards:
            evaluator.shards = shard_infos(reply.shards)
        if reply is not None and reply.reregister and not reply.shutdown:
            # the coordinator restarted: register again until admitted, then read from the
            # shards where it says they are (one may have moved while it was down)
            log.info("evaluator: coordinator restarted; registering again")
            again = None
            with contextlib.suppress(PeerLost):  # down again for long: the next beat retries
                again = await link.register(
                    link.stub.RegisterEvaluator,
                    request,
                    stop,
                    "the evaluator again",
                    (lambda: evaluator.flat) if evaluator.counters.evaluations else None,
                )
            if again is not None:
                evaluator.shards = shard_infos(again.shards)
        await _wait_any((stop, evaluator.finished), evaluator.config.heartbeat_interval)


async def _wait_any(events: Sequence[asyncio.Event], seconds: float) -> None:
    """Return once any of ``events`` is set, or after ``seconds``."""
    waits = [asyncio.ensure_future(e.wait()) for e in events]
    try:
        await asyncio.wait(waits, timeout=max(0.0, seconds), return_when=asyncio.FIRST_COMPLETED)
    finally:
        for w in waits:
            w.cancel()


async def run_evaluator(
    coordinator: str,
    stop: asyncio.Event,
    *,
    spec: ModelSpec | None = None,
    model: str | None = None,
    ready_file: str | None = None,
    connect_timeout: float = 60.0,
    security: Security | None = None,
) -> None:
    """Evaluate for the cluster at ``coordinator`` until the run ends (or ``stop``)."""
    link = CoordinatorLink(coordinator, give_up_after=connect_timeout, stop=stop, security=security)
    ctx = zmq.asyncio.Context()
    try:
        config, compiled = await load_cluster_model(link, spec, model)
        request = pb.RegisterEvaluatorRequest(
            layout=layout_message(compiled.layout),
            host=socket.gethostname(),
            protocol_version=wire.PROTOCOL_VERSION,
            incarnation=secrets.randbits(62) + 1,
        )
        reply = await link.register(
            link.stub.RegisterEvaluator, request, stop, "the evaluator", compiled.initial_flat
        )
        if reply is None:
            return
        shards = shard_infos(reply.shards)
        evaluator = Evaluator(compiled, config, shards, ctx, request.incarnation, security)
        try:
            async with asyncio.TaskGroup() as group:
                beats = group.create_task(
                    owned("heartbeats", _heartbeats(link, evaluator, request, stop))
                )
                await owned("evaluation", evaluator.run(link, stop, ready_file))
                beats.cancel()
        finally:
            with contextlib.suppress(grpc.aio.AioRpcError):
                await link.heartbeat_once(evaluator.heartbeat(leaving=True))
            await evaluator.aclose()
    finally:
        await link.aclose()
        ctx.term()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m dsgd.evaluator",
        description="Evaluate a dsgd cluster's parameters on the model's held-out split.",
    )
    add_member_arguments(parser, "write a line here (JSON) once an evaluation is reported")
    parser.add_argument(
        "--model", help="package.module:factory (default: the model the coordinator runs)"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging("evaluator", args.log_level)
    os.nice(NICENESS)  # before any thread starts: threads inherit it

    async def evaluator_main(stop: asyncio.Event) -> int:
        await run_evaluator(
            args.coordinator,
            stop,
            model=args.model,
            ready_file=args.ready_file,
            connect_timeout=args.connect_timeout,
            security=from_arguments(args),
        )
        return 0

    return run_process("evaluator", evaluator_main, args)


if __name__ == "__main__":
    import sys

    sys.exit(main())
