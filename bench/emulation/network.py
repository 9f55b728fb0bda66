"""The emulated network: a network namespace per host on a private bridge, links shaped
with ``tc``.

Each host is a namespace with its own loopback and one address on a bridge the cluster
makes (``10.213.<tag>.0/24``; the harness's own end is ``.1``, hosts from ``.2``). Nothing
routes that subnet anywhere, so traffic stays between the namespaces the cluster made.
A host's link is its veth pair: rate-limited both ways with a token bucket (``tbf``), or
with ``netem`` when it also has a delay, which needs the kernel's ``sch_netem``
(:func:`netem_unavailable` says whether this kernel has it). Needs root and ``ip``/``tc``.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess

SUBNET = "10.213"
PREFIX = "dsgd"  # every namespace, veth and bridge the harness makes starts with it


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check, timeout=30)


def tc(netns: str | None, *args: str) -> subprocess.CompletedProcess[str]:
    where = ["-n", netns] if netns else []
    return subprocess.run(["tc", *where, *args], capture_output=True, text=True, timeout=30)


def namespaces_unavailable() -> str | None:
    """Why namespace hosts cannot be made here (one line), or None when they can."""
    if not os.uname().sysname == "Linux":
        return "network namespaces need Linux"
    if os.geteuid() != 0:
        return "making network namespaces needs root"
    for tool, package in (("ip", "iproute2"), ("tc", "iproute2"), ("sh", "a POSIX shell")):
        if shutil.which(tool) is None:
            return f"the {tool} command ({package}) is not installed"
    probe = f"{PREFIX}probe{os.getpid()}"
    made = ip("netns", "add", probe, check=False)
    if made.returncode != 0:
        return f"cannot make a network namespace: {made.stderr.strip()}"
    ip("netns", "del", probe, check=False)
    return None


def netem_unavailable() -> str | None:
    """Why links cannot be delayed here (one line), or None when ``sch_netem`` works."""
    probe = f"{PREFIX}netem{os.getpid()}"
    if ip("netns", "add", probe, check=False).returncode != 0:
        return "cannot make a scratch namespace to look for sch_netem"
    try:
        ip("-n", probe, "link", "add", "vtha", "type", "veth", "peer", "name", "vthb")
        done = tc(probe, "qdisc", "add", "dev", "vtha", "root", "netem", "delay", "1ms")
        if done.returncode == 0:
            return None
        return (
            "this kernel has no sch_netem (CONFIG_NET_SCH_NETEM), so links are rate-limited "
            f"but not delayed ({done.stderr.strip() or 'tc refused netem'})"
        )
    finally:
        ip("netns", "del", probe, check=False)


def tc_rate_bits(rate: str) -> int:
    """``tc``'s rate units ("100mbit", "1gbit", "10gbit", "800kbit") in bits per second."""
    units = {"kbit": 10**3, "mbit": 10**6, "gbit": 10**9, "tbit": 10**12, "bit": 1}
    for unit, scale in units.items():
        if rate.endswith(unit) and rate[: -len(unit)].replace(".", "", 1).isdigit():
            return int(float(rate[: -len(unit)]) * scale)
    raise ValueError(f"rate {rate!r} is not like 1gbit or 100mbit")


