"""The data-plane wire format: round trips, chunking and rejection of malformed messages.

The encoding is pure (bytes and arrays in, bytes and arrays out), so everything here
runs without a socket. Values are drawn as raw bit patterns, so NaN payloads, signed
zeros, infinities and subnormals all have to survive the trip bit for bit.
"""

from __future__ import annotations

from dataclasses import asdict, replace
from typing import Any

import hypothesis.extra.numpy as hnp
import msgpack
import numpy as np
import pytest
import zmq
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from dsgd.errors import ProtocolError
from dsgd.wire import (
    ACK,
    DEFAULT_CHUNK_BYTES,
    DENSE,
    ERROR,
    FETCH,
    INDEX_DTYPE,
    KINDS,
    MAX_HEADER_BYTES,
    PARAMS,
    PROTOCOL_VERSION,
    PUSH,
    SPARSE,
    VALUE_DTYPES,
    VERSION,
    Header,
    acked_chunks,
    chunk_bounds,
    decode,
    dense_chunks,
    dtype_name,
    encode,
    merge_acks,
    pack_header,
    payload_bytes,
    sparse_chunks,
    unpack_header,
)

DTYPE_NAMES = sorted(VALUE_DTYPES)
FINGERPRINT = 0x5EED_F00D_CAFE  # any layout fingerprint; the wire does not interpret it

# Deadlines are off: the suite runs on slow, noisy machines and measures behaviour only.
PROPERTY = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _messages(chunks: Any) -> list[list[Any]]:
    """The frames of each chunk (what goes on the wire)."""
    return [chunk.frames for chunk in chunks]


def _bits_dtype(dtype: np.dtype[Any]) -> np.dtype[Any]:
    return np.dtype(np.uint32 if dtype.itemsize == 4 else np.uint16)


def _bits(array: np.ndarray) -> np.ndarray:
    """The raw bit patterns of a float array (so NaN == NaN when comparing)."""
    return np.ascontiguousarray(array).view(_bits_dtype(array.dtype))


def _values(draw: st.DrawFn, name: str, size: st.SearchStrategy[int]) -> np.ndarray:
    """A 1-D array of ``name`` values with arbitrary bit patterns."""
    dtype = VALUE_DTYPES[name]
    raw = draw(hnp.arrays(_bits_dtype(dtype), draw(size)))
    return raw.view(dtype)


def _template(kind: str = PUSH, **changes: Any) -> Header:
    base = Header(
        kind=kind,
        fingerprint=FINGERPRINT,
        shard=3,
        worker=7,
        seq=11,
        base_version=5,
        version=9,
        incarnation=2,
    )
    return replace(base, **changes)


def _as_bytes(frames: list[Any]) -> list[bytes]:
    """What a receiver gets from a copying ``recv_multipart``."""
    return [bytes(f) for f in frames]


# ---------------------------------------------------------------------------
# chunk_bounds


