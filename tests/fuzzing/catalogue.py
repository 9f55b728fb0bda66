"""The fault catalogue: valid push chunks for a shard under fire, and the ways to break them.

Every message starts as a valid push chunk (dense or sparse, float32, float16 or
bfloat16, extreme but finite values, random sequence numbers, versions and strings,
optional fields left out) and is then broken in one to three catalogued ways
(:data:`FAULTS`): garbage or truncated frames, frame counts and lengths that disagree
with the header, header fields of the wrong type or out of range, unknown kinds,
encodings, dtypes and fields, another protocol version, layout fingerprint or shard,
negative workers, offsets and indices beyond the range, unsorted or duplicated indices,
NaN and Inf. Each fault provokes a known refusal, and the shard's core states the order
of its checks (:data:`dsgd.shard.core.CHECKS`), so the reason a message must be refused
for is known before it is sent: the fault of the earliest stage.

Choices come from a :class:`Draw`: numpy in the benchmark (:class:`RandomDraw`),
Hypothesis in the tests. :mod:`tests.fuzzing.harness` fires the messages at a shard.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

import ml_dtypes
import msgpack
import numpy as np

from dsgd import wire
from dsgd.shard.core import ANSWERED_WITH_ERROR, MAX_UPDATE_VALUE, STAGE

SIZE = 10_000  # parameters of the shard under fire
SHARD_ID = 3
FINGERPRINT = 0x5EED_F00D_CAFE_F00D
MAX_VALUES = 48  # values per generated chunk: small frames, many messages
U64 = 2**64 - 1
I64 = -(2**63)
U32 = 2**32 - 1

# answered with an ERROR, not an ACK (the core's CHECKS say which)
ERROR_REASONS = ANSWERED_WITH_ERROR
MANTISSA_BITS = {"float32": 23, "float16": 10, "bfloat16": 7}
HEADER_FIELDS = tuple(wire.Header.__dataclass_fields__)
STR_FIELDS = ("kind", "encoding", "dtype", "status", "reason", "about")
INT_FIELDS = tuple(f for f in HEADER_FIELDS if f not in STR_FIELDS)

T = TypeVar("T")


class Draw(Protocol):
    """Where the generator's choices come from: numpy here, Hypothesis in the tests."""

    def integer(self, lo: int, hi: int) -> int:
        """An integer in ``[lo, hi]``, boundaries included."""
        ...

    def choice(self, options: Sequence[T]) -> T: ...

    def raw(self, min_size: int, max_size: int) -> bytes: ...

    def text(self, min_size: int, max_size: int) -> str: ...

    def sample(self, population: int, k: int) -> list[int]:
        """``k`` distinct integers from ``range(population)``."""
        ...


class RandomDraw:
    """Choices from a seeded numpy generator, biased towards boundaries and small values."""

    def __init__(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)

    def integer(self, lo: int, hi: int) -> int:
        span = hi - lo + 1
        roll = self.rng.random()
        if roll < 0.2:  # a boundary
            return self.choice([lo, hi, min(lo + 1, hi), max(hi - 1, lo)])
        if roll < 0.6:  # log-uniform distance from a boundary: small and huge alike
            bits = int(self.rng.integers(0, span.bit_length() + 1))
            distance = self._below(min(span, 1 << bits))
            return lo + distance if self.rng.random() < 0.5 else hi - distance
        return lo + self._below(span)

    def _below(self, n: int) -> int:
        return int.from_bytes(self.rng.bytes(16), "little") % n

    def choice(self, options: Sequence[T]) -> T:
        return options[int(self.rng.integers(0, len(options)))]

    def raw(self, min_size: int, max_size: int) -> bytes:
        return self.rng.bytes(self.integer(min_size, max_size))

    def text(self, min_size: int, max_size: int) -> str:
        size = self.integer(min_size, max_size)
        kind = self.rng.random()
        if kind < 0.5:  # printable ASCII
            points = self.rng.integers(0x20, 0x7F, size)
        elif kind < 0.7:  # control characters, NUL included
            points = self.rng.integers(0, 0x20, size)
        else:  # anything but surrogates (which cannot be encoded)
            points = self.rng.integers(0, 0x10FFFF - 0x800, size)
            points = np.where(points >= 0xD800, points + 0x800, points)
        return "".join(map(chr, points.tolist()))

    def sample(self, population: int, k: int) -> list[int]:
        return [int(i) for i in self.rng.choice(population, size=k, replace=False)]


