"""How fast can bytes move between two processes on this machine, and what does it cost
to move them through ZeroMQ, gRPC and each framing?

One run measures, with warm-up, the median of repeats and every case of a suite
interleaved round by round:

* ``ceiling``: in-process memcpy (into a reused buffer, into a fresh buffer per chunk,
  ``bytes(memoryview)``) and raw TCP loopback (``sendall`` / ``recv_into`` a reused
  buffer, or a fresh buffer per chunk);
* ``zmq``: ZeroMQ tcp and ipc over chunk sizes, dsgd's msgpack header + raw frame per
  chunk; copying vs zero-copy send; receiving into one reused array, into fresh bytes,
  applying each chunk as it arrives, or reassembling one array and then applying it;
* ``grpc``: unary and client-streaming, sync and ``grpc.aio``, over the same chunk sizes;
* ``framing``: msgpack header + raw frames vs the payload packed inside msgpack vs a
  protobuf bytes field, over ZeroMQ and gRPC;
* ``dsgd``: dsgd's own push path (encode, chunk, send, apply on a real shard process, acks)
  and fetch path, dense and sparse (1%, 10%), for 1M, 10M and 75M parameters;
* ``ps``: parameter-server throughput (pushes/s, applied GB/s) with 1, 2, 4 and 8
  synthetic worker processes, one shard or two;
* ``ps_cycle``: the pull-push cycle of 1, 2 and 4 workers against dsgd's shards and against
  a plain-TCP parameter server, 1M and 10M parameters, one shard or two
  (:mod:`bench.ps_cycle`; its records' ratio is to that server, not to raw TCP);
* ``apply``: a shard's dense apply vs memcpy, and sparse apply per touched parameter;
* ``secure``: what ``--secure`` costs: ZeroMQ with and without CURVE (tcp and ipc, dsgd's
  framing in 1 MiB chunks), gRPC with and without mutual TLS (aio unary and client
  stream), and the pull-push cycle against dsgd's shards plain and with CURVE; each
  secured record carries ``ratio_to_plain`` and ``extra_ns_per_byte``.

It writes ``transport.json``, ``transport.md``, ``transport_chunks.png``,
``transport_dsgd.png``, ``transport_ps.png``, ``transport_ps_cycle.png`` and
``transport_secure.png`` into ``--out``,
says which chunk size is fastest for dsgd's own framing, and whether dsgd's data path
meets its targets. See bench/README.md.

    python -m bench.transport            # 64 MiB payload, a few minutes
    python -m bench.transport --quick    # 8 MiB, a smoke run under a minute

A suite is a function ``(Bench) -> Iterable[Record]`` listed in :data:`SUITES`; see
bench/README.md.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from statistics import median
from typing import Any

import msgpack
import numpy as np
from google.protobuf import wrappers_pb2

from bench import _report
from bench._apply import apply_suite, dense_apply_target, sparse_apply_target
from bench._common import pyplot
from bench._dsgd_paths import dense_push_target, dsgd_suite, full_fetch_target, plot_paths
from bench._measure import (
    Bench,
    Case,
    Config,
    KiB,
    MiB,
    Record,
    machine_info,
    make_record,
    measure,
    package_versions,
)
from bench._netns import ONE_HOST
from bench._peers import (
    TCP_FRESH,
    TCP_REUSED,
    ZMQ_APPLY,
    ZMQ_COPY,
    ZMQ_INTO,
    ZMQ_MSGPACK,
    ZMQ_PROTOBUF,
    ZMQ_REASSEMBLE,
    GrpcPeer,
    TcpPeer,
    ZmqPeer,
)
from bench._ps import ps_suite
from bench._report import MEMCPY_FRESH, MEMCPY_REUSED, TCP_FRESH_VARIANT, TCP_REUSED_VARIANT
from bench.ps_cycle import measure as measure_cycle
from bench.ps_cycle import new_keys, ps_cycle_suite
from bench.ps_cycle import plot_records as plot_cycles
from dsgd import wire

Suite = Callable[[Bench], Iterable[Record]]

MEMCPY_BYTES = "bytes(memoryview) into fresh memory"
ZMQ_PRIMARY = "msgpack header + raw frame, zero-copy send, recv_into reused array"
ZMQ_FRESH = "msgpack header + raw frame, recv copies into fresh bytes"
# (variant, receiver mode, copying send?, measured over ipc too?)
ZMQ_VARIANTS = (
    (ZMQ_PRIMARY, ZMQ_INTO, False, True),
    ("msgpack header + raw frame, copying send, recv_into reused array", ZMQ_INTO, True, False),
    (ZMQ_FRESH, ZMQ_COPY, False, True),
    ("msgpack header + raw frame, apply each chunk on arrival", ZMQ_APPLY, False, False),
    ("msgpack header + raw frame, reassemble one array, then apply", ZMQ_REASSEMBLE, False, False),
)
FRAMING_RAW = "msgpack header + raw frames"
FRAMING_MSGPACK = "payload packed inside msgpack"
FRAMING_PROTOBUF = "protobuf bytes field"

# What the headline compares in ~1 MiB chunks vs one payload-sized frame.
CHUNKS_VS_ONE_FRAME = (
    ("memcpy into a fresh buffer", "ceiling", "memcpy", MEMCPY_FRESH),
    ("memcpy into a reused buffer", "ceiling", "memcpy", MEMCPY_REUSED),
    ("raw TCP, recv_into a fresh buffer", "ceiling", "tcp", TCP_FRESH_VARIANT),
    ("raw TCP, recv_into a reused buffer", "ceiling", "tcp", TCP_REUSED_VARIANT),
    ("ZeroMQ tcp, recv into fresh bytes", "zmq", "zmq-tcp", ZMQ_FRESH),
    ("ZeroMQ tcp, recv_into a reused array", "zmq", "zmq-tcp", ZMQ_PRIMARY),
)

FULL_CHUNKS = (64 * KiB, 256 * KiB, 1 * MiB, 4 * MiB, 16 * MiB, 64 * MiB)
QUICK_CHUNKS = (64 * KiB, 1 * MiB, 8 * MiB)
REFERENCE_CHUNK = 1 * MiB  # the raw-TCP reference every ratio divides by
DSGD_PNG = "transport_dsgd.png"
CYCLE_PNG = "transport_ps_cycle.png"
SECURE_PNG = "transport_secure.png"
PLAIN, CURVE, TLS = "plain", "CURVE", "mutual TLS + token"


def nchunks(payload: int, chunk: int) -> int:
    return -(-payload // chunk)


def ceiling_suite(bench: Bench) -> Iterator[Record]:
    """What no transport can beat: memcpy in one process, and raw TCP loopback."""
    config = bench.config
    n = config.payload_bytes
    src = np.ones(n, np.uint8)
    dst = np.ones(n, np.uint8)
    view = memoryview(src)

    def copy_reused(chunk: int) -> None:
        for start in range(0, n, chunk):
            np.copyto(dst[start : start + chunk], src[start : start + chunk])

    def copy_fresh(chunk: int) -> None:
        for start in range(0, n, chunk):
            part = src[start : start + chunk]
            np.copyto(np.empty(part.size, np.uint8), part)

    cases = [Case("memcpy", MEMCPY_BYTES, n, partial(bytes, view))]
    for chunk in config.chunks():
        cases.append(Case("memcpy", MEMCPY_REUSED, chunk, partial(copy_reused, chunk)))
        cases.append(Case("memcpy", MEMCPY_FRESH, chunk, partial(copy_fresh, chunk)))
    with TcpPeer(n, config.timeout_s) as tcp:
        for chunk in config.chunks():
            for variant, mode in ((TCP_REUSED_VARIANT, TCP_REUSED), (TCP_FRESH_VARIANT, TCP_FRESH)):
                cases.append(Case("tcp", variant, chunk, partial(tcp.transfer, view, chunk, mode)))
        # The sweep's own reused-buffer case at the reference chunk size is this suite's
        # reference, rather than timing the same thing twice.
        records = measure("ceiling", cases, config)
        reference = next(
            r
            for r in records
            if r["transport"] == "tcp"
            and r["variant"] == TCP_REUSED_VARIANT
            and r["chunk_bytes"] == min(REFERENCE_CHUNK, n)
        )
        for record in records:
            record["tcp_reference_gbps"] = reference["gbps_median"]
            record["ratio_to_tcp"] = record["gbps_median"] / reference["gbps_median"]
        yield from records


def _dense_messages(values: np.ndarray, chunk: int) -> Callable[[], Iterator[list[Any]]]:
    """dsgd's own framing (:func:`dsgd.wire.dense_chunks`): header frame + raw frame."""
    template = wire.Header(kind=wire.PUSH, fingerprint=0, shard=0)
    return lambda: (c.frames for c in wire.dense_chunks(template, values, chunk))