@PROPERTY
@given(
    count=st.integers(0, 5000),
    bytes_per_element=st.sampled_from([2, 4, 6, 8]),
    chunk_bytes=st.integers(1, 512),
)
def test_chunk_bounds_cover_the_range_once_within_the_byte_budget(
    count: int, bytes_per_element: int, chunk_bytes: int
) -> None:
    if chunk_bytes < bytes_per_element:
        with pytest.raises(ValueError, match="smaller than one element"):
            chunk_bounds(count, bytes_per_element, chunk_bytes)
        return
    bounds = chunk_bounds(count, bytes_per_element, chunk_bytes)
    per_chunk = chunk_bytes // bytes_per_element
    if count == 0:
        assert bounds == [(0, 0)]
        return
    assert bounds[0][0] == 0
    assert bounds[-1][1] == count
    for (_, stop), (start, _) in zip(bounds, bounds[1:], strict=False):
        assert stop == start  # consecutive: no gap, no overlap
    for start, stop in bounds:
        assert 0 < stop - start <= per_chunk
        assert (stop - start) * bytes_per_element <= chunk_bytes
    # every chunk but the last is full, so the number of chunks is minimal
    assert all(stop - start == per_chunk for start, stop in bounds[:-1])
    assert len(bounds) == -(-count // per_chunk)


def test_chunk_bounds_at_exactly_the_chunk_size() -> None:
    assert chunk_bounds(256, 4, 1024) == [(0, 256)]
    assert chunk_bounds(257, 4, 1024) == [(0, 256), (256, 257)]
    assert chunk_bounds(512, 4, 1024) == [(0, 256), (256, 512)]
    assert chunk_bounds(1, 4, 4) == [(0, 1)]
    assert chunk_bounds(0, 4, 4) == [(0, 0)]


# ---------------------------------------------------------------------------
# round trips


@st.composite
def dense_cases(draw: st.DrawFn) -> tuple[Header, np.ndarray, int]:
    name = draw(st.sampled_from(DTYPE_NAMES))
    values = _values(draw, name, st.integers(0, 300))
    itemsize = VALUE_DTYPES[name].itemsize
    # budgets that are exact multiples of the element size and ones that are not
    chunk_bytes = draw(st.integers(1, 40)) * itemsize + draw(st.integers(0, itemsize - 1))
    template = _template(
        kind=draw(st.sampled_from([PUSH, PARAMS])),
        offset=draw(st.integers(0, 2**40)),
        seq=draw(st.integers(0, 2**63 - 1)),
    )
    return template, values, chunk_bytes


@PROPERTY
@given(case=dense_cases(), as_bytes=st.booleans())
def test_dense_round_trip(case: tuple[Header, np.ndarray, int], as_bytes: bool) -> None:
    template, values, chunk_bytes = case
    name = dtype_name(values.dtype)
    bounds = chunk_bounds(values.size, values.dtype.itemsize, chunk_bytes)
    messages = _messages(dense_chunks(template, values, chunk_bytes))
    assert len(messages) == len(bounds)

    received = []
    next_offset = template.offset
    for i, (frames, (start, stop)) in enumerate(zip(messages, bounds, strict=True)):
        assert len(frames) == 2
        assert memoryview(frames[1]).nbytes <= chunk_bytes
        header, arrays = decode(_as_bytes(frames) if as_bytes else frames)
        assert header == replace(
            template,
            encoding=DENSE,
            dtype=name,
            chunk=i,
            nchunks=len(bounds),
            offset=template.offset + start,
            count=stop - start,
        )
        assert header.offset == next_offset  # chunks tile the range in order
        next_offset += header.count
        (chunk_values,) = arrays
        assert chunk_values.dtype == values.dtype
        assert chunk_values.shape == (header.count,)
        received.append(chunk_values)
    assert next_offset == template.offset + values.size
    np.testing.assert_array_equal(_bits(np.concatenate(received)), _bits(values))


@st.composite
def sparse_cases(draw: st.DrawFn) -> tuple[Header, np.ndarray, np.ndarray, int]:
    name = draw(st.sampled_from(DTYPE_NAMES))
    values = _values(draw, name, st.integers(0, 200))
    indices = draw(hnp.arrays(np.uint32, values.size))
    per_element = INDEX_DTYPE.itemsize + VALUE_DTYPES[name].itemsize
    chunk_bytes = draw(st.integers(1, 30)) * per_element + draw(st.integers(0, per_element - 1))
    template = _template(kind=draw(st.sampled_from([PUSH, PARAMS])))
    return template, indices, values, chunk_bytes


@PROPERTY
@given(case=sparse_cases(), as_bytes=st.booleans())
def test_sparse_round_trip(
    case: tuple[Header, np.ndarray, np.ndarray, int], as_bytes: bool
) -> None:
    template, indices, values, chunk_bytes = case
    name = dtype_name(values.dtype)
    per_element = INDEX_DTYPE.itemsize + values.dtype.itemsize
    bounds = chunk_bounds(values.size, per_element, chunk_bytes)
    messages = _messages(sparse_chunks(template, indices, values, chunk_bytes))
    assert len(messages) == len(bounds)

    got_indices, got_values = [], []
    for i, (frames, (start, stop)) in enumerate(zip(messages, bounds, strict=True)):
        assert len(frames) == 3
        assert payload_bytes(frames[1:]) <= chunk_bytes
        header, arrays = decode(_as_bytes(frames) if as_bytes else frames)
        assert header == replace(
            template,
            encoding=SPARSE,
            dtype=name,
            chunk=i,
            nchunks=len(bounds),
            offset=0,
            count=stop - start,
        )
        chunk_indices, chunk_values = arrays
        assert chunk_indices.dtype == INDEX_DTYPE
        assert chunk_values.dtype == values.dtype
        assert chunk_indices.shape == chunk_values.shape == (header.count,)
        got_indices.append(chunk_indices)
        got_values.append(chunk_values)
    np.testing.assert_array_equal(np.concatenate(got_indices), indices)
    np.testing.assert_array_equal(_bits(np.concatenate(got_values)), _bits(values))


def test_sparse_chunks_accept_any_integer_index_array() -> None:
    indices = np.array([0, 5, 70000], np.int64)
    values = np.array([1.0, -2.0, 3.5], np.float32)
    (frames,) = _messages(sparse_chunks(_template(), indices, values))
    _, (got_indices, got_values) = decode(frames)
    assert got_indices.dtype == INDEX_DTYPE
    np.testing.assert_array_equal(got_indices, [0, 5, 70000])
    np.testing.assert_array_equal(got_values, values)


@pytest.mark.parametrize("name", DTYPE_NAMES)
def test_empty_dense_update_is_one_empty_message(name: str) -> None:
    values = np.empty(0, VALUE_DTYPES[name])
    messages = _messages(dense_chunks(_template(offset=17), values))
    assert len(messages) == 1
    header, (got,) = decode(messages[0])
    assert (header.chunk, header.nchunks, header.count, header.offset) == (0, 1, 0, 17)
    assert header.dtype == name
    assert got.dtype == values.dtype
    assert got.size == 0


@pytest.mark.parametrize("name", DTYPE_NAMES)
def test_empty_sparse_update_is_one_empty_message(name: str) -> None:
    indices = np.empty(0, np.uint32)
    values = np.empty(0, VALUE_DTYPES[name])
    messages = _messages(sparse_chunks(_template(seq=42), indices, values))
    assert len(messages) == 1
    header, (got_indices, got_values) = decode(_as_bytes(messages[0]))
    assert (header.chunk, header.nchunks, header.count, header.seq) == (0, 1, 0, 42)
    assert header.encoding == SPARSE
    assert got_indices.size == got_values.size == 0
    assert got_values.dtype == values.dtype


@pytest.mark.parametrize("name", DTYPE_NAMES)
def test_dense_chunk_boundary_at_one_mebibyte(name: str) -> None:
    dtype = VALUE_DTYPES[name]
    fits = DEFAULT_CHUNK_BYTES // dtype.itemsize
    assert fits * dtype.itemsize == DEFAULT_CHUNK_BYTES

    values = (np.arange(fits + 1) % 2000).astype(dtype)  # exactly representable in all
    (exact,) = _messages(dense_chunks(_template(), values[:fits]))
    assert memoryview(exact[1]).nbytes == DEFAULT_CHUNK_BYTES
    header, (got,) = decode(exact)
    assert (header.nchunks, header.count) == (1, fits)
    np.testing.assert_array_equal(_bits(got), _bits(values[:fits]))

    first, second = _messages(dense_chunks(_template(offset=3), values))
    h1, (v1,) = decode(first)
    h2, (v2,) = decode(second)
    assert (h1.chunk, h1.nchunks, h1.offset, h1.count) == (0, 2, 3, fits)
    assert (h2.chunk, h2.nchunks, h2.offset, h2.count) == (1, 2, 3 + fits, 1)
    assert memoryview(first[1]).nbytes == DEFAULT_CHUNK_BYTES
    np.testing.assert_array_equal(_bits(np.concatenate([v1, v2])), _bits(values))


@pytest.mark.parametrize("name", DTYPE_NAMES)
def test_sparse_chunk_boundary_at_exactly_the_chunk_size(name: str) -> None:
    per_element = INDEX_DTYPE.itemsize + VALUE_DTYPES[name].itemsize
    # the largest budget <= 1 MiB that is a whole number of (index, value) pairs
    fits = DEFAULT_CHUNK_BYTES // per_element
    chunk_bytes = fits * per_element
    indices = np.arange(fits + 1, dtype=np.uint32)
    values = np.ones(fits + 1, VALUE_DTYPES[name])

    (exact,) = _messages(sparse_chunks(_template(), indices[:fits], values[:fits], chunk_bytes))
    assert payload_bytes(exact[1:]) == chunk_bytes
    assert decode(exact)[0].count == fits

    first, second = _messages(sparse_chunks(_template(), indices, values, chunk_bytes))
    h1, (i1, _) = decode(first)
    h2, (i2, _) = decode(second)
    assert (h1.chunk, h1.nchunks, h1.count) == (0, 2, fits)
    assert (h2.chunk, h2.nchunks, h2.count) == (1, 2, 1)
    np.testing.assert_array_equal(np.concatenate([i1, i2]), indices)


def test_float32_sparse_boundary_at_one_mebibyte() -> None:
    fits = DEFAULT_CHUNK_BYTES // 8  # uint32 index + float32 value
    indices = np.arange(fits + 1, dtype=np.uint32)
    values = np.zeros(fits + 1, np.float32)
    assert len(_messages(sparse_chunks(_template(), indices[:fits], values[:fits]))) == 1
    assert len(_messages(sparse_chunks(_template(), indices, values))) == 2


def test_dense_encoding_is_zero_copy_for_contiguous_values() -> None:
    values = np.arange(1000, dtype=np.float32)
    (frames,) = _messages(dense_chunks(_template(), values))
    _, (got,) = decode(frames)
    assert np.shares_memory(got, values)


def test_non_contiguous_values_are_encoded_correctly() -> None:
    base = np.arange(40, dtype=np.float32)
    strided = base[::3]
    (frames,) = _messages(dense_chunks(_template(), strided))
    _, (got,) = decode(_as_bytes(frames))
    np.testing.assert_array_equal(got, strided)


@pytest.mark.parametrize("kind", [ACK, FETCH, VERSION, ERROR])
def test_messages_without_arrays_round_trip(kind: str) -> None:
    header = _template(kind=kind, status="stale" if kind == ERROR else "", version=2**40)
    frames = encode(header)
    assert len(frames) == 1
    assert decode(frames) == (header, [])


def test_decode_accepts_zmq_frames() -> None:
    values = np.linspace(-1, 1, 33, dtype=np.float32)
    indices = np.arange(33, dtype=np.uint32) * 3
    (frames,) = _messages(sparse_chunks(_template(), indices, values))
    zmq_frames = [zmq.Frame(bytes(f)) for f in frames]
    header, (got_indices, got_values) = decode(zmq_frames)
    assert header.count == 33
    np.testing.assert_array_equal(got_indices, indices)
    np.testing.assert_array_equal(got_values, values)


def test_header_defaults_fill_in_missing_optional_fields() -> None:
    frame = msgpack.packb({"kind": ACK, "fingerprint": 1, "shard": 0})
    assert unpack_header(frame) == Header(kind=ACK, fingerprint=1, shard=0)


@pytest.mark.parametrize("value", [-(2**63), 2**63 - 1, 2**64 - 1])
def test_header_integers_span_the_msgpack_range(value: int) -> None:
    header = _template(kind=VERSION, fingerprint=value, version=value)
    assert unpack_header(pack_header(header)) == header


def test_header_strings_up_to_the_limit_are_accepted() -> None:
    header = _template(kind=ERROR, status="x" * 256)
    assert unpack_header(pack_header(header)).status == "x" * 256


def test_dtype_name_rejects_types_that_cannot_travel() -> None:
    for name, dtype in VALUE_DTYPES.items():
        assert dtype_name(dtype) == name
    for bad in (np.float64, np.int32, np.uint16, ">f4"):
        with pytest.raises(ValueError, match="cannot travel"):
            dtype_name(np.dtype(bad))


def test_dense_chunks_reject_values_that_cannot_travel() -> None:
    with pytest.raises(ValueError, match="cannot travel"):
        _messages(dense_chunks(_template(), np.zeros(3, np.float64)))


def test_sparse_chunks_reject_mismatched_lengths() -> None:
    with pytest.raises(ValueError, match="same length"):
        _messages(
            sparse_chunks(_template(), np.arange(3, dtype=np.uint32), np.zeros(2, np.float32))
        )


def test_payload_bytes_counts_every_frame() -> None:
    values = np.zeros(10, np.float32)
    frames = encode(_template(count=10), values)
    assert payload_bytes(frames) == len(frames[0]) + 40
    assert payload_bytes(_as_bytes(frames)) == payload_bytes(frames)
    assert payload_bytes([zmq.Frame(bytes(f)) for f in frames]) == payload_bytes(frames)


# ---------------------------------------------------------------------------
# rejection of malformed messages


def _raw_header(**changes: Any) -> dict[str, Any]:
    raw = asdict(_template(kind=PUSH, count=2))
    raw.update(changes)
    return raw


def _dense_push(raw: dict[str, Any], *payload: bytes) -> list[bytes]:
    if not payload:
        payload = (np.zeros(2, np.float32).tobytes(),)
    return [msgpack.packb(raw, use_bin_type=True), *payload]


def test_the_reference_message_is_valid() -> None:
    header, (values,) = decode(_dense_push(_raw_header()))
    assert header.count == 2
    assert values.tolist() == [0.0, 0.0]


@pytest.mark.parametrize(
    "frame",
    [
        b"",
        b"\xc1",  # a byte msgpack never uses
        b"\x85\xa4kind",  # a map that ends early
        b"\xdf\xff\xff\xff\xff",  # a map that claims 4 billion entries
        b"\x81\xa4kind\xa4push\x00",  # trailing bytes after the header
        b"\x81\xa4kind\xa2\xff\xfe",  # invalid UTF-8 in a string
        b"\xff" * 64,
    ],
    ids=["empty", "reserved", "truncated", "huge-map", "extra", "bad-utf8", "ff"],
)
def test_decode_rejects_garbage_header_bytes(frame: bytes) -> None:
    with pytest.raises(ProtocolError):
        decode([frame, b""])


@pytest.mark.parametrize("value", [[1, 2], 5, "push", None, b"\x00", 1.5, True])
def test_decode_rejects_a_header_that_is_not_a_map(value: Any) -> None:
    with pytest.raises(ProtocolError, match="not a msgpack map"):
        decode([msgpack.packb(value, use_bin_type=True)])


@pytest.mark.parametrize("key", ["extra", "Kind", "", b"kind"])
def test_decode_rejects_unknown_fields(key: Any) -> None:
    raw: dict[Any, Any] = _raw_header()
    if key == b"kind":
        raw[key] = raw.pop("kind")  # the right name, but as bytes
    else:
        raw[key] = 1
    with pytest.raises(ProtocolError, match="unknown header field"):
        decode(_dense_push(raw))


def test_decode_rejects_non_string_map_keys() -> None:
    frame = msgpack.packb({1: 2}, use_bin_type=True)
    with pytest.raises(ProtocolError):
        decode([frame])


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("kind", 5),
        ("kind", b"push"),
        ("kind", None),
        ("shard", "0"),
        ("shard", 1.0),
        ("shard", True),
        ("fingerprint", None),
        ("fingerprint", [1]),
        ("count", {"n": 2}),
        ("seq", 2.5),
        ("status", "x" * 257),
        ("dtype", 4),
        ("protocol", "1"),
    ],
)
def test_decode_rejects_wrong_field_types(field: str, value: Any) -> None:
    with pytest.raises(ProtocolError, match=repr(field)):
        decode(_dense_push(_raw_header(**{field: value})))


