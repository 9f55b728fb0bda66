"""The data-plane wire format: one msgpack header frame, then raw array frames.

Every data-plane message is a ZeroMQ multipart message::

    frame 0   msgpack map: the :class:`Header` (kind, protocol version, layout
              fingerprint, shard, worker, sequence, chunk i of n, versions, ...)
    frame 1.. raw little-endian arrays, sent zero-copy and rebuilt on the other
              side with ``numpy.frombuffer`` (never pickle)

    dense   [header, values]              values for ``[offset, offset + count)``
    sparse  [header, indices, values]     uint32 indices relative to the shard range

A chunk carries at most ``chunk_bytes`` of payload (1 MiB by default): measured on
this class of machine, 1 MiB frames move at raw-TCP speed over loopback while one
64 MiB frame moves at less than half of it, because the receiver faults in fresh
memory for every large frame.

This module is pure: bytes and arrays in, bytes and arrays out, no sockets.
:func:`decode` checks everything that can be checked without knowing the shard
(framing, sizes, dtypes) and raises :class:`~dsgd.errors.ProtocolError`; the shard
checks the rest (fingerprint, range, finiteness).
"""

from __future__ import annotations

import ctypes
import enum
import functools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, fields, replace
from operator import attrgetter
from typing import Any, NamedTuple

import ml_dtypes
import msgpack
import numpy as np

from dsgd.errors import ProtocolError

PROTOCOL_VERSION = 3  # 3: an ACK covers ``count`` consecutive chunks
DEFAULT_CHUNK_BYTES = 1 << 20
MAX_HEADER_BYTES = 4096
MAX_FRAME_BYTES = 64 << 20

# kinds
PUSH = "push"  # worker -> shard: an update chunk
ACK = "ack"  # shard -> worker: what became of push chunks [chunk, chunk + count)
FETCH = "fetch"  # worker -> shard: send me parameters (changed since `version`)
PARAMS = "params"  # shard -> worker: a chunk of parameters
VERSION = "version"  # shard -> all (PUB): my current version
ERROR = "error"  # shard -> worker: your request was refused (`reason` says why)
# replication between the processes of one shard range (dsgd.shard.replication)
# JOIN: backup -> primary: replicate to me (`worker`: my replica, `incarnation`: mine,
# `seq`: which of my joins this is)
JOIN = "join"
STATE = "state"  # primary -> backup: one piece of the state it starts from
REPLICATE = "replicate"  # primary -> backup: [this header, a push's frames], `seq`-th forward
# CONFIRM: backup -> primary: applied every forward up to `seq` (0: installed the state)
CONFIRM = "confirm"
KINDS = frozenset({PUSH, ACK, FETCH, PARAMS, VERSION, ERROR, JOIN, STATE, REPLICATE, CONFIRM})
# an ERROR's status for a push or a join that reached a process that is no primary (a
# backup being promoted, say): send it again shortly
NOT_PRIMARY = "not_primary"
# an ERROR's status from a primary to a backup it dropped from its chain: join again
REJOIN = "rejoin"

# encodings
DENSE = "dense"
SPARSE = "sparse"
ENCODINGS = frozenset({DENSE, SPARSE})

VALUE_DTYPES: dict[str, np.dtype[Any]] = {
    "float32": np.dtype(np.float32),
    "float16": np.dtype(np.float16),
    "bfloat16": np.dtype(ml_dtypes.bfloat16),
}
INDEX_DTYPE = np.dtype("<u4")


class AckStatus(enum.StrEnum):
    """What became of one push chunk, as its ACK's ``status`` says."""

    APPLIED = "applied"  # applied in place; the only status that changed anything
    DUPLICATE = "duplicate"  # seen before (at-most-once): acknowledged, not applied again
    STALE = "stale"  # dropped by the staleness policy
    REJECTED = "rejected"  # refused; the ACK's ``reason`` says why


def dtype_name(dtype: np.dtype[Any]) -> str:
    """The wire name of a value dtype (``float32``, ``float16``, ``bfloat16``)."""
    for name, known in VALUE_DTYPES.items():
        if known == dtype:
            return name
    raise ValueError(f"values of dtype {dtype} cannot travel; use one of {sorted(VALUE_DTYPES)}")


@dataclass(frozen=True, slots=True)
class Header:
    """Frame 0 of every data-plane message."""

    kind: str
    fingerprint: int
    shard: int
    worker: int = -1
    seq: int = 0
    chunk: int = 0
    nchunks: int = 1
    base_version: int = 0
    version: int = 0
    incarnation: int = 0
    offset: int = 0
    count: int = 0
    encoding: str = DENSE
    dtype: str = "float32"
    status: str = ""  # ACK: an AckStatus value
    reason: str = ""  # ACK (rejected) and ERROR: why the request was refused
    about: str = ""  # ERROR: the kind of the request it answers
    protocol: int = PROTOCOL_VERSION


