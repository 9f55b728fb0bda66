"""Hosts a test can make: Linux network namespaces on a private bridge.

Each host is a network namespace with its own loopback and one address on a bridge the
harness creates (10.213.X.0/24, a tag no other live cluster holds), and processes started
on it run inside its namespace, with the commands the README gives. A host's link can be
cut and healed, or shaped with ``tc``. Everything is removed on exit, also when the test
fails; nothing is routed anywhere else.

These are :class:`bench.emulation.EmulatedCluster` hosts without CPU or memory budgets:
one implementation of hosts serves the tests, the benchmarks' shaped links and the
emulated cluster of small machines. Needs root and ``ip``; :func:`unavailable` says why
not, for a skip.
"""

from __future__ import annotations

from pathlib import Path

from bench.emulation import ROOT, EmulatedCluster, Host
from bench.emulation import namespaces_unavailable as unavailable

__all__ = ["ROOT", "Hosts", "unavailable"]


class Hosts(EmulatedCluster):
    """``with Hosts(["coord", "shard0", ...], tmp) as hosts``: one namespace per name."""

    def __init__(self, names: list[str], logs: Path) -> None:
        super().__init__([Host(name) for name in names], logs)