@pytest.mark.parametrize("missing", ["kind", "fingerprint", "shard"])
def test_decode_rejects_a_header_without_required_fields(missing: str) -> None:
    raw = _raw_header()
    del raw[missing]
    with pytest.raises(ProtocolError, match="lacks"):
        decode(_dense_push(raw))


@pytest.mark.parametrize("protocol", [0, PROTOCOL_VERSION + 1, -1, 2**40])
def test_decode_rejects_other_protocol_versions(protocol: int) -> None:
    with pytest.raises(ProtocolError, match="protocol version"):
        decode(_dense_push(_raw_header(protocol=protocol)))


@pytest.mark.parametrize(
    ("field", "value", "match"),
    [
        ("kind", "pull", "unknown message kind"),
        ("kind", "", "unknown message kind"),
        ("kind", "PUSH", "unknown message kind"),
        ("encoding", "rle", "unknown encoding"),
        ("encoding", "", "unknown encoding"),
        ("dtype", "float64", "unknown value dtype"),
        ("dtype", "int8", "unknown value dtype"),
        ("dtype", "<f4", "unknown value dtype"),
    ],
)
def test_decode_rejects_unknown_kind_encoding_and_dtype(field: str, value: str, match: str) -> None:
    with pytest.raises(ProtocolError, match=match):
        decode(_dense_push(_raw_header(**{field: value})))


