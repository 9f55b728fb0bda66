"""The parameter-server cycle: what a worker runs many times a second, pull then push.

    python -m bench.ps_cycle --params P --workers W --shards S [--seconds 15] [--warmup 3]
                             [--secure] [--out FILE]
    python -m bench.ps_cycle --matrix [--reps 3] [--quick] --out FILE   # + FILE's .png

``--matrix`` runs every configuration of P = 1M, 10M x S = 1, 2 x W = 1, 2, 4 (``--quick``:
1M, one shard, W = 1, 2, short windows), ``--reps`` times, the repetitions interleaved, and
writes each run plus the medians and spread per configuration, and a chart. The transport
suite's ``ps_cycle`` entry runs the same matrix.

The server holds P float32 parameters (in S shards of contiguous ranges). Each of W worker
processes loops: pull the whole vector (from every shard at once), push a dense float32
gradient of P elements (generated once per worker, fixed seed) and wait until every shard
acknowledged it. The server applies ``params -= lr * grad`` in place. After ``--warmup``
seconds, completed pulls and pushes are counted for ``--seconds``; GB/s is (pushes + pulls)
x 4P / window.

Two servers run the same workload in the same invocation:

- ``dsgd``: real shard processes (:class:`bench._shard_peer.ShardPeer`, a ShardServer each)
  and workers using dsgd's :class:`~dsgd.shard.client.ShardClient` as a Replica does
  (chunked pushes acknowledged chunk by chunk, fetches into a preallocated vector);
- ``tcp``: the reference, a plain-TCP parameter server with one thread per connection,
  ``sendall`` and ``recv_into`` preallocated buffers, one lock around each apply.

With ``--secure`` a third runs too, ``dsgd_curve``: dsgd's shards and clients secured as
``--secure`` secures them (CURVE, an admission check per connection), and the result
carries its ratio to plain dsgd, ``curve_ratio``, the cost of encryption on the cycle.

All are checked afterwards: the first 4096 parameters must equal ``-lr * sum_w n_w * g_w``
(no update lost or applied twice, n_w the pushes worker w saw acknowledged), and for dsgd
every shard's own push count must equal the acknowledged pushes. The result (one JSON
document) carries both figures and dsgd's ratio to the reference.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import multiprocessing.connection
import socket
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from statistics import median
from typing import Any

import numpy as np

from bench._common import SPAWN, pyplot, stop_process, write_json
from bench._netns import ONE_HOST, Placement, across, host_names, run_in
from bench._shard_peer import FINGERPRINT, ShardPeer
from dsgd import wire

SUITE = "ps_cycle"
LR = 2.0**-10  # with small integer gradients every sum below is exact in float32
CHECKED = 4096  # leading parameters whose final values are checked exactly
TIMEOUT = 60.0


def gradient(worker: int, size: int) -> np.ndarray:
    """Worker ``worker``'s fixed gradient: small integers, so sums of them are exact."""
    rng = np.random.default_rng(1000 + worker)
    return rng.integers(-4, 5, size).astype(np.float32)


def expected_head(pushes: list[int], size: int) -> np.ndarray:
    """The first CHECKED parameters after worker w's ``pushes[w]`` applied pushes."""
    total = sum(n * gradient(w, size)[:CHECKED].astype(np.float64) for w, n in enumerate(pushes))
    return (-LR * np.asarray(total, np.float64)).astype(np.float32)  # exact: see LR


def ranges(size: int, shards: int) -> list[tuple[int, int]]:
    cuts = np.linspace(0, size, shards + 1).astype(int)
    return [(int(a), int(b)) for a, b in zip(cuts[:-1], cuts[1:], strict=True)]


# -- the workers (one process each) ------------------------------------------------------------


def _window(stamps: list[float], began: float, warmup: float, seconds: float) -> int:
    return sum(1 for t in stamps if began + warmup <= t < began + warmup + seconds)


def dsgd_worker(conn: multiprocessing.connection.Connection, *job: Any) -> None:
    """Cycle against dsgd shards until the window is over; report counts (see
    :func:`_dsgd_cycles` for ``job``)."""
    try:
        conn.send(asyncio.run(_dsgd_cycles(*job)))
    finally:
        conn.close()