# -- messages ---------------------------------------------------------------------------------


@dataclass
class Message:
    """A push chunk under construction: header map and arrays first, then frames."""

    header: dict[str, Any]
    indices: np.ndarray | None  # sparse only; int64 so faults may exceed uint32 ranges
    values: np.ndarray
    frames: list[bytes] = field(default_factory=list)
    faults: list[str] = field(default_factory=list)
    expected: str = ""  # the rejection counter that must grow

    @classmethod
    def of_frames(cls, frames: Sequence[Any], expected: str = "") -> Message:
        """A message given as ready-made frames (bytes, memoryviews)."""
        return cls({}, None, np.zeros(0, np.float32), [bytes(f) for f in frames], [], expected)

    @property
    def count(self) -> int:
        return int(self.values.size)

    @property
    def sparse(self) -> bool:
        return self.indices is not None

    def serialize(self) -> list[bytes]:
        self.frames = [msgpack.packb(self.header, use_bin_type=True)]
        if self.indices is not None:
            self.frames.append(self.indices.astype(wire.INDEX_DTYPE).tobytes())
        self.frames.append(self.values.tobytes())
        return self.frames


def finite_values(draw: Draw, dtype_name: str, count: int) -> np.ndarray:
    """Arbitrary acceptable values: random bit patterns within the shard's bound, then a few
    extremes (the bound, subnormals)."""
    dtype = wire.VALUE_DTYPES[dtype_name]
    values = np.frombuffer(draw.raw(count * dtype.itemsize, count * dtype.itemsize), dtype).copy()
    values[~np.isfinite(values.astype(np.float32))] = 0
    info = ml_dtypes.finfo(dtype)
    biggest = min(float(info.max), MAX_UPDATE_VALUE)  # beyond it a shard refuses the push
    values[np.abs(values.astype(np.float32)) > biggest] = 0
    extremes = [biggest, -biggest, info.smallest_subnormal, -info.smallest_subnormal]
    extremes += [info.tiny, -0.0, 0.0]
    for _ in range(draw.integer(0, min(count, 3))):
        values[draw.integer(0, count - 1)] = draw.choice(extremes)
    return values


def base_message(draw: Draw) -> Message:
    """A valid push chunk for the shard under fire (the tests check that it is accepted)."""
    sparse = draw.choice([False, True])
    dtype = draw.choice(sorted(wire.VALUE_DTYPES))
    count = draw.integer(1, MAX_VALUES)
    indices = np.array(sorted(draw.sample(SIZE, count)), np.int64) if sparse else None
    nchunks = draw.integer(1, U64)
    header: dict[str, Any] = {
        "kind": wire.PUSH,
        "fingerprint": FINGERPRINT,
        "shard": SHARD_ID,
        "worker": draw.integer(0, U64),
        "seq": draw.integer(I64, U64),
        "chunk": draw.integer(0, nchunks - 1),
        "nchunks": nchunks,
        "base_version": draw.integer(0, 2**63 - 1),
        "version": draw.integer(I64, U64),
        "incarnation": draw.integer(I64, U64),
        "offset": 0 if sparse else draw.integer(0, SIZE - count),
        "count": count,
        "encoding": wire.SPARSE if sparse else wire.DENSE,
        "dtype": dtype,
        "status": draw.text(0, 40),
        "reason": draw.text(0, 40),
        "about": draw.text(0, 40),
        "protocol": wire.PROTOCOL_VERSION,
    }
    # fields whose defaults are valid may be left out
    optional = [("seq",), ("chunk", "nchunks"), ("base_version",), ("version",)]
    optional += [("incarnation",), ("status",), ("reason",), ("about",), ("protocol",)]
    if header["offset"] == 0:
        optional.append(("offset",))
    if not sparse:
        optional.append(("encoding",))
    if dtype == "float32":
        optional.append(("dtype",))
    for group in optional:
        if draw.integer(0, 3) == 0:
            for name in group:
                del header[name]
    if draw.choice([False, True]):
        header = dict(reversed(header.items()))
    return Message(header, indices, finite_values(draw, dtype, count))


