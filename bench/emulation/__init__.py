"""An emulated cluster of small machines on this one (see :mod:`bench.emulation.cluster`),
and its validation (``python -m bench.emulation``).

This is the one implementation of hosts in the project: :class:`tests.hosts.Hosts` is an
:class:`EmulatedCluster` whose hosts have no budgets, so the tests' namespaces, the
benchmarks' shaped links and the budgeted hosts of the scaling benchmarks are made,
started into and removed by the same code.
"""

from bench.emulation.cgroups import PERIOD_US, CgroupUnavailable, CpuUsage
from bench.emulation.cluster import (
    HARNESS_MARGIN,
    ROOT,
    EmulatedCluster,
    EmulationRefused,
    Host,
    budget_env,
    machine_cpus,
    refusal,
    unavailable,
)
from bench.emulation.network import namespaces_unavailable, netem_unavailable

__all__ = [
    "HARNESS_MARGIN",
    "PERIOD_US",
    "ROOT",
    "CgroupUnavailable",
    "CpuUsage",
    "EmulatedCluster",
    "EmulationRefused",
    "Host",
    "budget_env",
    "machine_cpus",
    "namespaces_unavailable",
    "netem_unavailable",
    "refusal",
    "unavailable",
]
