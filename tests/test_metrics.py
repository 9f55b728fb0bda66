"""Prometheus metrics: the families a member, a shard and the coordinator expose, and a
real cluster scraped over HTTP."""

from __future__ import annotations

import socket
import time
import urllib.request
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from dsgd import metrics
from dsgd.errors import ConfigError
from dsgd.proto import control_pb2 as pb
from dsgd.stats import StalenessHistogram
from tests.conftest import ProcessGroup, free_port


def _samples(collector: Any) -> dict[str, float]:
    """name{labels} -> value over everything ``collector`` yields."""
    out = {}
    for family in collector.collect():
        for sample in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
            out[f"{sample.name}{{{labels}}}"] = sample.value
    return out


def test_member_metrics_come_from_the_latest_heartbeat(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(metrics, "_latest", None)
    assert _samples(metrics.MemberCollector()) == {"dsgd_up{role=unregistered}": 0.0}
    counters = {"pushes": 12.0, "bytes_pushed": 4096.0, "peak_rss_bytes": 1e9, "odd name!": 1.0}
    metrics.observe(
        pb.HeartbeatRequest(
            role=pb.ROLE_WORKER,
            id=3,
            stats=pb.MemberStats(version=7, step=40, rate=2.5, loss=0.25, counters=counters),
        )
    )
    got = _samples(metrics.MemberCollector())
    labels = "{id=3,role=worker}"
    assert got[f"dsgd_up{labels}"] == 1.0
    assert got[f"dsgd_steps_total{labels}"] == 40.0
    assert got[f"dsgd_version{labels}"] == 7.0
    assert got[f"dsgd_pushes_total{labels}"] == 12.0
    assert got[f"dsgd_bytes_pushed_total{labels}"] == 4096.0
    assert got[f"dsgd_peak_rss_bytes{labels}"] == 1e9  # a level, not a total
    assert got[f"dsgd_odd_name_total{labels}"] == 1.0


def test_staleness_buckets_are_cumulative_and_end_with_the_total() -> None:
    histogram = StalenessHistogram()
    for staleness in (0, 0, 1, 3, 5, 700):
        histogram.add(staleness)
    buckets = dict(metrics.staleness_buckets(histogram))
    assert buckets["0"] == 2 and buckets["1"] == 3 and buckets["3"] == 4 and buckets["7"] == 5
    assert buckets["511"] == 5 and buckets["+Inf"] == 6
    values = [v for _, v in metrics.staleness_buckets(histogram)]
    assert values == sorted(values)
    assert histogram.sum == 709


def test_metric_names_are_sanitized() -> None:
    assert metrics.metric_name("rejected_layout") == "rejected_layout"
    assert metrics.metric_name("Bytes Pushed/s") == "bytes_pushed_s"
    assert metrics.metric_name("9lives") == ""


def _scrape(port: int, timeout: float = 60) -> str:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
                return str(reply.read().decode())
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def _health(port: int) -> int:
    """The grpc.health.v1 status a process serves on ``port``."""
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        return int(stub.Check(health_pb2.HealthCheckRequest(), timeout=10).status)


def test_a_cluster_serves_its_metrics_over_http_and_workers_their_health(
    processes: ProcessGroup,
) -> None:
    ports = {role: free_port() for role in ("coordinator", "shard", "worker", "health")}
    flags = ["--model", "dsgd.examples.digits:digits_mlp", "--target-accuracy", "1.0"]
    flags += ["--no-evaluator", "--workers", "1", "--shards", "1", "--max-seconds", "120"]
    _, address = processes.start_coordinator(*flags, "--metrics-port", str(ports["coordinator"]))
    processes.start(
        "shard0",
        *("dsgd.shard", "--coordinator", address, "--shard-id", "0"),
        *("--metrics-port", str(ports["shard"])),
    )
    ready = processes.tmp / "worker.ready"
    worker = processes.start(
        "worker",
        *("dsgd.worker", "--coordinator", address, "--ready-file", str(ready)),
        *("--metrics-port", str(ports["worker"]), "--health-port", str(ports["health"])),
    )
    processes.wait_file(ready, worker)
    assert _health(ports["health"]) == health_pb2.HealthCheckResponse.SERVING
    deadline = time.monotonic() + 60
    while "dsgd_pushes_total" not in (shard := _scrape(ports["shard"])):
        assert time.monotonic() < deadline, shard
        time.sleep(0.5)  # the first heartbeat after the first push
    assert 'dsgd_up{id="0",role="shard"} 1.0' in shard
    assert 'dsgd_staleness_bucket{id="0",le="0",role="shard"}' in shard
    assert 'dsgd_staleness_count{id="0",role="shard"}' in shard
    worker_text = _scrape(ports["worker"])
    assert 'dsgd_steps_total{id="0",role="worker"}' in worker_text
    assert "dsgd_bytes_pushed_total" in worker_text
    cluster = _scrape(ports["coordinator"])
    assert 'dsgd_members{role="shard",state="alive"} 1.0' in cluster
    assert 'dsgd_members{role="worker",state="alive"} 1.0' in cluster
    assert "dsgd_target_reached 0.0" in cluster


def test_a_metrics_port_in_use_is_a_one_line_config_error() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(ConfigError, match="choose another --metrics-port"):
            metrics.serve("127.0.0.1", port, member=True)
