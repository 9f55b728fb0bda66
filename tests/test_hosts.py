"""dsgd across hosts: every role in its own network namespace, started as the README says,
trains digits to its target; with a worker's and a shard's link cut for a while, too."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from dsgd import keys
from tests.conftest import cluster_status
from tests.hosts import ROOT, Hosts, unavailable

WHY_NOT = unavailable()
pytestmark = pytest.mark.skipif(WHY_NOT is not None, reason=WHY_NOT or "")

PORT = "7070"
ROLES = ["coord", "shard0", "shard1", "worker0", "worker1"]
TRAINING = ["--workers", "2", "--shards", "2"]
TO_TARGET = ["--target-accuracy", "0.95"]
# a step budget outlasts a 5 s cut (digits reaches its target in about 3 s of training, so
# a target could end the run while a worker is cut off and its counters unreported)
STEP_BUDGET = 3000


@pytest.fixture
def hosts(tmp_path: Path) -> Iterator[Hosts]:
    with Hosts(ROLES, tmp_path) as made:
        yield made


def start_cluster(
    hosts: Hosts, tmp: Path, max_seconds: int, until: list[str] = TO_TARGET
) -> tuple[Any, str]:
    """The README's multi-machine recipe, one role per host, secured with one key directory
    (off loopback plaintext is refused), training ``until`` (flags); the coordinator's
    process and address."""
    coordinator = f"{hosts.address['coord']}:{PORT}"
    keys.init(tmp / "keys", [])
    secure = ("--secure", str(tmp / "keys"))
    status_file = tmp / "status.json"
    coord = hosts.start(
        "coord",
        "coordinator",
        "dsgd.coordinator",
        *("--host", "0.0.0.0", "--port", PORT, *TRAINING, *until),
        *("--max-seconds", str(max_seconds), "--status-file", str(status_file), *secure),
    )
    hosts.start("coord", "evaluator", "dsgd.evaluator", "--coordinator", coordinator, *secure)
    for k in range(2):
        host = f"shard{k}"
        hosts.start(
            host,
            host,
            "dsgd.shard",
            *("--coordinator", coordinator, "--shard-id", str(k)),
            *("--host", "0.0.0.0", "--advertise-host", hosts.address[host], *secure),
        )
    for k in range(2):
        hosts.start(
            f"worker{k}", f"worker{k}", "dsgd.worker", "--coordinator", coordinator, *secure
        )
    return coord, coordinator


def finish(hosts: Hosts, coord: Any, tmp: Path, timeout: float) -> dict[str, Any]:
    """Wait for the coordinator to end the run; its final status."""
    try:
        code = coord.wait(timeout=timeout)
    except Exception:
        log = hosts.log("coordinator")[-3000:]
        raise AssertionError(f"the run did not end in {timeout:.0f} s:\n{log}") from None
    assert code == 0, f"coordinator exited {code}:\n{hosts.log('coordinator')[-3000:]}"
    return dict(json.loads((tmp / "status.json").read_text()))


def members(status: dict[str, Any], role: str) -> list[dict[str, Any]]:
    return [m for m in status.get("members", []) if m["role"] == role]


def assert_nothing_applied_twice(status: dict[str, Any]) -> None:
    """Every chunk a worker sent is applied at most once: the shards applied no more values
    than the workers pushed (a lost chunk goes back to its worker's residual and leaves in
    a later push, never as a resend of the same one), and saw no duplicate."""
    shards = [m.get("stats", {}).get("counters", {}) for m in members(status, "ROLE_SHARD")]
    workers = [m.get("stats", {}).get("counters", {}) for m in members(status, "ROLE_WORKER")]
    applied = sum(float(s.get("values_applied", 0)) for s in shards)
    pushed = sum(float(w.get("values_pushed", 0)) for w in workers)
    assert 0 < applied <= pushed, (applied, pushed)
    assert sum(float(s.get("duplicates", 0)) for s in shards) == 0


def test_each_role_on_its_own_host_trains_digits_to_its_target(
    hosts: Hosts, tmp_path: Path
) -> None:
    coord, _ = start_cluster(hosts, tmp_path, max_seconds=150)
    status = finish(hosts, coord, tmp_path, timeout=200)
    assert status["reached_target"], status.get("done_reason")
    assert_nothing_applied_twice(status)


@pytest.mark.slow
@pytest.mark.parametrize("victim", ["worker1", "shard1"])
def test_a_host_cut_off_for_5_s_and_healed_does_not_stop_the_run(
    hosts: Hosts, tmp_path: Path, victim: str
) -> None:
    """The run ends only once both workers have taken every step of their budget, so the
    victim must come back after the heal and finish its share; the model still learns."""
    budget = ["--target", "none", "--max-steps", str(STEP_BUDGET)]
    coord, address = start_cluster(hosts, tmp_path, max_seconds=200, until=budget)

    def training() -> bool:
        shards = members(cluster_status(address, tmp_path / "keys"), "ROLE_SHARD")
        versions = [int(m.get("stats", {}).get("version", 0)) for m in shards]
        return len(versions) == 2 and min(versions) >= 20

    hosts.wait_for("both shards to apply 20 pushes", training, timeout=120)
    hosts.cut(victim)
    healed = threading.Timer(5.0, hosts.heal, args=(victim,))
    healed.start()
    try:
        status = finish(hosts, coord, tmp_path, timeout=260)
    finally:
        healed.cancel()
        healed.join()
    assert "step budget" in status["done_reason"], status["done_reason"]
    steps = [int(m.get("stats", {}).get("step", 0)) for m in members(status, "ROLE_WORKER")]
    assert steps == [STEP_BUDGET, STEP_BUDGET], steps
    last = status["history"][-1]  # (digits' test split is small: every evaluation is whole)
    assert last["metrics"]["accuracy"] >= 0.95, last
    assert_nothing_applied_twice(status)


def test_the_cycle_benchmark_across_shaped_hosts_loses_and_doubles_nothing(
    tmp_path: Path,
) -> None:
    """bench.ps_cycle --hosts: every server and worker in a namespace of its own, the links
    shaped to 1 Gbit/s; both servers applied exactly the acknowledged pushes."""
    out = tmp_path / "cycle.json"
    argv = ["--params", "50000", "--workers", "2", "--shards", "2", "--seconds", "1"]
    argv += ["--warmup", "0.5", "--hosts", "--shape", "1gbit", "--out", str(out)]
    proc = subprocess.run(
        [sys.executable, "-m", "bench.ps_cycle", *argv],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    doc = json.loads(out.read_text())
    assert doc["hosts"] == "a host each, bridged, every link 1gbit"
    for server in ("dsgd", "tcp"):
        figures = doc[server]
        assert figures["head_exact"] and figures["pushes_match"], figures
        assert figures["pulls"] > 0
