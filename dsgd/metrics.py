"""Prometheus metrics for operators: any dsgd process serves ``/metrics`` on ``--metrics-port``.

A scrape reads the numbers the process keeps anyway: the stats a member sends in its
heartbeats, a shard's staleness histogram and rejections, the coordinator's status. The
data path pays nothing for it. What lives in the event loop is read on the loop's thread
(the HTTP server has its own), so a scrape never sees a half-updated structure.

Names (the README lists them):

- every member (``role`` and ``id`` labels): ``dsgd_up``, ``dsgd_version``,
  ``dsgd_steps_total``, ``dsgd_step_rate``, ``dsgd_loss``, and each of its counters as
  ``dsgd_<name>_total`` (levels, such as ``dsgd_peak_rss_bytes``, keep their name);
- a shard: ``dsgd_staleness`` (histogram: versions between the fetch a push was computed
  from and its apply) and ``dsgd_rejected_total{reason}``;
- the coordinator: ``dsgd_members{role,state}``, ``dsgd_evaluation{metric}`` (the latest
  evaluation), ``dsgd_evaluations_total``, ``dsgd_target_reached``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
)

from dsgd.errors import ConfigError
from dsgd.proto import control_pb2 as pb
from dsgd.stats import ACKED_PREFIX, STALENESS_EDGES, StalenessHistogram

log = logging.getLogger("dsgd.metrics")

T = TypeVar("T")
READ_TIMEOUT = 2.0  # seconds a scrape waits for the event loop
ROLES = {pb.ROLE_WORKER: "worker", pb.ROLE_SHARD: "shard", pb.ROLE_EVALUATOR: "evaluator"}
LEVELS = frozenset({"peak_rss_bytes", "size", "checkpoint_version", "inflight"})

registry = CollectorRegistry(auto_describe=False)
"""This process's metrics; :func:`serve` exposes them."""

_latest: pb.HeartbeatRequest | None = None


def observe(heartbeat: pb.HeartbeatRequest) -> None:
    """Remember the member's latest heartbeat (what ``dsgd_*`` member metrics report)."""
    global _latest
    _latest = heartbeat


def on_loop(loop: asyncio.AbstractEventLoop, read: Callable[[], T]) -> T:
    """``read()`` on ``loop``'s thread, from another thread; TimeoutError if it is busy."""
    done: concurrent.futures.Future[T] = concurrent.futures.Future()

    def run() -> None:
        try:
            done.set_result(read())
        except BaseException as exc:  # handed to the scraping thread
            done.set_exception(exc)

    loop.call_soon_threadsafe(run)
    return done.result(timeout=READ_TIMEOUT)


class MemberCollector:
    """The member metrics, from the latest heartbeat this process sent."""

    def collect(self) -> Iterator[Any]:
        heartbeat = _latest
        up = GaugeMetricFamily("dsgd_up", "1 once the member reports", labels=["role"])
        if heartbeat is None:
            up.add_metric(["unregistered"], 0.0)
            yield up
            return
        labels, values = ["role", "id"], [ROLES.get(heartbeat.role, "other"), str(heartbeat.id)]
        up = GaugeMetricFamily("dsgd_up", "1 once the member reports", labels=labels)
        up.add_metric(values, 0.0 if heartbeat.leaving else 1.0)
        yield up
        stats = heartbeat.stats
        for name, text, value in (
            ("dsgd_version", "the member's version (a shard's: pushes applied)", stats.version),
            ("dsgd_step_rate", "steps per second, recently", stats.rate),
            ("dsgd_loss", "the latest training loss", stats.loss),
        ):
            gauge = GaugeMetricFamily(name, text, labels=labels)
            gauge.add_metric(values, float(value))
            yield gauge
        steps = CounterMetricFamily("dsgd_steps", "training steps taken", labels=labels)
        steps.add_metric(values, float(stats.step))
        yield steps
        for key in sorted(stats.counters):
            name = metric_name(key)
            if not name or key.startswith(ACKED_PREFIX):  # bookkeeping per incarnation
                continue
            level = key in LEVELS or key.startswith("staleness_")
            kind = GaugeMetricFamily if level else CounterMetricFamily
            family: Any = kind(f"dsgd_{name}", key.replace("_", " "), labels=labels)
            family.add_metric(values, float(stats.counters[key]))
            yield family


