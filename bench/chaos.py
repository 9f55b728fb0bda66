"""Chaos run: kill a random worker or shard every N seconds and measure the recovery.

    python -m bench.chaos [--interval 20] [--lr 0.0015] [--target 0.97] [--out DIR]

Starts ``dsgd start`` (supervised: crashed processes are restarted), then SIGKILLs a
random worker or shard every ``--interval`` seconds until the run ends. For each kill
it records:

- for a shard: the version it had when it died (from its version broadcasts), the
  version it restored from its checkpoint, hence the updates lost (those applied after
  the last checkpoint), and how long until it served again (new incarnation alive);
- for a worker: how long until its replacement registered and was alive.

Separately (``--detection``, on by default) it measures heartbeat failure detection
without a supervisor: a worker is SIGKILLed and the coordinator's status is polled
until it shows the worker ``dead``.

Writes chaos.json, chaos.md and chaos.png (accuracy over time, kills marked) into --out.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import grpc
import zmq

from bench._common import ROOT, pyplot, write_json
from dsgd import wire
from dsgd.proto import control_pb2 as pb
from dsgd.proto import control_pb2_grpc as pb_grpc


class VersionWatch(threading.Thread):
    """Follows every shard's version broadcasts (resubscribing when a shard moves)."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.versions: dict[int, int] = {}
        self.addresses: dict[int, str] = {}
        self._wanted: dict[int, str] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()

    def follow(self, endpoints: list[Any]) -> None:
        with self._lock:
            for e in endpoints:
                self._wanted[e.shard_id] = e.pub_address

    def run(self) -> None:
        ctx = zmq.Context()
        subs: dict[int, tuple[str, zmq.Socket[bytes]]] = {}
        poller = zmq.Poller()
        try:
            while not self._stop.is_set():
                with self._lock:
                    wanted = dict(self._wanted)
                for shard, address in wanted.items():
                    if shard not in subs or subs[shard][0] != address:
                        if shard in subs:
                            poller.unregister(subs[shard][1])
                            subs[shard][1].close(linger=0)
                        sock = ctx.socket(zmq.SUB)
                        sock.setsockopt(zmq.SUBSCRIBE, b"")
                        sock.connect(address)
                        poller.register(sock, zmq.POLLIN)
                        subs[shard] = (address, sock)
                for sock, _ in poller.poll(100):
                    header = wire.unpack_header(sock.recv())
                    if header.kind == wire.VERSION:
                        self.versions[header.shard] = header.version
        finally:
            for _, sock in subs.values():
                sock.close(linger=0)
            ctx.term()

    def stop(self) -> None:
        self._stop.set()


def status(stub: pb_grpc.CoordinatorStub) -> pb.ClusterStatus | None:
    try:
        return stub.Status(pb.StatusRequest(), timeout=2.0)
    except grpc.RpcError:
        return None


def member(st: pb.ClusterStatus, role: int, member_id: int) -> pb.MemberStatus | None:
    return next((m for m in st.members if m.role == role and m.id == member_id), None)