@pytest.mark.parametrize(
    "changes",
    [
        {"chunk": -1},
        {"chunk": 1, "nchunks": 1},
        {"chunk": 5, "nchunks": 3},
        {"nchunks": 0},
        {"nchunks": -2},
        {"count": -1},
        {"offset": -1},
    ],
)
def test_decode_rejects_bad_chunk_numbering(changes: dict[str, int]) -> None:
    with pytest.raises(ProtocolError, match="bad chunk numbering"):
        decode(_dense_push(_raw_header(**changes)))


@pytest.mark.parametrize(
    ("changes", "payload", "match"),
    [
        ({"count": 3}, [np.zeros(2, np.float32).tobytes()], "values frame"),
        ({"count": 1}, [np.zeros(2, np.float32).tobytes()], "values frame"),
        ({"count": 2}, [b"\x00" * 7], "values frame"),
        ({"count": 0}, [b"\x00"], "values frame"),
        ({"count": 2, "dtype": "float16"}, [np.zeros(2, np.float32).tobytes()], "values"),
        ({"count": 2, "dtype": "bfloat16"}, [b"\x00" * 2], "values"),
        (
            {"count": 2, "encoding": SPARSE},
            [np.zeros(3, np.uint32).tobytes(), np.zeros(2, np.float32).tobytes()],
            "indices frame",
        ),
        (
            {"count": 2, "encoding": SPARSE},
            [np.zeros(2, np.uint32).tobytes(), np.zeros(3, np.float32).tobytes()],
            "values frame",
        ),
        (
            {"count": 2, "encoding": SPARSE, "dtype": "float16"},
            [np.zeros(2, np.uint32).tobytes(), np.zeros(2, np.float32).tobytes()],
            "values frame",
        ),
        ({"count": 2**62}, [np.zeros(2, np.float32).tobytes()], "values frame"),
    ],
)
def test_decode_rejects_frame_lengths_that_disagree_with_count(
    changes: dict[str, Any], payload: list[bytes], match: str
) -> None:
    with pytest.raises(ProtocolError, match=match):
        decode(_dense_push(_raw_header(**changes), *payload))


