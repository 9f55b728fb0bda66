"""Hosts a test can make: Linux network namespaces on a private bridge.

Each host is a network namespace with its own loopback and one address on a bridge the
harness creates (10.213.X.0/24, X from the process id, so concurrent runs do not meet).
Processes started on a host run inside its namespace, with the commands the README gives.
A host's link can be cut and healed (its end of the bridge goes down), or shaped with
``tc`` (rate and delay). Everything is removed on exit, also when the test fails; nothing
is routed anywhere else, so traffic stays between the namespaces this harness made.

Needs root and ``ip`` (iproute2); :func:`unavailable` says why not, for a skip.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check, timeout=30)


def unavailable() -> str | None:
    """Why namespaces cannot be made here, or None when they can."""
    if sys.platform != "linux":
        return "network namespaces need Linux"
    if os.geteuid() != 0:
        return "making network namespaces needs root"
    if shutil.which("ip") is None:
        return "the ip command (iproute2) is not installed"
    probe = f"dsgdprobe{os.getpid()}"
    made = _ip("netns", "add", probe, check=False)
    if made.returncode != 0:
        return f"cannot make a network namespace: {made.stderr.strip()}"
    _ip("netns", "del", probe, check=False)
    return None


def _tc_rate_bits(rate: str) -> int:
    """``tc``'s rate units ("100mbit", "1gbit", "10gbit", "800kbit") in bits per second."""
    units = {"kbit": 10**3, "mbit": 10**6, "gbit": 10**9, "tbit": 10**12, "bit": 1}
    for unit, scale in units.items():
        if rate.endswith(unit) and rate[: -len(unit)].replace(".", "", 1).isdigit():
            return int(float(rate[: -len(unit)]) * scale)
    raise ValueError(f"rate {rate!r} is not like 1gbit or 100mbit")


class Hosts:
    """``with Hosts(["coord", "shard0", ...], tmp) as hosts``: one namespace per name."""

    def __init__(self, names: list[str], logs: Path) -> None:
        tag = os.getpid() % 250 + 1
        self.subnet = f"10.213.{tag}"
        self.bridge = f"dsgdbr{tag}"
        self.names = list(names)
        self.netns = {name: f"dsgd{tag}-{name}" for name in names}
        self.veth = {name: f"dsgd{tag}v{i}" for i, name in enumerate(names)}
        self.address = {name: f"{self.subnet}.{i + 2}" for i, name in enumerate(names)}
        self.logs = logs
        self.procs: list[tuple[str, subprocess.Popen[str]]] = []

    def __enter__(self) -> Hosts:
        try:
            self._make()
        except BaseException:
            self._remove()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_all()
        self._remove()

    def _make(self) -> None:
        _ip("link", "add", self.bridge, "type", "bridge")
        _ip("addr", "add", f"{self.subnet}.1/24", "dev", self.bridge)  # the test's own end
        _ip("link", "set", self.bridge, "up")
        for name in self.names:
            ns, veth, peer = self.netns[name], self.veth[name], self.veth[name] + "p"
            _ip("netns", "add", ns)
            _ip("link", "add", veth, "type", "veth", "peer", "name", peer)
            _ip("link", "set", peer, "netns", ns)
            _ip("link", "set", veth, "master", self.bridge)
            _ip("link", "set", veth, "up")
            _ip("-n", ns, "link", "set", "lo", "up")
            _ip("-n", ns, "addr", "add", f"{self.address[name]}/24", "dev", peer)
            _ip("-n", ns, "link", "set", peer, "up")

    def _remove(self) -> None:
        for name in self.names:
            _ip("netns", "del", self.netns[name], check=False)  # takes its veth pair along
            _ip("link", "del", self.veth[name], check=False)
        _ip("link", "del", self.bridge, check=False)

    # -- processes ---------------------------------------------------------------------------

    def start(self, host: str, label: str, *args: str) -> subprocess.Popen[str]:
        """``python -m ARGS`` inside ``host``'s namespace (log in ``logs/label.log``)."""
        return self.run(host, label, sys.executable, "-m", *args)

    def run(
        self, host: str, label: str, *command: str, env: dict[str, str] | None = None
    ) -> subprocess.Popen[str]:
        """Any command inside ``host``'s namespace, stopped with the others on exit."""
        log = self.logs / f"{label}.log"
        with open(log, "w") as out:
            proc = subprocess.Popen(
                ["ip", "netns", "exec", self.netns[host], *command],
                cwd=ROOT,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                text=True,
                env=env,
            )
        self.procs.append((label, proc))
        return proc

    def log(self, label: str) -> str:
        path = self.logs / f"{label}.log"
        return path.read_text() if path.exists() else ""

    def stop_all(self) -> None:
        for _, proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for _, proc in self.procs:
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    # -- the network -------------------------------------------------------------------------

    def cut(self, host: str) -> None:
        """Take ``host`` off the network (its end of the bridge goes down)."""
        _ip("link", "set", self.veth[host], "down")

    def heal(self, host: str) -> None:
        _ip("link", "set", self.veth[host], "up")

    def shape(self, host: str, rate: str, delay: str = "") -> None:
        """Limit ``host``'s link both ways to ``rate`` (``tc`` units: "1gbit", "10gbit"),
        with a token bucket; with a ``delay`` ("0.2ms") through netem instead, which needs
        the kernel's sch_netem (a one-line error where it is missing)."""
        bits = _tc_rate_bits(rate)
        burst = max(128 * 1024, bits // 8 // 1000)  # 1 ms of the rate, at least 2 GSO packets
        if delay:
            qdisc = ["netem", "rate", rate, "delay", delay]
        else:
            qdisc = ["tbf", "rate", rate, "burst", str(burst), "latency", "50ms"]
        for prefix, dev in (
            ([], self.veth[host]),
            (["ip", "netns", "exec", self.netns[host]], self.veth[host] + "p"),
        ):
            done = subprocess.run(
                [*prefix, "tc", "qdisc", "replace", "dev", dev, "root", *qdisc],
                capture_output=True,
                text=True,
                timeout=30,
            )
            if done.returncode != 0:
                raise RuntimeError(f"tc cannot shape {host}'s link: {done.stderr.strip()}")

    def wait_for(self, what: str, predicate: Any, timeout: float) -> Any:
        """Poll ``predicate()`` until it returns something true; fail with ``what``."""
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