def chaos_run(args: argparse.Namespace, out: Path) -> dict[str, Any]:
    run_dir = out / "chaos-run"
    proc = subprocess.Popen(
        [sys.executable, "-m", "dsgd", "start", "--run-dir", str(run_dir)]
        + ["--lr", str(args.lr), "--target-accuracy", str(args.target)]
        + ["--max-seconds", str(args.max_seconds), "--checkpoint-every", str(args.checkpoint_every)]
        + ["--workers", str(args.workers), "--shards", str(args.shards)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    rng = random.Random(args.seed)
    watch = VersionWatch()
    watch.start()
    kills: list[dict[str, Any]] = []
    try:
        ready = run_dir / "coordinator.ready"
        while not ready.exists():
            time.sleep(0.1)
        address = json.loads(ready.read_text())["address"]
        channel = grpc.insecure_channel(address)
        stub = pb_grpc.CoordinatorStub(channel)
        started = time.monotonic()
        next_kill = started + args.interval
        while proc.poll() is None:
            st = status(stub)
            if st is not None:
                watch.follow(list(st.shards))
                if st.done:
                    break
            if time.monotonic() >= next_kill and st is not None:
                kills.append(kill_one(rng, run_dir, stub, watch, args, started))
                next_kill = time.monotonic() + args.interval
            time.sleep(0.1)
        final, _ = proc.communicate(timeout=120)
        channel.close()
    finally:
        watch.stop()
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            proc.communicate(timeout=60)
    summary = json.loads(final.strip().splitlines()[-1])
    history = json.loads((run_dir / "status.json").read_text()).get("history", [])
    return {"summary": summary, "kills": kills, "history": history}


def kill_one(
    rng: random.Random,
    run_dir: Path,
    stub: pb_grpc.CoordinatorStub,
    watch: VersionWatch,
    args: argparse.Namespace,
    started: float,
) -> dict[str, Any]:
    pids = json.loads((run_dir / "pids.json").read_text())
    victims = [f"worker{k}" for k in range(args.workers)] + [
        f"shard{k}" for k in range(args.shards)
    ]
    name = rng.choice(victims)
    role = pb.ROLE_SHARD if name.startswith("shard") else pb.ROLE_WORKER
    member_id = int(name.removeprefix("shard").removeprefix("worker"))
    before = status(stub)
    old = member(before, role, member_id) if before else None
    old_incarnation = old.incarnation if old else 0
    version_at_kill = watch.versions.get(member_id, -1) if role == pb.ROLE_SHARD else None
    killed_at = time.monotonic()
    os.kill(pids[name], signal.SIGKILL)
    if role == pb.ROLE_SHARD:
        version_at_kill = watch.versions.get(member_id, version_at_kill)
    record: dict[str, Any] = {"victim": name, "at_seconds": round(killed_at - started, 2)}
    deadline = killed_at + 60
    while time.monotonic() < deadline:
        st = status(stub)
        m = member(st, role, member_id) if st else None
        if m is not None and m.state == "alive" and m.incarnation != old_incarnation:
            record["back_after_seconds"] = round(time.monotonic() - killed_at, 3)
            break
        if st is not None and st.done:
            record["back_after_seconds"] = None  # the run ended first
            break
        time.sleep(0.02)
    if role == pb.ROLE_SHARD:
        log = (run_dir / f"{name}.log").read_text().splitlines()
        restored = [line for line in log if "restored version" in line]
        restored_version = (
            int(restored[-1].split("restored version ")[1].split()[0]) if restored else 0
        )
        record.update(
            version_at_kill=version_at_kill,
            restored_version=restored_version,
            updates_lost=None if version_at_kill is None else version_at_kill - restored_version,
        )
    return record


def detection(out: Path) -> dict[str, Any]:
    """Kill an unsupervised worker; time until the coordinator shows it dead."""
    tmp = out / "detection"
    tmp.mkdir(parents=True, exist_ok=True)
    procs: list[subprocess.Popen[bytes]] = []

    def start(*argv: str) -> subprocess.Popen[bytes]:
        p = subprocess.Popen([sys.executable, "-m", *argv], cwd=ROOT, stderr=subprocess.DEVNULL)
        procs.append(p)
        return p

    ready = tmp / "coordinator.ready"
    ready.unlink(missing_ok=True)
    model = ["--model", "dsgd.examples.digits:digits_mlp", "--target-accuracy", "1.0"]
    start("dsgd.coordinator", "--ready-file", str(ready), "--shards", "1", *model)
    try:
        while not ready.exists():
            time.sleep(0.05)
        address = json.loads(ready.read_text())["address"]
        start("dsgd.shard", "--coordinator", address, "--shard-id", "0")
        worker_ready = tmp / "worker.ready"
        worker_ready.unlink(missing_ok=True)
        worker = start("dsgd.worker", "--coordinator", address, "--ready-file", str(worker_ready))
        while not worker_ready.exists():
            time.sleep(0.05)
        time.sleep(1.0)
        with grpc.insecure_channel(address) as channel:
            stub = pb_grpc.CoordinatorStub(channel)
            worker.send_signal(signal.SIGKILL)
            killed = time.monotonic()
            seen: dict[str, float] = {}
            while time.monotonic() - killed < 30 and "dead" not in seen:
                st = status(stub)
                m = member(st, pb.ROLE_WORKER, 0) if st else None
                if m is not None and m.state not in seen:
                    seen[m.state] = round(time.monotonic() - killed, 3)
                time.sleep(0.02)
        return {"worker_state_after_seconds": seen}
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in procs:
            p.wait(timeout=30)


def chart(result: dict[str, Any], path: Path) -> None:
    plt = pyplot()

    fig, ax = plt.subplots(figsize=(9, 4))
    history = result["history"]
    ax.plot(
        [h.get("elapsed_seconds", 0) for h in history],
        [h.get("test_accuracy", 0) for h in history],
        marker=".",
    )
    for kill in result["kills"]:
        ax.axvline(kill["at_seconds"], color="red", alpha=0.5)
        ax.annotate(kill["victim"], (kill["at_seconds"], 0.05), rotation=90, color="red")
    ax.set_xlabel("seconds since the coordinator started")
    ax.set_ylabel("test accuracy")
    ax.set_ylim(0, 1)
    ax.set_title("training under chaos (red: SIGKILL)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--interval", type=float, default=20.0, help="seconds between kills")
    parser.add_argument("--lr", type=float, default=0.0015)
    parser.add_argument("--target", type=float, default=0.97)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--shards", type=int, default=2)
    parser.add_argument("--checkpoint-every", type=float, default=5.0)
    parser.add_argument("--max-seconds", type=float, default=600)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-detection", action="store_true")
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    result = chaos_run(args, args.out)
    if not args.no_detection:
        result["detection"] = detection(args.out)
    result["settings"] = vars(args) | {"out": str(args.out)}
    write_json(args.out / "chaos.json", result, strict=False)
    chart(result, args.out / "chaos.png")
    s = result["summary"]
    lines = [
        f"# Chaos: SIGKILL every {args.interval:g} s",
        "",
        f"reached target {s['reached_target']} (accuracy {s['test_accuracy']}) in "
        f"{s['wall_seconds']:.0f} s; restarts {s.get('restarts', {})}",
        "",
        "| victim | at (s) | back after (s) | version at kill | restored | updates lost |",
        "|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {k['victim']} | {k['at_seconds']} | {k.get('back_after_seconds')} | "
        f"{k.get('version_at_kill', '')} | {k.get('restored_version', '')} | "
        f"{k.get('updates_lost', '')} |"
        for k in result["kills"]
    ]
    if "detection" in result:
        lines += ["", f"heartbeat detection (unsupervised worker): {result['detection']}"]
    text = "\n".join(lines) + "\n"
    (args.out / "chaos.md").write_text(text)
    print(text)
    return 0 if s["reached_target"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
