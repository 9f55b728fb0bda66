"""An emulated cluster of small machines on this one: hosts with a network namespace, a
CPU budget, a memory limit and a shaped link, made and removed by the harness.

Every process started on a host runs in its namespace (``ip netns exec``: its own
loopback, one address on the cluster's bridge, its own ``/sys/class/net``) and in its
cgroup (a wrapping ``sh`` writes its own pid into the groups' ``cgroup.procs`` and then
execs, so the process and everything it starts are charged from their first
instruction), with its budget in the environment: the thread pools of XLA's CPU client,
Eigen and BLAS sized to the host's cores (:func:`budget_env`), so a 0.2-core host runs
as a small one-core machine, not as a throttled copy of this one.

The budgets never add up to more than the machine has, less a margin for the harness
itself (its polling, ``ip``, the kernel's work on the bridge): the cluster refuses, in
one line (:class:`EmulationRefused`), before it makes anything.
"""

from __future__ import annotations

import math
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import IO, Any, TypeVar

from bench.emulation import cgroups
from bench.emulation.cgroups import PERIOD_US, CgroupUnavailable, ClusterGroups, CpuUsage
from bench.emulation.network import Network, namespaces_unavailable, netem_unavailable

ROOT = Path(__file__).resolve().parents[2]
HARNESS_MARGIN = 0.2
"""Cores kept out of the hosts' budgets for the harness process and the kernel's work
on the bridge and the veths."""

T = TypeVar("T")

# The wrapper every budgeted process starts in: join the host's groups, then exec.
_JOIN = (
    'for f; do [ "$f" = -- ] && break; echo $$ > "$f" || exit 125; shift; done; shift; exec "$@"'
)


class EmulationRefused(RuntimeError):
    """The cluster cannot be made here, or not with these budgets (a one-line message)."""


_UNITS = {"": 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}


def parse_bytes(size: int | str) -> int:
    """Bytes from ``2147483648``, ``"512m"``, ``"2g"`` (binary units)."""
    if isinstance(size, int):
        return size
    found = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?)i?b?\s*", size.lower())
    if not found:
        raise ValueError(f"memory {size!r} is not like 512m or 2g")
    return int(float(found.group(1)) * _UNITS[found.group(2)])


@dataclass(frozen=True)
class Host:
    """One emulated machine: ``cpus`` cores (a fraction of one is a CFS quota), ``memory``
    (bytes or "2g"), a link of ``rate`` ("1gbit") and ``delay`` ("0.2ms", needs netem).
    None leaves that resource as this machine has it."""

    name: str
    cpus: float | None = None
    memory: int | str | None = None
    rate: str | None = None
    delay: str | None = None

    @classmethod
    def many(cls, prefix: str, count: int, **budget: Any) -> list[Host]:
        """``count`` hosts named ``prefix0``, ``prefix1``, ... with the same budget."""
        return [cls(f"{prefix}{k}", **budget) for k in range(count)]

    @property
    def memory_bytes(self) -> int | None:
        return None if self.memory is None else parse_bytes(self.memory)

    @property
    def budgeted(self) -> bool:
        return self.cpus is not None or self.memory is not None


def budget_env(cpus: float | None) -> dict[str, str]:
    """What a process on a host of ``cpus`` cores is told, so that its thread pools are
    sized to the host and not to this machine: XLA's CPU client sizes its execution pool
    from ``NPROC`` (else from the affinity mask: every core here), Eigen's own pool is
    off with ``--xla_cpu_multi_thread_eigen=false``, and the BLAS and OpenMP libraries
    read their usual variables. ``python -m bench.emulation`` measures the effect."""
    if cpus is None:
        return {}
    threads = str(max(1, math.ceil(cpus - 1e-9)))
    env = {
        name: threads
        for name in (
            "NPROC",
            "PJRT_NPROC",
            "OMP_NUM_THREADS",
            "OPENBLAS_NUM_THREADS",
            "MKL_NUM_THREADS",
            "BLIS_NUM_THREADS",
            "NUMEXPR_NUM_THREADS",
            "VECLIB_MAXIMUM_THREADS",
        )
    }
    if threads == "1":
        env["XLA_FLAGS"] = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
    env["DSGD_HOST_CPUS"] = f"{cpus:g}"
    return env