_FIELD_TYPES: dict[str, type] = {f.name: (str if f.type == "str" else int) for f in fields(Header)}
_FIELD_VALUES = attrgetter(*_FIELD_TYPES)
_STR_LIMIT = 256


def pack_header(header: Header) -> bytes:
    # the same map as dataclasses.asdict(header), without its recursive deep copy (which
    # cost more than everything else a 1 MiB chunk's header needs)
    return msgpack.packb(
        dict(zip(_FIELD_TYPES, _FIELD_VALUES(header), strict=True)), use_bin_type=True
    )


def unpack_header(frame: bytes | memoryview) -> Header:
    """Parse and type-check frame 0; raise ProtocolError on anything unexpected."""
    if len(frame) > MAX_HEADER_BYTES:
        raise ProtocolError(f"header of {len(frame)} bytes exceeds {MAX_HEADER_BYTES}")
    try:
        raw = msgpack.unpackb(frame, raw=False, strict_map_key=True, max_map_len=64)
    except Exception as exc:  # msgpack raises a zoo of types on garbage
        raise ProtocolError(f"header is not valid msgpack: {exc}") from None
    if not isinstance(raw, dict):
        raise ProtocolError("header is not a msgpack map")
    for key, value in raw.items():
        want = _FIELD_TYPES.get(key)
        if want is None:
            raise ProtocolError(f"unknown header field {key!r}")
        if want is int and (type(value) is not int or not -(2**63) <= value < 2**64):
            raise ProtocolError(f"header field {key!r} must be an integer")
        if want is str and (type(value) is not str or len(value) > _STR_LIMIT):
            raise ProtocolError(f"header field {key!r} must be a short string")
    if "kind" not in raw or "fingerprint" not in raw or "shard" not in raw:
        raise ProtocolError("header lacks kind, fingerprint or shard")
    header = Header(**raw)
    if header.protocol != PROTOCOL_VERSION:
        raise ProtocolError(
            f"protocol version {header.protocol}, this peer speaks {PROTOCOL_VERSION}; "
            "upgrade dsgd on both ends"
        )
    if header.kind not in KINDS:
        raise ProtocolError(f"unknown message kind {header.kind!r}")
    if header.encoding not in ENCODINGS:
        raise ProtocolError(f"unknown encoding {header.encoding!r}")
    if header.dtype not in VALUE_DTYPES:
        raise ProtocolError(f"unknown value dtype {header.dtype!r}")
    if (
        not (0 <= header.chunk < header.nchunks)
        or header.count < 0
        or header.offset < 0
        or (header.kind == ACK and header.chunk + header.count > header.nchunks)
    ):
        raise ProtocolError(
            f"bad chunk numbering: chunk {header.chunk} of {header.nchunks}, "
            f"offset {header.offset}, count {header.count}"
        )
    return header


def acked_chunks(ack: Header) -> range:
    """The push chunks one ACK answers: ``count`` of them from ``chunk`` (at least one)."""
    return range(ack.chunk, ack.chunk + max(ack.count, 1))


def merge_acks(acks: Sequence[Header]) -> list[Header]:
    """Fewer ACKs saying the same: those of one push with one status and reason, for
    consecutive chunks, become one ACK of ``count`` chunks (naming the latest version).
    ``acks`` go to one peer.

    A shard that handled a burst of chunks answers them with one message instead of one
    each; the order of the merged ACKs follows their first chunk's arrival.
    """
    runs: dict[tuple[int, int, str, str], list[Header]] = {}
    for ack in acks:
        runs.setdefault((ack.worker, ack.seq, ack.status, ack.reason), []).append(ack)
    merged: list[Header] = []
    for same in runs.values():
        same.sort(key=attrgetter("chunk"))
        run = [same[0]]
        for ack in same[1:]:
            if ack.chunk != run[-1].chunk + max(run[-1].count, 1):
                merged.append(_one_ack(run))
                run = []
            run.append(ack)
        merged.append(_one_ack(run))
    return merged


def _one_ack(run: list[Header]) -> Header:
    covered = sum(max(ack.count, 1) for ack in run)
    return replace(run[0], count=covered, version=max(ack.version for ack in run))


def encode(header: Header, *arrays: np.ndarray) -> list[Any]:
    """Frames for one message: the packed header, then each array's buffer (no copy)."""
    return [pack_header(header), *(_bytes_view(a) for a in arrays)]


def _bytes_view(array: np.ndarray) -> memoryview:
    """A flat byte view of ``array`` (no copy when it is already contiguous)."""
    contiguous = np.ascontiguousarray(array)
    return contiguous.view(np.uint8).reshape(-1).data


def _array(frame: Any, dtype: np.dtype[Any], count: int, what: str) -> np.ndarray:
    buf = memoryview(frame.buffer if hasattr(frame, "buffer") else frame)
    if buf.nbytes != count * dtype.itemsize:
        raise ProtocolError(
            f"{what} frame has {buf.nbytes} bytes, header says {count} x {dtype.itemsize}"
        )
    return np.frombuffer(buf, dtype=dtype)