@pytest.mark.parametrize(
    ("changes", "nframes"),
    [
        ({"encoding": DENSE}, 0),
        ({"encoding": DENSE}, 2),
        ({"encoding": SPARSE}, 0),
        ({"encoding": SPARSE}, 1),
        ({"encoding": SPARSE}, 3),
        ({"kind": PARAMS, "encoding": DENSE}, 3),
        ({"kind": ACK, "count": 1}, 1),
        ({"kind": FETCH}, 2),
        ({"kind": VERSION}, 1),
        ({"kind": ERROR}, 1),
    ],
)
def test_decode_rejects_the_wrong_number_of_frames(changes: dict[str, Any], nframes: int) -> None:
    frames = [msgpack.packb(_raw_header(**changes))] + [np.zeros(2, np.float32).tobytes()] * nframes
    with pytest.raises(ProtocolError, match="frame|arrays"):
        decode(frames)


def test_decode_rejects_an_empty_message() -> None:
    with pytest.raises(ProtocolError, match="empty message"):
        decode([])


def test_decode_rejects_an_oversized_header() -> None:
    raw = _raw_header(padding="x" * MAX_HEADER_BYTES)
    frame = msgpack.packb(raw)
    assert len(frame) > MAX_HEADER_BYTES
    with pytest.raises(ProtocolError, match="exceeds"):
        decode(_dense_push(raw))
    with pytest.raises(ProtocolError, match="exceeds"):
        decode([b"\x00" * (MAX_HEADER_BYTES + 1)])