# -- the fault catalogue ----------------------------------------------------------------------

EVERYTHING = "*"  # a fault that replaces the whole header frame or message


@dataclass(frozen=True)
class Fault:
    """One way to break a message, and the rejection it must provoke."""

    name: str
    reason: str
    touches: frozenset[str]  # header fields or parts it writes; two faults never share one
    phase: int  # 0: arrays, 1: header fields, 2: frames (after serialising)
    apply: Callable[[Message, Draw], None]
    applies: Callable[[Message], bool] = lambda message: True

    @property
    def rank(self) -> int:
        """The stage of the core's check this fault trips (dsgd.shard.core.CHECKS)."""
        return STAGE[self.reason]


def _int_other_than(draw: Draw, avoid: int, lo: int = I64, hi: int = U64) -> int:
    value = draw.integer(lo, hi)
    return value if value != avoid else (value + 1 if value < hi else value - 1)


def _text_not_in(draw: Draw, avoid: Sequence[str], palette: Sequence[str]) -> str:
    value = draw.choice([*palette, draw.text(0, 30)])
    return value if value not in avoid else value + "\x00"


WRONG_FOR_INT: list[Any] = [1.5, float("nan"), -0.0, 2.0**70, True, False, None, "7", "", b"\x07"]
WRONG_FOR_INT += [[1], {"a": 1}, msgpack.ExtType(1, b"x")]
WRONG_FOR_STR: list[Any] = [1, -1, 0, 2**64 - 1, 1.0, None, True, b"push", ["push"], {"k": "v"}]
WRONG_FOR_STR += [msgpack.ExtType(5, b"push")]


def _set(name: str, make: Callable[[Message, Draw], Any]) -> Callable[[Message, Draw], None]:
    def apply(message: Message, draw: Draw) -> None:
        message.header[name] = make(message, draw)

    return apply


def _delete(*names: str) -> Callable[[Message, Draw], None]:
    def apply(message: Message, draw: Draw) -> None:
        for name in names:
            message.header.pop(name, None)

    return apply


def _header_fault(name: str, touches: Sequence[str], apply: Any, **kw: Any) -> Fault:
    return Fault(name, kw.pop("reason", "malformed"), frozenset(touches), 1, apply, **kw)


