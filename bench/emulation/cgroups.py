"""CPU and memory budgets from the cgroup controllers, v1 or v2, whichever the machine has.

A host's group is a child of the cgroup the harness itself runs in (so a limit placed on
the harness, a container's for instance, still bounds every host), in a directory of the
cluster's own: ``<own cgroup>/dsgd-emu-<tag>/<host>`` in every hierarchy that is used
(v1: ``cpu``, ``cpuacct`` when mounted on its own, ``memory``; v2: one directory).

- CPU: a hard quota per period (v1 ``cpu.cfs_quota_us`` / ``cpu.cfs_period_us``, v2
  ``cpu.max``). The period is short (:data:`PERIOD_US`) so a throttled host stalls for a
  few milliseconds at a time, not for the 80-90 ms of the kernel's 100 ms default; the
  kernel refuses quotas under 1 ms, so a budget under 0.1 core gets a longer period.
- Memory: a hard limit (v1 ``memory.limit_in_bytes``, v2 ``memory.max`` with no swap);
  going over it OOM-kills inside the host, as on a small machine.

What is written where is a pure function of the budget (:func:`cpu_settings`,
:func:`memory_settings`), so both versions are tested on any machine.
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

PERIOD_US = 10_000
"""The CFS period (10 ms): the shortest that keeps a 0.1-core quota legal (the kernel's
minimum quota is 1 ms), and short enough that throttling never stalls a host for longer
than a step of a small model; ``python -m bench.emulation --periods`` measures the choice."""

MIN_QUOTA_US = 1_000  # the kernel refuses shorter quotas (and periods)
MAX_PERIOD_US = 1_000_000


class CgroupUnavailable(RuntimeError):
    """This machine's cgroups cannot give hosts a budget (the message is one line)."""


@dataclass(frozen=True)
class CpuUsage:
    """A host's CPU account since its group was made."""

    seconds: float  # CPU time its processes used
    periods: int  # CFS periods in which it was runnable
    throttled_periods: int  # periods in which it hit its quota
    throttled_seconds: float  # time it spent throttled


@dataclass(frozen=True)
class Hierarchies:
    """Where this machine keeps the controllers the harness uses: the directory of the
    harness's own cgroup in each (v1: one per controller, maybe shared; v2: one)."""

    version: int
    cpu: Path
    cpuacct: Path | None = None  # v1, when mounted apart from cpu
    memory: Path | None = None

    def dirs(self) -> list[Path]:
        found = [self.cpu, self.cpuacct, self.memory]
        return list(dict.fromkeys(d for d in found if d is not None))


def cpu_settings(
    version: int, cpus: float | None, period_us: int = PERIOD_US
) -> list[tuple[str, str]]:
    """The files (relative to a host's group) and values, in order, that give it ``cpus``
    cores; None lifts the limit. The period grows where the quota would be under the
    kernel's 1 ms minimum."""
    if cpus is None:
        return [("cpu.max", "max")] if version == 2 else [("cpu.cfs_quota_us", "-1")]
    if cpus <= 0:
        raise ValueError(f"a CPU budget must be positive, got {cpus}")
    period = min(MAX_PERIOD_US, max(period_us, math.ceil(MIN_QUOTA_US / cpus)))
    quota = max(MIN_QUOTA_US, round(cpus * period))
    if version == 2:
        return [("cpu.max", f"{quota} {period}")]
    # the quota lifted first: v1 refuses a period that the old quota would not fit
    return [
        ("cpu.cfs_quota_us", "-1"),
        ("cpu.cfs_period_us", str(period)),
        ("cpu.cfs_quota_us", str(quota)),
    ]


def memory_settings(version: int, limit: int | None) -> dict[str, str]:
    """The files and values that cap a host's memory at ``limit`` bytes (None: no cap)."""
    if version == 2:
        if limit is None:
            return {"memory.max": "max"}
        return {"memory.max": str(limit), "memory.swap.max": "0"}
    return {"memory.limit_in_bytes": "-1" if limit is None else str(limit)}


