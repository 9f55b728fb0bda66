"""Turning a ClusterStatus into what people read: progress lines, tables and the summary."""

from __future__ import annotations

from typing import Any

from dsgd.config import parse_target
from dsgd.proto import control_pb2 as pb

ROLE_NAMES = {pb.ROLE_SHARD: "shard", pb.ROLE_WORKER: "worker", pb.ROLE_EVALUATOR: "evaluator"}


def _members(status: pb.ClusterStatus, role: int) -> list[pb.MemberStatus]:
    return [m for m in status.members if m.role == role]


def _primaries(status: pb.ClusterStatus) -> list[pb.MemberStatus]:
    """Each shard range's primary (the range itself when it is not replicated)."""
    return sorted((m for m in _members(status, pb.ROLE_SHARD) if m.primary), key=lambda m: m.id)


def _counter(members: list[pb.MemberStatus], name: str) -> float:
    return sum(m.stats.counters.get(name, 0.0) for m in members)


def summarize(status: pb.ClusterStatus, wall_seconds: float) -> dict[str, Any]:
    """The one-line JSON summary of a finished run."""
    shards = _primaries(status)
    workers = _members(status, pb.ROLE_WORKER)
    last = status.history[-1] if status.history else None
    periodic = [h for h in status.history if not h.final]
    evaluators = _members(status, pb.ROLE_EVALUATOR)
    metric = _target_metric(status)
    values = [h.metrics[metric] for h in status.history if metric in h.metrics]
    target = parse_target(status.target) if status.target else None
    best = None
    for value in values:
        best = value if best is None or target is None else target.better(best, value)
    return {
        "target": status.target,
        f"test_{metric}": _rounded(last.metrics.get(metric)) if last else None,
        f"best_{metric}": _rounded(best),
        "test_loss": _rounded(last.metrics.get("loss")) if last else None,
        "metrics": {k: _rounded(v) for k, v in sorted(last.metrics.items())} if last else {},
        "reached_target": bool(status.reached_target),
        "wall_seconds": round(wall_seconds, 3),
        "train_seconds": round(periodic[-1].elapsed_seconds, 3) if periodic else None,
        "test_examples": int(last.examples) if last else 0,
        "final_evaluation": bool(last is not None and last.final),
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
        # held for a shard no worker could reach before it left: never applied
        "values_unpushed": int(_counter(workers, "values_unpushed")),
        "fetches": int(_counter(workers, "fetches")),
        "fetches_skipped": int(_counter(workers, "fetches_skipped")),
        "gradient_seconds": round(_counter(workers, "gradient_seconds"), 3),
        "exchange_seconds": round(_counter(workers, "exchange_seconds"), 3),
        "updates_applied": [int(m.stats.counters.get("updates_applied", 0)) for m in shards],
        "shard_versions": [int(m.stats.version) for m in shards],
        "rejected": int(_counter(shards, "rejected")),
        "evaluations": len(status.history),
        "eval_seconds": round(_counter(evaluators, "eval_seconds"), 3),
        "peak_rss_mb": _peak_rss(status),
        "failovers": int(status.failovers),
        "lost_acknowledged_pushes": {str(k): int(v) for k, v in sorted(status.lost_pushes.items())},
    } | {f"staleness_{q}": _worst(shards, f"staleness_{q}") for q in ("p50", "p90", "p99")}


def _target_metric(status: pb.ClusterStatus) -> str:
    """The metric the run is judged on (accuracy when it has no target)."""
    target = parse_target(status.target) if status.target else None
    return target.metric if target is not None else "accuracy"


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(float(value), 6)


def _peak_rss(status: pb.ClusterStatus) -> dict[str, float]:
    """Peak RSS in MB of the coordinator and of each member's latest process."""
    out = {"coordinator": round(status.peak_rss_bytes / 1e6, 1)}
    for m in sorted(status.members, key=lambda m: (m.role, m.id)):
        name = ROLE_NAMES.get(m.role, "?") + ("" if m.role == pb.ROLE_EVALUATOR else str(m.id))
        out[name] = round(m.stats.counters.get("peak_rss_bytes", 0.0) / 1e6, 1)
    return out


def _worst(members: list[pb.MemberStatus], name: str) -> float:
    return max((m.stats.counters.get(name, 0.0) for m in members), default=0.0)


def progress_line(status: pb.ClusterStatus) -> str:
    """One line of live progress: accuracy, update rates, shard versions, liveness."""
    shards = _primaries(status)
    workers = _members(status, pb.ROLE_WORKER)
    alive = sum(1 for w in workers if w.state in ("alive", "suspect"))
    metric = _target_metric(status)
    metrics = status.history[-1].metrics if status.history else {}
    value = f"{metrics[metric]:.4g}" if metric in metrics else "-"
    judged = f"test {metric} {value} (target {status.target or 'none'})"
    if metric != "loss":
        judged += f", loss {metrics['loss']:.4g}" if "loss" in metrics else ", loss -"
    steps = sum(w.stats.rate for w in workers)
    updates = sum(s.stats.rate for s in shards)
    versions = " ".join(str(s.stats.version) for s in shards) or "-"
    line = (
        f"[{status.elapsed_seconds:6.1f}s] {judged} | "
        f"{steps:6.0f} steps/s | {updates:6.0f} updates/s | shard versions {versions} | "
        f"workers {alive}/{status.num_workers}"
    )
    if status.waiting_for:
        line += f" | waiting for {status.waiting_for}"
    return line


def _member_id(m: pb.MemberStatus) -> str:
    """A member's id; a replicated shard's with its replica, the primary starred."""
    if m.role != pb.ROLE_SHARD or (m.replica == 0 and m.primary):
        return str(m.id)
    return f"{m.id} r{m.replica}{' primary' if m.primary else ''}"


def status_table(status: pb.ClusterStatus) -> str:
    """The cluster table printed by ``dsgd status``."""
    head = (
        f"model {status.model}: {status.num_params:,} parameters, {status.num_shards} shard(s), "
        f"{status.num_workers} worker(s), up {status.elapsed_seconds:.0f} s"
    )
    if status.history:
        h = status.history[-1]
        shown = ", ".join(f"{k} {v:.4g}" for k, v in sorted(h.metrics.items()))
        scope = "all" if h.final else "a sample of"
        head += (
            f"\ntest {shown} at {h.elapsed_seconds:.0f} s (target {status.target or 'none'}; "
            f"{scope} {h.examples} examples, evaluated in {h.eval_seconds:.1f} s)"
        )
    notes = sorted({f"{k}: {v}" for m in status.members for k, v in m.stats.notes.items()})
    if notes:
        head += "\n" + "\n".join(notes)
    if status.done:
        head += f"\nrun finished: {status.done_reason}"
    if status.waiting_for:
        head += f"\nwaiting for {status.waiting_for}"
    rows = [("role", "id", "state", "version", "step", "rate/s", "seen", "address")]
    rows += [
        (
            ROLE_NAMES.get(m.role, "?"),
            _member_id(m),
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
