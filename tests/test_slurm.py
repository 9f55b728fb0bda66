"""deploy/slurm/dsgd.sbatch for real: a Slurm cluster made on this machine (slurmctld on one
network-namespace host, a slurmd on each of three others, munge for authentication, all
of it the test's own and removed afterwards) runs the heterogeneous job, which trains
digits to its target. Behind the ``slurm`` marker; skipped where Slurm is not installed
(Debian: ``apt-get install slurm-wlm munge``, as .ci/run does)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.hosts import ROOT, Hosts, unavailable

NODES = ["n0", "n1", "n2"]
NEEDED = ("slurmctld", "slurmd", "sbatch", "sinfo", "munged")


def why_not() -> str | None:
    missing = [tool for tool in NEEDED if shutil.which(tool) is None]
    if missing:
        tools = ", ".join(missing)
        return f"Slurm is not installed ({tools} missing; apt-get install slurm-wlm munge)"
    return unavailable()


WHY_NOT = why_not()
pytestmark = [
    pytest.mark.slurm,
    pytest.mark.slow,
    pytest.mark.skipif(WHY_NOT is not None, reason=WHY_NOT or ""),
]


def slurm_conf(tmp: Path, hosts: Hosts, munge_socket: Path) -> str:
    nodes = "\n".join(
        f"NodeName={n} NodeAddr={hosts.address[n]} CPUs=2 RealMemory=2000 State=UNKNOWN"
        for n in NODES
    )
    # the namespaces share this machine's hostname: slurmctld checks its own against it
    return f"""\
ClusterName=dsgdtest
SlurmctldHost={socket.gethostname()}({hosts.address["ctl"]})
MailProg=/bin/true
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket={munge_socket}
CredType=cred/munge
StateSaveLocation={tmp}/state
SlurmdSpoolDir={tmp}/spool/%n
SlurmctldPidFile={tmp}/slurmctld.pid
SlurmdPidFile={tmp}/slurmd-%n.pid
SlurmctldLogFile={tmp}/slurmctld.log
SlurmdLogFile={tmp}/slurmd-%n.log
# one machine, several slurmd: no cgroups or systemd to lean on
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SlurmdParameters=config_overrides
MpiDefault=none
SwitchType=switch/none
ReturnToService=2
SlurmctldTimeout=30
SlurmdTimeout=30
{nodes}
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
"""


CGROUP_CONF = """\
CgroupPlugin=cgroup/v1
IgnoreSystemd=yes
CgroupAutomount=no
ConstrainCores=no
ConstrainRAMSpace=no
"""


@pytest.fixture
def slurm(tmp_path: Path) -> Iterator[tuple[Hosts, dict[str, str]]]:
    with Hosts(["ctl", *NODES], tmp_path) as hosts:
        munge = tmp_path / "munge"
        munge.mkdir(mode=0o700)
        key = munge / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o600)
        socket_path = munge / "munge.sock"
        hosts.run(
            "ctl",
            "munged",
            *("munged", "--foreground", "--force", f"--socket={socket_path}"),
            *(f"--key-file={key}", f"--pid-file={munge}/munged.pid"),
            *(f"--log-file={munge}/munged.log", f"--seed-file={munge}/munged.seed"),
        )
        for sub in ("state", *(f"spool/{n}" for n in NODES)):
            (tmp_path / sub).mkdir(parents=True)
        conf = tmp_path / "slurm.conf"
        conf.write_text(slurm_conf(tmp_path, hosts, socket_path))
        (tmp_path / "cgroup.conf").write_text(CGROUP_CONF)
        env = {**os.environ, "SLURM_CONF": str(conf)}
        hosts.wait_for("munged's socket", socket_path.exists, timeout=30)
        hosts.run("ctl", "slurmctld", "slurmctld", "-D", "-i", "-f", str(conf), env=env)
        for node in NODES:
            hosts.run(node, f"slurmd-{node}", "slurmd", "-D", "-N", node, "-f", str(conf), env=env)

        def idle() -> bool:
            out = subprocess.run(
                ["ip", "netns", "exec", hosts.netns["ctl"], "sinfo", "-h", "-N", "-o", "%N %T"],
                capture_output=True,
                text=True,
                env=env,
                timeout=30,
            )
            states = dict(line.split() for line in out.stdout.splitlines() if line.strip())
            return sorted(states) == NODES and all(s == "idle" for s in states.values())

        try:
            hosts.wait_for("every slurmd to register idle", idle, timeout=90)
        except AssertionError as exc:
            logs = "\n".join(
                f"--- {p.name}\n{p.read_text()[-1500:]}"
                for p in sorted(tmp_path.glob("slurm*.log"))
            )
            raise AssertionError(f"{exc}\n{logs}") from None
        yield hosts, env


def test_the_heterogeneous_batch_job_trains_digits_to_its_target(
    slurm: tuple[Hosts, dict[str, str]], tmp_path: Path
) -> None:
    hosts, env = slurm
    # component 0's two tasks serve one range, replicated: a primary and a backup
    env = {**env, "DSGD_PYTHON": sys.executable, "PYTHONPATH": str(ROOT), "DSGD_REPLICAS": "2"}
    script = ROOT / "deploy" / "slurm" / "dsgd.sbatch"
    started = time.monotonic()
    job = subprocess.run(
        ["ip", "netns", "exec", hosts.netns["ctl"], "sbatch", "--wait", "--parsable"]
        + ["-D", str(tmp_path), str(script), "--target-accuracy", "0.95", "--max-seconds", "150"],
        capture_output=True,
        text=True,
        env=env,
        timeout=400,
    )
    outputs = "\n".join(p.read_text()[-3000:] for p in tmp_path.glob("dsgd-*.out"))
    assert job.returncode == 0, f"{job.stdout}{job.stderr}\n{outputs}"
    job_id = job.stdout.strip().split(";")[0]
    status = json.loads((tmp_path / f"dsgd-{job_id}-status.json").read_text())
    assert status["reached_target"], status.get("done_reason")
    roles = [m["role"] for m in status["members"]]
    assert roles.count("ROLE_SHARD") == 2 and roles.count("ROLE_WORKER") == 2, roles
    shards = [m for m in status["members"] if m["role"] == "ROLE_SHARD"]
    assert sorted(m.get("replica", 0) for m in shards) == [0, 1], shards
    assert {m.get("id", 0) for m in shards} == {0} and status["num_shards"] == 1
    assert time.monotonic() - started < 400
