"""Is the network the bottleneck? The 74.8M-parameter Caltech-101 CNN across hosts whose
links are shaped to datacenter rates, dense pushes against 1% density with float16 values.

    python -m bench.shaped_links --data ../shared/caltech101 [--image-size 96] [--seconds 60]
                                 [--links bridge 10gbit 1gbit] [--runs dense 1%-fp16]
                                 [--out DIR]

Every run puts the coordinator, 2 shards and 1 worker each in a network namespace of its
own (:class:`tests.hosts.Hosts`; needs root), started with the README's multi-machine
commands, and limits every host's link both ways to the rate (a token bucket: ``tc tbf``).
``bridge`` leaves the links unshaped: the namespaces' veth bridge, as fast as the CPUs
move bytes; it is the baseline every ratio divides by. Each run trains for ``--seconds``
from its first step and reports the steady step time (from ``--warmup`` s after the first
step), the bytes a step moves (pushed + fetched, from the worker's own counters), the
worker's time in gradients and in exchanges per step, and the step time as a multiple of
the unshaped one. Writes shaped_links.json and shaped_links.png to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench._common import ROOT, pyplot, write_json

MODEL = "dsgd.examples.caltech101:cnn"
RUNS = {"dense": (1.0, "float32"), "1%-fp16": (0.01, "float16"), "1%": (0.01, "float32")}
LINKS = {"bridge": None, "10gbit": "10gbit", "1gbit": "1gbit"}
ROLES = ["coord", "shard0", "shard1", "worker0"]
PORT = "7070"
STARTUP_ALLOWANCE = 300.0  # seconds a run may take to its first step (data, compile)


def _status(address: str) -> Any:
    import grpc

    from dsgd.proto import control_pb2 as pb
    from dsgd.proto import control_pb2_grpc as pb_grpc

    with grpc.insecure_channel(address) as channel:
        try:
            return pb_grpc.CoordinatorStub(channel).Status(pb.StatusRequest(), timeout=2.0)
        except grpc.RpcError:
            return None


def _shutdown(address: str, reason: str) -> None:
    import grpc

    from dsgd.proto import control_pb2 as pb
    from dsgd.proto import control_pb2_grpc as pb_grpc

    with grpc.insecure_channel(address) as channel:
        request = pb.ShutdownRequest(reason=reason, wait_for_members=True)
        try:
            pb_grpc.CoordinatorStub(channel).Shutdown(request, timeout=10.0)
        except grpc.RpcError:
            pass


def one_run(link: str, run: str, args: argparse.Namespace, logs: Path) -> dict[str, Any]:
    from dsgd.proto import control_pb2 as pb
    from tests.hosts import Hosts

    density, value_dtype = RUNS[run]
    status_file = logs / f"{link}-{run}-status.json"
    with Hosts(ROLES, logs) as hosts:
        rate = LINKS[link]
        if rate is not None:
            for name in ROLES:
                hosts.shape(name, rate)
        address = f"{hosts.address['coord']}:{PORT}"
        coordinator = hosts.start(
            "coord",
            f"{link}-{run}-coordinator",
            *("dsgd.coordinator", "--host", "0.0.0.0", "--port", PORT, "--insecure"),
            *("--model", MODEL, "--data", args.data, "--model-arg"),
            *(f"image_size={args.image_size}", "--workers", "1", "--shards", "2"),
            *("--density", str(density), "--value-dtype", value_dtype, "--no-evaluator"),
            *("--max-seconds", str(args.seconds + STARTUP_ALLOWANCE)),
            *("--status-file", str(status_file)),
        )
        for k in range(2):
            host = f"shard{k}"
            hosts.start(
                host,
                f"{link}-{run}-{host}",
                *("dsgd.shard", "--coordinator", address, "--shard-id", str(k)),
                *("--host", "0.0.0.0", "--advertise-host", hosts.address[host], "--insecure"),
            )
        hosts.start("worker0", f"{link}-{run}-worker0", "dsgd.worker", "--coordinator", address)
        samples: list[tuple[float, int]] = []
        launched = time.monotonic()
        ended = False
        while coordinator.poll() is None:
            time.sleep(1.0)
            status = _status(address)
            if status is None or status.done:
                if time.monotonic() - launched > args.seconds + STARTUP_ALLOWANCE + 60:
                    break
                continue
            steps = sum(m.stats.step for m in status.members if m.role == pb.ROLE_WORKER)
            samples.append((time.monotonic(), steps))
            first = next((t for t, s in samples if s > 0), None)
            if first is not None and samples[-1][0] - first >= args.seconds and not ended:
                _shutdown(address, f"the benchmark's {args.seconds:g} s are done")
                ended = True
        try:
            coordinator.wait(timeout=60)
        except Exception:
            raise SystemExit(f"{link} {run}: the coordinator did not end; see {logs}") from None
        if not status_file.exists():
            raise SystemExit(f"{link} {run}: no final status; see {logs}")
    final = json.loads(status_file.read_text())
    worker = next(m for m in final["members"] if m["role"] == "ROLE_WORKER")
    counters = worker["stats"]["counters"]
    steps = max(int(worker["stats"]["step"]), 1)
    training = [(t, s) for t, s in samples if s > 0]
    steady = [(t, s) for t, s in training if t >= training[0][0] + args.warmup]
    if len(steady) < 2 or steady[-1][1] == steady[0][1]:
        # fewer steps than polls (a slow link): from the first step to the last sample
        steady = [training[0], training[-1]] if len(training) > 1 else []
    rate = (
        (steady[-1][1] - steady[0][1]) / (steady[-1][0] - steady[0][0])
        if len(steady) > 1 and steady[-1][0] > steady[0][0]
        else 0.0
    )
    moved = float(counters["bytes_pushed"]) + float(counters["bytes_fetched"])
    return {
        "link": link,
        "rate_bits": None if LINKS[link] is None else LINKS[link],
        "run": run,
        "density": density,
        "value_dtype": value_dtype,
        "steps": steps,
        "steps_per_second": rate,
        "step_seconds": 1.0 / rate if rate else None,
        "bytes_per_step": moved / steps,
        "push_bytes_per_step": float(counters["bytes_pushed"]) / steps,
        "fetch_bytes_per_step": float(counters["bytes_fetched"]) / steps,
        "fetches_skipped": float(counters.get("fetches_skipped", 0)),
        "gradient_seconds_per_step": float(counters["gradient_seconds"]) / steps,
        "exchange_seconds_per_step": float(counters["exchange_seconds"]) / steps,
        "num_params": int(final.get("num_params", 0)),
    }


def with_ratios(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Medians per (link, run) and the step time as a multiple of the unshaped link's."""
    rows = []
    for link in LINKS:
        for run in RUNS:
            group = [r for r in records if r["link"] == link and r["run"] == run]
            if not group:
                continue
            times = [r["step_seconds"] for r in group if r["step_seconds"]]
            row = {
                "link": link,
                "run": run,
                "repeats": len(group),
                "step_seconds": statistics.median(times) if times else None,
                "step_seconds_min": min(times) if times else None,
                "step_seconds_max": max(times) if times else None,
                "bytes_per_step": statistics.median(r["bytes_per_step"] for r in group),
                "gradient_seconds_per_step": statistics.median(
                    r["gradient_seconds_per_step"] for r in group
                ),
                "exchange_seconds_per_step": statistics.median(
                    r["exchange_seconds_per_step"] for r in group
                ),
            }
            rows.append(row)
    for row in rows:
        base = next((b for b in rows if b["link"] == "bridge" and b["run"] == row["run"]), None)
        if base and base["step_seconds"] and row["step_seconds"]:
            row["step_time_x_bridge"] = row["step_seconds"] / base["step_seconds"]
    return rows


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    plt = pyplot()
    fig, (times, sizes) = plt.subplots(1, 2, figsize=(13, 5))
    links = [link for link in LINKS if any(r["link"] == link for r in rows)]
    runs = [run for run in RUNS if any(r["run"] == run for r in rows)]
    width = 0.8 / max(len(runs), 1)
    for i, run in enumerate(runs):
        mine = {r["link"]: r for r in rows if r["run"] == run}
        xs = [j + i * width for j in range(len(links))]
        times.bar(
            xs,
            [(mine[link]["step_seconds"] or 0.0) if link in mine else 0.0 for link in links],
            width,
            label=run,
        )
        sizes.bar(
            xs,
            [mine[link]["bytes_per_step"] / 1e6 if link in mine else 0.0 for link in links],
            width,
            label=run,
        )
    for axis in (times, sizes):
        axis.set_xticks([j + width * (len(runs) - 1) / 2 for j in range(len(links))], links)
        axis.legend()
    times.set_ylabel("seconds per worker step")
    times.set_title("step time by link rate (74.8M-parameter CNN, 1 worker, 2 shards)")
    sizes.set_ylabel("MB moved per step (pushed + fetched)")
    sizes.set_yscale("log")
    sizes.set_title("bytes per step")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.shaped_links", description=__doc__)
    parser.add_argument("--data", default=os.environ.get("DSGD_CALTECH101", ""))
    parser.add_argument("--image-size", type=int, default=96)
    parser.add_argument("--seconds", type=float, default=60.0, help="training per run")
    parser.add_argument("--warmup", type=float, default=10.0, help="seconds not counted")
    parser.add_argument("--links", nargs="+", default=list(LINKS), choices=list(LINKS))
    parser.add_argument("--runs", nargs="+", default=["dense", "1%-fp16"], choices=list(RUNS))
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = parser.parse_args(argv)
    if not args.data or not Path(args.data).is_dir():
        parser.error("--data must name the Caltech-101 directory (see ../shared/caltech101)")
    if "bridge" not in args.links:
        parser.error("--links needs bridge: the unshaped baseline every ratio divides by")
    return args


