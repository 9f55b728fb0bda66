"""The parameter-server cycle: what a worker runs many times a second, pull then push.

    python -m bench.ps_cycle --params P --workers W --shards S [--seconds 15] [--warmup 3]
                             [--out FILE]

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

Both are checked afterwards: the first 4096 parameters must equal ``-lr * sum_w n_w * g_w``
(no update lost or applied twice, n_w the pushes worker w saw acknowledged), and for dsgd
every shard's own push count must equal the acknowledged pushes. The result (one JSON
document) carries both figures and dsgd's ratio to the reference.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing.connection
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench._common import SPAWN, stop_process, write_json
from bench._shard_peer import FINGERPRINT, ShardPeer

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
) -> dict[str, Any]:
    import secrets

    import zmq.asyncio

    from dsgd import wire
    from dsgd.shard.client import PushResult, ShardClient

    grad = gradient(worker, size)
    params = np.zeros(size, np.float32)
    ctx = zmq.asyncio.Context()
    clients = [
        ShardClient(k, data, pub, FINGERPRINT, worker, ctx, ack_timeout=TIMEOUT)
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
                chunks = list(
                    wire.dense_chunks(template, grad[start:stop], wire.DEFAULT_CHUNK_BYTES)
                )
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


def tcp_server(conn: multiprocessing.connection.Connection, size: int) -> None:
    """One shard of the reference: a thread per connection, preallocated buffers."""
    params = np.zeros(size, np.float32)
    lock = threading.Lock()
    listener = socket.create_server(("127.0.0.1", 0))
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


def _run_workers(target: Any, count: int, size: int, shards: list[Any], args: Any) -> list[Any]:
    began = time.time() + 2.0  # every worker starts its clock at the same moment
    pipes, procs = [], []
    for worker in range(count):
        mine, child = SPAWN.Pipe()
        proc = SPAWN.Process(
            target=target,
            args=(child, worker, size, shards, began, args.warmup, args.seconds),
            daemon=True,
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


def run_dsgd(args: argparse.Namespace) -> dict[str, Any]:
    bounds = ranges(args.params, args.shards)
    peers = [
        ShardPeer(stop - start, TIMEOUT, shard_id=k, lr=LR)
        for k, (start, stop) in enumerate(bounds)
    ]
    try:
        for peer in peers:
            peer.wait_ready()
        shards = [
            (a, b, p.data_address, p.pub_address) for (a, b), p in zip(bounds, peers, strict=True)
        ]
        results = _run_workers(dsgd_worker, args.workers, args.params, shards, args)
        figures = _figures(results, args.params, args.seconds)
        applied = [int(peer.stats()["pushes"]) for peer in peers]
        head = _dsgd_head(shards[0], bounds[0])
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


def _dsgd_head(shard: tuple[int, int, str, str], bounds: tuple[int, int]) -> np.ndarray:
    """The first CHECKED parameters of shard 0, fetched as a worker would."""
    import zmq.asyncio

    from dsgd.shard.client import ShardClient

    async def fetch() -> np.ndarray:
        ctx = zmq.asyncio.Context()
        client = ShardClient(0, shard[2], shard[3], FINGERPRINT, 999, ctx, fetch_timeout=TIMEOUT)
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
    for start, stop in bounds:
        mine, child = SPAWN.Pipe()
        proc = SPAWN.Process(target=tcp_server, args=(child, stop - start), daemon=True)
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
        shards = [(a, b, "127.0.0.1", port) for (a, b), port in zip(bounds, ports, strict=True)]
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
    """One configuration: the reference, then dsgd, then the ratio."""
    tcp = run_tcp(args)
    dsgd = run_dsgd(args)
    return {
        "benchmark": "ps_cycle",
        "params": args.params,
        "workers": args.workers,
        "shards": args.shards,
        "seconds": args.seconds,
        "warmup": args.warmup,
        "dsgd": dsgd,
        "tcp": tcp,
        "ratio": dsgd["cycles_per_s"] / tcp["cycles_per_s"] if tcp["cycles_per_s"] else None,
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.ps_cycle", description=__doc__)
    parser.add_argument("--params", type=int, default=1_000_000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--shards", type=int, default=1)
    parser.add_argument("--seconds", type=float, default=15.0)
    parser.add_argument("--warmup", type=float, default=3.0)
    parser.add_argument("--out", type=Path, help="write the JSON result here too")
    args = parser.parse_args(argv)
    if args.params < CHECKED * args.shards or args.workers < 1 or args.shards < 1:
        parser.error(f"need --params >= {CHECKED} per shard, --workers >= 1, --shards >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    import json

    args = parse_args(argv)
    result = measure(args)
    if args.out is not None:
        write_json(args.out, result)
    print(json.dumps(result))
    ok = all(result[s]["head_exact"] and result[s]["pushes_match"] for s in ("dsgd", "tcp"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
