"""Replicated shards under SIGKILL, with real workers: how long a failover takes, how
long the workers stand still, and whether any acknowledged update is lost or applied twice.

    python -m bench.failover --kills 20 [--replicas 2] [--params 1000000] [--workers 2]
                             [--steps N] [--out FILE] [--workdir DIR]
    python -m bench.failover --kills 6 --backup-faults 6     # backups killed and stalled too
    python -m bench.failover --kills 5 --replicas 1          # restarts from a checkpoint
    python -m bench.failover --kills 0 --replicas R --seconds 15   # throughput alone

Every process is dsgd's own, started as a user starts it (bench/_failover_cluster.py): a
coordinator (``--replicas R``, one shard range, ``--optimizer sgd``, lr 2**-10, a step
budget ``--max-steps``, no evaluator), R ``python -m dsgd.shard`` processes and W
``python -m dsgd.worker`` processes training bench/_fixed_gradient.py, whose ``grad``
returns a fixed gradient of small integers, shifted per worker (its data partition says
which), so every sum is exact in float32. The workers fetch and push every step, densely,
take no local step and overlap nothing (``n_fetch = n_push = 1``, density 1): each step's
gradient reaches the shards in one push, resent unchanged to a promoted backup or given
back to the residual and pushed again until it is acknowledged.

Then, ``--kills`` times: wait until every worker trains (two new steps each in the last
1.5 s), wait a random 0.3-1.5 s, SIGKILL the primary, measure the failover, start the
killed process again and wait until the coordinator counts it a backup holding all its
primary acknowledged. The workers are left alone: the benchmark fails at once if one
exits before the faults are over, and at the end if the coordinator holds another
incarnation for a worker than at the start (it was replaced). The run ends on its step
budget, so each worker flushes its residual and waits for its last acknowledgement
before it leaves; the coordinator then reads the final parameters from the primary
(``--final-params``) and every shard process writes its last checkpoint as it leaves.
The final parameters and every replica's last checkpoint must equal
``-lr * sum_w steps_w * g_w`` bit for bit (``steps_w``: worker w's final step in the
coordinator's status); solving them for the steps they hold says, per worker, how many
were lost or applied twice when they do not.

**Failover** is from the SIGKILL to the first update applied by the promoted replica,
taken without touching the workers. A thread subscribes to every shard process's version
broadcasts (the PUB socket workers read to skip fetches; a VERSION message carries the
process's incarnation and its version, which counts the pushes it applied), and this
process polls the coordinator's status every 5 ms from the kill until it names a new
primary. The promoted process's version in that status is the one its last heartbeat
reported, the heartbeat that asked to be promoted: every forward of the dead primary it
applied is in it (it stops following before it asks) and nothing it applied as primary.
The failover ends when that process first broadcasts a version above it. A shard
broadcasts a changed version every 5 ms, so a figure is late by 0-5 ms plus delivery;
``promotion_seen_s`` (when the status first named the new primary, late by up to one
poll) shows how much is detection and promotion, the rest being a worker's heartbeat
learning where the primary went, its resend, and the apply. With R = 1 the killed shard
is started again at once and restarts from its last checkpoint: the failover ends at the
first broadcast of the new process above the version it restored.

**Worker stall**: the longest time a worker's step stood still around each kill, from the
coordinator's status sampled every 0.1 s (a worker that trains shows a new step in each
heartbeat, every 0.5 s; a stall shorter than about a second is lost in that).

With ``--backup-faults N``, each of the first N primary kills comes after a fault of a
backup, alternately a SIGKILL (restarted 1 s later) and a SIGSTOP longer than the
heartbeat timeout (the coordinator stops counting it, the primary drops it and tells it
to join again once it runs). The primary holds the workers' ACKs until it drops the
backup and the workers stop once ``max_inflight`` pushes wait: the longest pause of the
primary's version says how long. The primary kill that follows shows the rejoined backup
holds everything.

With ``--kills 0`` it measures what replication costs instead: pushes applied per second
by the primary over ``--seconds`` (each one worker step, fetch and push, acknowledged
once every backup confirmed it) with nothing killed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
from google.protobuf import json_format

from bench._failover_cluster import (
    HEARTBEAT,
    TIMEOUT,
    WORKER_COUNTERS,
    Broadcasts,
    Run,
    counters,
    listen_to,
    poll,
    primary_of,
    replicated,
    sample_steps,
    stalls,
    start_cluster,
    status_of,
    training,
    workers_of,
)
from bench._fixed_gradient import MAX_WORKERS, applied_steps, expected_params
from dsgd import checkpoint, wire
from dsgd.config import TrainConfig
from dsgd.control import CoordinatorLink
from dsgd.proto import control_pb2 as pb

POLL = 0.005  # seconds between status calls while a failover is under way


async def _kill_primary(
    run: Run, link: CoordinatorLink, broadcasts: Broadcasts, kill: int
) -> dict[str, Any]:
    """SIGKILL the primary; measure the failover; return once the killed process is back
    in the chain (R = 1: restarted from its checkpoint and the loss counted)."""
    status = await poll(run, "the replicas", partial(replicated, run, link))
    primary = primary_of(status)
    assert primary is not None
    name = f"shard-r{primary.replica}"
    lost_before = sum(status.lost_pushes.values())
    before = counters(status)
    record: dict[str, Any] = {"replica": name}
    if run.replicas == 1:
        restored = max(
            (v for v, _ in checkpoint.list_checkpoints(run.tmp / "checkpoints-0", 0)), default=0
        )
    killed_at = time.monotonic()
    os.kill(run.procs[name].pid, signal.SIGKILL)
    if run.replicas == 1:
        run.restart(name)
        await listen_to(run, name, broadcasts)

        async def restarted_applies() -> float | None:  # a process not seen before the kill
            known = {i for t, i, _ in list(broadcasts.records) if t < killed_at}
            return next(
                (t for t, i, v in list(broadcasts.records) if i not in known and v > restored),
                None,
            )

        first = await poll(run, "the restarted shard's first apply", restarted_applies)
        record.update(restored_version=restored)
        await asyncio.sleep(3 * HEARTBEAT)  # the workers report what the dead one acknowledged
    else:
        seen = 0.0
        promoted = None
        while promoted is None or promoted.incarnation == primary.incarnation:
            run.check_workers()
            await asyncio.sleep(POLL)
            promoted = primary_of(await status_of(link))
            seen = time.monotonic()
            if seen - killed_at > TIMEOUT:
                raise TimeoutError("no backup promoted")
        # its version in the heartbeat that asked to be promoted (the coordinator keeps the
        # stats of a member's last heartbeat): every forward of the dead primary it applied
        # is in it, and nothing it applied as the primary
        base = int(promoted.stats.version)

        async def promoted_applies() -> float | None:
            return broadcasts.first_above(promoted.incarnation, base, killed_at)

        first = await poll(run, "the promoted replica's first apply", promoted_applies)
        record.update(
            promotion_seen_s=seen - killed_at,
            promoted=f"shard-r{promoted.replica}",
            killed_version=broadcasts.version(primary.incarnation, first),  # its last
            promoted_version=base,
        )
        run.restart(name)
        await listen_to(run, name, broadcasts)
    promotions = kill + 1 if run.replicas > 1 else 0
    status = await poll(
        run, "the killed replica to rejoin", partial(replicated, run, link, promotions)
    )
    record["killed_at"] = killed_at
    record["failover_s"] = first - killed_at
    record["lost"] = sum(status.lost_pushes.values()) - lost_before
    record["counters_before"] = before
    return record


async def _fault_backup(
    run: Run, link: CoordinatorLink, broadcasts: Broadcasts, how: str
) -> dict[str, Any]:
    """SIGKILL a backup (and start it again 1 s later), or stop it (SIGSTOP) for longer
    than the heartbeat timeout, so that the coordinator and its primary drop it, and let
    it go on; return once it is promotable again, with the longest stalls of the
    primary's version: until the backup is started or continued again (how long the
    primary held the ACKs), and until it is promotable again (its rejoin included)."""
    status = await poll(run, "the replicas", partial(replicated, run, link))
    primary = primary_of(status)
    assert primary is not None
    backup = next(m for m in status.members if m.role == pb.ROLE_SHARD and m.promotable)
    name = f"shard-r{backup.replica}"
    began = time.monotonic()
    if how == "kill":
        os.kill(run.procs[name].pid, signal.SIGKILL)
        await asyncio.sleep(1.0)
        dropped = broadcasts.longest_stall(primary.incarnation, began, time.monotonic())
        run.restart(name)
        await listen_to(run, name, broadcasts)
    else:
        os.kill(run.procs[name].pid, signal.SIGSTOP)
        await asyncio.sleep(TrainConfig().heartbeat_timeout + 1.0)
        dropped = broadcasts.longest_stall(primary.incarnation, began, time.monotonic())
        os.kill(run.procs[name].pid, signal.SIGCONT)
    failovers, killed = int(status.failovers), backup.incarnation if how == "kill" else 0

    async def back() -> bool:  # (a new process, when it was killed)
        now = await replicated(run, link, failovers)
        return now is not None and any(
            m.promotable and m.replica == backup.replica and m.incarnation != killed
            for m in now.members
        )

    await poll(run, "the backup to be promotable again", back)
    return {
        "fault": how,
        "replica": name,
        "primary_stall_until_dropped_s": dropped,
        "primary_stall_until_rejoined_s": broadcasts.longest_stall(
            primary.incarnation, began, time.monotonic()
        ),
    }


# -- one run ----------------------------------------------------------------------------------


def steps_per_s(params: int) -> float:
    """About how many steps a second one worker takes here (2 cores shared by every
    process): 35-45 at 1M parameters, about 200 at 100k."""
    return min(200.0, 4e7 / params)


def default_steps(args: argparse.Namespace) -> int:
    """A step budget that outlasts the faults: the start, then 6 s of training for each
    (the random wait, the failover and the rejoin, until every worker trains again)."""
    faults = args.kills + args.backup_faults
    seconds = 10 + 6 * faults + (0 if args.kills else args.seconds + 5)
    return int(steps_per_s(args.params) * seconds)


async def _throughput(
    run: Run, link: CoordinatorLink, broadcasts: Broadcasts, args: argparse.Namespace, steps: int
) -> dict[str, Any]:
    """Pushes applied per second by the primary over ``--seconds`` (or until a worker
    nears its budget), nothing killed."""
    status = await status_of(link)
    primary = primary_of(status)
    assert primary is not None
    await asyncio.sleep(2.0)  # past the first fetches and the compile's last effects
    began = time.monotonic()
    while time.monotonic() - began < args.seconds:
        status = await status_of(link)
        if max(m.stats.step for m in workers_of(status)) >= 0.9 * steps:
            break
        run.check_workers()
        await asyncio.sleep(0.25)
    ended = time.monotonic()
    pushes = broadcasts.version(primary.incarnation, ended) - broadcasts.version(
        primary.incarnation, began
    )
    return {"window_s": ended - began, "pushes_per_s": pushes / (ended - began)}


async def measure(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    run = Run(tmp, args.replicas, args.workers)
    rng = random.Random(args.seed)
    steps = args.steps or default_steps(args)
    broadcasts = Broadcasts()
    link: CoordinatorLink | None = None
    kills: list[dict[str, Any]] = []
    backup_faults: list[dict[str, Any]] = []
    throughput: dict[str, Any] = {}
    try:
        start_cluster(run, args, steps)
        link = CoordinatorLink(run.address, give_up_after=TIMEOUT)
        for j in range(run.replicas):
            await listen_to(run, f"shard-r{j}", broadcasts)
        await poll(run, "every replica to join", partial(replicated, run, link))

        async def first_pushes() -> bool:  # every worker had a push applied
            return all((tmp / f"worker{w}.ready").exists() for w in range(run.workers))

        await poll(run, "the workers' first pushes", first_pushes, limit=120)
        started = {m.id: m.incarnation for m in workers_of(await status_of(link))}
        sampler = asyncio.create_task(sample_steps(run, link))
        if not args.kills:
            throughput = await _throughput(run, link, broadcasts, args, steps)
        for kill in range(args.kills):
            await training(run)  # each fault from steady training, not a stall's tail
            _note_stall(run, kills)
            if kill < args.backup_faults:  # a backup first; the primary kill then shows
                how = ("kill", "stop")[kill % 2]  # the backup it promotes holds everything
                await asyncio.sleep(rng.uniform(0.3, 1.5))
                fault = await _fault_backup(run, link, broadcasts, how)
                backup_faults.append(fault)
                print(
                    f"  backup fault {kill + 1}: {how} {fault['replica']}, primary stalled "
                    f"{fault['primary_stall_until_dropped_s'] * 1000:.0f} ms until it dropped "
                    f"it, {fault['primary_stall_until_rejoined_s'] * 1000:.0f} ms with the rejoin",
                    flush=True,
                )
            await asyncio.sleep(rng.uniform(0.3, 1.5))
            record = await _kill_primary(run, link, broadcasts, kill)
            kills.append(record)
            print(
                f"  kill {kill + 1}/{args.kills}: {record['replica']}, failover "
                f"{record['failover_s'] * 1000:.0f} ms"
                + (
                    f" (promotion seen after {record['promotion_seen_s'] * 1000:.0f} ms)"
                    if "promotion_seen_s" in record
                    else ""
                )
                + f", acknowledged pushes lost {record['lost']}",
                flush=True,
            )
        run.over = True  # from here a worker may leave: its budget is spent
        if kills:  # the last kill's stall: until every worker trains again (or finished)
            await training(run)
            _note_stall(run, kills)
        sampler.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sampler
        reached = {w: s for _, w, s in run.moves}  # the last step each worker reported
        left = steps - min(reached.values(), default=0)
        await _end(run, limit=TIMEOUT + 2 * left / steps_per_s(args.params))
    finally:
        if link is not None:
            await link.aclose()
        broadcasts.close()
        run.stop_all()
    return _result(args, run, steps, started, kills, backup_faults, throughput)


def _note_stall(run: Run, kills: list[dict[str, Any]]) -> None:
    """Once every worker trains again: how long each stood still around the last kill."""
    if kills:
        stall = kills[-1]["worker_stall_s"] = stalls(run, kills[-1]["killed_at"], time.monotonic())
        print(f"    workers stood still {', '.join(f'{s:.1f}' for s in stall)} s", flush=True)


async def _end(run: Run, limit: float) -> None:
    """Wait for every process to leave at the end of the run, cleanly."""
    deadline = time.monotonic() + limit
    for name, proc in run.procs.items():
        while proc.poll() is None:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{name} still running {limit:.0f} s after the faults")
            run.check_workers()
            await asyncio.sleep(0.1)
        if proc.returncode != 0:
            tail = (run.tmp / f"{name}.log").read_text(errors="replace")[-3000:]
            raise RuntimeError(f"{name} exited with code {proc.returncode} at the end:\n{tail}")


def _result(
    args: argparse.Namespace,
    run: Run,
    steps: int,
    started: dict[int, int],
    kills: list[dict[str, Any]],
    backup_faults: list[dict[str, Any]],
    throughput: dict[str, Any],
) -> dict[str, Any]:
    status = json_format.Parse((run.tmp / "status.json").read_text(), pb.ClusterStatus())
    workers = sorted(workers_of(status), key=lambda m: m.id)
    worker_steps = {m.id % run.workers: int(m.stats.step) for m in workers}
    # a worker the coordinator holds another process for than at the start, or none
    replaced = sorted(
        {m.id for m in workers if started.get(m.id) != m.incarnation}
        | (set(started) - {m.id for m in workers})
    )
    expected = expected_params(worker_steps, args.params)
    # per kill, the counters' change until the next kill (the final status for the last)
    snapshots = [k.pop("counters_before") for k in kills] + [counters(status)]
    for k in kills:
        del k["killed_at"]
    for k, (a, b) in zip(kills, zip(snapshots, snapshots[1:], strict=False), strict=True):
        k["worker_counters"] = {name: b[name] - a.get(name, 0.0) for name in b}
    final = np.load(run.tmp / "final.npy")  # what the coordinator read from the primary
    last = {}  # each replica's last checkpoint, written as it left
    for j in range(run.replicas):
        saved = checkpoint.scan_latest(run.tmp / f"checkpoints-{j}", 0).checkpoint
        if saved is not None:
            last[f"shard-r{j}"] = saved
    replicas_exact = [bool(np.array_equal(c.params, expected)) for c in last.values()]
    final_exact = bool(np.array_equal(final, expected))
    bounds = wire.chunk_bounds(args.params, 4, TrainConfig().chunk_bytes)
    held = applied_steps(final, run.workers, bounds)
    failovers = [k["failover_s"] for k in kills]
    stood = [max(k["worker_stall_s"]) for k in kills if "worker_stall_s" in k]
    return {
        "benchmark": "failover",
        "replicas": args.replicas,
        "params": args.params,
        "workers": args.workers,
        "kills": args.kills,
        "max_steps": steps,
        "failover_seconds": failovers,
        "failover_median_s": statistics.median(failovers) if failovers else None,
        "failover_worst_s": max(failovers) if failovers else None,
        "worker_stall_median_s": statistics.median(stood) if stood else None,
        "worker_stall_worst_s": max(stood) if stood else None,
        "per_kill": kills,
        "lost_per_kill": [k["lost"] for k in kills],
        "backup_faults": backup_faults,
        "worker_steps": [worker_steps.get(w, 0) for w in range(run.workers)],
        "workers_replaced": replaced,
        "worker_counters": {
            m.id: {n: m.stats.counters[n] for n in WORKER_COUNTERS if n in m.stats.counters}
            for m in workers
        },
        "pushes_per_s": throughput.get("pushes_per_s"),
        "push_gbps": (throughput["pushes_per_s"] * 4 * args.params / 1e9 if throughput else None),
        "throughput_window_s": throughput.get("window_s"),
        "coordinator_failovers": int(status.failovers),
        "lost_acknowledged_pushes": int(sum(status.lost_pushes.values())),
        "done_reason": status.done_reason,
        # per chunk of a push (a shard applies each whole), the steps of each worker the
        # final parameters hold there (None: no whole numbers of steps)
        "applied_steps_per_chunk": held,
        "steps_lost_per_chunk": [
            None if n is None else [worker_steps.get(w, 0) - k for w, k in enumerate(n)]
            for n in held
        ],
        "replica_versions": {name: c.version for name, c in last.items()},
        "replica_applied_steps_per_chunk": {
            name: applied_steps(c.params, run.workers, bounds) for name, c in last.items()
        },
        "final_params_exact": final_exact,
        "replicas_exact": replicas_exact,
        "exact": final_exact and len(last) == run.replicas and all(replicas_exact),
    }


# -- the reference and its chart --------------------------------------------------------------


def reference(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    """The reference set: ``--kills`` kills with R = 2 (``--backup-faults`` of them after
    a backup fault), 5 with R = 1 (what is lost without replicas), and the throughput of
    R = 1, 2, 3 with nothing killed."""
    runs = []
    plan = [(2, args.kills), (1, 5), (1, 0), (2, 0), (3, 0)]
    for replicas, kills in plan:
        faults = args.backup_faults if replicas > 1 and kills else 0
        one = argparse.Namespace(
            **{**vars(args), "replicas": replicas, "kills": kills, "backup_faults": faults}
        )
        print(f"R={replicas}, {kills} kills", flush=True)
        part = tmp / f"r{replicas}-k{kills}"
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
    """Failover times per kill (R = 2 and R = 1), and pushes applied per second per R."""
    from bench._common import pyplot

    plt = pyplot()
    fig, (ax_time, ax_rate) = plt.subplots(1, 2, figsize=(13, 5))
    for run in (r for r in doc["runs"] if r["kills"]):
        times = [1000 * t for t in run["failover_seconds"]]
        lost = sum(run["lost_per_kill"])
        label = (
            f"R={run['replicas']}: failover median {statistics.median(times):.0f} ms, worst "
            f"{max(times):.0f} ms; acknowledged pushes lost {lost}; "
            f"{'exact' if run['exact'] else 'not exact'}"
        )
        kills = range(1, len(times) + 1)
        (line,) = ax_time.plot(kills, times, "o-", label=label)
        stood = [1000 * max(k.get("worker_stall_s", [0.0])) for k in run["per_kill"]]
        ax_time.plot(
            kills,
            stood,
            "x--",
            color=line.get_color(),
            label=f"R={run['replicas']}: longest a worker stood still (heartbeats: 0.5 s "
            f"resolution), median {statistics.median(stood) / 1000:.1f} s",
        )
    ax_time.set_yscale("log")
    ax_time.set_xlabel("kill")
    ax_time.set_ylabel("ms after the SIGKILL of the primary")
    ax_time.set_title(
        "First update applied by the promoted replica (R=2) or the restarted shard (R=1)"
    )
    ax_time.legend(fontsize=7)
    ax_time.grid(alpha=0.3, which="both")
    quiet = sorted((r for r in doc["runs"] if not r["kills"]), key=lambda r: r["replicas"])
    if quiet:
        rates = [r["pushes_per_s"] for r in quiet]
        bars = ax_rate.bar([r["replicas"] for r in quiet], rates, 0.6)
        for bar, rate in zip(bars, rates, strict=True):
            ax_rate.annotate(
                f"{rate:.0f}/s\n{rate / rates[0]:.2f}x",
                (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                ha="center",
                va="bottom",
                fontsize=8,
            )
        ax_rate.set_ylim(0, 1.2 * max(rates))
        ax_rate.set_xticks([r["replicas"] for r in quiet])
        ax_rate.set_title(
            f"What replication costs ({quiet[0]['workers']} workers, "
            f"{quiet[0]['params']:,} parameters)"
        )
    ax_rate.set_xlabel("replicas per range (R)")
    ax_rate.set_ylabel("worker steps (fetch + push) applied per second")
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
    parser.add_argument("--workers", type=int, default=2, help=f"1..{MAX_WORKERS}")
    parser.add_argument(
        "--steps", type=int, default=0, help="each worker's step budget (0: enough for the faults)"
    )
    parser.add_argument("--checkpoint-every", type=float, default=5.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--seconds", type=float, default=15.0, help="with --kills 0: the throughput window"
    )
    parser.add_argument("--out", type=Path)
    parser.add_argument(
        "--workdir",
        type=Path,
        help="keep the processes' logs and checkpoints here (default: a temporary directory)",
    )
    parser.add_argument(
        "--reference",
        action="store_true",
        help="the reference set (R=2 with --kills, R=1 with 5, throughput of R=1,2,3) + a chart",
    )
    args = parser.parse_args(argv)
    if not 1 <= args.workers <= MAX_WORKERS:
        parser.error(f"--workers must be 1..{MAX_WORKERS}")
    return args


@contextlib.contextmanager
def _workdir(args: argparse.Namespace) -> Iterator[Path]:
    if args.workdir is not None:
        args.workdir.mkdir(parents=True, exist_ok=True)
        yield args.workdir
        return
    with tempfile.TemporaryDirectory(prefix="dsgd-failover-") as tmp:
        yield Path(tmp)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.reference:
        with _workdir(args) as tmp:
            doc = reference(args, tmp)
        out = args.out or Path("bench/results/failover.json")
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(doc, indent=2) + "\n")
        plot(doc, out.with_suffix(".png"))
        return 0 if all(r["exact"] for r in doc["runs"] if r["replicas"] > 1) else 1
    with _workdir(args) as tmp:
        result = asyncio.run(measure(args, tmp))
    print(
        json.dumps({k: v for k, v in result.items() if k not in ("failover_seconds", "per_kill")})
    )
    if args.out is not None:
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0 if result["exact"] or args.replicas == 1 else 1


if __name__ == "__main__":
    sys.exit(main())
