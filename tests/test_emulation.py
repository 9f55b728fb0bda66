"""The emulated cluster (bench.emulation): what it writes for a budget, what it refuses,
what a process on a host sees, and that nothing of a cluster outlives it."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from bench.emulation import EmulatedCluster, EmulationRefused, Host, budget_env, unavailable
from bench.emulation.cgroups import cpu_settings, memory_settings
from bench.emulation.cluster import ROOT, parse_bytes

BUDGETED = [Host("a", cpus=0.2, memory="256m", rate="100mbit"), Host("b", cpus=0.3), Host("c")]
WHY_NOT = unavailable(BUDGETED)
needs_hosts = pytest.mark.skipif(WHY_NOT is not None, reason=WHY_NOT or "")

# What a process on a host reports: its environment, its cgroups, which addresses it can
# bind (its own, not another host's), and the CPU it got while spinning for 1 s of wall.
REPORT = textwrap.dedent(
    """
    import json, os, socket, sys, time
    def binds(address):
        with socket.socket() as s:
            try:
                s.bind((address, 0))
                return True
            except OSError:
                return False
    began, cpu = time.monotonic(), time.process_time()
    while time.monotonic() - began < 1.0:
        pass
    spun = (time.process_time() - cpu) / (time.monotonic() - began)
    names = ("NPROC", "XLA_FLAGS", "OMP_NUM_THREADS", "DSGD_HOST", "DSGD_HOST_CPUS")
    print(json.dumps({
        "env": {n: os.environ.get(n) for n in names},
        "cgroup": {line.split(":")[1]: line.split(":", 2)[2]
                   for line in open("/proc/self/cgroup").read().splitlines()},
        "binds": {a: binds(a) for a in sys.argv[1:]},
        "cpu_per_wall": spun,
    }))
    """
)


def test_a_budget_is_a_quota_per_short_period_in_either_cgroup_version() -> None:
    assert cpu_settings(2, 0.2) == [("cpu.max", "2000 10000")]
    assert cpu_settings(1, 0.25)[-2:] == [
        ("cpu.cfs_period_us", "10000"),
        ("cpu.cfs_quota_us", "2500"),
    ]
    assert cpu_settings(1, 0.25)[0] == ("cpu.cfs_quota_us", "-1")  # lifted before the period
    assert cpu_settings(2, 0.05) == [("cpu.max", "1000 20000")]  # a quota is at least 1 ms
    assert cpu_settings(2, 1.5) == [("cpu.max", "15000 10000")]
    assert cpu_settings(2, None) == [("cpu.max", "max")]
    assert cpu_settings(1, None) == [("cpu.cfs_quota_us", "-1")]
    assert memory_settings(2, parse_bytes("1g")) == {
        "memory.max": str(2**30),
        "memory.swap.max": "0",
    }
    assert memory_settings(1, parse_bytes("512m")) == {"memory.limit_in_bytes": str(2**29)}
    assert parse_bytes("1.5g") == 3 * 2**29 and parse_bytes(4096) == 4096


def test_a_host_is_told_its_budget_in_thread_counts() -> None:
    small = budget_env(0.2)
    assert small["NPROC"] == small["OMP_NUM_THREADS"] == small["OPENBLAS_NUM_THREADS"] == "1"
    assert "--xla_cpu_multi_thread_eigen=false" in small["XLA_FLAGS"]
    assert small["DSGD_HOST_CPUS"] == "0.2"
    assert budget_env(1.5)["NPROC"] == "2" and "XLA_FLAGS" not in budget_env(1.5)
    assert budget_env(None) == {}


def test_budgets_over_the_machine_are_refused_in_one_line_before_anything_is_made(
    tmp_path: Path,
) -> None:
    cluster = EmulatedCluster(Host.many("w", 40, cpus=0.2), tmp_path)
    with pytest.raises(EmulationRefused) as refused:
        with cluster:
            pytest.fail("an over-budget cluster was made")
    message = str(refused.value)
    assert "\n" not in message and "add up to 8 cores" in message
    assert cluster.network.tag == 0 and cluster.groups is None  # nothing claimed


@needs_hosts
def test_a_process_on_a_host_runs_in_its_namespace_and_cgroup_told_its_budget(
    tmp_path: Path,
) -> None:
    with EmulatedCluster(BUDGETED, tmp_path) as cluster:
        groups = cluster.groups
        assert groups is not None
        cpu_dir = groups.roots[0] / "a"
        if groups.version == 1:
            quota = (cpu_dir / "cpu.cfs_quota_us").read_text().split()[0]
            assert (quota, (cpu_dir / "cpu.cfs_period_us").read_text().strip()) == ("2000", "10000")
        else:
            assert (cpu_dir / "cpu.max").read_text().split() == ["2000", "10000"]
        addresses = [cluster.address["a"], cluster.address["b"]]
        report = cluster.run("a", "report", sys.executable, "-c", REPORT, *addresses)
        plain = cluster.run("c", "plain", sys.executable, "-c", REPORT, cluster.address["c"])
        assert report.wait(timeout=30) == 0 and plain.wait(timeout=30) == 0
        seen = json.loads(cluster.log("report"))
        unbudgeted = json.loads(cluster.log("plain"))
        usage = cluster.usage("a")
        qdisc = subprocess.run(
            ["tc", "qdisc", "show", "dev", cluster.network.veth["a"]],
            capture_output=True,
            text=True,
            timeout=30,
        ).stdout
    assert seen["binds"] == {cluster.address["a"]: True, cluster.address["b"]: False}
    assert seen["cgroup"]["cpu"].endswith(f"/dsgd-emu-{cluster.network.tag}/a")
    assert seen["env"]["NPROC"] == seen["env"]["OMP_NUM_THREADS"] == "1"
    assert "--xla_cpu_multi_thread_eigen=false" in seen["env"]["XLA_FLAGS"]
    assert (seen["env"]["DSGD_HOST"], seen["env"]["DSGD_HOST_CPUS"]) == ("a", "0.2")
    assert 0.05 < seen["cpu_per_wall"] < 0.3, seen  # the quota holds a spinning process
    assert usage.seconds > 0.05 and usage.throttled_periods > 10
    assert "tbf" in qdisc and "100Mbit" in qdisc
    assert unbudgeted["binds"] == {cluster.address["c"]: True}
    assert unbudgeted["env"]["NPROC"] is None and "dsgd-emu" not in unbudgeted["cgroup"]["cpu"]
    assert cluster.leftovers() == []


@needs_hosts
def test_nothing_is_left_behind_when_the_body_raises(tmp_path: Path) -> None:
    cluster = EmulatedCluster(BUDGETED, tmp_path)
    with pytest.raises(RuntimeError, match="the body failed"):
        with cluster:
            sleeper = cluster.run("a", "sleeper", "sleep", "60")
            made = cluster.network.leftovers()
            assert len(made) == 1 + 2 * len(BUDGETED)  # bridge, each namespace and veth
            raise RuntimeError("the body failed")
    assert sleeper.poll() is not None
    assert cluster.leftovers() == []
    assert all(not root.exists() for root in cluster.groups.roots)  # type: ignore[union-attr]


HARNESS = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from bench.emulation import EmulatedCluster, Host
    hosts = [Host("a", cpus=0.2, memory="128m"), Host("b")]
    with EmulatedCluster(hosts, Path(sys.argv[1])) as cluster:
        cluster.run("a", "sleeper", "sleep", "60")
        cluster.run("b", "sleeper-b", "sleep", "60")
        print(cluster.network.tag, *[str(r) for r in cluster.groups.roots], flush=True)
        time.sleep(60)
    """
)


@needs_hosts
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_to_the_harness_removes_its_cluster(tmp_path: Path, signum: int) -> None:
    harness = subprocess.Popen(
        [sys.executable, "-c", HARNESS, str(tmp_path)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert harness.stdout is not None
    tag, *roots = harness.stdout.readline().split()
    harness.send_signal(signum)
    _, err = harness.communicate(timeout=60)
    assert harness.returncode != 0, err
    names = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=30)
    assert not [n for n in names.stdout.split() if n.startswith(f"dsgd{tag}-")]
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True, timeout=30)
    assert f"dsgdbr{tag}:" not in links.stdout and f"dsgd{tag}v" not in links.stdout
    assert roots and not [r for r in roots if Path(r).exists()]