async def _dsgd_cycles(
    worker: int,
    size: int,
    shards: list[tuple[int, int, str, str]],
    began: float,
    warmup: float,
    seconds: float,
    chunk_bytes: int,
    keys: Path | None,
) -> dict[str, Any]:
    import secrets

    import zmq.asyncio

    from dsgd.security import Security
    from dsgd.shard.client import PushResult, ShardClient

    grad = gradient(worker, size)
    params = np.zeros(size, np.float32)
    ctx = zmq.asyncio.Context()
    security = None if keys is None else Security.load(keys)
    clients = [
        ShardClient(k, data, pub, FINGERPRINT, worker, ctx, ack_timeout=TIMEOUT, security=security)
        for k, (_, _, data, pub) in enumerate(shards)
    ]
    incarnation = secrets.randbits(62) + 1
    pulls: list[float] = []
    pushes: list[float] = []
    acknowledged = 0
    try:
        for client in clients:
            await client.start()
        seq = 0
        loop = asyncio.get_running_loop()
        while time.time() < began + warmup + seconds:
            await asyncio.gather(
                *(
                    client.fetch(params[start:stop])
                    for client, (start, stop, _, _) in zip(clients, shards, strict=True)
                )
            )
            pulls.append(time.time())
            seq += 1
            waits = []
            for k, (client, (start, stop, _, _)) in enumerate(zip(clients, shards, strict=True)):
                template = wire.Header(
                    kind=wire.PUSH,
                    fingerprint=FINGERPRINT,
                    shard=k,
                    worker=worker,
                    seq=seq,
                    incarnation=incarnation,
                )
                chunks = list(wire.dense_chunks(template, grad[start:stop], chunk_bytes))
                done: asyncio.Future[PushResult] = loop.create_future()
                if not await client.push(seq, chunks, done.set_result, TIMEOUT):
                    raise TimeoutError("no push permit freed in time")
                waits.append(done)
            results = await asyncio.gather(*waits)
            if not all(r.complete for r in results):
                raise RuntimeError(f"push {seq} was not applied everywhere: {results}")
            acknowledged += 1
            pushes.append(time.time())
    finally:
        for client in clients:
            await client.aclose()
        ctx.term()
    return {
        "pulls": _window(pulls, began, warmup, seconds),
        "pushes": _window(pushes, began, warmup, seconds),
        "acknowledged": acknowledged,
    }


def tcp_worker(
    conn: multiprocessing.connection.Connection,
    worker: int,
    size: int,
    shards: list[tuple[int, int, str, int]],
    began: float,
    warmup: float,
    seconds: float,
) -> None:
    """Cycle against the plain-TCP servers; report counts."""
    grad = gradient(worker, size)
    params = np.zeros(size, np.float32)
    socks = [socket.create_connection((host, port), timeout=TIMEOUT) for _, _, host, port in shards]
    pulls: list[float] = []
    pushes: list[float] = []
    acknowledged = 0
    ack = bytearray(1)
    try:
        for sock in socks:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        while time.time() < began + warmup + seconds:
            for sock in socks:  # ask every shard first, so they send at once
                sock.sendall(b"P")
            for sock, (start, stop, _, _) in zip(socks, shards, strict=True):
                _recv_exactly(sock, memoryview(params[start:stop]).cast("B"))
            pulls.append(time.time())
            for sock, (start, stop, _, _) in zip(socks, shards, strict=True):
                sock.sendall(b"U")
                sock.sendall(memoryview(grad[start:stop]).cast("B"))
            for sock in socks:
                _recv_exactly(sock, memoryview(ack))
            acknowledged += 1
            pushes.append(time.time())
    finally:
        for sock in socks:
            sock.close()
    conn.send(
        {
            "pulls": _window(pulls, began, warmup, seconds),
            "pushes": _window(pushes, began, warmup, seconds),
            "acknowledged": acknowledged,
        }
    )
    conn.close()


def _recv_exactly(sock: socket.socket, view: memoryview) -> None:
    got = 0
    while got < len(view):
        n = sock.recv_into(view[got:])
        if not n:
            raise ConnectionError("the server closed the connection")
        got += n


# -- the plain-TCP reference server ------------------------------------------------------------


