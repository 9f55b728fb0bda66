"""The original example at its real scale: the 74.8M-parameter CNN on Caltech-101.

    python -m bench.caltech --data ../shared/caltech101 [--image-size 96] [--seconds 120]
                            [--runs standalone 1w-dense 1w-1%-fp16 2w-dense 2w-1%-fp16 ...]
                            [--repeats 1] [--target-accuracy A] [--out DIR]

Each run is a process of its own, started cold (imports, data from the warm cache, the
model's initial values, the compile):

- ``standalone``: a single-process jitted loop (no dsgd) with the same model, data,
  augmentation and optimizer (Adagrad, as the shards apply it, via optax), evaluating the
  same fixed sample of the test split; its step rate is the baseline every ratio divides by;
- ``<W>w-<dense|1%|1%-fp16>``: ``python -m dsgd start`` with W workers and W shards, dense
  pushes or 1% density (float32 or float16 values). The bench polls the coordinator's
  status every second for the cluster's step count.

Without ``--target-accuracy`` each run trains for ``--seconds`` from its first step (a
dsgd run is then ended through the coordinator's Shutdown call, as a spent budget would
end it; its start-up is not counted against its training time) and reports the steady
step rate from ``--warmup`` (10) s after the first step to the end, and the ratio of the
cluster's rate to the standalone loop's; with it, each run trains until the sample
reaches that accuracy (DistBelief's Figure 5: time to a fixed accuracy; ``--epochs``
bounds the standalone loop and reports what it reached). Every run records its accuracy
curve (Figure 4), seconds to its first step, bytes pushed and fetched per step against
dense, fetches skipped, staleness and the peak RSS of each process. Writes caltech.json
and caltech.png to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench._common import ROOT, pyplot, write_json

MODEL = "dsgd.examples.caltech101:cnn"
RUNS = {
    "standalone": None,
    "1w-dense": (1, 1.0, "float32"),
    "1w-1%": (1, 0.01, "float32"),
    "1w-1%-fp16": (1, 0.01, "float16"),
    "2w-dense": (2, 1.0, "float32"),
    "2w-1%": (2, 0.01, "float32"),
    "2w-1%-fp16": (2, 0.01, "float16"),
}
STARTUP_ALLOWANCE = 240.0  # seconds a run may take to its first step (a loaded machine)
MALLOC = {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}  # what dsgd's members run with


# -- the standalone loop (runs in a process of its own) ------------------------------------


def standalone(args: argparse.Namespace) -> dict[str, Any]:
    """Train with one jitted step per batch; return the curve and the step rate."""
    launched = time.monotonic()
    import jax
    import optax

    from dsgd.config import TrainConfig
    from dsgd.model import CompiledModel, batches, load_model, softmax_cross_entropy

    config = TrainConfig()
    spec = load_model(MODEL, seed=0, data=args.data, args=f"image_size={args.image_size}")
    compiled = CompiledModel(spec, 1)
    sample = compiled.evaluation_sample(args.eval_sample, config.seed)
    data = spec.dataset
    stream = batches(data.x_train, data.y_train, spec.batch_size, 0, augment=spec.augment)
    steps_per_epoch = max(1, len(data.x_train) // min(spec.batch_size, len(data.x_train)))
    optimizer = optax.adagrad(config.lr, initial_accumulator_value=0.1, eps=1e-7)

    def loss(params: Any, x: Any, y: Any) -> Any:
        return softmax_cross_entropy(spec.apply(params, x), y)

    def step(params: Any, state: Any, x: Any, y: Any) -> Any:
        value, grads = jax.value_and_grad(loss)(params, x, y)
        updates, state = optimizer.update(grads, state, params)
        return optax.apply_updates(params, updates), state, value

    jitted = jax.jit(step, donate_argnums=(0, 1))
    params = jax.tree_util.tree_map(jax.numpy.asarray, spec.init_params)
    state = optimizer.init(params)
    curve: list[dict[str, float]] = []
    steps, trained, first_step_at = 0, 0.0, None
    next_eval = 0.0
    steady_from: tuple[int, float] | None = None

    def evaluate() -> float:
        flat = compiled.layout.flatten(params)
        return compiled.evaluate(flat, sample)["accuracy"]

    curve.append({"seconds": 0.0, "steps": 0, "accuracy": evaluate()})
    while True:
        x, y = next(stream)
        began = time.monotonic()
        params, state, value = jitted(params, state, x, y)
        float(value)
        trained += time.monotonic() - began
        steps += 1
        if first_step_at is None:
            first_step_at = time.monotonic() - launched
        if steady_from is None and trained >= args.warmup:
            steady_from = (steps, trained)
        done = (
            steps >= args.epochs * steps_per_epoch
            if args.target_accuracy
            else trained >= args.seconds
        )
        if trained >= next_eval or done:
            accuracy = evaluate()
            curve.append({"seconds": trained, "steps": steps, "accuracy": accuracy})
            next_eval = trained + args.eval_every
            if args.target_accuracy and accuracy >= args.target_accuracy:
                break
        if done:
            break
    base_steps, base_time = steady_from or (0, 0.0)
    return {
        "run": "standalone",
        "workers": 1,
        "steps": steps,
        "epochs": steps / steps_per_epoch,
        "train_seconds": trained,
        "steps_per_second": (steps - base_steps) / max(trained - base_time, 1e-9),
        "seconds_to_first_step": first_step_at,
        "curve": curve,
        "best_accuracy": max(p["accuracy"] for p in curve),
        "peak_rss_mb": {"standalone": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e3},
        "num_params": compiled.layout.size,
    }


# -- a dsgd run ------------------------------------------------------------------------------


def _coordinator(address: str, method: str, request: Any) -> Any:
    """One call to the coordinator at ``address``; None when it does not answer."""
    import grpc

    from dsgd.proto import control_pb2_grpc as pb_grpc

    with grpc.insecure_channel(address) as channel:
        try:
            return getattr(pb_grpc.CoordinatorStub(channel), method)(request, timeout=2.0)
        except grpc.RpcError:
            return None


def dsgd_run(name: str, args: argparse.Namespace, out: Path) -> dict[str, Any]:
    workers, density, value_dtype = RUNS[name]
    run_dir = out / "runs" / name
    summary_path = out / "runs" / f"{name}.json"
    from dsgd.proto import control_pb2 as pb

    target = f"accuracy>={args.target_accuracy}" if args.target_accuracy else "none"
    budget = args.max_seconds if args.target_accuracy else args.seconds + STARTUP_ALLOWANCE
    argv = [
        sys.executable, "-m", "dsgd", "start", "--model", MODEL, "--data", args.data,
        "--model-arg", f"image_size={args.image_size}", "--workers", str(workers),
        "--shards", str(workers), "--density", str(density), "--value-dtype", value_dtype,
        "--target", target, "--max-seconds", str(budget), "--eval-sample",
        str(args.eval_sample), "--eval-every", str(args.eval_every),
        "--run-dir", str(run_dir), "--out", str(summary_path),
    ]  # fmt: skip
    launched = time.monotonic()
    log = (out / "runs" / f"{name}.log").open("w")
    proc = subprocess.Popen(argv, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    samples: list[tuple[float, int]] = []  # (seconds since launch, cluster steps)
    address = None
    ended = False
    while proc.poll() is None:
        time.sleep(1.0)
        ready = run_dir / "coordinator.ready"
        if address is None and ready.exists():
            address = json.loads(ready.read_text() or "{}").get("address")
        status = _coordinator(address, "Status", pb.StatusRequest()) if address else None
        if status is None or status.done:
            continue
        steps = sum(m.stats.step for m in status.members if m.role == pb.ROLE_WORKER)
        samples.append((time.monotonic() - launched, steps))
        first = next((t for t, s in samples if s > 0), None)
        trained = first is not None and samples[-1][0] - first >= args.seconds
        if trained and not args.target_accuracy and not ended:
            reason = f"the benchmark's {args.seconds:g} s of training are done"
            request = pb.ShutdownRequest(reason=reason, wait_for_members=True)
            ended = _coordinator(address, "Shutdown", request) is not None
    log.close()
    if proc.returncode not in (0, 3):
        raise SystemExit(f"{name}: dsgd start exited {proc.returncode}; see {log.name}")
    summary = json.loads(summary_path.read_text())
    status_path = run_dir / "status.json"  # the coordinator's last word
    status = json.loads(status_path.read_text()) if status_path.exists() else {}
    training = [(t, s) for t, s in samples if s > 0]
    first = training[0][0] if training else None
    steady = [(t, s) for t, s in training if first is not None and t >= first + args.warmup]
    rate = (steady[-1][1] - steady[0][1]) / (steady[-1][0] - steady[0][0]) if len(steady) > 1 else 0
    steps = max(summary["steps"], 1)
    curve = [
        {
            "seconds": float(h.get("elapsed_seconds", 0.0)),
            "accuracy": float(h.get("metrics", {}).get("accuracy", 0.0)),
            "examples": int(h.get("examples", 0)),
            "final": bool(h.get("final", False)),
        }
        for h in status.get("history", [])
    ]
    return {
        "run": name,
        "workers": workers,
        "density": density,
        "value_dtype": value_dtype,
        "steps": summary["steps"],
        "steps_per_second": rate,
        "seconds_to_first_step": first,
        "train_seconds": summary["train_seconds"],
        "wall_seconds": summary["wall_seconds"],
        "reached_target": summary["reached_target"],
        "test_accuracy": summary["test_accuracy"],
        "final_evaluation": summary["final_evaluation"],
        "best_accuracy": summary["best_accuracy"],
        "curve": curve,
        "push_bytes_per_step": summary["bytes_pushed"] / steps,
        "fetch_bytes_per_step": summary["bytes_fetched"] / steps,
        "push_ratio_to_dense": summary["bytes_pushed"]
        / max(summary["bytes_pushed_dense_equivalent"], 1),
        "fetch_ratio_to_dense": summary["bytes_fetched"]
        / max(summary["bytes_fetched_dense_equivalent"], 1),
        "fetches": summary["fetches"],
        "fetches_skipped": summary["fetches_skipped"],
        "staleness_p50": summary["staleness_p50"],
        "staleness_p99": summary["staleness_p99"],
        "eval_seconds": summary["eval_seconds"],
        "gradient_seconds_per_step": summary["gradient_seconds"] / steps,
        "exchange_seconds_per_step": summary["exchange_seconds"] / steps,
        "evaluations": summary["evaluations"],
        "peak_rss_mb": summary["peak_rss_mb"],
        "num_params": summary["num_params"],
    }


# -- the report ------------------------------------------------------------------------------


def training_seconds_to(record: dict[str, Any], accuracy: float | None) -> float | None:
    """Seconds of training (from the first step) until an evaluation first reached
    ``accuracy``; None if none did. The standalone loop's curve counts training time
    only; a dsgd run's counts from the coordinator's start, so its time to the first step
    (on the bench's clock, which starts within a second of the coordinator's) comes off."""
    if accuracy is None:
        return None
    reached = [p["seconds"] for p in record["curve"] if p["accuracy"] >= accuracy]
    if not reached:
        return None
    start = 0.0 if record["run"] == "standalone" else record["seconds_to_first_step"] or 0.0
    return max(0.0, reached[0] - start)


def aggregate(records: list[dict[str, Any]], target: float | None = None) -> list[dict[str, Any]]:
    """Per run: medians over repeats, the spread, the ratio to the standalone loop, and
    with a ``target`` accuracy the training time to it (DistBelief's Figure 5)."""
    names = [n for n in RUNS if any(r["run"] == n for r in records)]
    base = [r["steps_per_second"] for r in records if r["run"] == "standalone"]
    base_rate = statistics.median(base) if base else None
    rows = []
    for name in names:
        group = [r for r in records if r["run"] == name]
        rates = [r["steps_per_second"] for r in group]
        firsts = [r["seconds_to_first_step"] for r in group if r["seconds_to_first_step"]]
        row = {
            "run": name,
            "repeats": len(group),
            "steps_per_second": statistics.median(rates),
            "steps_per_second_min": min(rates),
            "steps_per_second_max": max(rates),
            "ratio_to_standalone": statistics.median(rates) / base_rate if base_rate else None,
            "seconds_to_first_step": statistics.median(firsts) if firsts else None,
            "best_accuracy": statistics.median(r["best_accuracy"] for r in group),
            "train_seconds": statistics.median(r["train_seconds"] for r in group),
        }
        if target is not None:
            times = [training_seconds_to(r, target) for r in group]
            reached = [t for t in times if t is not None]
            row["training_seconds_to_target"] = statistics.median(reached) if reached else None
            row["reached_target_runs"] = len(reached)
        for key in ("push_ratio_to_dense", "fetch_ratio_to_dense", "staleness_p99"):
            if key in group[0]:
                row[key] = statistics.median(r[key] for r in group)
        if "fetches" in group[0]:
            row["fetches_skipped_fraction"] = sum(r["fetches_skipped"] for r in group) / max(
                1, sum(r["fetches"] + r["fetches_skipped"] for r in group)
            )
        row["peak_rss_mb"] = {
            k: max(r["peak_rss_mb"].get(k, 0.0) for r in group) for k in group[0]["peak_rss_mb"]
        }
        rows.append(row)
    return rows


def plot(
    records: list[dict[str, Any]],
    rows: list[dict[str, Any]],
    path: Path,
    target: float | None = None,
) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(1, 3 if target else 2, figsize=(19 if target else 13, 5))
    curves, rates = axes[0], axes[1]
    for record in records:
        points = [p for p in record["curve"] if not p.get("final")]
        # from the first step, as training_seconds_to counts
        start = 0.0 if record["run"] == "standalone" else record["seconds_to_first_step"] or 0.0
        curves.plot(
            [max(0.0, p["seconds"] - start) / 60 for p in points],
            [100 * p["accuracy"] for p in points],
            label=record["run"],
        )
    curves.set_xlabel("training time (minutes)")
    curves.set_ylabel("test accuracy on the fixed sample (%)")
    curves.set_title("accuracy against time (DistBelief Fig. 4 style)")
    curves.legend(fontsize=8)
    names = [r["run"] for r in rows]
    values = [r["ratio_to_standalone"] or 0.0 for r in rows]
    spread = [
        (r["steps_per_second_min"], r["steps_per_second_max"], max(r["steps_per_second"], 1e-9))
        for r in rows
    ]
    low = [max(0.0, v - v * lo / mid) for v, (lo, _, mid) in zip(values, spread, strict=True)]
    high = [max(0.0, v * hi / mid - v) for v, (_, hi, mid) in zip(values, spread, strict=True)]
    rates.bar(names, values, yerr=[low, high], color="tab:blue")
    rates.axhline(1.0, color="grey", linestyle="--", linewidth=1)
    rates.set_ylabel("cluster steps/s / standalone steps/s")
    rates.set_title("aggregate step rate against the standalone jitted loop")
    rates.tick_params(axis="x", rotation=30)
    if target:
        times = axes[2]
        minutes = [(r.get("training_seconds_to_target") or 0.0) / 60 for r in rows]
        times.bar(names, minutes, color="tab:green")
        for i, row in enumerate(rows):
            if row.get("training_seconds_to_target") is None:
                times.annotate("not reached", (i, 0), ha="center", va="bottom", fontsize=8)
        times.set_ylabel("training minutes")
        times.set_title(f"time to {100 * target:g}% test accuracy (DistBelief Fig. 5 style)")
        times.tick_params(axis="x", rotation=30)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.caltech", description=__doc__)
    parser.add_argument("--data", default=os.environ.get("DSGD_CALTECH101", ""))
    parser.add_argument("--image-size", type=int, default=96)
    parser.add_argument("--runs", nargs="+", default=list(RUNS), choices=list(RUNS))
    parser.add_argument("--repeats", type=int, default=1, help="interleaved repetitions")
    parser.add_argument("--seconds", type=float, default=120.0, help="training per run")
    parser.add_argument(
        "--warmup", type=float, default=10.0, help="seconds after the first step not counted"
    )
    parser.add_argument("--target-accuracy", type=float, help="train to this accuracy instead")
    parser.add_argument("--epochs", type=float, default=10.0, help="the standalone loop's bound")
    parser.add_argument("--max-seconds", type=float, default=3600.0, help="dsgd runs' bound")
    parser.add_argument("--eval-sample", type=int, default=500)
    parser.add_argument("--eval-every", type=float, default=30.0)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    parser.add_argument(
        "--replot", type=Path, help="redo the rows and chart of an earlier caltech.json"
    )
    parser.add_argument("--standalone-json", type=Path, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.replot:
        doc = json.loads(args.replot.read_text())
        doc["rows"] = aggregate(doc["records"], doc["target_accuracy"])
        args.out.mkdir(parents=True, exist_ok=True)
        write_json(args.out / "caltech.json", doc)
        plot(doc["records"], doc["rows"], args.out / "caltech.png", doc["target_accuracy"])
        return 0
    if not args.data:
        print("bench.caltech: give --data DIR (the folder holding 101_ObjectCategories/)")
        return 2
    if args.standalone_json:  # the child process of a standalone run
        write_json(args.standalone_json, standalone(args))
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "runs").mkdir(exist_ok=True)
    records = []
    for repeat in range(args.repeats):
        for name in args.runs:
            print(f"[{time.strftime('%H:%M:%S')}] {name} (repeat {repeat + 1})", flush=True)
            if RUNS[name] is None:
                result = args.out / "runs" / "standalone.json"
                given = sys.argv[1:] if argv is None else argv
                child = [sys.executable, "-m", "bench.caltech", *given]
                subprocess.run(
                    [*child, "--standalone-json", str(result)],
                    cwd=ROOT,
                    check=True,
                    env={**os.environ, **MALLOC},
                )
                record = json.loads(result.read_text())
            else:
                record = dsgd_run(name, args, args.out)
            record["repeat"] = repeat
            records.append(record)
            print(json.dumps({k: v for k, v in record.items() if k != "curve"}), flush=True)
    rows = aggregate(records, args.target_accuracy)
    doc = {
        "benchmark": "caltech",
        "image_size": args.image_size,
        "seconds": args.seconds,
        "target_accuracy": args.target_accuracy,
        "eval_sample": args.eval_sample,
        "machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0]},
        "rows": rows,
        "records": records,
    }
    write_json(args.out / "caltech.json", doc)
    plot(records, rows, args.out / "caltech.png", args.target_accuracy)
    for row in rows:
        print(json.dumps({k: v for k, v in row.items() if k != "peak_rss_mb"}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
