"""Accuracy and bytes on the wire vs push density: does sparsification cost accuracy?

    python -m bench.density [--densities 0.01 0.1 1.0] [--seeds 0 1 2] [--steps 600]
                            [--model dsgd.examples.digits:digits_cnn] [--out DIR]

Each (density, seed) trains the model on an in-process cluster (2 workers, 2 shards,
real sockets on 127.0.0.1) for the same number of steps per worker, then records the
final held-out accuracy and the bytes pushed and fetched, actual and dense-equivalent.
Writes density.json, density.md and density.png into --out (default bench/results/).
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import dsgd
from bench._common import pyplot, write_json


def run_one(model: str, density: float, seed: int, steps: int, workers: int) -> dict[str, Any]:
    started = time.monotonic()
    result = dsgd.train(
        model,
        num_workers=workers,
        num_shards=2,
        density=density,
        seed=seed,
        max_steps=steps,
        target="none",
        max_seconds=600,
        eval_every=0.5,
    )
    s = result.summary
    pushes = max(s["pushes"], 1)
    return {
        "density": density,
        "seed": seed,
        "steps_per_worker": steps,
        "test_accuracy": s["test_accuracy"],
        "pushes": s["pushes"],
        "bytes_pushed": s["bytes_pushed"],
        "bytes_pushed_dense_equivalent": s["bytes_pushed_dense_equivalent"],
        "bytes_per_push": s["bytes_pushed"] / pushes,
        "push_ratio_to_dense": s["bytes_pushed"] / max(s["bytes_pushed_dense_equivalent"], 1),
        "bytes_fetched": s["bytes_fetched"],
        "bytes_fetched_dense_equivalent": s["bytes_fetched_dense_equivalent"],
        "fetch_ratio_to_dense": s["bytes_fetched"] / max(s["bytes_fetched_dense_equivalent"], 1),
        "staleness_p50": s["staleness_p50"],
        "staleness_p99": s["staleness_p99"],
        "wall_seconds": time.monotonic() - started,
    }


def summarize(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for density in sorted({r["density"] for r in records}):
        group = [r for r in records if r["density"] == density]
        accs = [r["test_accuracy"] for r in group]
        rows.append(
            {
                "density": density,
                "seeds": len(group),
                "accuracy_mean": statistics.mean(accs),
                "accuracy_min": min(accs),
                "accuracy_max": max(accs),
                "bytes_per_push": statistics.mean(r["bytes_per_push"] for r in group),
                "push_ratio_to_dense": statistics.mean(r["push_ratio_to_dense"] for r in group),
                "fetch_ratio_to_dense": statistics.mean(r["fetch_ratio_to_dense"] for r in group),
            }
        )
    dense = next((r for r in rows if r["density"] == 1.0), None)
    for row in rows:
        row["accuracy_points_vs_dense"] = (
            100 * (row["accuracy_mean"] - dense["accuracy_mean"]) if dense else None
        )
    return rows


def markdown(rows: list[dict[str, Any]], model: str, steps: int) -> str:
    lines = [
        f"# Accuracy vs push density ({model}, {steps} steps per worker, 2 workers, 2 shards)",
        "",
        "| density | seeds | test accuracy (mean, min-max) | vs dense (points) "
        "| bytes/push | push bytes / dense | fetch bytes / dense |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        vs = r["accuracy_points_vs_dense"]
        lines.append(
            f"| {r['density']:g} | {r['seeds']} | {r['accuracy_mean']:.4f} "
            f"({r['accuracy_min']:.4f}-{r['accuracy_max']:.4f}) | "
            f"{'' if vs is None else f'{vs:+.2f}'} | {r['bytes_per_push']:,.0f} | "
            f"{r['push_ratio_to_dense']:.2%} | {r['fetch_ratio_to_dense']:.2%} |"
        )
    return "\n".join(lines) + "\n"


def chart(rows: list[dict[str, Any]], path: Path) -> None:
    plt = pyplot()

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    xs = [r["density"] for r in rows]
    left.errorbar(
        xs,
        [r["accuracy_mean"] for r in rows],
        yerr=[
            [r["accuracy_mean"] - r["accuracy_min"] for r in rows],
            [r["accuracy_max"] - r["accuracy_mean"] for r in rows],
        ],
        marker="o",
        capsize=4,
    )
    left.set_xscale("log")
    left.set_xlabel("push density")
    left.set_ylabel("test accuracy (mean, min-max over seeds)")
    left.set_title("accuracy")
    right.bar([f"{x:g}" for x in xs], [r["push_ratio_to_dense"] * 100 for r in rows])
    right.set_xlabel("push density")
    right.set_ylabel("bytes pushed, % of dense")
    right.set_title("bytes on the wire per push")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="dsgd.examples.digits:digits_cnn")
    parser.add_argument("--densities", type=float, nargs="+", default=[0.01, 0.1, 1.0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=600, help="steps per worker")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    records = []
    for density in args.densities:
        for seed in args.seeds:
            record = run_one(args.model, density, seed, args.steps, args.workers)
            print(
                f"density {density:g} seed {seed}: accuracy {record['test_accuracy']:.4f}, "
                f"{record['bytes_per_push']:,.0f} B/push ({record['push_ratio_to_dense']:.2%} "
                f"of dense), {record['wall_seconds']:.1f} s"
            )
            records.append(record)
    rows = summarize(records)
    out = {
        "machine": {"platform": platform.platform(), "python": platform.python_version()},
        "model": args.model,
        "steps_per_worker": args.steps,
        "records": records,
        "summary": rows,
    }
    write_json(args.out / "density.json", out, strict=False)
    text = markdown(rows, args.model, args.steps)
    (args.out / "density.md").write_text(text)
    chart(rows, args.out / "density.png")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