# ---------------------------------------------------------------------------
# fuzzing: whatever arrives, decode returns a consistent message or raises ProtocolError


@st.composite
def valid_messages(draw: st.DrawFn) -> list[bytes]:
    name = draw(st.sampled_from(DTYPE_NAMES))
    values = _values(draw, name, st.integers(0, 12))
    shape = draw(st.sampled_from([DENSE, SPARSE, "control"]))
    if shape == DENSE:
        (frames,) = _messages(dense_chunks(_template(kind=PARAMS), values, 1 << 10))
    elif shape == SPARSE:
        indices = draw(hnp.arrays(np.uint32, values.size))
        (frames,) = _messages(sparse_chunks(_template(), indices, values, 1 << 10))
    else:
        frames = encode(_template(kind=draw(st.sampled_from([ACK, FETCH, VERSION, ERROR]))))
    return _as_bytes(frames)


def _mutate(data: st.DataObject, frames: list[bytes]) -> list[bytes]:
    frames = list(frames)
    op = data.draw(st.sampled_from(["flip", "set", "insert", "delete", "truncate", "frames"]))
    if op == "frames":
        choice = data.draw(st.sampled_from(["drop", "duplicate", "swap", "append"]))
        i = data.draw(st.integers(0, len(frames) - 1))
        j = data.draw(st.integers(0, len(frames) - 1))
        if choice == "drop":
            del frames[i]
        elif choice == "duplicate":
            frames.insert(i, frames[i])
        elif choice == "swap":
            frames[i], frames[j] = frames[j], frames[i]
        else:
            frames.append(data.draw(st.binary(max_size=16)))
        return frames
    i = data.draw(st.integers(0, len(frames) - 1))
    frame = bytearray(frames[i])
    pos = data.draw(st.integers(0, len(frame)))
    if op == "flip" and frame:
        frame[min(pos, len(frame) - 1)] ^= 1 << data.draw(st.integers(0, 7))
    elif op == "set" and frame:
        frame[min(pos, len(frame) - 1)] = data.draw(st.integers(0, 255))
    elif op == "insert":
        frame[pos:pos] = data.draw(st.binary(min_size=1, max_size=8))
    elif op == "delete":
        del frame[pos : pos + data.draw(st.integers(1, 8))]
    elif op == "truncate":
        del frame[pos:]
    frames[i] = bytes(frame)
    return frames


