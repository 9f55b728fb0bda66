"""Replicated shards under SIGKILL: how long a failover takes, and whether any
acknowledged update is lost or applied twice.

    python -m bench.failover --kills 20 [--replicas 2] [--params 1000000] [--workers 2]
                             [--out FILE]
    python -m bench.failover --kills 6 --backup-faults 6     # backups killed and stalled too
    python -m bench.failover --kills 0 --replicas R --seconds 15   # throughput alone

A real coordinator (``--replicas R``, one shard range, plain SGD) and R real shard
processes; W pushers in this process, each a real :class:`~dsgd.shard.client.ShardClient`
pushing a fixed gradient of small integers (exact sums in float32) again and again, as a
worker would. The pushers learn where the range's primary is from the coordinator's
heartbeat replies, as workers do, and move there with ``ShardClient.retarget`` (resending
what was never acknowledged, unchanged). A push is retried until it is acknowledged.

Then, ``--kills`` times: wait a random 0.3-1.5 s, SIGKILL the primary, measure the
failover (the kill to the first push acknowledged by the promoted replica), start the
killed process again and wait until it has caught up as a backup. At the end the
parameters of every replica must equal ``-lr * sum_w n_w * g_w`` exactly (n_w: pushes
worker w saw acknowledged): zero acknowledged updates lost, none applied twice.

With ``--backup-faults N``, each of the first N primary kills comes after a fault of a
backup, alternately a SIGKILL (the primary drops it as its link breaks) and a SIGSTOP
longer than the heartbeat timeout (the coordinator stops counting it, the primary drops
it and tells it to join again once it runs). It reports the longest wait for an ACK
meanwhile, and the primary kill that follows shows the backup, rejoined, holds all.

With ``--kills 0`` it measures what replication costs instead: acknowledged pushes per
second (and GB/s of gradient) over ``--seconds``, with nothing killed.

With ``--replicas 1`` there is nothing to fail over to: each kill restarts the shard from
its last checkpoint, and the result counts the acknowledged pushes lost (the run's
``lost_acknowledged_pushes``, as the coordinator reports it).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import secrets
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import zmq.asyncio

from dsgd import wire
from dsgd.config import TrainConfig
from dsgd.control import CoordinatorLink, layout_message
from dsgd.layout import Layout
from dsgd.proto import control_pb2 as pb
from dsgd.shard.client import PushResult, ShardClient
from dsgd.wire import PROTOCOL_VERSION
from dsgd.worker.replica import acked_counters

LR = 2.0**-10  # with small integer gradients every sum is exact in float32
TIMEOUT = 60.0
HEARTBEAT = TrainConfig().heartbeat_interval  # the pushers beat as often as workers do


def gradient(worker: int, size: int) -> np.ndarray:
    rng = np.random.default_rng(1000 + worker)
    return rng.integers(-4, 5, size).astype(np.float32)


@dataclass
class Run:
    """The processes of one run and what the pushers saw."""

    tmp: Path
    replicas: int
    params: int
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    argv: dict[str, list[str]] = field(default_factory=dict)
    address: str = ""
    acked: list[int] = field(default_factory=list)
    acks: list[tuple[float, str]] = field(default_factory=list)  # (time, where) per ack

    def start(self, name: str, *args: str) -> None:
        argv = [sys.executable, "-m", *args]
        self.argv[name] = argv
        log = open(self.tmp / f"{name}.log", "ab")  # noqa: SIM115 - the child owns it
        self.procs[name] = subprocess.Popen(argv, stdout=log, stderr=log)
        log.close()

    def restart(self, name: str) -> None:
        self.procs[name].wait(timeout=TIMEOUT)
        (self.tmp / f"{name}.ready").unlink(missing_ok=True)
        log = open(self.tmp / f"{name}.log", "ab")  # noqa: SIM115
        self.procs[name] = subprocess.Popen(self.argv[name], stdout=log, stderr=log)
        log.close()

    def stop_all(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs.values():
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _wait_file(path: Path, proc: subprocess.Popen[bytes], timeout: float = TIMEOUT) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists():
            return json.loads(path.read_text())
        if proc.poll() is not None:
            raise RuntimeError(f"{path.stem} exited with code {proc.returncode}")
        time.sleep(0.05)
    raise TimeoutError(f"no {path} within {timeout:.0f} s")


def start_cluster(run: Run, checkpoint_every: float) -> None:
    ready = run.tmp / "coordinator.ready"
    run.start(
        "coordinator",
        "dsgd.coordinator",
        "--ready-file",
        str(ready),
        "--shards",
        "1",
        "--workers",
        "1",
        "--replicas",
        str(run.replicas),
        "--no-evaluator",
        "--optimizer",
        "sgd",
        "--lr",
        str(LR),
        "--max-seconds",
        "3600",
        "--checkpoint-every",
        str(checkpoint_every),
        "--target",
        "none",
    )
    run.address = _wait_file(ready, run.procs["coordinator"])["address"]
    for j in range(run.replicas):
        name = f"shard-r{j}"
        run.start(
            name,
            "dsgd.shard",
            "--coordinator",
            run.address,
            "--shard-id",
            "0",
            "--replica",
            str(j),
            "--checkpoint-dir",
            str(run.tmp / f"checkpoints-{j}"),
            "--ready-file",
            str(run.tmp / f"{name}.ready"),
        )


class Pushers:
    """W pushers and one registered worker's heartbeats telling them where to push."""

    def __init__(self, run: Run, workers: int, cycle: bool = False) -> None:
        self.run = run
        self.cycle = cycle  # pull the whole range before each push, as a worker's cycle
        self.workers = workers
        self.size = run.params
        self.layout = Layout(("['w']",), ((run.params,),), 1)
        self.ctx = zmq.asyncio.Context()
        self.link = CoordinatorLink(run.address, give_up_after=TIMEOUT)
        self.clients: list[ShardClient] = []
        self.endpoint: pb.ShardEndpoint | None = None
        self.stop = asyncio.Event()
        self.primary_replica = -1
        run.acked = [0] * workers

    async def register(self) -> None:
        request = pb.RegisterWorkerRequest(
            worker_id=0,
            layout_fingerprint=self.layout.fingerprint,
            protocol_version=PROTOCOL_VERSION,
            incarnation=secrets.randbits(62) + 1,
            layout=layout_message(self.layout),
        )
        self.incarnation = request.incarnation
        reply = await self.link.register(
            self.link.stub.RegisterWorker,
            request,
            asyncio.Event(),
            "the pushers",
            initial=lambda: np.zeros(self.size, np.float32),
        )
        assert reply is not None
        self.endpoint = reply.shards[0]
        for w in range(self.workers):
            client = ShardClient(
                0,
                self.endpoint.data_address,
                self.endpoint.pub_address,
                self.layout.fingerprint,
                w,
                self.ctx,
                ack_timeout=5.0,
                fetch_timeout=10.0,
                replicated=self.run.replicas > 1,
            )
            await client.start()
            self.clients.append(client)

    async def heartbeats(self) -> None:
        while not self.stop.is_set():
            counters: dict[str, float] = {}
            for client in self.clients:  # what a worker reports of its acknowledged pushes
                counters.update(acked_counters(0, client.acked_versions))
            reply = await self.link.heartbeat_once(
                pb.HeartbeatRequest(
                    role=pb.ROLE_WORKER,
                    id=0,
                    incarnation=self.incarnation,
                    stats=pb.MemberStats(counters=counters),
                )
            )
            if reply is not None and reply.shards:
                shard = reply.shards[0]
                if self.endpoint is None or shard.data_address != self.endpoint.data_address:
                    self.endpoint = shard
                    for client in self.clients:
                        await client.retarget(shard.data_address, shard.pub_address)
            # as a worker does: beat fast while the primary's connection is down
            lost = any(c.lost is not None and c.lost.is_set() for c in self.clients)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop_or_lost(lost), 0.02 if lost else HEARTBEAT)

    async def _stop_or_lost(self, lost: bool) -> None:
        waits = [asyncio.ensure_future(self.stop.wait())]
        if not lost:
            waits += [asyncio.ensure_future(c.lost.wait()) for c in self.clients if c.lost]
        try:
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for wait in waits:
                wait.cancel()

    async def push_loop(self, w: int) -> None:
        client, grad = self.clients[w], gradient(w, self.size)
        pulled = np.empty(self.size, np.float32)
        incarnation = secrets.randbits(62) + 1
        seq = 0
        loop = asyncio.get_running_loop()
        while not self.stop.is_set():
            if self.cycle:
                await client.fetch(pulled)
            seq += 1
            template = wire.Header(
                kind=wire.PUSH,
                fingerprint=self.layout.fingerprint,
                shard=0,
                worker=w,
                seq=seq,
                incarnation=incarnation,
            )
            chunks = list(wire.dense_chunks(template, grad, wire.DEFAULT_CHUNK_BYTES))
            while True:  # until every chunk is acknowledged: resend what was lost, as is
                done: asyncio.Future[PushResult] = loop.create_future()
                if not await client.push(seq, chunks, done.set_result, TIMEOUT):
                    raise TimeoutError("no push permit freed in time")
                result = await done
                if result.rejected:
                    raise RuntimeError(f"push {seq} refused: {result.rejected[0]}")
                if result.complete:
                    break
                chunks = result.lost
            self.run.acked[w] += 1
            self.run.acks.append((time.monotonic(), client.data_address))

    async def fetch(self, data_address: str, pub_address: str) -> np.ndarray:
        client = ShardClient(0, data_address, pub_address, self.layout.fingerprint, 999, self.ctx)
        dest = np.empty(self.size, np.float32)
        try:
            await client.start()
            await client.fetch(dest)
        finally:
            await client.aclose()
        return dest

    async def aclose(self) -> None:
        for client in self.clients:
            await client.aclose()
        await self.link.aclose()
        self.ctx.term()