def machine_cpus() -> float:
    """The cores the hosts may share: this process's affinity mask, or its cgroup's CPU
    quota where that is tighter (a container's, say)."""
    cores: float = len(os.sched_getaffinity(0))
    try:
        quota = cgroups.quota_cores(cgroups.find())
    except (CgroupUnavailable, OSError):
        quota = None
    return cores if quota is None else min(cores, quota)


def _available_memory() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 0


def refusal(hosts: Sequence[Host], margin: float = HARNESS_MARGIN) -> str | None:
    """Why these hosts cannot be made here (one line), or None when they can. The
    budgets are checked first, so an over-budget cluster is refused anywhere."""
    names = [h.name for h in hosts]
    bad = [n for n in names if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,31}", n)]
    if bad:
        return f"host names must be letters, digits, '_', '.', '-' (at most 32): {bad}"
    if len(set(names)) != len(names):
        return f"host names repeat: {sorted(n for n in set(names) if names.count(n) > 1)}"
    cpus = [h.cpus for h in hosts if h.cpus is not None]
    if any(c <= 0 for c in cpus):
        return f"CPU budgets must be positive: {cpus}"
    has = machine_cpus()
    if cpus and sum(cpus) > has - margin + 1e-9:
        return (
            f"the hosts' CPU budgets add up to {sum(cpus):g} cores, more than this machine's "
            f"{has:g} less {margin:g} for the harness ({has - margin:g})"
        )
    memory = [m for h in hosts if (m := h.memory_bytes) is not None]
    if memory and sum(memory) > (free := _available_memory()):
        return (
            f"the hosts' memory adds up to {sum(memory) / 2**30:.1f} GiB, more than this "
            f"machine has available ({free / 2**30:.1f} GiB)"
        )
    why = namespaces_unavailable()
    if why:
        return why
    if any(h.budgeted for h in hosts):
        try:
            found = cgroups.find()
        except CgroupUnavailable as exc:
            return str(exc)
        except OSError as exc:
            return f"cannot read this machine's cgroups: {exc}"
        if memory and found.memory is None:
            return "memory limits need the cgroup memory controller, which is not mounted"
    if any(h.delay for h in hosts):
        return netem_unavailable()
    return None


def unavailable(hosts: Sequence[Host] = (Host("probe"),)) -> str | None:
    """For a test's skip: why ``hosts`` (by default, one bare namespace host) cannot be
    made here, in one line, or None."""
    return refusal(hosts)