def _header_faults() -> list[Fault]:
    faults = [
        _header_fault(
            f"wrong_type:{name}", [name], _set(name, lambda m, d: d.choice(WRONG_FOR_INT))
        )
        for name in INT_FIELDS
    ]
    for name in STR_FIELDS:
        wrong = _set(name, lambda m, d: d.choice(WRONG_FOR_STR))
        faults.append(_header_fault(f"wrong_type:{name}", [name], wrong))
        too_long = _set(name, lambda m, d: d.text(257, 600))
        faults.append(_header_fault(f"long_string:{name}", [name], too_long))
    faults += [
        _header_fault(f"missing:{name}", [name], _delete(name))
        for name in ("kind", "fingerprint", "shard")
    ]
    faults += [
        _header_fault("missing:count", ["count"], _delete("count")),
        _header_fault(
            "unknown_field",
            ["+extra"],
            _set_unknown_field,
        ),
        _header_fault(
            "protocol",
            ["protocol"],
            _set("protocol", lambda m, d: _int_other_than(d, wire.PROTOCOL_VERSION)),
        ),
        _header_fault(
            "kind:unknown",
            ["kind"],
            _set("kind", lambda m, d: _text_not_in(d, wire.KINDS, ["PUSH", "push\x00", ""])),
        ),
        _header_fault(
            "kind:without_arrays",
            ["kind"],
            _set("kind", lambda m, d: d.choice([wire.FETCH, wire.ACK, wire.VERSION, wire.ERROR])),
        ),
        _header_fault(
            "encoding:unknown",
            ["encoding"],
            _set("encoding", lambda m, d: _text_not_in(d, wire.ENCODINGS, ["DENSE", "rle", ""])),
        ),
        _header_fault(
            "encoding:swapped",
            ["encoding"],
            _set("encoding", lambda m, d: wire.DENSE if m.sparse else wire.SPARSE),
        ),
        _header_fault(
            "dtype:unknown",
            ["dtype"],
            _set(
                "dtype",
                lambda m, d: _text_not_in(
                    d, list(wire.VALUE_DTYPES), ["float64", "int8", "<f4", "FLOAT32", ""]
                ),
            ),
        ),
        _header_fault("dtype:other_width", ["dtype"], _set("dtype", _other_width_dtype)),
        _header_fault(
            "count:mismatch",
            ["count"],
            _set("count", lambda m, d: _int_other_than(d, m.count)),
        ),
        _header_fault("chunk:numbering", ["chunk", "nchunks"], _break_chunk_numbering),
        _header_fault(
            "offset:negative", ["offset"], _set("offset", lambda m, d: d.integer(I64, -1))
        ),
        _header_fault(
            "fingerprint:other",
            ["fingerprint"],
            _set("fingerprint", lambda m, d: _int_other_than(d, FINGERPRINT)),
            reason="layout",
        ),
        _header_fault(
            "shard:other",
            ["shard"],
            _set("shard", lambda m, d: _int_other_than(d, SHARD_ID)),
            reason="layout",
        ),
        _header_fault(
            "kind:params", ["kind"], _set("kind", lambda m, d: wire.PARAMS), reason="kind"
        ),
        _header_fault(
            "worker:negative",
            ["worker"],
            _set("worker", lambda m, d: d.integer(I64, -1)),
            reason="worker",
        ),
        _header_fault("worker:missing", ["worker"], _delete("worker"), reason="worker"),
        _header_fault(
            "dense:beyond_range",
            ["offset"],
            _set("offset", lambda m, d: d.integer(SIZE - m.count + 1, U64)),
            reason="range",
            applies=lambda m: not m.sparse,
        ),
    ]
    return faults


def _set_unknown_field(message: Message, draw: Draw) -> None:
    palette = ["Kind", "kind ", "extra", "__class__", "", "protocol_version", "offset\x00"]
    key = _text_not_in(draw, HEADER_FIELDS, palette)
    message.header[key] = draw.choice([0, "x", None, [1, 2], 1.5])


def _other_width_dtype(message: Message, draw: Draw) -> str:
    width = wire.VALUE_DTYPES[message.header.get("dtype", "float32")].itemsize
    return draw.choice([n for n, t in sorted(wire.VALUE_DTYPES.items()) if t.itemsize != width])


def _break_chunk_numbering(message: Message, draw: Draw) -> None:
    header = message.header
    way = draw.integer(0, 2)
    if way == 0:
        header["chunk"] = draw.integer(I64, -1)
    elif way == 1:
        nchunks = draw.integer(1, 2**63)
        header["nchunks"], header["chunk"] = nchunks, draw.integer(nchunks, U64)
    else:
        header["nchunks"], header["chunk"] = draw.integer(I64, 0), 0


# -- array faults (phase 0) ---


def _beyond(draw: Draw) -> int:
    return draw.integer(SIZE, U32)


def _last_beyond(message: Message, draw: Draw) -> None:
    assert message.indices is not None
    message.indices[-1] = _beyond(draw)


def _inner_beyond(message: Message, draw: Draw) -> None:
    assert message.indices is not None
    message.indices[draw.integer(0, message.count - 2)] = _beyond(draw)


def _unsorted(message: Message, draw: Draw) -> None:
    assert message.indices is not None
    i = draw.integer(0, message.count - 2)
    j = draw.integer(i + 1, message.count - 1)
    message.indices[[i, j]] = message.indices[[j, i]]


