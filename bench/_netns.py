"""Benchmarks across hosts: a process that enters a network namespace before it runs, and
where a benchmark's servers and workers go.

The namespaces come from :class:`tests.hosts.Hosts` (one per host on a private bridge, the
benchmark's own); a process spawned with :func:`run_in` moves into one with setns(2) before
it makes a socket, so its traffic crosses the bridge (and any ``tc`` shaping on it) as
between machines. Needs root, like the harness.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

CLONE_NEWNET = 0x40000000
LOOPBACK = "127.0.0.1"


def enter(netns: str | None) -> None:
    """Move this process into the named network namespace (``ip netns`` name); None stays."""
    if netns is None:
        return
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(f"/run/netns/{netns}", os.O_RDONLY)
    try:
        if libc.setns(fd, CLONE_NEWNET) != 0:
            errno = ctypes.get_errno()
            raise OSError(errno, f"cannot enter network namespace {netns}: {os.strerror(errno)}")
    finally:
        os.close(fd)


def run_in(netns: str | None, target: Callable[..., Any], *args: Any) -> Any:
    """A spawned process's target: ``target(*args)`` inside ``netns``."""
    enter(netns)
    return target(*args)


@dataclass(frozen=True)
class Placement:
    """Where servers and workers run: ``servers[k]`` is (namespace, the address it listens
    on), ``workers[w]`` a namespace. Empty: everything on this host's loopback."""

    label: str = "one host"
    servers: tuple[tuple[str, str], ...] = ()
    workers: tuple[str, ...] = ()

    def server(self, k: int) -> tuple[str | None, str]:
        return self.servers[k] if self.servers else (None, LOOPBACK)

    def worker(self, w: int) -> str | None:
        return self.workers[w] if self.workers else None


ONE_HOST = Placement()


def host_names(servers: int, workers: int) -> list[str]:
    return [f"server{k}" for k in range(servers)] + [f"worker{w}" for w in range(workers)]


def across(hosts: Any, servers: int, workers: int, label: str) -> Placement:
    """Each server and worker on a host of its own, from a :class:`tests.hosts.Hosts` made
    with :func:`host_names`."""
    return Placement(
        label,
        tuple((hosts.netns[f"server{k}"], hosts.address[f"server{k}"]) for k in range(servers)),
        tuple(hosts.netns[f"worker{w}"] for w in range(workers)),
    )