def zmq_suite(bench: Bench) -> Iterator[Record]:
    """ZeroMQ PUSH/PULL, tcp and ipc, over chunk sizes, send and receive strategies."""
    config = bench.config
    values = np.ones(config.payload_bytes // 4, np.float32)
    with ZmqPeer(config.payload_bytes, config.timeout_s) as peer:
        cases = []
        for chunk in config.chunks():
            count = nchunks(config.payload_bytes, chunk)
            for variant, mode, copy, ipc_too in ZMQ_VARIANTS:
                for transport in ("tcp", "ipc") if ipc_too else ("tcp",):
                    messages = _dense_messages(values, chunk)
                    run = _zmq_run(peer, transport, mode, count, messages, copy)
                    cases.append(Case(f"zmq-{transport}", variant, chunk, run))
        yield from bench.measure("zmq", cases)


def _zmq_run(
    peer: ZmqPeer,
    transport: str,
    mode: str,
    count: int,
    messages: Callable[[], Iterable[Any]],
    copy: bool,
) -> Callable[[], None]:
    return lambda: peer.transfer(transport, mode, count, messages(), copy)


def _chunk_bytes(values: np.ndarray, chunk: int) -> Callable[[], Iterator[bytes]]:
    """The payload as one ``bytes`` per chunk, made at send time (gRPC and protobuf
    want ``bytes``, so turning the array into them is part of their cost)."""
    raw = memoryview(values).cast("B")
    return lambda: (raw[start : start + chunk].tobytes() for start in range(0, raw.nbytes, chunk))


def _bytes_values(values: np.ndarray, chunk: int) -> Callable[[], Iterator[Any]]:
    chunks = _chunk_bytes(values, chunk)
    return lambda: (wrappers_pb2.BytesValue(value=b) for b in chunks())


def grpc_suite(bench: Bench) -> Iterator[Record]:
    """gRPC with raw-bytes messages (no protobuf): unary vs client stream, sync vs aio."""
    config = bench.config
    values = np.ones(config.payload_bytes // 4, np.float32)
    with (
        GrpcPeer("sync", config.payload_bytes, config.timeout_s) as sync,
        GrpcPeer("aio", config.payload_bytes, config.timeout_s) as aio,
    ):
        cases = []
        for chunk in config.chunks():
            requests = _chunk_bytes(values, chunk)
            for flavor, peer in (("sync", sync), ("aio", aio)):
                cases.append(Case("grpc", f"{flavor} unary", chunk, partial(peer.unary, requests)))
                cases.append(
                    Case("grpc", f"{flavor} client stream", chunk, partial(peer.stream, requests))
                )
        yield from bench.measure("grpc", cases)


def framing_suite(bench: Bench) -> Iterator[Record]:
    """The same payload framed three ways over ZeroMQ tcp, and two ways over gRPC."""
    config = bench.config
    values = np.ones(config.payload_bytes // 4, np.float32)
    raw = memoryview(values).cast("B")

    def packed(chunk: int) -> Iterator[list[bytes]]:
        per_chunk = chunk // 4
        for offset in range(0, values.size, per_chunk):
            count = min(per_chunk, values.size - offset)
            data = raw[offset * 4 : (offset + count) * 4]
            yield [msgpack.packb({"offset": offset, "count": count, "data": data})]

    def protobuf(chunk: int) -> Iterator[list[bytes]]:
        for start in range(0, raw.nbytes, chunk):
            value = wrappers_pb2.BytesValue(value=raw[start : start + chunk].tobytes())
            yield [value.SerializeToString()]

    with (
        ZmqPeer(config.payload_bytes, config.timeout_s, transports=("tcp",)) as zmq_peer,
        GrpcPeer("sync", config.payload_bytes, config.timeout_s) as grpc_peer,
    ):
        cases = []
        for chunk in config.chunks():
            count = nchunks(config.payload_bytes, chunk)
            for variant, mode, messages in (
                (FRAMING_RAW, ZMQ_INTO, _dense_messages(values, chunk)),
                (FRAMING_MSGPACK, ZMQ_MSGPACK, partial(packed, chunk)),
                (FRAMING_PROTOBUF, ZMQ_PROTOBUF, partial(protobuf, chunk)),
            ):
                run = _zmq_run(zmq_peer, "tcp", mode, count, messages, copy=False)
                cases.append(Case("zmq-tcp", variant, chunk, run))
            as_bytes, as_pb = _chunk_bytes(values, chunk), _bytes_values(values, chunk)
            for call, name in ((grpc_peer.stream, "client stream"), (grpc_peer.unary, "unary")):
                raw_call, pb_call = partial(call, as_bytes), partial(call, as_pb, pb=True)
                cases.append(Case("grpc", f"raw bytes, sync {name}", chunk, raw_call))
                cases.append(Case("grpc", f"{FRAMING_PROTOBUF}, sync {name}", chunk, pb_call))
        yield from bench.measure("framing", cases)


def secure_suite(bench: Bench) -> Iterator[Record]:
    """Each secured path beside the same path in the clear, interleaved: ZeroMQ with CURVE
    (as a secured shard and worker speak), gRPC with mutual TLS and the token (as the
    control plane and checkpoints), and the pull-push cycle of dsgd's shards and clients."""
    config = bench.config
    values = np.ones(config.payload_bytes // 4, np.float32)
    chunk = min(wire.DEFAULT_CHUNK_BYTES, config.payload_bytes)
    count = nchunks(config.payload_bytes, chunk)
    with contextlib.ExitStack() as stack:
        keys = new_keys(stack)
        cases = []
        for variant, curve in ((PLAIN, False), (CURVE, True)):
            peer = stack.enter_context(ZmqPeer(config.payload_bytes, config.timeout_s, curve=curve))
            for transport in ("tcp", "ipc"):
                messages = _dense_messages(values, chunk)
                run = _zmq_run(peer, transport, ZMQ_INTO, count, messages, False)
                cases.append(Case(f"zmq-{transport}", variant, chunk, run))
        requests = _chunk_bytes(values, chunk)
        for variant, key_dir in ((PLAIN, None), (TLS, keys)):
            grpc_peer = stack.enter_context(
                GrpcPeer("aio", config.payload_bytes, config.timeout_s, keys=key_dir)
            )
            for call, run in (("unary", grpc_peer.unary), ("client stream", grpc_peer.stream)):
                cases.append(Case(f"grpc aio {call}", variant, chunk, partial(run, requests)))
        records = bench.measure("secure", cases)
        yield from _against_plain(records)
        yield from _against_plain(list(_secure_cycles(config, keys)))


def _secure_cycles(config: Config, keys: Path) -> Iterator[Record]:
    """The pull-push cycle against one dsgd shard, plain and with CURVE, 1 and 2 workers
    (``bench.ps_cycle``; 10M parameters, 3 repetitions; ``--quick``: 1M, 1 worker, once)."""
    params = 1_000_000 if config.quick else 10_000_000
    seconds, warmup = (2.0, 0.5) if config.quick else (10.0, 2.0)
    reps = 1 if config.quick else 3
    for workers in (1,) if config.quick else (1, 2):
        runs = []
        for _ in range(reps):
            setting = argparse.Namespace(
                params=params,
                shards=1,
                workers=workers,
                seconds=seconds,
                warmup=warmup,
                chunk_bytes=wire.DEFAULT_CHUNK_BYTES,
                placement=ONE_HOST,
                keys=keys,
            )
            runs.append(measure_cycle(setting))
        for variant, server in ((PLAIN, "dsgd"), (CURVE, "dsgd_curve")):
            rates = [r[server]["cycles_per_s"] for r in runs]
            yield make_record(
                "secure",
                "dsgd cycle",
                f"{variant}, {workers} worker{'s' if workers > 1 else ''}",
                8 * params,  # a cycle moves the vector twice
                wire.DEFAULT_CHUNK_BYTES,
                [1.0 / rate for rate in rates if rate > 0],
                params=params,
                workers=workers,
                cycles_per_s=median(rates),
                correct=all(r[server]["head_exact"] and r[server]["pushes_match"] for r in runs),
            )


def _against_plain(records: list[Record]) -> Iterator[Record]:
    """Each secured record with ``ratio_to_plain`` (its GB/s over the plain record of the
    same path) and ``extra_ns_per_byte`` (what securing adds per byte moved)."""
    plain = {
        (r["transport"], r["variant"].replace(PLAIN, "")): r
        for r in records
        if r["variant"].startswith(PLAIN)
    }
    for record in records:
        variant = record["variant"]
        for secured in (CURVE, TLS):
            if variant.startswith(secured):
                base = plain[(record["transport"], variant.replace(secured, ""))]
                record["ratio_to_plain"] = record["gbps_median"] / base["gbps_median"]
                record["extra_ns_per_byte"] = 1 / record["gbps_median"] - 1 / base["gbps_median"]
        yield record


def plot_secure(records: list[Record], path: Path) -> bool:
    """GB/s of each path in the clear and secured, side by side; False without records."""
    mine = [r for r in records if r["suite"] == "secure"]
    if not mine:
        return False
    plt = pyplot()
    paths = list(dict.fromkeys((r["transport"], _path_of(r["variant"])) for r in mine))
    fig, ax = plt.subplots(figsize=(12, 5))
    width = 0.4
    for offset, secured in ((-width / 2, False), (width / 2, True)):
        heights, lows, highs = [], [], []
        for transport, tail in paths:
            match = [
                r
                for r in mine
                if r["transport"] == transport
                and _path_of(r["variant"]) == tail
                and r["variant"].startswith(PLAIN) != secured
            ]
            r = match[0] if match else None
            heights.append(r["gbps_median"] if r else 0.0)
            lows.append(max(0.0, r["gbps_median"] - r["gbps_min"]) if r else 0.0)
            highs.append(max(0.0, r["gbps_max"] - r["gbps_median"]) if r else 0.0)
        xs = [i + offset for i in range(len(paths))]
        bars = ax.bar(
            xs,
            heights,
            width,
            yerr=[lows, highs],
            capsize=3,
            label="secured (CURVE; gRPC: mutual TLS + token)" if secured else "plain",
        )
        if secured:
            plain_heights = [b.get_height() for b in ax.patches[: len(paths)]]
            for bar, h, p in zip(bars, heights, plain_heights, strict=True):
                if p:
                    ax.annotate(
                        f"{h / p:.2f}x", (bar.get_x() + width / 2, h), ha="center", va="bottom"
                    )
    ax.set_xticks(range(len(paths)))
    ax.set_xticklabels([f"{t}{tail}" for t, tail in paths], rotation=15, fontsize=8)
    ax.set_ylabel("GB/s (median; bars min..max)")
    ax.set_title("What --secure costs: each path in the clear and secured (label: secured/plain)")
    ax.legend()
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _path_of(variant: str) -> str:
    for name in (PLAIN, CURVE, TLS):
        if variant.startswith(name):
            return variant[len(name) :]
    return variant


# Suites run in this order; "ceiling" always runs. To add one, write
# `def my_suite(bench: Bench) -> Iterable[Record]` that builds Cases and
# `yield from bench.measure("my", cases)` (or yields `make_record(...)`s), and list it here.
SUITES: dict[str, Suite] = {
    "ceiling": ceiling_suite,
    "zmq": zmq_suite,
    "grpc": grpc_suite,
    "framing": framing_suite,
    "dsgd": dsgd_suite,
    "ps": ps_suite,
    "ps_cycle": ps_cycle_suite,
    "apply": apply_suite,
    "secure": secure_suite,
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.transport", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--quick", action="store_true", help="smoke run: 8 MiB, 3 chunk sizes")
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    parser.add_argument(
        "--suite",
        action="append",
        choices=sorted(SUITES),
        help="run only these suites (repeatable; ceiling always runs)",
    )
    parser.add_argument("--payload-mib", type=float, help="payload per transfer (64; quick: 8)")
    parser.add_argument("--repeats", type=int, help="timed rounds (9; quick: 3)")
    parser.add_argument("--warmup", type=int, help="untimed rounds first (2; quick: 1)")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds for any wait")
    return parser.parse_args(argv)


def make_config(args: argparse.Namespace) -> Config:
    payload_mib = args.payload_mib or (8 if args.quick else 64)
    payload = max(4, int(payload_mib * MiB) // 4 * 4)
    return Config(
        payload_bytes=payload,
        chunk_sizes=QUICK_CHUNKS if args.quick else FULL_CHUNKS,
        warmup=args.warmup if args.warmup is not None else (1 if args.quick else 2),
        repeats=args.repeats or (3 if args.quick else 9),
        timeout_s=args.timeout,
        quick=args.quick,
    )


def run_suites(config: Config, names: Iterable[str]) -> list[Record]:
    """Run the named suites (ceiling first, always), each with the raw-TCP reference
    interleaved; fill in ``ratio_to_tcp`` where a suite did not."""
    order = ["ceiling", *(n for n in SUITES if n in set(names) and n != "ceiling")]
    records: list[Record] = []
    source = np.ones(config.payload_bytes, np.uint8)
    chunk = min(REFERENCE_CHUNK, config.payload_bytes)
    with TcpPeer(config.payload_bytes, config.timeout_s) as tcp:
        reference = Case(
            "tcp",
            f"reference: {TCP_REUSED_VARIANT}",
            chunk,
            partial(tcp.transfer, memoryview(source), chunk, TCP_REUSED),
        )
        bench = Bench(config, reference)
        for name in order:
            print(f"[{name}]", flush=True)
            start = time.perf_counter()
            for record in SUITES[name](bench):
                records.append(record)
                print(f"  {_report.one_line(record)}", flush=True)
            print(f"  ({time.perf_counter() - start:.1f} s)", flush=True)
    _report.fill_ratios(records)
    return records


def targets(records: list[Record], config: Config) -> list[dict[str, Any]]:
    """The data-path targets this run can judge (ratios within the run), met or not."""
    found = (
        dense_push_target(records, config.payload_bytes),
        full_fetch_target(records),
        dense_apply_target(records),
        sparse_apply_target(records),
    )
    return [t for t in found if t is not None]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    config = make_config(args)
    started = time.perf_counter()
    records = run_suites(config, args.suite or SUITES)
    doc: dict[str, Any] = {
        "benchmark": "transport",
        "created_utc": datetime.now(UTC).isoformat(timespec="seconds"),
        "argv": sys.argv[1:] if argv is None else list(argv),
        "config": asdict(config),
        "machine": machine_info(),
        "packages": package_versions(),
        "tcp_ceiling_gbps": _report.tcp_ceiling(records),
        "tcp_reference_gbps": _report.tcp_references(records),
        "dsgd_default_chunk_bytes": wire.DEFAULT_CHUNK_BYTES,
        "best_chunk": _report.best_chunk(
            records, ("zmq", "zmq-tcp", ZMQ_PRIMARY), wire.DEFAULT_CHUNK_BYTES
        ),
        "best_per_transport": _report.best_per_transport(records),
        "chunks_vs_one_frame": _report.chunks_vs_one_frame(records, CHUNKS_VS_ONE_FRAME),
        "targets": targets(records, config),
        "elapsed_s": time.perf_counter() - started,
        "records": records,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    outputs = _report.write_all(doc, args.out)
    if plot_paths(records, args.out / DSGD_PNG):
        outputs.append(args.out / DSGD_PNG)
    if plot_cycles(records, args.out / CYCLE_PNG):
        outputs.append(args.out / CYCLE_PNG)
    if plot_secure(records, args.out / SECURE_PNG):
        outputs.append(args.out / SECURE_PNG)
    print()
    print(_report.headline(doc))
    print(f"finished in {doc['elapsed_s']:.1f} s; wrote {', '.join(str(p) for p in outputs)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