def main(argv: list[str] | None = None) -> int:
    from tests.hosts import unavailable

    args = parse_args(argv)
    why_not = unavailable()
    if why_not is not None:
        print(f"bench.shaped_links: {why_not}", file=sys.stderr)
        return 2
    args.data = str(Path(args.data).resolve())
    os.environ.setdefault("GLIBC_TUNABLES", "glibc.malloc.hugetlb=1")  # as members run
    args.out.mkdir(parents=True, exist_ok=True)
    records = []
    with tempfile.TemporaryDirectory() as logs:
        for link in args.links:
            for run in args.runs:
                record = one_run(link, run, args, Path(logs))
                records.append(record)
                print(
                    f"{link:>7} {run:>8}: {record['step_seconds'] or float('nan'):.2f} s/step, "
                    f"{record['bytes_per_step'] / 1e6:.1f} MB/step, gradient "
                    f"{record['gradient_seconds_per_step']:.2f} s, exchange "
                    f"{record['exchange_seconds_per_step']:.2f} s",
                    flush=True,
                )
    rows = with_ratios(records)
    doc = {
        "benchmark": "shaped_links",
        "model": MODEL,
        "image_size": args.image_size,
        "seconds": args.seconds,
        "shaping": "tc tbf on both ends of every host's veth (token bucket, 1 ms burst)",
        "rows": rows,
        "records": records,
    }
    write_json(args.out / "shaped_links.json", doc)
    plot(rows, args.out / "shaped_links.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