class Network:
    """One bridge and a namespace per host, named from a tag no other live cluster uses."""

    def __init__(self, names: list[str]) -> None:
        self.names = list(names)
        self.tag = 0
        self.netns: dict[str, str] = {}
        self.veth: dict[str, str] = {}
        self.address: dict[str, str] = {}
        self.made = False

    @property
    def subnet(self) -> str:
        return f"{SUBNET}.{self.tag}"

    @property
    def bridge(self) -> str:
        return f"{PREFIX}br{self.tag}"

    def _claim_tag(self) -> None:
        """Make the bridge under the first free tag from this process's id (two clusters,
        in this process or in concurrent runs, never share names or a subnet)."""
        first = os.getpid() % 250
        for k in range(250):
            tag = (first + k) % 250 + 1
            made = ip("link", "add", f"{PREFIX}br{tag}", "type", "bridge", check=False)
            if made.returncode == 0:
                self.tag = tag
                self.made = True
                return
        raise RuntimeError("no free bridge name dsgdbr1-250: remove stale ones (ip link del)")

    def make(self) -> None:
        self._claim_tag()
        self.netns = {n: f"{PREFIX}{self.tag}-{n}" for n in self.names}
        self.veth = {n: f"{PREFIX}{self.tag}v{i}" for i, n in enumerate(self.names)}
        self.address = {n: f"{self.subnet}.{i + 2}" for i, n in enumerate(self.names)}
        ip("addr", "add", f"{self.subnet}.1/24", "dev", self.bridge)  # the harness's own end
        ip("link", "set", self.bridge, "up")
        for name in self.names:
            ns, veth, peer = self.netns[name], self.veth[name], self.veth[name] + "p"
            ip("netns", "add", ns)
            ip("link", "add", veth, "type", "veth", "peer", "name", peer)
            ip("link", "set", peer, "netns", ns)
            ip("link", "set", veth, "master", self.bridge)
            ip("link", "set", veth, "up")
            ip("-n", ns, "link", "set", "lo", "up")
            ip("-n", ns, "addr", "add", f"{self.address[name]}/24", "dev", peer)
            ip("-n", ns, "link", "set", peer, "up")

    def remove(self) -> None:
        """Kill what still runs in the namespaces (a namespace with a process in it outlives
        ``ip netns del``, and keeps its veth), then remove namespaces, veths and bridge."""
        if not self.made:
            return
        for ns in self.netns.values():
            pids = ip("netns", "pids", ns, check=False).stdout.split()
            for pid in pids:
                with contextlib.suppress(ProcessLookupError, ValueError):
                    os.kill(int(pid), signal.SIGKILL)
        for name in self.netns:
            ip("netns", "del", self.netns[name], check=False)  # takes its veth pair along
            ip("link", "del", self.veth[name], check=False)
        ip("link", "del", self.bridge, check=False)
        self.made = False

    def leftovers(self) -> list[str]:
        """What of this cluster still exists: namespaces, links (empty once removed)."""
        own = re.compile(rf"^{PREFIX}{self.tag}(-|v)|^{PREFIX}br{self.tag}$")
        names = ip("netns", "list", check=False).stdout.split()
        links = [
            line.split(":")[1].strip().split("@")[0]
            for line in ip("-o", "link", "show", check=False).stdout.splitlines()
        ]
        return sorted({n for n in names + links if own.match(n)})

    # -- links -------------------------------------------------------------------------------

    def cut(self, host: str) -> None:
        """Take ``host`` off the network (its end of the bridge goes down)."""
        ip("link", "set", self.veth[host], "down")

    def heal(self, host: str) -> None:
        ip("link", "set", self.veth[host], "up")

    def shape(self, host: str, rate: str, delay: str = "") -> None:
        """Limit ``host``'s link both ways to ``rate`` (``tc`` units: "1gbit", "100mbit")
        with a token bucket; with a ``delay`` ("0.2ms") through netem instead, which needs
        the kernel's sch_netem (a one-line error where it is missing)."""
        bits = tc_rate_bits(rate)
        burst = max(128 * 1024, bits // 8 // 1000)  # 1 ms of the rate, at least 2 GSO packets
        if delay:
            qdisc = ["netem", "rate", rate, "delay", delay]
        else:
            qdisc = ["tbf", "rate", rate, "burst", str(burst), "latency", "50ms"]
        for netns, dev in ((None, self.veth[host]), (self.netns[host], self.veth[host] + "p")):
            done = tc(netns, "qdisc", "replace", "dev", dev, "root", *qdisc)
            if done.returncode != 0:
                if delay and "unknown" in done.stderr:
                    raise RuntimeError(netem_unavailable() or done.stderr.strip())
                raise RuntimeError(f"tc cannot shape {host}'s link: {done.stderr.strip()}")