def _duplicate(message: Message, draw: Draw) -> None:
    assert message.indices is not None
    j = draw.integer(1, message.count - 1)
    message.indices[j] = message.indices[j - 1]


def _nonfinite(message: Message, draw: Draw) -> None:
    """NaN (any payload, either sign) or +-Inf, written as raw bits of the wire dtype."""
    nmant = MANTISSA_BITS[wire.dtype_name(message.values.dtype)]
    bits = message.values.dtype.itemsize * 8
    exponent = ((1 << (bits - 1)) - 1) ^ ((1 << nmant) - 1)
    as_uint = message.values.view(f"<u{bits // 8}")
    for _ in range(draw.integer(1, min(message.count, 4))):
        mantissa = draw.choice([0, 1, 1 << (nmant - 1), draw.integer(0, (1 << nmant) - 1)])
        sign = draw.integer(0, 1) << (bits - 1)
        as_uint[draw.integer(0, message.count - 1)] = sign | exponent | mantissa


def _array_faults() -> list[Fault]:
    def sparse(least: int) -> Callable[[Message], bool]:
        return lambda m: m.sparse and m.count >= least

    return [
        Fault(
            "sparse:last_beyond_range", "range", frozenset({"indices"}), 0, _last_beyond, sparse(1)
        ),
        Fault(
            "sparse:inner_beyond_range",
            "order",
            frozenset({"indices"}),
            0,
            _inner_beyond,
            sparse(2),
        ),
        Fault("sparse:unsorted", "order", frozenset({"indices"}), 0, _unsorted, sparse(2)),
        Fault("sparse:duplicate", "order", frozenset({"indices"}), 0, _duplicate, sparse(2)),
        Fault("values:nonfinite", "nonfinite", frozenset({"values"}), 0, _nonfinite),
    ]


# -- frame faults (phase 2) ---


def not_a_header(data: bytes) -> bytes:
    """``data``, made certain not to decode as a msgpack map (0xc1 is never valid msgpack)."""
    try:
        decoded = msgpack.unpackb(data, raw=False, strict_map_key=True)
    except Exception:  # anything msgpack refuses is fine as it is
        return data
    return b"\xc1" + data if isinstance(decoded, dict) else data


def _random_message(message: Message, draw: Draw) -> None:
    frames = [draw.raw(0, 300) for _ in range(draw.integer(1, 6))]
    frames[0] = not_a_header(frames[0])
    message.frames = frames


def _replace_header(make: Callable[[Message, Draw], bytes]) -> Callable[[Message, Draw], None]:
    def apply(message: Message, draw: Draw) -> None:
        message.frames[0] = make(message, draw)

    return apply


def _non_map(message: Message, draw: Draw) -> bytes:
    value = draw.choice(
        [
            0,
            -1,
            2**64 - 1,
            1.5,
            None,
            True,
            "push",
            b"\x00" * 8,
            [message.header],
            [1, [2, [3]]],
            msgpack.ExtType(1, b"x"),
            list(message.header.items()),
        ]
    )
    return msgpack.packb(value, use_bin_type=True)


def _odd_map(message: Message, draw: Draw) -> bytes:
    """A map msgpack parses but a header cannot be: non-string keys, 65+ entries, nesting."""
    way = draw.integer(0, 4)
    if way == 0:  # integer keys (strict_map_key refuses them)
        return msgpack.packb({1: "push", 2: FINGERPRINT})
    if way == 1:  # bytes keys
        return msgpack.packb({k.encode(): v for k, v in message.header.items()}, use_bin_type=True)
    if way == 2:  # more entries than a header has fields
        return msgpack.packb({f"f{i}": i for i in range(draw.integer(65, 300))})
    if way == 3:  # the header nested inside itself
        return msgpack.packb({"kind": message.header}, use_bin_type=True)
    # a key given twice: the later (garbage) value wins
    items = [*message.header.items(), ("kind", draw.text(0, 8) + "?")]
    body = b"".join(msgpack.packb(k) + msgpack.packb(v, use_bin_type=True) for k, v in items)
    return b"\xde" + len(items).to_bytes(2, "big") + body