async def _status(link: CoordinatorLink) -> pb.ClusterStatus:
    return await link.call(link.stub.Status, pb.StatusRequest(), "status")


def _primary(status: pb.ClusterStatus) -> pb.MemberStatus | None:
    return next((m for m in status.members if m.role == pb.ROLE_SHARD and m.primary), None)


async def _poll(what: str, check: Any) -> Any:
    """``await check()`` until it returns something true (TimeoutError after TIMEOUT)."""
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline:
        found = await check()
        if found:
            return found
        await asyncio.sleep(0.02)
    raise TimeoutError(f"timed out waiting for {what}")


async def _replicated(run: Run, link: CoordinatorLink, failovers: int = 0) -> Any:
    """The status once every replica is alive, in the chain, and ``failovers`` happened."""
    status = await _status(link)
    shards = [m for m in status.members if m.role == pb.ROLE_SHARD]
    primary = _primary(status)
    if primary is None or sum(1 for m in shards if m.state == "alive") < run.replicas:
        return None
    if status.failovers < failovers:
        return None
    backups = sum(1 for m in shards if m.promotable)  # in the chain, holding all acknowledged
    return status if run.replicas == 1 or backups >= run.replicas - 1 else None


async def _kill_primary(run: Run, pushers: Pushers, kill: int) -> tuple[str, float, int]:
    """SIGKILL the primary; (its name, seconds to the first push acknowledged after,
    acknowledged pushes lost); return once the killed process is back in the chain."""
    link = pushers.link
    status = await _poll("the replicas", partial(_replicated, run, link))
    primary = _primary(status)
    assert primary is not None
    name = f"shard-r{primary.replica}"
    lost_before = sum(status.lost_pushes.values())
    old = pushers.endpoint.data_address if pushers.endpoint else ""
    killed_at = time.monotonic()
    os.kill(run.procs[name].pid, signal.SIGKILL)
    # the first ACK from elsewhere: the promoted backup, or (R = 1) the restarted shard
    if run.replicas == 1:
        run.restart(name)
    first = await _poll(
        "a push acknowledged after the kill", partial(_first_after, run.acks, killed_at, old)
    )
    if run.replicas > 1:
        run.restart(name)
    else:  # the pushers' next heartbeats report the last versions the dead shard acknowledged
        await asyncio.sleep(3 * HEARTBEAT)
    promoted = kill + 1 if run.replicas > 1 else 0
    status = await _poll("the killed replica to rejoin", partial(_replicated, run, link, promoted))
    return name, first - killed_at, sum(status.lost_pushes.values()) - lost_before


