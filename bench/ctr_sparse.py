"""Bytes per worker step, sparse vs dense, on the click-through embedding model.

    python -m bench.ctr_sparse [--density 0.01] [--steps 300] [--lr 0.3] [--out DIR]

Trains ``dsgd.examples.ctr:ctr_embedding`` (8.4M parameters; one batch touches about
1.2% of the embedding rows) on an in-process cluster of 2 workers and 2 shards with
sparse pushes at ``--density`` and sparse pulls, for ``--steps`` steps per worker.
Reports the bytes pushed and fetched per worker step against what dense pushes and
full fetches would have moved for the same steps (the ``*_dense_equivalent``
counters: 4 bytes per parameter of each range, per push and per fetch), and the final
log-loss against the planted teacher's. Writes ctr_sparse.json/.md/.png into --out.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import dsgd
from bench._common import pyplot, write_json

MODEL = "dsgd.examples.ctr:ctr_embedding"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--density", type=float, default=0.01)
    parser.add_argument("--steps", type=int, default=300, help="steps per worker")
    parser.add_argument("--lr", type=float, default=0.3)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    result = dsgd.train(
        MODEL,
        num_workers=args.workers,
        num_shards=2,
        optimizer="sgd",
        lr=args.lr,
        density=args.density,
        max_steps=args.steps,
        target="none",
        max_seconds=1800,
        eval_every=5.0,
    )
    s = result.summary
    steps = max(s["steps"], 1)
    final = result.history[-1]
    record: dict[str, Any] = {
        "model": MODEL,
        "density": args.density,
        "workers": args.workers,
        "steps": s["steps"],
        "wall_seconds": time.monotonic() - started,
        "bytes_pushed_per_step": s["bytes_pushed"] / steps,
        "bytes_fetched_per_step": s["bytes_fetched"] / steps,
        "dense_pushed_per_step": s["bytes_pushed_dense_equivalent"] / steps,
        "dense_fetched_per_step": s["bytes_fetched_dense_equivalent"] / steps,
        "log_loss": final.get("log_loss"),
        "teacher_log_loss": final.get("teacher_log_loss"),
        "log_loss_gap": final.get("log_loss_gap"),
        "test_accuracy": final.get("test_accuracy"),
        "history": result.history,
    }
    actual = record["bytes_pushed_per_step"] + record["bytes_fetched_per_step"]
    dense = record["dense_pushed_per_step"] + record["dense_fetched_per_step"]
    record["reduction"] = dense / max(actual, 1)
    write_json(args.out / "ctr_sparse.json", record, strict=False)
    text = (
        f"# Sparse vs dense bytes per worker step ({MODEL}, density {args.density:g}, "
        f"{args.workers} workers, {s['steps']} steps)\n\n"
        "| | pushed / step | fetched / step | total / step |\n|---|---|---|---|\n"
        f"| sparse (measured) | {record['bytes_pushed_per_step']:,.0f} B "
        f"| {record['bytes_fetched_per_step']:,.0f} B | {actual:,.0f} B |\n"
        f"| dense (same steps) | {record['dense_pushed_per_step']:,.0f} B "
        f"| {record['dense_fetched_per_step']:,.0f} B | {dense:,.0f} B |\n\n"
        f"**{record['reduction']:.1f}x fewer bytes per worker step.** Final test log-loss "
        f"{record['log_loss']:.4f} vs the teacher's {record['teacher_log_loss']:.4f} "
        f"(gap {100 * record['log_loss_gap']:.2f}%), accuracy {record['test_accuracy']:.4f}.\n"
    )
    (args.out / "ctr_sparse.md").write_text(text)
    chart(record, args.out / "ctr_sparse.png")
    print(text)
    return 0


def chart(record: dict[str, Any], path: Path) -> None:
    plt = pyplot()

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    labels = ["pushed", "fetched"]
    sparse = [record["bytes_pushed_per_step"], record["bytes_fetched_per_step"]]
    dense = [record["dense_pushed_per_step"], record["dense_fetched_per_step"]]
    xs = range(len(labels))
    left.bar([x - 0.2 for x in xs], [d / 2**20 for d in dense], 0.4, label="dense")
    left.bar([x + 0.2 for x in xs], [v / 2**20 for v in sparse], 0.4, label="sparse")
    left.set_xticks(list(xs), labels)
    left.set_ylabel("MiB per worker step")
    left.set_title(f"{record['reduction']:.0f}x fewer bytes")
    left.legend()
    history = record["history"]
    right.plot(
        [h["elapsed_seconds"] for h in history], [h.get("log_loss") for h in history], marker="."
    )
    right.axhline(record["teacher_log_loss"], color="gray", linestyle="--", label="teacher")
    right.set_xlabel("seconds")
    right.set_ylabel("test log-loss")
    right.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