def _decode_or_reject(frames: list[Any]) -> None:
    """Decode must either succeed with a self-consistent result or raise ProtocolError."""
    try:
        header, arrays = decode(frames)
    except ProtocolError:
        event("rejected")
        return
    event("decoded")
    assert header.kind in KINDS
    assert header.protocol == PROTOCOL_VERSION
    assert 0 <= header.chunk < header.nchunks
    if header.kind in (PUSH, PARAMS):
        assert len(arrays) == (1 if header.encoding == DENSE else 2)
        assert arrays[-1].dtype == VALUE_DTYPES[header.dtype]
        if header.encoding == SPARSE:
            assert arrays[0].dtype == INDEX_DTYPE
        assert all(a.shape == (header.count,) for a in arrays)
    else:
        assert arrays == []


@settings(deadline=None, max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(frames=valid_messages(), data=st.data())
def test_fuzz_byte_mutations_decode_or_raise_protocol_error(
    frames: list[bytes], data: st.DataObject
) -> None:
    for _ in range(data.draw(st.integers(1, 4))):
        if not frames:
            break
        frames = _mutate(data, frames)
    _decode_or_reject(frames)


@settings(deadline=None, max_examples=200)
@given(frames=st.lists(st.binary(max_size=64), max_size=4))
def test_fuzz_random_frames_decode_or_raise_protocol_error(frames: list[bytes]) -> None:
    _decode_or_reject(frames)


msgpack_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats()
    | st.text(max_size=20)
    | st.binary(max_size=20),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner),
    max_leaves=6,
)