async def _fault_backup(run: Run, pushers: Pushers, how: str) -> tuple[str, float, float]:
    """SIGKILL a backup (and start it again 1 s later), or stop it (SIGSTOP) for longer
    than the heartbeat timeout, so that the coordinator and its primary drop it, and let
    it go on; return once it is promotable again, with its name and the longest pauses
    between acknowledgements: until it is started or continued again (how long the
    primary took to drop it), and until it is promotable again (its rejoin included)."""
    link = pushers.link
    status = await _poll("the replicas", partial(_replicated, run, link))
    backup = next(m for m in status.members if m.role == pb.ROLE_SHARD and m.promotable)
    name = f"shard-r{backup.replica}"
    began = time.monotonic()
    if how == "kill":
        os.kill(run.procs[name].pid, signal.SIGKILL)
        await asyncio.sleep(1.0)
        dropped = _longest_gap(run.acks, began, time.monotonic())
        run.restart(name)
    else:
        os.kill(run.procs[name].pid, signal.SIGSTOP)
        await asyncio.sleep(TrainConfig().heartbeat_timeout + 1.0)
        dropped = _longest_gap(run.acks, began, time.monotonic())
        os.kill(run.procs[name].pid, signal.SIGCONT)
    failovers, killed = int(status.failovers), backup.incarnation if how == "kill" else 0

    async def back() -> bool:  # (a new process, when it was killed)
        now = await _replicated(run, link, failovers)
        return now is not None and any(
            m.promotable and m.replica == backup.replica and m.incarnation != killed
            for m in now.members
        )

    await _poll("the backup to be promotable again", back)
    return name, dropped, _longest_gap(run.acks, began, time.monotonic())


