"""dsgd's own data path, end to end, by model size: the ``dsgd`` suite.

For each size (1M, 10M and 75M parameters, the original Caltech-101 CNN's size, plus a 64 MiB
range for the push target; ``--quick``: 256K and the quick payload) one real shard process
serves the range and this process pushes to it and fetches from it as a worker does
(:class:`bench._shard_peer.Pusher`):

* **push**, timed from the first encode to the last acknowledgement: the
  :class:`~dsgd.codec.SparseEncoder` takes the update out of its residual (dense, or the
  1% / 10% largest entries), :mod:`dsgd.wire` cuts it into 1 MiB chunk messages, the
  :class:`~dsgd.shard.client.ShardClient` sends them zero-copy under a permit, the shard
  decodes, checks and applies each one (SGD) as it arrives and acknowledges it. An
  untimed step before each push puts the same update back into the residual.
* **fetch**, timed from the request to the last chunk copied into a preallocated array:
  the whole range, or only what changed since a version (an untimed push first changes
  1% or 10% of the parameters, scattered).
* **raw TCP of the same bytes as the dense range**, in the same rounds, so every path has a
  ceiling of its own size next to it (``time_vs_tcp_same_bytes``), besides the run's 1 MiB
  raw-TCP reference (``ratio_to_tcp``).

Sparse records count the bytes on the wire (4-byte index + 4-byte value per entry) in
``payload_bytes`` and GB/s, and the dense range they stand for in ``dense_equivalent_gbps``.
"""

from __future__ import annotations

import contextlib
import random
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np

from bench._measure import Bench, Case, MiB, Record, make_record
from bench._peers import TCP_REUSED, TcpPeer
from bench._shard_peer import Pusher, ShardPeer, dsgd_transport
from dsgd import wire
from dsgd.codec import CodecConfig, Encoded, SparseEncoder

SUITE = "dsgd"
FULL_SIZES = (1_000_000, 10_000_000, 75_000_000)
QUICK_SIZES = (1 << 18,)
DENSITIES = (0.01, 0.1)
PUSH_DENSE = "push dense float32"
FETCH_FULL = "fetch full range"
TCP_SAME = "raw TCP, same bytes as the dense range"


def push_sparse(density: float) -> str:
    return f"push sparse {density:.0%}"


def fetch_changed(density: float) -> str:
    return f"fetch changes, {density:.0%} changed"


def params_label(size: int) -> str:
    for unit, scale in (("M", 1_000_000), ("K", 1_000)):
        if size >= scale:
            return f"{size / scale:.3g}{unit}"
    return str(size)


@dataclass(frozen=True)
class Timed:
    """A case whose ``prepare`` (untimed) runs right before each timed ``case.run``."""

    case: Case
    prepare: Callable[[], object] | None = None


def measure_prepared(
    bench: Bench, timed: list[Timed], *, with_reference: bool = True
) -> tuple[list[list[float]], float | None]:
    """Seconds of each case's timed repeats, and the raw-TCP reference's GB/s median from
    the same rounds (None without a reference). Like :func:`bench._measure.measure`: warm
    up, then round-robin in a new random order each round."""
    config = bench.config
    reference = bench.reference if with_reference else None
    everything = [*timed, Timed(reference)] if reference is not None else timed
    seconds: list[list[float]] = [[] for _ in everything]
    order = list(range(len(everything)))
    shuffle = random.Random(0).shuffle
    for round_ in range(config.warmup + config.repeats):
        shuffle(order)
        for i in order:
            item = everything[i]
            if item.prepare is not None:
                item.prepare()
            start = time.perf_counter()
            item.case.run()
            elapsed = time.perf_counter() - start
            if round_ >= config.warmup:
                seconds[i].append(elapsed)
    if reference is None:
        return seconds, None
    times = seconds.pop()
    return seconds, statistics.median(config.payload_bytes / max(s, 1e-9) / 1e9 for s in times)


class _RecordingEncoder:
    """Encodes with a :class:`SparseEncoder` and remembers how many entries each push sent."""

    def __init__(self, encoder: SparseEncoder) -> None:
        self.encoder = encoder
        self.sizes: list[int] = []

    def __call__(self) -> Encoded:
        encoded = self.encoder.encode()
        self.sizes.append(encoded.size)
        return encoded