def tcp_server(conn: multiprocessing.connection.Connection, size: int, host: str) -> None:
    """One shard of the reference: a thread per connection, preallocated buffers."""
    params = np.zeros(size, np.float32)
    lock = threading.Lock()
    listener = socket.create_server((host, 0))
    listener.settimeout(0.2)
    stop = threading.Event()
    threads: list[threading.Thread] = []
    pushes = [0]

    def serve(sock: socket.socket) -> None:
        grad, step = np.zeros(size, np.float32), np.zeros(size, np.float32)  # faulted in
        view = memoryview(grad).cast("B")
        op = bytearray(1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with sock:
            while not stop.is_set():
                try:
                    if not sock.recv_into(op):
                        return
                except OSError:
                    return
                if op == b"P":
                    sock.sendall(memoryview(params).cast("B"))
                else:
                    _recv_exactly(sock, view)
                    np.multiply(grad, np.float32(LR), out=step)
                    with lock:
                        np.subtract(params, step, out=params)
                        pushes[0] += 1
                    sock.sendall(b"A")

    conn.send(listener.getsockname()[1])
    try:
        while not conn.poll(0):
            try:
                sock, _ = listener.accept()
            except TimeoutError:
                continue
            sock.settimeout(TIMEOUT)
            thread = threading.Thread(target=serve, args=(sock,), daemon=True)
            thread.start()
            threads.append(thread)
        conn.recv()
        conn.send({"pushes": pushes[0], "head": params[:CHECKED].copy()})
    finally:
        stop.set()
        listener.close()
        conn.close()


# -- one configuration -------------------------------------------------------------------------


def _run_workers(
    target: Any, count: int, size: int, shards: list[Any], args: Any, *extra: Any
) -> list[Any]:
    began = time.time() + 2.0  # every worker starts its clock at the same moment
    pipes, procs = [], []
    for worker in range(count):
        mine, child = SPAWN.Pipe()
        job = (child, worker, size, shards, began, args.warmup, args.seconds, *extra)
        proc = SPAWN.Process(
            target=run_in, args=(args.placement.worker(worker), target, *job), daemon=True
        )
        proc.start()
        child.close()
        pipes.append(mine)
        procs.append(proc)
    results = []
    deadline = began + args.warmup + args.seconds + TIMEOUT
    for pipe, proc in zip(pipes, procs, strict=True):
        if not pipe.poll(max(1.0, deadline - time.time())):
            raise TimeoutError("a worker did not report")
        results.append(pipe.recv())
        pipe.close()
        stop_process(proc, TIMEOUT)
    return results


def _figures(results: list[dict[str, Any]], size: int, seconds: float) -> dict[str, Any]:
    pulls = sum(r["pulls"] for r in results)
    pushes = sum(r["pushes"] for r in results)
    return {
        "cycles_per_s": min(pulls, pushes) / seconds,
        "pulls": pulls,
        "pushes": pushes,
        "gbps": (pulls + pushes) * 4 * size / seconds / 1e9,
        "acknowledged": [r["acknowledged"] for r in results],
    }


def run_dsgd(args: argparse.Namespace, keys: Path | None = None) -> dict[str, Any]:
    """dsgd's shards and clients, secured with the key directory ``keys`` if given."""
    bounds = ranges(args.params, args.shards)
    peers = [
        ShardPeer(
            stop - start,
            TIMEOUT,
            shard_id=k,
            lr=LR,
            chunk_bytes=args.chunk_bytes,
            at=args.placement.server(k),
            keys=keys,
        )
        for k, (start, stop) in enumerate(bounds)
    ]
    try:
        for peer in peers:
            peer.wait_ready()
        shards = [
            (a, b, p.data_address, p.pub_address) for (a, b), p in zip(bounds, peers, strict=True)
        ]
        results = _run_workers(
            dsgd_worker, args.workers, args.params, shards, args, args.chunk_bytes, keys
        )
        figures = _figures(results, args.params, args.seconds)
        applied = [int(peer.stats()["pushes"]) for peer in peers]
        head = _dsgd_head(shards[0], bounds[0], keys)
    finally:
        for peer in peers:
            peer.close()
    acknowledged = sum(figures["acknowledged"])
    figures["shard_pushes"] = applied
    figures["pushes_match"] = all(n == acknowledged for n in applied)
    figures["head_exact"] = bool(
        np.array_equal(head, expected_head(figures["acknowledged"], args.params))
    )
    return figures


def _dsgd_head(
    shard: tuple[int, int, str, str], bounds: tuple[int, int], keys: Path | None
) -> np.ndarray:
    """The first CHECKED parameters of shard 0, fetched as a worker would."""
    import zmq.asyncio

    from dsgd.security import Security
    from dsgd.shard.client import ShardClient

    security = None if keys is None else Security.load(keys)

    async def fetch() -> np.ndarray:
        ctx = zmq.asyncio.Context()
        client = ShardClient(
            0, shard[2], shard[3], FINGERPRINT, 999, ctx, fetch_timeout=TIMEOUT, security=security
        )
        dest = np.empty(bounds[1] - bounds[0], np.float32)
        try:
            await client.start()
            await client.fetch(dest)
        finally:
            await client.aclose()
            ctx.term()
        return dest[:CHECKED]

    return asyncio.run(fetch())


def run_tcp(args: argparse.Namespace) -> dict[str, Any]:
    bounds = ranges(args.params, args.shards)
    pipes, procs = [], []
    hosts = [args.placement.server(k) for k in range(len(bounds))]
    for (start, stop), (netns, host) in zip(bounds, hosts, strict=True):
        mine, child = SPAWN.Pipe()
        proc = SPAWN.Process(
            target=run_in, args=(netns, tcp_server, child, stop - start, host), daemon=True
        )
        proc.start()
        child.close()
        pipes.append(mine)
        procs.append(proc)
    try:
        ports = []
        for pipe in pipes:
            if not pipe.poll(TIMEOUT):
                raise TimeoutError("a plain-TCP server did not report its port")
            ports.append(pipe.recv())
        shards = [
            (a, b, host, port) for (a, b), (_, host), port in zip(bounds, hosts, ports, strict=True)
        ]
        results = _run_workers(tcp_worker, args.workers, args.params, shards, args)
        reports = []
        for pipe in pipes:
            pipe.send("stop")
            if not pipe.poll(TIMEOUT):
                raise TimeoutError("a plain-TCP server did not report its pushes")
            reports.append(pipe.recv())
    finally:
        for pipe, proc in zip(pipes, procs, strict=True):
            pipe.close()
            stop_process(proc, TIMEOUT)
    figures = _figures(results, args.params, args.seconds)
    acknowledged = sum(figures["acknowledged"])
    figures["shard_pushes"] = [r["pushes"] for r in reports]
    figures["pushes_match"] = all(r["pushes"] == acknowledged for r in reports)
    expected = expected_head(figures["acknowledged"], args.params)
    figures["head_exact"] = bool(np.array_equal(reports[0]["head"], expected))
    return figures


def measure(args: argparse.Namespace) -> dict[str, Any]:
    """One configuration: the reference, then dsgd (and, with ``args.keys``, dsgd secured),
    then the ratios."""
    tcp = run_tcp(args)
    dsgd = run_dsgd(args)
    secured: dict[str, Any] = {}
    if getattr(args, "keys", None) is not None:
        curve = run_dsgd(args, args.keys)
        secured = {
            "dsgd_curve": curve,
            "curve_ratio": curve["cycles_per_s"] / dsgd["cycles_per_s"]
            if dsgd["cycles_per_s"]
            else None,
        }
    return {
        "benchmark": "ps_cycle",
        "hosts": args.placement.label,
        "params": args.params,
        "workers": args.workers,
        "shards": args.shards,
        "seconds": args.seconds,
        "warmup": args.warmup,
        "dsgd": dsgd,
        "tcp": tcp,
        "ratio": dsgd["cycles_per_s"] / tcp["cycles_per_s"] if tcp["cycles_per_s"] else None,
        **secured,
    }


# -- the matrix --------------------------------------------------------------------------------

MATRIX = {"params": (1_000_000, 10_000_000), "shards": (1, 2), "workers": (1, 2, 4)}
QUICK_MATRIX = {"params": (1_000_000,), "shards": (1,), "workers": (1, 2)}
QUICK_WINDOW = (3.0, 1.0)  # seconds, warm-up


def configurations(
    quick: bool,
    seconds: float,
    warmup: float,
    placement: Placement = ONE_HOST,
    keys: Path | None = None,
) -> list[argparse.Namespace]:
    grid = QUICK_MATRIX if quick else MATRIX
    if quick:
        seconds, warmup = QUICK_WINDOW
    return [
        argparse.Namespace(
            params=p,
            shards=s,
            workers=w,
            seconds=seconds,
            warmup=warmup,
            chunk_bytes=wire.DEFAULT_CHUNK_BYTES,
            placement=placement,
            keys=keys,
        )
        for p in grid["params"]
        for s in grid["shards"]
        for w in grid["workers"]
    ]


def run_matrix(
    reps: int,
    quick: bool,
    seconds: float = 15.0,
    warmup: float = 3.0,
    log: Any = print,
    placement: Placement = ONE_HOST,
    keys: Path | None = None,
) -> list[dict[str, Any]]:
    """Every configuration ``reps`` times, one repetition of all before the next; with
    ``keys``, dsgd secured with them too."""
    runs = []
    configs = configurations(quick, seconds, warmup, placement, keys)
    for rep in range(reps):
        for config in configs:
            result = measure(config)
            result["rep"] = rep
            runs.append(result)
            log(
                f"  rep {rep + 1}/{reps} P={config.params} S={config.shards} "
                f"W={config.workers}: dsgd {result['dsgd']['cycles_per_s']:.1f} cycles/s, "
                f"plain TCP {result['tcp']['cycles_per_s']:.1f}, ratio {result['ratio']:.2f}"
                + (f", CURVE/plain {result['curve_ratio']:.2f}" if "curve_ratio" in result else "")
            )
    return runs


def summarize(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per configuration: median, min and max cycles/s of each server, and of the ratio
    (the ratio of each repetition, whose two servers ran back to back)."""
    groups: dict[tuple[int, int, int], list[dict[str, Any]]] = {}
    for run in runs:
        groups.setdefault((run["params"], run["shards"], run["workers"]), []).append(run)
    rows = []
    for (params, shards, workers), same in groups.items():
        row: dict[str, Any] = {"params": params, "shards": shards, "workers": workers}
        row["reps"] = len(same)
        servers = [s for s in ("dsgd", "tcp", "dsgd_curve") if all(s in r for r in same)]
        for server in servers:
            rates = [r[server]["cycles_per_s"] for r in same]
            row[server] = {"median": median(rates), "min": min(rates), "max": max(rates)}
        for ratio in ("ratio", "curve_ratio"):
            ratios = [r[ratio] for r in same if r.get(ratio) is not None]
            if ratios:
                row[ratio] = {"median": median(ratios), "min": min(ratios), "max": max(ratios)}
        row["correct"] = all(
            r[server]["head_exact"] and r[server]["pushes_match"]
            for r in same
            for server in servers
        )
        rows.append(row)
    return rows


def plot(rows: list[dict[str, Any]], path: Path) -> bool:
    """Cycles/s vs workers for both servers, and dsgd's ratio, one line per (P, S)."""
    if not rows:
        return False
    plt = pyplot()
    fig, (ax_rate, ax_ratio) = plt.subplots(1, 2, figsize=(15, 5.5))
    keys = sorted({(r["params"], r["shards"]) for r in rows})
    for i, (params, shards) in enumerate(keys):
        points = sorted(
            (r for r in rows if (r["params"], r["shards"]) == (params, shards)),
            key=lambda r: r["workers"],
        )
        x = [r["workers"] for r in points]
        label = f"P={params / 1e6:g}M, {shards} shard{'s' if shards > 1 else ''}"
        color = f"C{i}"
        for server, style in (("dsgd", "-"), ("tcp", ":")):
            med = [r[server]["median"] for r in points]
            ax_rate.errorbar(
                x,
                med,
                yerr=[
                    # clamped: figures read back from records round-trip through 1/x
                    [max(0.0, m - r[server]["min"]) for m, r in zip(med, points, strict=True)],
                    [max(0.0, r[server]["max"] - m) for m, r in zip(med, points, strict=True)],
                ],
                color=color,
                linestyle=style,
                marker="o" if server == "dsgd" else "s",
                capsize=3,
                label=f"{'dsgd' if server == 'dsgd' else 'plain TCP'}, {label}",
            )
        med = [r["ratio"]["median"] for r in points]
        ax_ratio.errorbar(
            x,
            med,
            yerr=[
                [max(0.0, m - r["ratio"]["min"]) for m, r in zip(med, points, strict=True)],
                [max(0.0, r["ratio"]["max"] - m) for m, r in zip(med, points, strict=True)],
            ],
            color=color,
            marker="o",
            capsize=3,
            label=label,
        )
    ax_rate.set_yscale("log")
    ax_rate.set_xlabel("workers")
    ax_rate.set_ylabel("cycles/s (median; bars min..max)")
    ax_rate.set_title("Pull + push cycles per second (solid: dsgd, dotted: plain TCP)")
    ax_rate.legend(fontsize=7)
    ax_rate.grid(alpha=0.3, which="both")
    ax_ratio.axhline(1.0, color="black", linestyle="--", label="plain-TCP parameter server")
    ax_ratio.set_xlabel("workers")
    ax_ratio.set_ylabel("dsgd cycles/s / plain TCP cycles/s")
    ax_ratio.set_ylim(bottom=0)
    ax_ratio.set_title("dsgd's ratio to the plain-TCP parameter server (same run)")
    ax_ratio.legend(fontsize=8)
    ax_ratio.grid(alpha=0.3)
    for ax in (ax_rate, ax_ratio):
        ax.set_xticks(sorted({r["workers"] for r in rows}))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def ps_cycle_suite(bench: Any) -> Iterator[dict[str, Any]]:
    """The transport suite's ``ps_cycle`` entry: the matrix (``--quick``: the quick one,
    once; else 3 repetitions), one record per server and configuration."""
    from bench._measure import make_record

    quick = bench.config.quick
    rows = summarize(run_matrix(1 if quick else 3, quick))
    for row in rows:
        payload = 8 * row["params"]  # a cycle moves the vector twice: pull and push
        for server in ("dsgd", "tcp"):
            rates = row[server]
            yield make_record(
                SUITE,
                server,
                f"P={row['params']} S={row['shards']} W={row['workers']}",
                payload,
                wire.DEFAULT_CHUNK_BYTES,
                [1.0 / rates[k] for k in ("median", "min", "max") if rates[k] > 0],
                params=row["params"],
                shards=row["shards"],
                workers=row["workers"],
                cycles_per_s=rates["median"],
                ratio_to_plain_tcp=row["ratio"]["median"] if server == "dsgd" else 1.0,
                correct=row["correct"],
            )


def plot_records(records: list[dict[str, Any]], path: Path) -> bool:
    """:func:`plot` from the transport suite's records; False when there are none."""
    rows: dict[tuple[int, int, int], dict[str, Any]] = {}
    for r in records:
        if r["suite"] != SUITE:
            continue
        row = rows.setdefault((r["params"], r["shards"], r["workers"]), {})
        row.update(params=r["params"], shards=r["shards"], workers=r["workers"])
        row[r["transport"]] = {
            "median": r["cycles_per_s"],
            "min": r["gbps_min"] * 1e9 / r["payload_bytes"],
            "max": r["gbps_max"] * 1e9 / r["payload_bytes"],
        }
        if r["transport"] == "dsgd":
            ratio = r["ratio_to_plain_tcp"]
            row["ratio"] = {"median": ratio, "min": ratio, "max": ratio}
    return plot([r for r in rows.values() if {"dsgd", "tcp", "ratio"} <= r.keys()], path)


# -- command line ------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.ps_cycle", description=__doc__)
    parser.add_argument("--params", type=int, default=1_000_000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--shards", type=int, default=1)
    parser.add_argument("--seconds", type=float, default=15.0)
    parser.add_argument("--warmup", type=float, default=3.0)
    parser.add_argument(
        "--chunk-bytes",
        type=int,
        default=wire.DEFAULT_CHUNK_BYTES,
        help="dsgd's message size for pushes and fetch replies",
    )
    parser.add_argument("--out", type=Path, help="write the JSON result here too")
    parser.add_argument("--matrix", action="store_true", help="run the whole matrix instead")
    parser.add_argument("--reps", type=int, default=3, help="with --matrix: repetitions")
    parser.add_argument("--quick", action="store_true", help="with --matrix: the quick one")
    parser.add_argument(
        "--hosts",
        action="store_true",
        help="each server and worker in a network namespace of its own (root): across hosts",
    )
    parser.add_argument(
        "--secure",
        action="store_true",
        help="also run dsgd secured (CURVE, as --secure DIR does), for the cost of encryption",
    )
    parser.add_argument(
        "--shape",
        metavar="RATE[,DELAY]",
        help="with --hosts: every link's rate (and delay, where the kernel has netem): 1gbit",
    )
    args = parser.parse_args(argv)
    args.placement = ONE_HOST
    if args.params < CHECKED * args.shards or args.workers < 1 or args.shards < 1:
        parser.error(f"need --params >= {CHECKED} per shard, --workers >= 1, --shards >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    import json

    args = parse_args(argv)
    with contextlib.ExitStack() as stack:
        if args.hosts:
            args.placement = _across_hosts(stack, args)
        args.keys = new_keys(stack) if args.secure else None
        if args.matrix:
            return matrix_main(args)
        result = measure(args)
    if args.out is not None:
        write_json(args.out, result)
    print(json.dumps(result))
    servers = [s for s in ("dsgd", "tcp", "dsgd_curve") if s in result]
    ok = all(result[s]["head_exact"] and result[s]["pushes_match"] for s in servers)
    return 0 if ok else 1


def new_keys(stack: contextlib.ExitStack) -> Path:
    """A new cluster's key directory (removed when ``stack`` closes)."""
    import tempfile

    from dsgd import keys

    directory = Path(stack.enter_context(tempfile.TemporaryDirectory())) / "keys"
    keys.init(directory, [])
    return directory


def _across_hosts(stack: contextlib.ExitStack, args: argparse.Namespace) -> Placement:
    """Hosts for every server and worker the run needs (removed when ``stack`` closes),
    their links shaped as ``--shape`` says."""
    import tempfile

    from tests.hosts import Hosts, unavailable

    why_not = unavailable()
    if why_not is not None:
        raise SystemExit(f"--hosts: {why_not}")
    servers, workers = args.shards, args.workers
    if args.matrix:
        grid = QUICK_MATRIX if args.quick else MATRIX
        servers, workers = max(grid["shards"]), max(grid["workers"])
    logs = Path(stack.enter_context(tempfile.TemporaryDirectory()))
    hosts = stack.enter_context(Hosts(host_names(servers, workers), logs))
    label = "a host each, bridged"
    if args.shape:
        rate, _, delay = args.shape.partition(",")
        for name in hosts.names:
            hosts.shape(name, rate, delay)
        label += f", every link {rate}" + (f" with {delay} delay" if delay else "")
    return across(hosts, servers, workers, label)


def matrix_main(args: argparse.Namespace) -> int:
    from datetime import UTC, datetime

    from bench._measure import machine_info, package_versions

    started = time.perf_counter()
    runs = run_matrix(
        args.reps, args.quick, args.seconds, args.warmup, placement=args.placement, keys=args.keys
    )
    rows = summarize(runs)
    doc = {
        "benchmark": "ps_cycle_matrix",
        "created_utc": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": machine_info(),
        "packages": package_versions(),
        "reps": args.reps,
        "hosts": args.placement.label,
        "elapsed_s": time.perf_counter() - started,
        "summary": rows,
        "runs": runs,
    }
    for row in rows:
        print(
            f"P={row['params']} S={row['shards']} W={row['workers']}: ratio "
            f"{row['ratio']['median']:.2f} ({row['ratio']['min']:.2f}-{row['ratio']['max']:.2f}), "
            f"dsgd {row['dsgd']['median']:.1f} cycles/s, plain TCP {row['tcp']['median']:.1f}"
            + (
                f", CURVE/plain dsgd {row['curve_ratio']['median']:.2f}"
                if "curve_ratio" in row
                else ""
            )
        )
    if args.out is not None:
        write_json(args.out, doc)
        plot(rows, args.out.with_suffix(".png"))
    return 0 if all(row["correct"] for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
