"""``dsgd.train``: a whole local cluster inside one Python process, for notebooks and tests.

The coordinator, every shard, the evaluator and every worker run in their own thread
with their own event loop, talking over real sockets on 127.0.0.1 exactly as separate processes
would. Unlike ``scripts/start_cluster.sh``, the model may be a :class:`ModelSpec`
object defined in the notebook itself (nothing is pickled or re-imported).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import zmq.asyncio
from google.protobuf import json_format

from dsgd.config import TrainConfig, target_for_accuracy
from dsgd.coordinator.process import run_coordinator
from dsgd.errors import Closed, ConfigError, DsgdError
from dsgd.evaluator import run_evaluator
from dsgd.layout import Layout
from dsgd.members import Member, MemberRole, cluster_members
from dsgd.model import ModelSpec, load_model
from dsgd.report import summarize
from dsgd.runtime import root_cause
from dsgd.shard.process import run_shard
from dsgd.types import FlatParams, PyTree
from dsgd.worker.process import run_worker

JOIN_TIMEOUT = 60.0


@dataclass
class TrainResult:
    """What :func:`train` returns."""

    params: PyTree  # the final parameters, shaped like the model's initial ones
    history: list[dict[str, float]]  # one entry per evaluation: elapsed_seconds, accuracy, ...
    summary: dict[str, Any]  # the same summary start_cluster.sh prints
    status: dict[str, Any]  # the coordinator's final status (members and their counters)


class _Role(threading.Thread):
    """One role's event loop in a thread; ``stop()`` may be called from any thread.

    A shard's role owns the ZeroMQ context its sockets are made in (``context``), which is
    what lets :meth:`crash` end it as abruptly as a killed process."""

    def __init__(
        self,
        name: str,
        main: Callable[[asyncio.Event], Coroutine[Any, Any, Any]],
        context: zmq.asyncio.Context | None = None,
    ):
        super().__init__(name=name, daemon=True)
        self._main = main
        self._context = context
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop_event: asyncio.Event | None = None
        self.crashed = False
        self.started_event = threading.Event()
        self.result: Any = None
        self.error: BaseException | None = None

    def run(self) -> None:
        async def body() -> Any:
            self._loop = asyncio.get_running_loop()
            self._stop_event = asyncio.Event()
            self.started_event.set()
            return await self._main(self._stop_event)

        try:
            with contextlib.ExitStack() as owned:
                if self._context is not None:
                    owned.enter_context(self._context)  # closed once the loop is
                self.result = asyncio.run(body())
        except BaseException as exc:  # reported by train(), a task group's failure unwrapped
            cause = root_cause(exc)
            stopped = self._stop_event is not None and self._stop_event.is_set()
            if not (stopped and isinstance(cause, Closed)):  # Closed: stopped while waiting
                self.error = cause
        finally:
            self.started_event.set()

    def request_stop(self) -> None:
        if self.ident is None:
            return  # never started
        self.started_event.wait()
        loop, stop = self._loop, self._stop_event
        if loop is not None and stop is not None and not loop.is_closed():
            try:
                loop.call_soon_threadsafe(stop.set)
            except RuntimeError:  # the loop finished meanwhile
                pass

    def crash(self) -> None:
        """End this role the way SIGKILL ends a process, for tests of failover: its
        sockets close at once (linger 0) and its thread stops where it is, for good, so
        nothing it would say on the way out (a last checkpoint, heartbeat or goodbye) is
        said and its peers find it gone as they would a dead process.

        Like a killed process's memory, the rest of what it held (its tasks, its gRPC
        server) stays as it was until this process exits: a loop stopped mid-flight and
        resumed later to clean up crashed CPython 3.11 in one run out of three."""
        context = self._context
        if context is None:
            raise ValueError(f"{self.name} cannot crash: only a shard's role owns its sockets")
        self.started_event.wait()
        loop = self._loop
        if loop is None or self.crashed:
            return
        self.crashed = True
        never = threading.Event()

        def die() -> None:
            context.destroy(linger=0)
            never.wait()  # nothing of this role runs again

        loop.call_soon_threadsafe(die)


class LocalCluster:
    """A whole cluster in this process: the coordinator, then every member
    :func:`~dsgd.members.cluster_members` names (the same list the supervisor starts as
    processes), each a :class:`_Role` thread. :func:`train` is :meth:`start` then
    :meth:`wait`; tests hold the cluster in between to reach its members."""

    def __init__(
        self, spec: ModelSpec, config: TrainConfig, checkpoint_dir: Path | None = None
    ) -> None:
        self.spec = spec
        self.config = config
        self.checkpoint_dir = checkpoint_dir  # None: shards do not checkpoint
        self.address = ""  # the coordinator's, once started
        self.coordinator: _Role | None = None
        self.members: dict[str, _Role] = {}  # by member name: shard0, shard0-r1, worker3, ...

    def start(self) -> None:
        """Start the coordinator, then, once it serves, every member."""
        port_ready = threading.Event()
        address: list[str] = []

        def announce(addr: str) -> None:
            address.append(addr)
            port_ready.set()

        async def coordinator_main(stop: asyncio.Event) -> Any:
            return await run_coordinator(self.config, stop, linger=JOIN_TIMEOUT, on_ready=announce)

        coordinator = self.coordinator = _Role("dsgd-coordinator", coordinator_main)
        coordinator.start()
        while not port_ready.wait(0.05):
            if not coordinator.is_alive():
                raise coordinator.error or DsgdError("the coordinator did not start")
        self.address = address[0]
        self.members = {member.name: self._role(member) for member in cluster_members(self.config)}
        try:
            for role in self.members.values():
                role.start()
        except BaseException:
            self.close()
            raise

    def _role(self, member: Member) -> _Role:
        """The thread that runs ``member``, with the options the supervisor gives its
        process (see :meth:`dsgd.supervisor.Supervisor.member_argv`)."""
        name, address, spec = f"dsgd-{member.name}", self.address, self.spec
        if member.role is MemberRole.SHARD:
            context = zmq.asyncio.Context()
            checkpoints = self.checkpoint_dir
            main = partial(
                run_shard,
                address,
                member.shard_id,
                replica=member.replica,
                checkpoint_dir=None if checkpoints is None else member.checkpoint_dir(checkpoints),
                context=context,
            )
            return _Role(name, main, context)
        if member.role is MemberRole.EVALUATOR:
            return _Role(name, partial(run_evaluator, address, spec=spec))
        return _Role(name, partial(run_worker, address, spec=spec, worker_id=member.worker_id))

    def crash(self, name: str) -> None:
        """Kill member ``name`` (a shard) abruptly: see :meth:`_Role.crash`."""
        self.members[name].crash()

    def wait(self) -> TrainResult:
        """Until the run is over (a member that fails for good ends it); the result."""
        coordinator = self.coordinator
        assert coordinator is not None, "start() the cluster first"
        try:
            while coordinator.is_alive():
                coordinator.join(0.2)
                if any(role.error is not None for role in self.members.values()):
                    coordinator.request_stop()  # a member failed for good: end the run now
        except KeyboardInterrupt:
            coordinator.request_stop()
            raise
        finally:
            self._stop_members()
        for role in [coordinator, *self.members.values()]:
            if role.error is not None:
                raise role.error
        final, params = coordinator.result
        status = final.status()
        if status.failed:
            raise (ConfigError if status.usage_error else DsgdError)(status.done_reason)
        layout = Layout.from_pytree(self.spec.init_params, self.config.num_shards)
        return _result(status, params, layout)

    def close(self) -> None:
        """End the run now and stop every thread (what a failed test calls)."""
        if self.coordinator is not None:
            self.coordinator.request_stop()
            self.coordinator.join(JOIN_TIMEOUT)
        self._stop_members()

    def _stop_members(self) -> None:
        for role in self.members.values():
            role.request_stop()
        for role in self.members.values():
            if not role.crashed:  # (a crashed one never ends)
                role.join(JOIN_TIMEOUT)


def train(
    model: ModelSpec | str,
    *,
    num_workers: int | None = None,
    num_shards: int | None = None,
    config: TrainConfig | None = None,
    checkpoint_dir: str | os.PathLike[str] | None = None,
    **overrides: Any,
) -> TrainResult:
    """Train ``model`` with Downpour SGD on a local cluster; return parameters and history.

    ``model`` is a :class:`ModelSpec` or ``"package.module:factory"``. Every
    :class:`TrainConfig` field can be given as a keyword (``lr=0.05``, ``max_seconds=60``,
    ``target="loss<=0.3"``; ``target_accuracy=A`` stands for ``target="accuracy>=A"``),
    or in ``config``; a keyword wins, and ``num_workers``/``num_shards`` left out are
    ``config``'s (2 each by default). Each field means what it means to
    ``scripts/start_cluster.sh``, the same members run (``replicas=2``: two shard threads
    per range, a backup taking over when the primary dies), with these exceptions, each
    refused in one line rather than ignored:

    - ``data`` and ``model_args`` are a factory's arguments: with a :class:`ModelSpec`
      (already built) they are refused. ``seed`` then orders the batches and the
      evaluation sample; the initial parameters are the spec's own.
    - Shards checkpoint only to ``checkpoint_dir`` (``DIR/replicaJ`` per replica when
      replicated), and restore from it at start, like ``dsgd start --checkpoint-dir DIR``:
      a second call with the same directory resumes where the first stopped. Without one
      they do not checkpoint (nothing in-process restarts from a checkpoint), and a
      ``checkpoint_every`` or ``checkpoint_keep`` other than the default is refused.

    A run that fails raises: a :class:`~dsgd.errors.ConfigError` for the user's mistake
    (a model function that raised, a target the metrics do not have), else a DsgdError.
    """
    accuracy = overrides.pop("target_accuracy", None)
    if accuracy is not None:
        if "target" in overrides:
            raise ConfigError("give target or target_accuracy, not both")
        overrides["target"] = target_for_accuracy(accuracy)
    sizes = {"num_workers": num_workers, "num_shards": num_shards}
    overrides.update({k: v for k, v in sizes.items() if v is not None})
    name = model if isinstance(model, str) else f"{getattr(model, 'name', 'model')}:<in-process>"
    config = (config or TrainConfig()).with_(model=name, **overrides)
    _refuse_what_would_go_unused(config, isinstance(model, str), checkpoint_dir is not None)
    if isinstance(model, str):
        spec = load_model(model, seed=config.seed, data=config.data, args=config.model_args)
    else:
        spec = model
    cluster = LocalCluster(spec, config, None if checkpoint_dir is None else Path(checkpoint_dir))
    cluster.start()
    return cluster.wait()


def _refuse_what_would_go_unused(config: TrainConfig, factory: bool, checkpointing: bool) -> None:
    """A ConfigError for a field an in-process run would not honour (see :func:`train`)."""
    default = TrainConfig()
    given = [f for f in ("data", "model_args") if getattr(config, f) != getattr(default, f)]
    if given and not factory:
        raise ConfigError(
            f"{' and '.join(given)} are arguments of a model factory, and dsgd.train was "
            "given a ModelSpec already built: pass them to the factory yourself, or name "
            "the model as 'package.module:factory'"
        )
    shaping = [
        f"{f}={getattr(config, f)}"
        for f in ("checkpoint_every", "checkpoint_keep")
        if getattr(config, f) != getattr(default, f)
    ]
    if shaping and not checkpointing:
        raise ConfigError(
            f"{', '.join(shaping)}: an in-process cluster checkpoints only when given "
            "somewhere to write; pass dsgd.train(..., checkpoint_dir=DIR), or leave "
            "checkpoint_every and checkpoint_keep at their defaults"
        )


def _result(status: Any, params: FlatParams | None, layout: Layout) -> TrainResult:
    if params is None:
        raise DsgdError(f"the run ended without final parameters: {status.done_reason}")
    history = [
        {
            "elapsed_seconds": h.elapsed_seconds,
            "test_accuracy": h.test_accuracy,
            "examples": h.examples,
            "final": h.final,
            **h.metrics,
        }
        for h in status.history
    ]
    return TrainResult(
        params=layout.unflatten(params),
        history=history,
        summary=summarize(status, status.elapsed_seconds),
        status=json_format.MessageToDict(status, preserving_proto_field_name=True),
    )
