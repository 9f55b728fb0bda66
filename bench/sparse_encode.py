"""Is sparse encoding cheaper than just sending the update dense?

Times, in one run and on the same update (``--size`` float32 entries, N(0, 1)):

* ``encode_*``: :meth:`dsgd.codec.SparseEncoder.encode` at ``--density``, error
  feedback included, for each value dtype (steady state: the residual carries over);
* ``encode_preaccumulated_float32``: the same when the worker accumulated straight into
  the encoder (``accumulate`` untimed, ``encode()`` timed);
* ``exact_topk_argpartition``: the exact top-k this codec avoids (abs, argpartition,
  sort, gather; no error feedback, so it is a lower bound of an exact encoder);
* ``dense_send_zmq``: sending the update dense over a real ZeroMQ tcp loopback
  PUSH/PULL pair in ``--chunk-bytes`` frames (:func:`dsgd.wire.dense_chunks`) to a
  receiver process that receives into a reused buffer and acknowledges the last chunk;
* ``sparse_encode_and_send_zmq``: encode plus sending the sparse chunks the same way.

Each is warmed up, then repeated; the JSON records the median, min and max seconds and
the ratio of the median to the dense send's. The PNG shows the medians as bars.

    python bench/sparse_encode.py --size 20000000 --density 0.01 --repeats 15 --out results
"""

from __future__ import annotations

import argparse
import itertools
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import zmq

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._common import SPAWN, pyplot, write_json
from dsgd import wire
from dsgd.codec import CodecConfig, SparseEncoder

STOP = b"stop"
READY = b"ready"
RECEIVE_TIMEOUT_MS = 30_000


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=20_000_000, help="float32 entries")
    parser.add_argument("--density", type=float, default=0.01)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--chunk-bytes", type=int, default=wire.DEFAULT_CHUNK_BYTES)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    return parser.parse_args(argv)


class Case(NamedTuple):
    """One timed thing: ``prepare`` runs untimed before each timed call of ``measure``."""

    name: str
    measure: Callable[[], Any]
    prepare: Callable[[], Any] | None = None
    every: int = 1  # run only every ``every``-th round (for the slow exact top-k)


def time_round_robin(cases: list[Case], repeats: int, warmup: int) -> dict[str, list[float]]:
    """Seconds per call of each case, interleaved round by round after ``warmup`` rounds.

    Interleaving spreads the drift of a shared machine over every case alike, so the
    ratios between them hold even when the absolute times wander.
    """
    seconds: dict[str, list[float]] = {case.name: [] for case in cases}
    for round_ in range(warmup + repeats):
        for case in cases:
            if round_ % case.every:
                continue
            if case.prepare is not None:
                case.prepare()
            start = time.perf_counter()
            case.measure()
            elapsed = time.perf_counter() - start
            if round_ >= warmup:
                seconds[case.name].append(elapsed)
    return seconds


def receive(endpoint: str, ack_endpoint: str, size: int, chunk_bytes: int) -> None:
    """The receiver process: take chunks into reused buffers; ack each message's last chunk."""
    ctx = zmq.Context()
    pull, ack = ctx.socket(zmq.PULL), ctx.socket(zmq.PUSH)
    pull.linger = ack.linger = 0
    pull.connect(endpoint)
    ack.connect(ack_endpoint)
    dense = np.empty(size, np.float32)
    scratch = bytearray(chunk_bytes)
    dense_bytes = memoryview(dense).cast("B")
    ack.send(READY)
    try:
        while True:
            first = pull.recv()
            if first == STOP:
                return
            header = wire.unpack_header(first)
            if header.encoding == wire.DENSE:
                itemsize = wire.VALUE_DTYPES[header.dtype].itemsize
                start = header.offset * itemsize
                pull.recv_into(dense_bytes[start : start + header.count * itemsize])
            else:
                pull.recv_into(scratch)  # indices
                pull.recv_into(scratch)  # values
            if header.chunk == header.nchunks - 1:
                ack.send(b"")
    finally:
        pull.close()
        ack.close()
        ctx.term()


class Link:
    """A PUSH socket to a receiver process, and the PULL socket its acks come back on."""

    def __init__(self, size: int, chunk_bytes: int) -> None:
        self.ctx = zmq.Context()
        self.push, self.acks = self.ctx.socket(zmq.PUSH), self.ctx.socket(zmq.PULL)
        self.push.linger = self.acks.linger = 0
        self.acks.rcvtimeo = RECEIVE_TIMEOUT_MS
        port = self.push.bind_to_random_port("tcp://127.0.0.1")
        ack_port = self.acks.bind_to_random_port("tcp://127.0.0.1")
        self.process = SPAWN.Process(
            target=receive,
            args=(f"tcp://127.0.0.1:{port}", f"tcp://127.0.0.1:{ack_port}", size, chunk_bytes),
            daemon=True,
        )
        self.process.start()
        if self.acks.recv() != READY:
            raise RuntimeError("receiver did not report ready")

    def send(self, chunks: Any) -> None:
        """Send every chunk, then wait until the receiver has taken the last one."""
        for chunk in chunks:
            self.push.send_multipart(chunk.frames, copy=False)
        self.acks.recv()

    def close(self) -> None:
        self.push.send(STOP)
        self.process.join(timeout=10)
        if self.process.is_alive():
            self.process.kill()
            self.process.join()
        self.push.close()
        self.acks.close()
        self.ctx.term()