class ShardCollector:
    """A shard's staleness histogram and rejections, read on its event loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop, shard_id: int, read: Callable[[], Any]):
        self.loop, self.shard_id = loop, shard_id
        self.read = read  # -> (merged StalenessHistogram, {reason: count})

    def collect(self) -> Iterator[Any]:
        histogram, rejected = on_loop(self.loop, self.read)
        labels, values = ["role", "id"], ["shard", str(self.shard_id)]
        family = HistogramMetricFamily(
            "dsgd_staleness",
            "versions between the fetch a push was computed from and its apply",
            labels=labels,
        )
        family.add_metric(values, staleness_buckets(histogram), sum_value=float(histogram.sum))
        yield family
        refused = CounterMetricFamily(
            "dsgd_rejected", "messages refused, by reason", labels=[*labels, "reason"]
        )
        for reason, count in sorted(rejected.items()):
            refused.add_metric([*values, reason], float(count))
        yield refused


def staleness_buckets(histogram: StalenessHistogram) -> list[tuple[str, float]]:
    """Cumulative Prometheus buckets: staleness <= edge - 1 for each next edge, then +Inf."""
    buckets, cumulative = [], 0
    for upper, count in zip(STALENESS_EDGES[1:], histogram.counts[:-1], strict=True):
        cumulative += int(count)
        buckets.append((str(upper - 1), float(cumulative)))
    buckets.append(("+Inf", float(histogram.total)))
    return buckets


class ClusterCollector:
    """The coordinator's view: members by role and state, the latest evaluation."""

    def __init__(self, loop: asyncio.AbstractEventLoop, status: Callable[[], pb.ClusterStatus]):
        self.loop, self.status = loop, status

    def collect(self) -> Iterator[Any]:
        status = on_loop(self.loop, self.status)
        members = GaugeMetricFamily(
            "dsgd_members", "members of the cluster by role and state", labels=["role", "state"]
        )
        tally: dict[tuple[str, str], int] = {}
        for member in status.members:
            key = (ROLES.get(member.role, "other"), member.state)
            tally[key] = tally.get(key, 0) + 1
        for (role, state), count in sorted(tally.items()):
            members.add_metric([role, state], float(count))
        yield members
        evaluations = CounterMetricFamily("dsgd_evaluations", "evaluations reported")
        evaluations.add_metric([], float(len(status.history)))
        yield evaluations
        latest = GaugeMetricFamily(
            "dsgd_evaluation", "the latest evaluation's metrics", labels=["metric"]
        )
        if status.history:
            last = status.history[-1]
            latest.add_metric(["accuracy"], last.test_accuracy)
            latest.add_metric(["loss"], last.test_loss)
            for name, value in sorted(last.metrics.items()):
                latest.add_metric([metric_name(name) or "unnamed"], value)
        yield latest
        reached = GaugeMetricFamily("dsgd_target_reached", "1 once the run reached its target")
        reached.add_metric([], 1.0 if status.reached_target else 0.0)
        yield reached


def metric_name(key: str) -> str:
    """A counter's name as a metric name: [a-z0-9_] only, never starting with a digit."""
    name = "".join(c if c.isalnum() or c == "_" else "_" for c in key.lower()).strip("_")
    return name if name and not name[0].isdigit() else ""


_server: Any = None


def serve(host: str, port: int, *, member: bool) -> Any:
    """Serve this process's metrics on ``http://host:port/metrics`` from a daemon thread
    (``member``: with the member metrics of its heartbeats); the server, to ``shutdown()``.
    A port in use is a one-line ConfigError."""
    global _server
    try:
        _server, _ = start_http_server(port, addr=host, registry=registry)
    except OSError as exc:
        raise ConfigError(
            f"cannot serve metrics on {host}:{port} ({exc.strerror or exc}); "
            "choose another --metrics-port or stop the process using it"
        ) from None
    if member:
        add(MemberCollector())
    log.info("metrics on http://%s:%d/metrics", host, _server.server_port)
    return _server


def add(collector: Any) -> None:
    """Expose ``collector`` (anything with ``collect()``) while this process serves its
    metrics; a no-op otherwise (an in-process cluster runs many members and serves none)."""
    if _server is not None:
        registry.register(collector)