def _longest_gap(acks: list[tuple[float, str]], start: float, end: float) -> float:
    """The longest time without an acknowledgement between ``start`` and ``end``."""
    times = [start, *(t for t, _ in acks if start < t < end), end]
    return max(b - a for a, b in zip(times, times[1:], strict=False))


async def measure(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    run = Run(tmp, args.replicas, args.params)
    rng = random.Random(args.seed)
    try:
        start_cluster(run, args.checkpoint_every)
        pushers = Pushers(run, args.workers, args.cycle)
        await pushers.register()
        tasks = [asyncio.create_task(pushers.heartbeats())]
        tasks += [asyncio.create_task(pushers.push_loop(w)) for w in range(args.workers)]
        link = pushers.link
        failovers: list[float] = []
        lost_per_kill: list[int] = []

        await _poll("every replica to join", partial(_replicated, run, link))
        await _poll("the first pushes", partial(_first_after, run.acks, 0.0))
        began, pushed = time.monotonic(), sum(run.acked)
        if not args.kills:  # throughput alone: acknowledged pushes over a quiet window
            await asyncio.sleep(args.seconds)
        rate = None if args.kills else (sum(run.acked) - pushed) / (time.monotonic() - began)
        backup_faults: list[dict[str, Any]] = []
        for kill in range(args.kills):
            if kill < args.backup_faults:  # a backup first; the primary kill then shows
                how = ("kill", "stop")[kill % 2]  # the backup it promotes holds everything
                await asyncio.sleep(rng.uniform(0.3, 1.5))
                name, dropped, gap = await _fault_backup(run, pushers, how)
                backup_faults.append(
                    {
                        "fault": how,
                        "replica": name,
                        "ack_gap_until_dropped_s": dropped,
                        "ack_gap_until_rejoined_s": gap,
                    }
                )
                print(
                    f"  backup fault {kill + 1}: {how} {name}, longest wait for an ACK "
                    f"{dropped * 1000:.0f} ms until dropped, {gap * 1000:.0f} ms with the rejoin",
                    flush=True,
                )
            await asyncio.sleep(rng.uniform(0.3, 1.5))
            name, seconds, lost = await _kill_primary(run, pushers, kill)
            failovers.append(seconds)
            lost_per_kill.append(lost)
            print(
                f"  kill {kill + 1}/{args.kills}: {name}, failover {seconds * 1000:.0f} ms, "
                f"acknowledged pushes lost {lost}",
                flush=True,
            )
        await asyncio.sleep(1.0)
        pushers.stop.set()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.wait_for(task, TIMEOUT)
        status = await _status(link)
        expected = (
            -LR
            * sum(n * gradient(w, args.params).astype(np.float64) for w, n in enumerate(run.acked))
        ).astype(np.float32)
        replicas_exact = []
        for endpoint in _endpoints(status):
            params = await pushers.fetch(endpoint.data_address, endpoint.pub_address)
            replicas_exact.append(bool(np.array_equal(params, expected)))
        await pushers.aclose()
    finally:
        run.stop_all()
    return {
        "benchmark": "failover",
        "replicas": args.replicas,
        "params": args.params,
        "workers": args.workers,
        "kills": args.kills,
        "failover_seconds": failovers,
        "failover_median_s": statistics.median(failovers) if failovers else None,
        "failover_worst_s": max(failovers) if failovers else None,
        "acknowledged_pushes": run.acked,
        "cycle": args.cycle,
        "pushes_per_s": rate,
        "push_gbps": None if rate is None else rate * 4 * args.params / 1e9,
        "lost_per_kill": lost_per_kill,
        "backup_faults": backup_faults,
        "coordinator_failovers": int(status.failovers),
        "replicas_exact": replicas_exact,
        "exact": bool(replicas_exact) and all(replicas_exact),
    }


def _endpoints(status: pb.ClusterStatus) -> list[pb.ShardEndpoint]:
    """Every replica's endpoint: the primary's and the backups' (which serve fetches)."""
    return [*status.shards, *status.replicas]


async def _first_after(
    acks: list[tuple[float, str]], when: float, not_from: str | None = None
) -> float | None:
    """The first acknowledgement after ``when`` (and not from ``not_from``), if any."""
    after = [t for t, where in acks if t > when and where != not_from]
    return after[0] if after else None


def reference(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    """The reference set: ``--kills`` kills with R = 2 (``--backup-faults`` of them after
    a backup fault), 5 with R = 1 (what is lost without replicas), and the throughput of
    R = 1, 2, 3 with nothing killed."""
    runs = []
    plan = [(2, args.kills, False), (1, 5, False)]
    plan += [(r, 0, cycle) for cycle in (False, True) for r in (1, 2, 3)]
    for replicas, kills, cycle in plan:
        faults = args.backup_faults if replicas > 1 and kills else 0
        one = argparse.Namespace(
            **{
                **vars(args),
                "replicas": replicas,
                "kills": kills,
                "cycle": cycle,
                "backup_faults": faults,
            }
        )
        print(f"R={replicas}, {kills} kills{', pull-push cycle' if cycle else ''}", flush=True)
        part = tmp / f"r{replicas}-k{kills}-c{int(cycle)}"
        part.mkdir()
        runs.append(asyncio.run(measure(one, part)))
    from bench._measure import machine_info, package_versions

    return {
        "benchmark": "failover_reference",
        "machine": machine_info(),
        "packages": package_versions(),
        "runs": runs,
    }


def plot(doc: dict[str, Any], path: Path) -> None:
    """Failover times per kill (R = 2 and R = 1), and acknowledged pushes/s per R."""
    from bench._common import pyplot

    plt = pyplot()
    fig, (ax_time, ax_rate) = plt.subplots(1, 2, figsize=(13, 5))
    for run in (r for r in doc["runs"] if r["kills"]):
        times = [1000 * t for t in run["failover_seconds"]]
        lost = sum(run["lost_per_kill"])
        label = (
            f"R={run['replicas']}: median {statistics.median(times):.0f} ms, worst "
            f"{max(times):.0f} ms; acknowledged pushes lost {lost}"
        )
        ax_time.plot(range(1, len(times) + 1), times, "o-", label=label)
    ax_time.set_yscale("log")
    ax_time.set_xlabel("kill")
    ax_time.set_ylabel("SIGKILL of the primary to the next acknowledged push (ms)")
    ax_time.set_title("Failover (R=2) vs restart from checkpoint (R=1)")
    ax_time.legend(fontsize=8)
    ax_time.grid(alpha=0.3, which="both")
    quiet = [r for r in doc["runs"] if not r["kills"]]
    for offset, cycle in ((-0.2, False), (0.2, True)):
        same = sorted((r for r in quiet if r["cycle"] == cycle), key=lambda r: r["replicas"])
        if not same:
            continue
        rates = [r["pushes_per_s"] for r in same]
        bars = ax_rate.bar(
            [r["replicas"] + offset for r in same],
            rates,
            0.4,
            label="pull + push cycles" if cycle else "pushes alone",
        )
        for bar, r in zip(bars, same, strict=True):
            ax_rate.annotate(
                f"{r['pushes_per_s']:.0f}/s\n{r['pushes_per_s'] / rates[0]:.2f}x",
                (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                ha="center",
                va="bottom",
                fontsize=8,
            )
    ax_rate.legend(fontsize=8)
    ax_rate.set_xticks(sorted({r["replicas"] for r in quiet}))
    ax_rate.set_xlabel("replicas per range (R)")
    ax_rate.set_ylabel("acknowledged pushes (or cycles) per second")
    ax_rate.set_title(
        f"What replication costs ({quiet[0]['workers']} workers, {quiet[0]['params']:,} parameters)"
    )
    ax_rate.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.failover", description=__doc__)
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument(
        "--backup-faults",
        type=int,
        default=0,
        help="before each of the first N primary kills, SIGKILL or SIGSTOP a backup (alternately)",
    )
    parser.add_argument("--params", type=int, default=1_000_000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--checkpoint-every", type=float, default=5.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--seconds", type=float, default=15.0, help="with --kills 0: the throughput window"
    )
    parser.add_argument("--out", type=Path)
    parser.add_argument(
        "--cycle", action="store_true", help="pull the whole range before each push"
    )
    parser.add_argument(
        "--reference",
        action="store_true",
        help="the reference set (R=2 with --kills, R=1 with 5, throughput of R=1,2,3) + a chart",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.reference:
        with tempfile.TemporaryDirectory(prefix="dsgd-failover-") as tmp:
            doc = reference(args, Path(tmp))
        out = args.out or Path("bench/results/failover.json")
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(doc, indent=2) + "\n")
        plot(doc, out.with_suffix(".png"))
        return 0 if all(r["exact"] for r in doc["runs"] if r["replicas"] > 1) else 1
    with tempfile.TemporaryDirectory(prefix="dsgd-failover-") as tmp:
        result = asyncio.run(measure(args, Path(tmp)))
    print(json.dumps({k: v for k, v in result.items() if k != "failover_seconds"}))
    if args.out is not None:
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0 if result["exact"] or args.replicas == 1 else 1


if __name__ == "__main__":
    sys.exit(main())