def decode(frames: Sequence[Any]) -> tuple[Header, list[np.ndarray]]:
    """Parse a multipart message into its header and zero-copy array views.

    ``frames`` may be ``bytes``, ``memoryview`` or ``zmq.Frame`` objects. Raises
    :class:`ProtocolError` when the framing disagrees with the header.
    """
    if not frames:
        raise ProtocolError("empty message")
    first = frames[0]
    header = unpack_header(first.bytes if hasattr(first, "bytes") else first)
    payload = frames[1:]
    if header.kind in (PUSH, PARAMS):
        dtype = VALUE_DTYPES[header.dtype]
        if header.encoding == DENSE:
            if len(payload) != 1:
                raise ProtocolError(f"dense {header.kind} needs 1 array frame, got {len(payload)}")
            return header, [_array(payload[0], dtype, header.count, "values")]
        if len(payload) != 2:
            raise ProtocolError(f"sparse {header.kind} needs 2 array frames, got {len(payload)}")
        return header, [
            _array(payload[0], INDEX_DTYPE, header.count, "indices"),
            _array(payload[1], dtype, header.count, "values"),
        ]
    if payload:
        raise ProtocolError(f"{header.kind} message carries no arrays, got {len(payload)}")
    return header, []


def chunk_bounds(count: int, bytes_per_element: int, chunk_bytes: int) -> list[tuple[int, int]]:
    """Split ``count`` elements into consecutive ``(start, stop)`` chunks of <= ``chunk_bytes``.

    Always returns at least one chunk, so that an empty update still makes one
    (empty) message and the receiver learns the sequence number was used.
    """
    if chunk_bytes < bytes_per_element:
        raise ValueError(f"chunk_bytes {chunk_bytes} is smaller than one element")
    per_chunk = chunk_bytes // bytes_per_element
    if count == 0:
        return [(0, 0)]
    return [(start, min(start + per_chunk, count)) for start in range(0, count, per_chunk)]


class Chunk(NamedTuple):
    """One message of a chunked update: ``frames`` carry ``[start, stop)`` of the arrays it
    was cut from (so whoever sent it knows what to resend if it is lost)."""

    start: int
    stop: int
    frames: list[Any]


def dense_chunks(
    template: Header, values: np.ndarray, chunk_bytes: int = DEFAULT_CHUNK_BYTES
) -> Iterator[Chunk]:
    """Chunks carrying ``values`` (one shard's range, or part of it) densely.

    ``template.offset`` is where ``values[0]`` sits in the shard's range.
    """
    bounds = chunk_bounds(values.size, values.dtype.itemsize, chunk_bytes)
    for i, (start, stop) in enumerate(bounds):
        header = replace(
            template,
            encoding=DENSE,
            dtype=dtype_name(values.dtype),
            chunk=i,
            nchunks=len(bounds),
            offset=template.offset + start,
            count=stop - start,
        )
        yield Chunk(start, stop, encode(header, values[start:stop]))


def sparse_chunks(
    template: Header,
    indices: np.ndarray,
    values: np.ndarray,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
) -> Iterator[Chunk]:
    """Chunks carrying ``values`` at ``indices`` (relative to the shard range)."""
    if indices.shape != values.shape:
        raise ValueError("indices and values must have the same length")
    indices = np.asarray(indices, INDEX_DTYPE)
    per_element = INDEX_DTYPE.itemsize + values.dtype.itemsize
    bounds = chunk_bounds(values.size, per_element, chunk_bytes)
    for i, (start, stop) in enumerate(bounds):
        header = replace(
            template,
            encoding=SPARSE,
            dtype=dtype_name(values.dtype),
            chunk=i,
            nchunks=len(bounds),
            offset=0,
            count=stop - start,
        )
        yield Chunk(start, stop, encode(header, indices[start:stop], values[start:stop]))


# glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_KEEP_FREE_BYTES = 128 << 20
_MMAP_ABOVE_BYTES = 16 << 20


@functools.cache
def keep_frame_memory() -> bool:
    """Let freed message buffers be reused instead of handed back to the OS; True if done.

    libzmq allocates every received frame on its I/O thread (``malloc`` of the frame's
    size). glibc gives the freed space of a 1 MiB frame back to the kernel as soon as a
    few MiB are free at the top of the arena, so the next frames fault their pages in
    again: a sixth of the cost of receiving a dense push, measured here. Raising the trim
    threshold (and fixing the mmap threshold above the chunk size) keeps that memory
    mapped for the next frames. Process-wide and idempotent; a no-op without glibc.
    """
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # not glibc (macOS, musl, Windows)
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(
        mallopt(_M_MMAP_THRESHOLD, _MMAP_ABOVE_BYTES)
        and mallopt(_M_TRIM_THRESHOLD, _KEEP_FREE_BYTES)
    )


def payload_bytes(frames: Sequence[Any]) -> int:
    """Bytes a message puts on the wire (header included)."""
    return sum(memoryview(f.buffer if hasattr(f, "buffer") else f).nbytes for f in frames)