@settings(deadline=None, max_examples=300)
@given(
    frames=valid_messages(),
    field=st.sampled_from([*asdict(_template()), "extra"]),
    value=msgpack_values,
)
def test_fuzz_header_field_values_decode_or_raise_protocol_error(
    frames: list[bytes], field: str, value: Any
) -> None:
    raw = msgpack.unpackb(frames[0])
    raw[field] = value
    frames[0] = msgpack.packb(raw, use_bin_type=True)
    _decode_or_reject(frames)


def test_chunks_know_their_slice_of_the_arrays() -> None:
    values = np.arange(1000, dtype=np.float32)
    chunks = list(dense_chunks(_template(offset=5), values, 1024))
    assert [(c.start, c.stop) for c in chunks] == [(0, 256), (256, 512), (512, 768), (768, 1000)]
    for chunk in chunks:
        header, (got,) = decode(chunk.frames)
        assert header.offset == 5 + chunk.start and header.count == chunk.stop - chunk.start
        np.testing.assert_array_equal(got, values[chunk.start : chunk.stop])
    indices = np.arange(0, 3000, 3, dtype=np.uint32)
    sparse = list(sparse_chunks(_template(), indices, values, 800))
    assert sparse[0].start == 0 and sparse[-1].stop == 1000
    assert all(a.stop == b.start for a, b in zip(sparse, sparse[1:], strict=False))


# -- acknowledgements covering several chunks ---------------------------------------------


def _ack(chunk: int, *, seq: int = 5, status: str = "applied", **kw: Any) -> Header:
    fields: dict[str, Any] = dict(kind=ACK, fingerprint=1, shard=0, worker=3, nchunks=16)
    fields.update(count=1, version=0)
    fields.update(kw)
    return Header(seq=seq, chunk=chunk, status=status, **fields)


def test_merge_acks_makes_one_ack_per_run_of_consecutive_chunks() -> None:
    acks = [_ack(2, version=4), _ack(0, version=2), _ack(1, version=3), _ack(5), _ack(6)]
    merged = merge_acks(acks)
    assert [(a.chunk, a.count) for a in merged] == [(0, 3), (5, 2)]
    assert merged[0].version == 4  # the latest version of the run
    assert [list(acked_chunks(a)) for a in merged] == [[0, 1, 2], [5, 6]]


def test_merge_acks_keeps_pushes_statuses_and_reasons_apart() -> None:
    acks = [
        _ack(0),
        _ack(1, status="duplicate"),
        _ack(2),
        _ack(0, seq=6),
        _ack(3, status="rejected", reason="a"),
        _ack(4, status="rejected", reason="b"),
    ]
    merged = merge_acks(acks)
    covered = sorted((a.seq, c, a.status, a.reason) for a in merged for c in acked_chunks(a))
    assert covered == sorted((a.seq, a.chunk, a.status, a.reason) for a in acks)
    assert len(merged) == len(acks)  # no two of them may share an ACK


def test_an_ack_counting_zero_chunks_still_acknowledges_one() -> None:
    assert list(acked_chunks(_ack(4, count=0))) == [4]
    assert merge_acks([_ack(4, count=0), _ack(5)])[0].count == 2


def test_an_ack_beyond_the_push_is_refused() -> None:
    raw = asdict(_ack(14, count=3))
    with pytest.raises(ProtocolError, match="chunk numbering"):
        unpack_header(msgpack.packb(raw))
    assert unpack_header(msgpack.packb(asdict(_ack(13, count=3)))).count == 3