def record(name: str, seconds: list[float], **extra: Any) -> dict[str, Any]:
    return {
        "name": name,
        "seconds_median": statistics.median(seconds),
        "seconds_min": min(seconds),
        "seconds_max": max(seconds),
        "repeats": len(seconds),
        **extra,
    }


def exact_topk(accumulated: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The exact encoder this codec avoids: argpartition over the whole vector."""
    n = accumulated.size
    indices = np.argpartition(np.abs(accumulated), n - k)[n - k :]
    indices.sort()
    return indices.astype(wire.INDEX_DTYPE), accumulated[indices]


def counting(
    encoder: SparseEncoder, next_update: Callable[[], np.ndarray], counts: list[int]
) -> Callable[[], None]:
    """Encode the next update, noting how many entries were selected."""

    def measure() -> None:
        counts.append(encoder.encode(next_update()).size)

    return measure


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    rng = np.random.default_rng(args.seed)
    updates = [rng.standard_normal(args.size, dtype=np.float32) for _ in range(2)]
    turn = itertools.count()

    def next_update() -> np.ndarray:
        return updates[next(turn) % len(updates)]

    def encoder(dtype: str = "float32") -> SparseEncoder:
        config = CodecConfig(density=args.density, value_dtype=dtype, seed=args.seed)
        return SparseEncoder(args.size, config)

    k = max(1, round(args.density * args.size))
    template = wire.Header(kind=wire.PUSH, fingerprint=0, shard=0)
    selected: dict[str, list[int]] = {f"encode_{dtype}": [] for dtype in wire.VALUE_DTYPES}
    cases = []
    for dtype in wire.VALUE_DTYPES:
        name = f"encode_{dtype}"
        cases.append(Case(name, counting(encoder(dtype), next_update, selected[name])))
    pre = encoder()
    cases.append(
        Case("encode_preaccumulated_float32", pre.encode, lambda: pre.accumulate(next_update()))
    )
    cases.append(Case("exact_topk_argpartition", lambda: exact_topk(next_update(), k), every=3))
    link = Link(args.size, args.chunk_bytes)
    dense = updates[0]
    cases.append(
        Case(
            "dense_send_zmq",
            lambda: link.send(wire.dense_chunks(template, dense, args.chunk_bytes)),
        )
    )
    pushing = encoder()

    def encode_and_send() -> None:
        indices, values = pushing.encode(next_update())
        assert indices is not None
        link.send(wire.sparse_chunks(template, indices, values, args.chunk_bytes))

    cases.append(Case("sparse_encode_and_send_zmq", encode_and_send))
    try:
        seconds = time_round_robin(cases, args.repeats, args.warmup)
    finally:
        link.close()

    records = []
    for name, times in seconds.items():
        extra: dict[str, Any] = {}
        if name in selected:
            extra["selected_median"] = float(np.median(selected[name]))
            extra["selected_target"] = k
        if name.endswith("_zmq"):
            extra["chunk_bytes"] = args.chunk_bytes
        records.append(record(name, times, **extra))
    dense_median = statistics.median(seconds["dense_send_zmq"])
    for r in records:
        r["ratio_to_dense_send"] = r["seconds_median"] / dense_median
    return records


def plot(records: list[dict[str, Any]], title: str, path: Path) -> None:
    plt = pyplot()

    names = [r["name"] for r in records]
    medians = np.array([r["seconds_median"] for r in records]) * 1e3
    low = medians - np.array([r["seconds_min"] for r in records]) * 1e3
    high = np.array([r["seconds_max"] for r in records]) * 1e3 - medians
    colors = ["tab:gray" if n == "dense_send_zmq" else "tab:blue" for n in names]
    fig, ax = plt.subplots(figsize=(9, 0.5 * len(records) + 1.6))
    ax.barh(names, medians, xerr=[low, high], color=colors, capsize=3)
    dense = medians[names.index("dense_send_zmq")]
    ax.axvline(dense, color="tab:red", linestyle="--", label="dense send (median)")
    for y, (value, top) in enumerate(zip(medians, medians + high, strict=True)):
        ax.text(top, y, f"  {value:.1f} ms", va="center", fontsize=8)
    ax.set_xlim(0, float((medians + high).max()) * 1.15)
    ax.invert_yaxis()
    ax.set_xlabel("milliseconds (bar: median; whiskers: min..max)")
    ax.set_title(title, fontsize=10)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    records = run(args)
    args.out.mkdir(parents=True, exist_ok=True)
    result = {
        "benchmark": "sparse_encode",
        "size": args.size,
        "density": args.density,
        "repeats": args.repeats,
        "chunk_bytes": args.chunk_bytes,
        "machine": {
            "python": platform.python_version(),
            "numpy": np.__version__,
            "pyzmq": zmq.__version__,
            "libzmq": zmq.zmq_version(),
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
        },
        "records": records,
    }
    write_json(args.out / "sparse_encode.json", result, strict=False)
    title = f"{args.size:,} float32 at density {args.density}: encode vs dense send"
    plot(records, title, args.out / "sparse_encode.png")
    for r in records:
        print(
            f"{r['name']:32s} {r['seconds_median'] * 1e3:8.2f} ms "
            f"({r['ratio_to_dense_send']:.2f}x dense send)"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