class EmulatedCluster:
    """``with EmulatedCluster([Host("worker0", cpus=0.2, memory="1g", rate="1gbit"), ...],
    logs) as cluster``: the hosts, made on entry and removed on exit (also when the body
    raises, and on SIGINT or SIGTERM), with every process started on them.

    ``period_us`` is the CFS period of every budget; ``margin`` the cores kept for the
    harness. Entering raises :class:`EmulationRefused` (one line) where it cannot be made.
    """

    def __init__(
        self,
        hosts: Iterable[Host | str],
        logs: Path,
        *,
        period_us: int = PERIOD_US,
        margin: float = HARNESS_MARGIN,
    ) -> None:
        self.hosts = {h.name: h for h in (Host(h) if isinstance(h, str) else h for h in hosts)}
        self.names = list(self.hosts)
        self.logs = Path(logs)
        self.period_us = period_us
        self.margin = margin
        self.network = Network(self.names)
        self.groups: ClusterGroups | None = None
        self.procs: list[tuple[str, subprocess.Popen[str]]] = []
        self._previous_sigterm: Any = None

    # -- where things are ------------------------------------------------------------------

    @property
    def address(self) -> dict[str, str]:
        """Each host's address on the bridge (the harness reaches them all from here)."""
        return self.network.address

    @property
    def netns(self) -> dict[str, str]:
        """Each host's network namespace (``ip netns`` name)."""
        return self.network.netns

    @property
    def subnet(self) -> str:
        return self.network.subnet

    @property
    def bridge(self) -> str:
        return self.network.bridge

    # -- making and removing ---------------------------------------------------------------

    def __enter__(self) -> EmulatedCluster:
        why = refusal(list(self.hosts.values()), self.margin)
        if why:
            raise EmulationRefused(why)
        self._catch_sigterm()
        try:
            self._make()
        except BaseException as exc:
            self._remove()
            if isinstance(exc, (CgroupUnavailable, RuntimeError, subprocess.CalledProcessError)):
                detail = getattr(exc, "stderr", None) or str(exc)
                raise EmulationRefused(f"cannot make the cluster: {detail.strip()}") from exc
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self._remove()

    def _make(self) -> None:
        self.logs.mkdir(parents=True, exist_ok=True)
        self.network.make()
        budgeted = [h for h in self.hosts.values() if h.budgeted]
        if budgeted:
            self.groups = ClusterGroups(cgroups.find(), str(self.network.tag))
            self.groups.make()
            for host in budgeted:
                self.groups.add(host.name, host.cpus, host.memory_bytes, self.period_us)
        for host in self.hosts.values():
            if host.rate or host.delay:
                self.network.shape(host.name, host.rate or "10gbit", host.delay or "")

    def _remove(self) -> None:
        """Stop every process, remove groups, namespaces, veths and bridge; signals wait
        until it is done (a second Ctrl-C must not leave half a cluster behind)."""
        masked = {signal.SIGINT, signal.SIGTERM}
        in_main = threading.current_thread() is threading.main_thread()
        if in_main:
            signal.pthread_sigmask(signal.SIG_BLOCK, masked)
        try:
            self.stop_all()
            if self.groups is not None:
                self.groups.remove()
            self.network.remove()
        finally:
            if in_main:
                self._restore_sigterm()
                signal.pthread_sigmask(signal.SIG_UNBLOCK, masked)

    def _catch_sigterm(self) -> None:
        """SIGTERM ends the harness through ``__exit__`` (as SIGINT does), where nobody else
        has claimed it."""
        if threading.current_thread() is not threading.main_thread():
            return
        if signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
            return

        def ended(signum: int, frame: FrameType | None) -> None:
            raise SystemExit(128 + signum)

        self._previous_sigterm = signal.signal(signal.SIGTERM, ended)

    def _restore_sigterm(self) -> None:
        if self._previous_sigterm is not None:
            signal.signal(signal.SIGTERM, self._previous_sigterm)
            self._previous_sigterm = None

    def leftovers(self) -> list[str]:
        """What of this cluster still exists (namespaces, links, cgroup directories)."""
        left = self.network.leftovers() if self.network.tag else []
        if self.groups is not None:
            left += [str(d) for d in self.groups.roots if d.exists()]
        return left

    # -- budgets ---------------------------------------------------------------------------

    def env(self, host: str) -> dict[str, str]:
        """The environment a process on ``host`` is told its budget with."""
        spec = self.hosts[host]
        env = budget_env(spec.cpus)
        if spec.budgeted:
            env["DSGD_HOST"] = host
        if spec.memory is not None:
            env["DSGD_HOST_MEMORY"] = str(spec.memory_bytes)
        return env

    def set_cpus(self, host: str, cpus: float | None) -> None:
        """Give ``host`` a new CPU budget now (its processes keep their thread settings);
        refused like a new cluster where the budgets would add up to too much."""
        spec = self.hosts[host]
        if self.groups is None or host not in self.groups.hosts:
            raise EmulationRefused(f"{host} was made without a budget; give it one up front")
        changed = Host(spec.name, cpus, spec.memory, spec.rate, spec.delay)
        others = [h for h in self.hosts.values() if h.name != host]
        why = refusal([*others, changed], self.margin)
        if why:
            raise EmulationRefused(why)
        self.groups.set_cpus(host, cpus, self.period_us)
        self.hosts[host] = changed

    def usage(self, host: str) -> CpuUsage:
        """The CPU ``host`` used and how often its quota throttled it, since it was made."""
        if self.groups is None or host not in self.groups.hosts:
            raise ValueError(f"{host} has no budget, so no cgroup account")
        return self.groups.usage(host)

    def memory_peak(self, host: str) -> int | None:
        """The most memory ``host``'s processes held at once, in bytes (None: not tracked)."""
        if self.groups is None or host not in self.groups.hosts:
            return None
        return self.groups.memory_peak(host)

    # -- processes -------------------------------------------------------------------------

    def start(self, host: str, label: str, *args: str, **kwargs: Any) -> subprocess.Popen[str]:
        """``python -m ARGS`` on ``host`` (output in ``logs/label.log``)."""
        return self.run(host, label, sys.executable, "-m", *args, **kwargs)

    def run(
        self,
        host: str,
        label: str,
        *command: str,
        env: dict[str, str] | None = None,
        pipe: bool = False,
    ) -> subprocess.Popen[str]:
        """Any command on ``host``: in its namespace and its cgroup, told its budget, from
        the repository root, stopped with the others on exit. ``env`` replaces this
        process's environment (the budget is added to it; XLA flags are merged). ``pipe``:
        stdin and stdout are pipes for the caller (stderr still goes to the log)."""
        full = dict(os.environ if env is None else env)
        for name, value in self.env(host).items():
            full[name] = (
                f"{full[name]} {value}" if name == "XLA_FLAGS" and full.get(name) else value
            )
        argv = ["ip", "netns", "exec", self.netns[host], *command]
        if self.groups is not None and host in self.groups.hosts:
            procs = [str(p) for p in self.groups.procs_files(host)]
            argv = ["sh", "-c", _JOIN, "sh", *procs, "--", *argv]
        log = self.logs / f"{label}.log"
        with open(log, "w") as out:
            proc = subprocess.Popen(
                argv,
                cwd=ROOT,
                stdout=subprocess.PIPE if pipe else out,
                stderr=out if pipe else subprocess.STDOUT,
                stdin=subprocess.PIPE if pipe else subprocess.DEVNULL,
                text=True,
                env=full,
            )
        self.procs.append((label, proc))
        return proc

    def log(self, label: str) -> str:
        path = self.logs / f"{label}.log"
        return path.read_text() if path.exists() else ""

    def stop_all(self, timeout: float = 15.0) -> None:
        """SIGTERM every process started here, SIGKILL what is left after ``timeout``."""
        for _, proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for _, proc in self.procs:
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            for stream in (proc.stdin, proc.stdout):
                _close(stream)

    def wait_for(self, what: str, predicate: Callable[[], T], timeout: float) -> T:
        """Poll ``predicate()`` until it returns something true; fail with ``what``, or
        with the log of a process that exited with an error meanwhile."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for label, proc in self.procs:
                if proc.poll() not in (None, 0):
                    raise AssertionError(
                        f"{label} exited with {proc.returncode}:\n{self.log(label)[-3000:]}"
                    )
            value = predicate()
            if value:
                return value
            time.sleep(0.2)
        raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")

    # -- the network -----------------------------------------------------------------------

    def cut(self, host: str) -> None:
        """Take ``host`` off the network (its end of the bridge goes down)."""
        self.network.cut(host)

    def heal(self, host: str) -> None:
        self.network.heal(host)

    def shape(self, host: str, rate: str, delay: str = "") -> None:
        """Limit ``host``'s link both ways to ``rate``, delayed by ``delay`` (needs netem)."""
        self.network.shape(host, rate, delay)


def _close(stream: IO[str] | None) -> None:
    if stream is not None and not stream.closed:
        try:
            stream.close()
        except OSError:
            pass