def _mounts() -> list[tuple[str, Path, str, set[str]]]:
    """(fstype, mount point, root within the hierarchy, super options) of cgroup mounts."""
    found = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        left, _, right = line.partition(" - ")
        fields, tail = left.split(), right.split()
        if len(tail) >= 3 and tail[0] in ("cgroup", "cgroup2"):
            found.append((tail[0], Path(fields[4]), fields[3], set(tail[2].split(","))))
    return found


def _own(controller: str | None) -> str:
    """This process's cgroup path in the v1 hierarchy of ``controller`` (None: v2's)."""
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if (controller is None and controllers == "") or controller in controllers.split(","):
            return path
    raise CgroupUnavailable(f"this process is in no {controller or 'v2'} cgroup")


def _inside(mount: Path, root: str, path: str) -> Path:
    relative = os.path.relpath(path, root) if root != "/" else path.lstrip("/")
    return mount if relative in (".", "") else mount / relative


def find() -> Hierarchies:
    """The controllers this machine has, v1 where its cpu controller is mounted as v1, else
    v2; a one-line :class:`CgroupUnavailable` where there is no usable cpu controller."""
    if not Path("/proc/self/mountinfo").exists():
        raise CgroupUnavailable("CPU budgets need Linux cgroups (no /proc/self/mountinfo)")
    mounts = _mounts()
    v1 = {}
    for fstype, mount, root, options in mounts:
        if fstype == "cgroup":
            for controller in ("cpu", "cpuacct", "memory"):
                if controller in options and controller not in v1:
                    v1[controller] = _inside(mount, root, _own(controller))
    if "cpu" in v1:
        cpuacct = v1.get("cpuacct")
        return Hierarchies(
            1, v1["cpu"], cpuacct if cpuacct != v1["cpu"] else None, v1.get("memory")
        )
    for fstype, mount, root, _ in mounts:
        if fstype == "cgroup2":
            own = _inside(mount, root, _own(None))
            available = (own / "cgroup.controllers").read_text().split()
            if "cpu" not in available:
                raise CgroupUnavailable(
                    f"the cgroup v2 cpu controller is not delegated to {own} "
                    f"(it has: {' '.join(available) or 'none'})"
                )
            return Hierarchies(2, own, None, own if "memory" in available else None)
    raise CgroupUnavailable("no cgroup cpu controller is mounted (v1 cpu or v2)")


def _write(path: Path, value: str) -> None:
    try:
        path.write_text(value)
    except OSError as exc:
        raise CgroupUnavailable(f"cannot write {value!r} to {path}: {exc.strerror}") from None