def _deep(message: Message, draw: Draw) -> bytes:
    """Arrays nested thousands deep (within the header size limit)."""
    depth = draw.integer(500, 4000)
    return b"\x91" * depth + b"\xc0"


def _oversized(message: Message, draw: Draw) -> bytes:
    padded = dict(message.header, about="x" * draw.integer(wire.MAX_HEADER_BYTES, 20_000))
    return msgpack.packb(padded)


def _frame_count(message: Message, draw: Draw) -> None:
    payload = len(message.frames) - 1
    if payload and draw.choice([False, True]):
        del message.frames[1 + draw.integer(0, payload - 1) :]
    else:
        message.frames += [draw.raw(0, 64) for _ in range(draw.integer(1, 4))]


def _frame_length(message: Message, draw: Draw) -> None:
    i = draw.integer(1, len(message.frames) - 1)
    frame = message.frames[i]
    delta = draw.choice([-len(frame), -1, 1, draw.integer(-len(frame), 64)]) or 1
    message.frames[i] = frame[:delta] if delta < 0 else frame + draw.raw(delta, delta)


def _frame_faults() -> list[Fault]:
    every = frozenset({EVERYTHING})
    header = frozenset({"header_frame"})
    payload = frozenset({"payload_frames"})

    def prefix(m: Message, d: Draw) -> bytes:
        return m.frames[0][: d.integer(0, len(m.frames[0]) - 1)]

    def trailing(m: Message, d: Draw) -> bytes:
        return m.frames[0] + d.raw(1, 16)

    def garbage(m: Message, d: Draw) -> bytes:
        return not_a_header(d.raw(0, 200))

    return [
        Fault("message:random_frames", "malformed", every, 2, _random_message),
        Fault("header:random_bytes", "malformed", header, 2, _replace_header(garbage)),
        Fault("header:not_a_map", "malformed", header, 2, _replace_header(_non_map)),
        Fault("header:odd_map", "malformed", header, 2, _replace_header(_odd_map)),
        Fault("header:truncated", "malformed", header, 2, _replace_header(prefix)),
        Fault("header:trailing_bytes", "malformed", header, 2, _replace_header(trailing)),
        Fault("header:deeply_nested", "malformed", header, 2, _replace_header(_deep)),
        Fault("header:oversized", "malformed", header, 2, _replace_header(_oversized)),
        Fault("frames:count", "malformed", payload, 2, _frame_count),
        Fault("frames:length", "malformed", payload, 2, _frame_length),
    ]


FAULTS: tuple[Fault, ...] = (*_array_faults(), *_header_faults(), *_frame_faults())


def _compatible(fault: Fault, chosen: list[Fault]) -> bool:
    if any(EVERYTHING in f.touches for f in chosen) or (chosen and EVERYTHING in fault.touches):
        return False
    return all(f.rank != fault.rank and not (f.touches & fault.touches) for f in chosen)


def malformed_message(draw: Draw, max_faults: int = 3) -> Message:
    """A valid push broken in 1..``max_faults`` ways; ``expected`` is the reason to refuse it.

    Faults of one message come from different stages of the shard's checks and write
    different fields, so none undoes another and the earliest stage decides the reason.
    """
    message = base_message(draw)
    chosen: list[Fault] = []
    for _ in range(draw.integer(1, max_faults)):
        candidates = [f for f in FAULTS if f.applies(message) and _compatible(f, chosen)]
        if not candidates:
            break
        rank = draw.choice(sorted({f.rank for f in candidates}))  # stages equally often
        chosen.append(draw.choice([f for f in candidates if f.rank == rank]))
    for fault in sorted(chosen, key=lambda f: f.phase):
        if fault.phase == 2 and not message.frames:
            message.serialize()
        fault.apply(message, draw)
    if not message.frames:
        message.serialize()
    message.faults = [f.name for f in chosen]
    message.expected = min(chosen, key=lambda f: f.rank).reason
    return message
