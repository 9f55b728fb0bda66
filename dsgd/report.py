"""Turning a ClusterStatus into what people read: progress lines, tables and the summary."""

from __future__ import annotations

from typing import Any

from dsgd.proto import control_pb2 as pb

ROLE_NAMES = {pb.ROLE_SHARD: "shard", pb.ROLE_WORKER: "worker"}


def _members(status: pb.ClusterStatus, role: int) -> list[pb.MemberStatus]:
    return [m for m in status.members if m.role == role]


def _counter(members: list[pb.MemberStatus], name: str) -> float:
    return sum(m.stats.counters.get(name, 0.0) for m in members)


def summarize(status: pb.ClusterStatus, wall_seconds: float) -> dict[str, Any]:
    """The one-line JSON summary of a finished run."""
    shards = sorted(_members(status, pb.ROLE_SHARD), key=lambda m: m.id)
    workers = _members(status, pb.ROLE_WORKER)
    last = status.history[-1] if status.history else None
    return {
        "test_accuracy": round(last.test_accuracy, 6) if last else None,
        "best_accuracy": round(max(h.test_accuracy for h in status.history), 6)
        if status.history
        else None,
        "reached_target": bool(status.reached_target),
        "target_accuracy": status.target_accuracy,
        "wall_seconds": round(wall_seconds, 3),
        "train_seconds": round(last.elapsed_seconds, 3) if last else None,
        "done_reason": status.done_reason,
        "model": status.model,
        "num_params": int(status.num_params),
        "workers": int(status.num_workers),
        "shards": int(status.num_shards),
        "steps": int(sum(m.stats.step for m in workers)),
        "pushes": int(_counter(workers, "pushes")),
        "bytes_pushed": int(_counter(workers, "bytes_pushed")),
        "bytes_fetched": int(_counter(workers, "bytes_fetched")),
        "bytes_pushed_dense_equivalent": int(_counter(workers, "bytes_pushed_dense_equivalent")),
        "bytes_fetched_dense_equivalent": int(_counter(workers, "bytes_fetched_dense_equivalent")),
        "values_given_back": int(_counter(workers, "values_given_back")),
        "fetches": int(_counter(workers, "fetches")),
        "fetches_skipped": int(_counter(workers, "fetches_skipped")),
        "updates_applied": [int(m.stats.counters.get("updates_applied", 0)) for m in shards],
        "shard_versions": [int(m.stats.version) for m in shards],
        "rejected": int(_counter(shards, "rejected")),
        "evaluations": len(status.history),
    } | {f"staleness_{q}": _worst(shards, f"staleness_{q}") for q in ("p50", "p90", "p99")}


def _worst(members: list[pb.MemberStatus], name: str) -> float:
    return max((m.stats.counters.get(name, 0.0) for m in members), default=0.0)


def progress_line(status: pb.ClusterStatus) -> str:
    """One line of live progress: accuracy, update rates, shard versions, liveness."""
    shards = sorted(_members(status, pb.ROLE_SHARD), key=lambda m: m.id)
    workers = _members(status, pb.ROLE_WORKER)
    alive = sum(1 for w in workers if w.state in ("alive", "suspect"))
    acc = f"{status.history[-1].test_accuracy:.3f}" if status.history else "  -  "
    steps = sum(w.stats.rate for w in workers)
    updates = sum(s.stats.rate for s in shards)
    versions = " ".join(str(s.stats.version) for s in shards) or "-"
    line = (
        f"[{status.elapsed_seconds:6.1f}s] test acc {acc} (target {status.target_accuracy:g}) | "
        f"{steps:6.0f} steps/s | {updates:6.0f} updates/s | shard versions {versions} | "
        f"workers {alive}/{status.num_workers}"
    )
    if status.waiting_for:
        line += f" | waiting for {status.waiting_for}"
    return line


def status_table(status: pb.ClusterStatus) -> str:
    """The cluster table printed by ``dsgd status``."""
    head = (
        f"model {status.model}: {status.num_params:,} parameters, {status.num_shards} shard(s), "
        f"{status.num_workers} worker(s), up {status.elapsed_seconds:.0f} s"
    )
    if status.history:
        h = status.history[-1]
        head += f"\ntest accuracy {h.test_accuracy:.4f} at {h.elapsed_seconds:.0f} s"
    if status.done:
        head += f"\nrun finished: {status.done_reason}"
    if status.waiting_for:
        head += f"\nwaiting for {status.waiting_for}"
    rows = [("role", "id", "state", "version", "step", "rate/s", "seen", "address")]
    rows += [
        (
            ROLE_NAMES.get(m.role, "?"),
            str(m.id),
            m.state,
            str(m.stats.version),
            str(m.stats.step),
            f"{m.stats.rate:.1f}",
            f"{m.last_seen_seconds:.1f}s ago",
            m.address,
        )
        for m in status.members
    ]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)) for row in rows]
    return head + "\n" + "\n".join(line.rstrip() for line in lines)
