"""``dsgd.train``: a whole local cluster inside one Python process, for notebooks and tests.

The coordinator, every shard, the evaluator and every worker run in their own thread
with their own event loop, talking over real sockets on 127.0.0.1 exactly as separate processes
would. Unlike ``scripts/start_cluster.sh``, the model may be a :class:`ModelSpec`
object defined in the notebook itself (nothing is pickled or re-imported).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from functools import partial
from typing import Any

from google.protobuf import json_format

from dsgd.config import TrainConfig, target_for_accuracy
from dsgd.coordinator.process import run_coordinator
from dsgd.errors import Closed, ConfigError, DsgdError
from dsgd.evaluator import run_evaluator
from dsgd.layout import Layout
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
    """One role's event loop in a thread; ``stop()`` may be called from any thread."""

    def __init__(self, name: str, main: Callable[[asyncio.Event], Coroutine[Any, Any, Any]]):
        super().__init__(name=name, daemon=True)
        self._main = main
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop_event: asyncio.Event | None = None
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


def train(
    model: ModelSpec | str,
    *,
    num_workers: int = 2,
    num_shards: int = 2,
    config: TrainConfig | None = None,
    **overrides: Any,
) -> TrainResult:
    """Train ``model`` with Downpour SGD on a local cluster; return parameters and history.

    ``model`` is a :class:`ModelSpec` or ``"package.module:factory"``. Any
    :class:`TrainConfig` field can be given as a keyword (``lr=0.05``, ``max_seconds=60``,
    ``target="loss<=0.3"``; ``target_accuracy=A`` stands for ``target="accuracy>=A"``).

    A run that fails raises: a :class:`~dsgd.errors.ConfigError` for the user's mistake
    (a model function that raised, a target the metrics do not have), else a DsgdError.
    """
    accuracy = overrides.pop("target_accuracy", None)
    if accuracy is not None:
        if "target" in overrides:
            raise ConfigError("give target or target_accuracy, not both")
        overrides["target"] = target_for_accuracy(accuracy)
    base = config or TrainConfig()
    name = model if isinstance(model, str) else f"{getattr(model, 'name', 'model')}:<in-process>"
    config = base.with_(model=name, num_workers=num_workers, num_shards=num_shards, **overrides)
    if isinstance(model, str):
        spec = load_model(model, seed=config.seed, data=config.data, args=config.model_args)
    else:
        spec = model
    port_ready = threading.Event()
    address: list[str] = []

    def announce(addr: str) -> None:
        address.append(addr)
        port_ready.set()

    async def coordinator_main(stop: asyncio.Event) -> Any:
        return await run_coordinator(config, stop, linger=JOIN_TIMEOUT, on_ready=announce)

    coordinator = _Role("dsgd-coordinator", coordinator_main)
    coordinator.start()
    while not port_ready.wait(0.05):
        if not coordinator.is_alive():
            raise coordinator.error or DsgdError("the coordinator did not start")
    roles = _member_roles(address[0], config, spec)
    try:
        for role in roles:
            role.start()
        while coordinator.is_alive():
            coordinator.join(0.2)
            if any(role.error is not None for role in roles):
                coordinator.request_stop()  # a member failed for good: end the run now
    except KeyboardInterrupt:
        coordinator.request_stop()
        raise
    finally:
        for role in roles:
            role.request_stop()
        for role in roles:
            role.join(JOIN_TIMEOUT)
    for role in [coordinator, *roles]:
        if role.error is not None:
            raise role.error
    final, params = coordinator.result
    status = final.status()
    if status.failed:
        raise (ConfigError if status.usage_error else DsgdError)(status.done_reason)
    return _result(status, params, Layout.from_pytree(spec.init_params, num_shards))


def _member_roles(address: str, config: TrainConfig, spec: ModelSpec) -> list[_Role]:
    """The shards, the evaluator and the workers of an in-process cluster (not started)."""
    roles = [
        _Role(f"dsgd-shard{k}", partial(run_shard, address, k)) for k in range(config.num_shards)
    ]
    if config.evaluator:
        roles.append(_Role("dsgd-evaluator", partial(run_evaluator, address, spec=spec)))
    roles += [
        _Role(f"dsgd-worker{k}", partial(run_worker, address, spec=spec, worker_id=k))
        for k in range(config.num_workers)
    ]
    return roles


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