class ClusterGroups:
    """The cluster's directory in each hierarchy, and one group per budgeted host in it."""

    def __init__(self, hierarchies: Hierarchies, tag: str) -> None:
        self.hierarchies = hierarchies
        self.version = hierarchies.version
        self.roots = [d / f"dsgd-emu-{tag}" for d in hierarchies.dirs()]
        self.hosts: dict[str, list[Path]] = {}

    def make(self) -> None:
        for root in self.roots:
            try:
                root.mkdir()
            except OSError as exc:
                raise CgroupUnavailable(f"cannot make cgroup {root}: {exc.strerror}") from None
        if self.version == 2:
            wanted = ["+cpu"] + (["+memory"] if self.hierarchies.memory else [])
            for parent in (self.roots[0].parent, self.roots[0]):
                enabled = (parent / "cgroup.subtree_control").read_text().split()
                missing = [c for c in wanted if c[1:] not in enabled]
                if missing:
                    _write(parent / "cgroup.subtree_control", " ".join(missing))

    def add(self, host: str, cpus: float | None, memory: int | None, period_us: int) -> None:
        dirs = [root / host for root in self.roots]
        for d in dirs:
            d.mkdir()
        self.hosts[host] = dirs
        self.set_cpus(host, cpus, period_us)
        if memory is not None and self.hierarchies.memory is not None:
            for name, value in memory_settings(self.version, memory).items():
                if self.version == 1 or (self._dir(host, "memory") / name).exists():
                    _write(self._dir(host, "memory") / name, value)

    def _dir(self, host: str, controller: str) -> Path:
        root = getattr(self.hierarchies, controller)
        return root / self.roots[0].name / host

    def set_cpus(self, host: str, cpus: float | None, period_us: int = PERIOD_US) -> None:
        for name, value in cpu_settings(self.version, cpus, period_us):
            _write(self._dir(host, "cpu") / name, value)

    def procs_files(self, host: str) -> list[Path]:
        """Where a process writes its pid to join ``host`` in every hierarchy."""
        return [d / "cgroup.procs" for d in self.hosts[host]]

    def pids(self, host: str) -> set[int]:
        found: set[int] = set()
        for procs in self.procs_files(host):
            with contextlib.suppress(OSError):
                found |= {int(p) for p in procs.read_text().split()}
        return found

    def usage(self, host: str) -> CpuUsage:
        stat = self._stat(self._dir(host, "cpu") / "cpu.stat")
        if self.version == 2:
            return CpuUsage(
                stat.get("usage_usec", 0) / 1e6,
                stat.get("nr_periods", 0),
                stat.get("nr_throttled", 0),
                stat.get("throttled_usec", 0) / 1e6,
            )
        account = self.hierarchies.cpuacct or self.hierarchies.cpu
        used = account / self.roots[0].name / host / "cpuacct.usage"
        nanos = int(used.read_text()) if used.exists() else 0
        return CpuUsage(
            nanos / 1e9,
            stat.get("nr_periods", 0),
            stat.get("nr_throttled", 0),
            stat.get("throttled_time", 0) / 1e9,
        )

    def memory_peak(self, host: str) -> int | None:
        """The most memory ``host`` held at once (bytes), where the kernel tracks it."""
        if self.hierarchies.memory is None:
            return None
        d = self._dir(host, "memory")
        for name in ("memory.peak", "memory.max_usage_in_bytes"):
            if (d / name).exists():
                return int((d / name).read_text())
        return None

    @staticmethod
    def _stat(path: Path) -> dict[str, int]:
        if not path.exists():
            return {}
        pairs = (line.split() for line in path.read_text().splitlines())
        return {p[0]: int(p[1]) for p in pairs if len(p) == 2}

    def remove(self) -> None:
        """Kill what is still in the hosts' groups, then remove every directory made."""
        for host in self.hosts:
            deadline = time.monotonic() + 10.0
            while (pids := self.pids(host)) and time.monotonic() < deadline:
                for pid in pids:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                time.sleep(0.02)
        for d in [d for dirs in self.hosts.values() for d in dirs] + self.roots:
            for _ in range(100):  # a killed process leaves its group a moment later
                try:
                    d.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError:
                    time.sleep(0.05)


def quota_cores(hierarchies: Hierarchies) -> float | None:
    """The tightest CPU quota (in cores) on the harness's own cgroup or an ancestor, None
    where there is none: what the hosts can have in all, whatever the core count."""
    tightest = None
    d = hierarchies.cpu
    while True:
        if hierarchies.version == 2:
            limit = d / "cpu.max"
            if not limit.exists():
                break
            quota, _, period = limit.read_text().partition(" ")
            cores = None if quota == "max" else int(quota) / int(period)
        else:
            limit = d / "cpu.cfs_quota_us"
            if not limit.exists():
                break
            quota_us = int(limit.read_text())
            period_us = int((d / "cpu.cfs_period_us").read_text())
            cores = None if quota_us < 0 else quota_us / period_us
        if cores is not None:
            tightest = cores if tightest is None else min(tightest, cores)
        if d.parent == d:
            break
        d = d.parent
    return tightest