class _ChangedFetch:
    """Push a fixed sparse update (untimed), then fetch only what it changed (timed)."""

    def __init__(self, pusher: Pusher, dest: np.ndarray, update: Encoded) -> None:
        self.pusher, self.dest, self.update = pusher, dest, update
        self.since = 0

    def prepare(self) -> None:
        self.since = self.pusher.version
        self.pusher.push(lambda: self.update)

    def run(self) -> None:
        self.pusher.fetch(self.dest, self.since)


def scattered_update(size: int, density: float, rng: np.random.Generator) -> Encoded:
    """About ``density * size`` entries at random positions (ascending), small values."""
    indices = np.flatnonzero(rng.random(size, dtype=np.float32) < density).astype(wire.INDEX_DTYPE)
    values = rng.standard_normal(indices.size, dtype=np.float32) * np.float32(1e-3)
    return Encoded(indices, values)


def dsgd_suite(bench: Bench) -> Iterator[Record]:
    """Push and fetch paths of dsgd, dense and sparse, against a real shard process."""
    config = bench.config
    sizes = (*(QUICK_SIZES if config.quick else FULL_SIZES), config.payload_bytes // 4)
    for size in sorted(set(sizes)):
        yield from _size_group(bench, size)


def _size_group(bench: Bench, size: int) -> Iterator[Record]:
    config = bench.config
    chunk = wire.DEFAULT_CHUNK_BYTES
    dense_bytes = 4 * size
    rng = np.random.default_rng(size)
    base = rng.standard_normal(size, dtype=np.float32) * np.float32(1e-3)
    dest = np.ones(size, np.float32)  # preallocated and faulted in, as a worker's is
    with contextlib.ExitStack() as stack:
        shard = stack.enter_context(ShardPeer(size, config.timeout_s, chunk_bytes=chunk))
        tcp = stack.enter_context(TcpPeer(dense_bytes, config.timeout_s))
        pusher = stack.enter_context(Pusher(shard, config.timeout_s, chunk_bytes=chunk))
        # (path, density, direction, timed, entries on the wire: a callable, read after)
        cases: list[tuple[str, float, str, Timed, Callable[[], int]]] = []

        def add(
            path: str,
            density: float,
            direction: str,
            run: Callable[[], object],
            entries: Callable[[], int],
            prepare: Callable[[], object] | None = None,
            transport: str = "",
        ) -> None:
            label = f"{path}, {params_label(size)} params"
            case = Case(transport or dsgd_transport(), label, min(chunk, dense_bytes), run)
            cases.append((path, density, direction, Timed(case, prepare), entries))

        dense = _RecordingEncoder(SparseEncoder(size, CodecConfig(density=1.0)))
        restore = partial(_restore, dense.encoder, base)
        add(PUSH_DENSE, 1.0, "push", partial(pusher.push, dense), lambda: size, restore)
        add(FETCH_FULL, 1.0, "fetch", partial(pusher.fetch, dest), lambda: size)
        for density in DENSITIES:
            sparse = _RecordingEncoder(SparseEncoder(size, CodecConfig(density=density, seed=1)))
            restore = partial(_restore, sparse.encoder, base)
            entries = partial(_median_size, sparse.sizes)
            add(
                push_sparse(density),
                density,
                "push",
                partial(pusher.push, sparse),
                entries,
                restore,
            )
            changed = _ChangedFetch(pusher, dest, scattered_update(size, density, rng))
            add(
                fetch_changed(density),
                density,
                "fetch",
                changed.run,
                partial(int, changed.update.size),
                changed.prepare,
            )
        view = memoryview(base).cast("B")
        tcp_run = partial(tcp.transfer, view, chunk, TCP_REUSED)
        add(TCP_SAME, 1.0, "raw", tcp_run, lambda: size, transport="tcp")
        seconds, reference = measure_prepared(bench, [c[3] for c in cases])
    tcp_seconds = statistics.median(seconds[-1])
    for (path, density, direction, timed, entries), times in zip(cases, seconds, strict=True):
        sparse_wire = density < 1.0
        payload = (wire.INDEX_DTYPE.itemsize + 4) * entries() if sparse_wire else dense_bytes
        extra: dict[str, Any] = {
            "path": path,
            "direction": direction,
            "params": size,
            "density": density,
            "entries": entries(),
            "dense_equivalent_gbps": dense_bytes / statistics.median(times) / 1e9,
            "time_vs_tcp_same_bytes": statistics.median(times) / tcp_seconds,
        }
        if reference is not None:
            extra["tcp_reference_gbps"] = reference
        record = make_record(
            SUITE,
            timed.case.transport,
            timed.case.variant,
            max(payload, 1),
            min(timed.case.chunk_bytes, max(payload, 1)),
            times,
            **extra,
        )
        if reference is not None:
            record["ratio_to_tcp"] = record["gbps_median"] / reference
        yield record


def _restore(encoder: SparseEncoder, update: np.ndarray) -> None:
    """The same update in the residual again, the way a worker puts it there."""
    encoder.reset()
    encoder.accumulate(update)


def _median_size(sizes: list[int]) -> int:
    return int(statistics.median(sizes)) if sizes else 0


# ---------------------------------------------------------------- targets and chart


def dense_push_target(records: list[Record], payload_bytes: int) -> dict[str, Any] | None:
    """dsgd's dense push of the run's payload (64 MiB) vs the raw-TCP reference: >= 0.85.

    The raw TCP of the same bytes, timed in the same rounds by another receiver process, is
    quoted beside it: on a 2-core VM raw TCP alone varies by up to 1.5x with where the
    scheduler puts its two processes, so the two baselines can differ that much.
    """
    for r in records:
        if r["suite"] == SUITE and r.get("path") == PUSH_DENSE and r["params"] * 4 == payload_bytes:
            return {
                "what": (
                    f"dense push of {payload_bytes // MiB} MiB in default chunks, x raw TCP "
                    f"reference ({1 / r['time_vs_tcp_same_bytes']:.2f}x the raw TCP of the same "
                    "bytes timed alongside)"
                ),
                "value": r["ratio_to_tcp"],
                "target": ">= 0.85",
                "met": r["ratio_to_tcp"] >= 0.85,
            }
    return None


def full_fetch_target(records: list[Record]) -> dict[str, Any] | None:
    """The biggest full fetch, its time over raw TCP's for the same bytes: target <= 1.5."""
    fetches = [r for r in records if r["suite"] == SUITE and r.get("path") == FETCH_FULL]
    if not fetches:
        return None
    r = max(fetches, key=lambda r: r["params"])
    return {
        "what": (
            f"full fetch of {params_label(r['params'])} parameters, time x raw TCP of the same "
            f"bytes ({r['ratio_to_tcp']:.2f}x the raw TCP reference's GB/s)"
        ),
        "value": r["time_vs_tcp_same_bytes"],
        "target": "<= 1.5",
        "met": r["time_vs_tcp_same_bytes"] <= 1.5,
    }


def plot_paths(records: list[Record], path: Any) -> bool:
    """dsgd's paths vs model size (GB/s on the wire and dense-equivalent), and the shard's
    apply cost per touched parameter vs shard size; False when there is nothing to draw."""
    rows = [r for r in records if r["suite"] == SUITE]
    applies = [r for r in records if r["suite"] == "apply" and "ns_per_touched" in r]
    if not rows and not applies:
        return False
    from bench._common import pyplot

    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(19, 5.6))
    for ax, key, label in (
        (axes[0], "gbps_median", "GB/s on the wire (median)"),
        (axes[1], "dense_equivalent_gbps", "dense-equivalent GB/s (4 B x params / s)"),
    ):
        for name in dict.fromkeys(r["path"] for r in rows):
            points = sorted((r for r in rows if r["path"] == name), key=lambda r: r["params"])
            style = "k--" if name == TCP_SAME else "-"
            x, y = [r["params"] for r in points], [r[key] for r in points]
            ax.plot(x, y, style, marker="o", label=name)
        ax.set_xscale("log")
        ax.set_xlabel("parameters in the shard's range")
        ax.set_ylabel(label)
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.set_title(
            "push: first encode .. last ack; fetch: request .. last chunk copied", fontsize=9
        )
    axes[1].legend(fontsize=8)
    ax = axes[2]
    for density in sorted({r["density"] for r in applies}):
        points = sorted((r for r in applies if r["density"] == density), key=lambda r: r["params"])
        label = "dense apply" if density >= 1 else f"sparse apply, {density:.0%} of the shard"
        x, y = [r["params"] for r in points], [r["ns_per_touched"] for r in points]
        ax.plot(x, y, marker="o", label=label)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("parameters in the shard")
    ax.set_ylabel("ns per touched parameter (median)")
    ax.set_title("shard apply (decode + ShardCore.apply, SGD), in process", fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, which="both")
    fig.suptitle("dsgd's own data path: push, fetch and apply by size")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
