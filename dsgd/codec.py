"""Sparse push encoding with error feedback: what a worker sends to one shard.

A worker keeps one :class:`SparseEncoder` per shard. Each push, the encoder adds the
new update to its *residual* (everything accumulated and not yet sent), sends only
the entries of largest magnitude, and keeps the rest, including the rounding error
of the value dtype, for later pushes. Nothing is ever dropped: for every entry,

    sent (as float32) + new residual == update + old residual

holds exactly in float32 arithmetic (see :meth:`SparseEncoder.encode` for the one
exception, float16 values beyond 2**29). This is the error feedback of Deep Gradient
Compression (Lin et al., 2018) and of 1-bit SGD: sparsification delays updates, it
does not lose them.

Exact top-k (``np.argpartition``) is too slow here: on 20M float32 it costs several
dense loopback sends (bench/sparse_encode.py). Instead the encoder estimates the
magnitude threshold from a random sample of about 100k entries, selects everything at
or above it in one cache-blocked pass, and falls back to an exact top-k on the (small)
selected subset only when the estimate selected more than ``max_overselect`` times the
target.
Magnitudes are compared as integer keys (the float32 bits without the sign), which
order exactly like ``abs`` and put NaN and Inf above every finite value, so a
non-finite update is always caught instead of hiding in the residual.

This module is pure numpy: arrays in, arrays out, no sockets.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any, NamedTuple

import ml_dtypes
import numpy as np
import numpy.typing as npt

from dsgd.errors import ConfigError
from dsgd.types import FlatParams, Indices
from dsgd.wire import INDEX_DTYPE, VALUE_DTYPES

Keys = npt.NDArray[np.uint32]
Positions = npt.NDArray[np.intp]
_SIGN_OFF = np.uint32(0x7FFFFFFF)
_SMALLEST_KEY = 1  # the key of the smallest subnormal: a zero is never selected
_SPARE_BUFFERS = 2  # dense float32 pushes whose buffers are kept for reuse as the residual


class Encoded(NamedTuple):
    """One shard's share of a push.

    Sparse: ``indices`` (uint32, unique, ascending, relative to the shard range) and
    ``values`` at them. Dense: ``indices is None`` and ``values`` covers the whole range.
    Both arrays belong to the caller, so they can be sent zero-copy while the encoder goes
    on: the encoder never writes to them again while anything else references them.
    """

    indices: Indices | None
    values: npt.NDArray[Any]

    @property
    def dense(self) -> bool:
        return self.indices is None

    @property
    def size(self) -> int:
        return int(self.values.size)


@dataclass(frozen=True, slots=True)
class CodecConfig:
    """How a worker encodes its pushes.

    ``density``: the fraction of entries each push sends, once warmed up. A density at
    or above the break-even point (where indices + values outweigh dense values, 0.5
    for float32) sends dense. ``threshold``: when set, send every entry whose
    magnitude is at least this instead (no density target, never dense).
    ``warmup_pushes``: decay the density exponentially from 1.0 to ``density`` over
    this many pushes (see :func:`density_at`). ``sample_size``: entries sampled to
    estimate the threshold. ``max_overselect``: above this many times the target
    count, cut the selection down to the exact top-k. ``block``: elements processed
    per step of the selection pass (sized to stay in L2 cache).
    """

    density: float = 0.01
    value_dtype: str = "float32"
    threshold: float | None = None
    warmup_pushes: int = 0
    sample_size: int = 100_000
    max_overselect: float = 2.0
    seed: int = 0
    block: int = 1 << 18

    def __post_init__(self) -> None:
        if not 0.0 < self.density <= 1.0:
            raise ConfigError(f"density must be in (0, 1], got {self.density}")
        if self.value_dtype not in VALUE_DTYPES:
            raise ConfigError(
                f"value dtype must be one of {', '.join(VALUE_DTYPES)}, got {self.value_dtype!r}"
            )
        if self.threshold is not None and not self.threshold >= 0.0:
            raise ConfigError(f"threshold must be >= 0, got {self.threshold}")
        if self.warmup_pushes < 0:
            raise ConfigError(f"warmup_pushes must be >= 0, got {self.warmup_pushes}")
        if self.sample_size < 1 or self.block < 8:
            raise ConfigError("sample_size must be >= 1 and block >= 8")
        if not self.max_overselect >= 1.0:
            raise ConfigError(f"max_overselect must be >= 1, got {self.max_overselect}")


def density_at(push_index: int, target: float, warmup_pushes: int) -> float:
    """The density of push number ``push_index`` (from 0) under exponential warm-up.

    Starts dense (1.0) and decays geometrically to ``target``, reached at push
    ``warmup_pushes`` and kept after: ``target ** (push_index / warmup_pushes)``. Early
    updates are large and change fast, so sending them sparsely would park most of them
    in the residual, where they go stale (Deep Gradient Compression, section 3.3).
    """
    if not 0.0 < target <= 1.0:
        raise ValueError(f"target density must be in (0, 1], got {target}")
    if warmup_pushes <= 0 or push_index >= warmup_pushes:
        return target
    return float(target ** (max(push_index, 0) / warmup_pushes))


def break_even_density(value_dtype: str) -> float:
    """The density above which sparse (index + value per entry) is no smaller than dense."""
    itemsize = VALUE_DTYPES[value_dtype].itemsize
    return itemsize / (INDEX_DTYPE.itemsize + itemsize)


def wants_dense(density: float, value_dtype: str) -> bool:
    """Whether a push at ``density`` should go dense: it would not be smaller sparse."""
    return density >= 1.0 or density >= break_even_density(value_dtype)


def magnitude_keys(values: FlatParams) -> Keys:
    """Integer keys ordered exactly like ``abs(values)``; NaN and Inf sort above all else."""
    return values.view(np.uint32) & _SIGN_OFF


def threshold_key(threshold: float) -> int:
    """The key of a magnitude threshold, never below the smallest non-zero magnitude."""
    key = int(magnitude_keys(np.array([threshold], np.float32))[0])
    return max(key, _SMALLEST_KEY)


def sample_positions(size: int, sample_size: int, rng: np.random.Generator) -> npt.NDArray[Any]:
    """One random position in each of ``sample_size`` equal strata of ``[0, size)``.

    Stratified, so every part of the vector (every layer) is represented in proportion;
    jittered, so a periodic structure in the parameters cannot alias with the stride.
    Ascending, which keeps the gather cache-friendly.
    """
    width = size / sample_size
    positions = (np.arange(sample_size) + rng.random(sample_size)) * width
    return np.minimum(positions.astype(np.intp), size - 1)


def estimate_threshold_key(sample_keys: Keys, density: float) -> int:
    """The key of the ``density`` upper quantile of a sample (at least one sample entry)."""
    n = sample_keys.size
    if n == 0:
        return _SMALLEST_KEY
    k = min(n, max(1, round(density * n)))
    return max(int(np.partition(sample_keys, n - k)[n - k]), _SMALLEST_KEY)


def top_k_positions(keys: Keys, k: int) -> npt.NDArray[np.intp]:
    """Positions of the ``k`` largest keys, ascending; ties go to the lower positions."""
    m = keys.size
    if k <= 0:
        return np.empty(0, np.intp)
    if k >= m:
        return np.arange(m)
    kth = np.partition(keys, m - k)[m - k]
    above = np.flatnonzero(keys > kth)
    ties = np.flatnonzero(keys == kth)[: k - above.size]
    return np.sort(np.concatenate([above, ties]))


def to_float32(values: npt.NDArray[Any]) -> FlatParams:
    """Values of any wire dtype as float32 (exact: every wire dtype widens losslessly)."""
    return values.astype(np.float32, copy=False)


def densify(size: int, encoded: Encoded) -> FlatParams:
    """The dense float32 vector an :class:`Encoded` push stands for."""
    if encoded.indices is None:
        return to_float32(encoded.values).copy()
    out = np.zeros(size, np.float32)
    out[encoded.indices] = to_float32(encoded.values)
    return out


class SparseEncoder:
    """Error-feedback sparsifier for one worker's pushes to one shard of ``size`` entries.

    Holds the float32 residual and the scratch buffers of the selection pass, which are
    allocated once and reused, so an encode allocates only its (small) output. A dense
    float32 push sends the residual buffer itself and takes a zeroed one in its place (a
    buffer of an earlier push that nothing references any more), so a dense encode copies
    nothing and does not fault in fresh memory; :meth:`accumulate` checks finiteness block
    by block while each block is still in cache, so a dense encode right after it need not
    read the residual again. Not thread-safe: use each encoder from one thread at a time.
    """

    def __init__(self, size: int, config: CodecConfig | None = None) -> None:
        if not 0 <= size <= 1 << 32:
            raise ValueError(f"a shard range of {size} entries cannot be indexed by uint32")
        self.config = config if config is not None else CodecConfig()
        self.size = size
        self.pushes = 0
        self._residual: FlatParams = np.zeros(size, np.float32)
        # _residual's entries from here on are stale and stand for zeros: zeroing is left
        # to the next accumulate, which writes the update instead of adding to zeros
        self._stale_from = size
        self._finite = True  # the residual is known to hold no NaN or Inf
        self._sent: list[FlatParams] = []  # buffers of earlier dense pushes, maybe in use
        self._dtype = VALUE_DTYPES[self.config.value_dtype]
        self._clip = float(ml_dtypes.finfo(self._dtype).max)
        block = min(self.config.block, max(size, 1))
        self._keys: Keys = np.empty(block, np.uint32)
        self._mask: npt.NDArray[np.bool_] = np.empty(block, np.bool_)
        self._rng = np.random.default_rng(self.config.seed)

    @property
    def residual(self) -> FlatParams:
        """Everything accumulated and not sent yet (float32, one entry per parameter).

        The caller may write to it; the next encode then checks it for NaN and Inf.
        """
        self._finite = False
        return self._values()

    def _values(self) -> FlatParams:
        """The residual, its stale entries zeroed first (see ``_stale_from``)."""
        if self._stale_from < self.size:
            self._residual[self._stale_from :].fill(0.0)
            self._stale_from = self.size
        return self._residual

    def density_now(self) -> float:
        """The density the next :meth:`encode` uses (warm-up included)."""
        cfg = self.config
        return density_at(self.pushes, cfg.density, cfg.warmup_pushes)

    def accumulate(self, update: FlatParams, offset: int | None = None) -> None:
        """Add ``update`` into the residual at ``offset`` without sending anything.

        A worker that sums several steps between pushes can accumulate straight into
        the encoder and call ``encode()`` without an argument, saving a full pass. An
        update may come in pieces, each with its ``offset`` (a model's gradient, one
        parameter array at a time): pieces in ascending order cost the same as one whole
        update. Without ``offset`` the update must cover the whole range.
        """
        with np.errstate(over="ignore", invalid="ignore"):  # non-finite: encode() raises
            self._add(self._check(update, offset), offset or 0)

    def _add(self, update: FlatParams, offset: int = 0) -> None:
        """residual[offset:] += update in cache-sized blocks, checking each sum while it is
        hot. Where the residual is stale (stands for zeros) the update is written instead
        (0 + update has the same bits as update + 0), and stale entries it skips over are
        zeroed."""
        end, stale = offset + update.size, self._stale_from
        if offset > stale:
            self._residual[stale:offset].fill(0.0)
            stale = offset
        finite = True
        for lo, hi, written in ((offset, min(stale, end), False), (max(stale, offset), end, True)):
            for start in range(lo, hi, self._mask.size):
                stop = min(start + self._mask.size, hi)
                part, piece = self._residual[start:stop], update[start - offset : stop - offset]
                np.add(piece if written else part, np.float32(0.0) if written else piece, out=part)
                if finite:
                    finite = bool(np.isfinite(part, out=self._mask[: stop - start]).all())
        self._stale_from = max(stale, end)
        whole = offset == 0 and update.size == self.size
        self._finite = finite if whole else self._finite and finite

    def encode(self, update: FlatParams | None = None, *, density: float | None = None) -> Encoded:
        """Add ``update`` to the residual and take out what this push sends.

        Sparse: the entries of largest magnitude, about ``density * size`` of them (never
        more than ``max_overselect`` times that; at least one when anything is
        non-zero), or all at or above the configured threshold. Dense: everything, when
        ``density`` is at or above the break-even point. Values are converted to the
        value dtype; what that rounds away stays in the residual. float16 values are
        clipped to +-65504 (the remainder stays in the residual too, exactly while the
        entry is below 2**29). ``density`` overrides the configured (warm-up) density.

        Raises ``FloatingPointError`` when the accumulated update holds NaN or Inf; the
        non-finite entries are then zeroed in the residual, nothing else is sent, and
        the caller decides what to do with the rest.
        """
        checked = None if update is None else self._check(update)
        if density is None:
            density = self.density_now()
        elif not 0.0 < density <= 1.0:
            raise ValueError(f"density must be in (0, 1], got {density}")
        self.pushes += 1
        with np.errstate(over="ignore", invalid="ignore"):  # non-finite sums raise below
            return self._encode(checked, density)

    def _encode(self, update: FlatParams | None, density: float) -> Encoded:
        """Dense, thresholded or top-density: see :meth:`encode`."""
        cfg = self.config
        if cfg.threshold is None and wants_dense(density, cfg.value_dtype):
            return self._encode_dense(update)
        self._finite = False  # the sparse paths below do not keep track
        if cfg.threshold is not None:
            return self._take(*self._select(update, threshold_key(cfg.threshold)))
        k = max(1, round(density * self.size))
        positions, accumulated = self._select(update, self._estimate(update, density))
        if positions.size > cfg.max_overselect * k:
            keep = top_k_positions(magnitude_keys(accumulated), k)
            unsent = np.ones(positions.size, np.bool_)
            unsent[keep] = False
            self._values()[positions[unsent]] = accumulated[unsent]
            positions, accumulated = positions[keep], accumulated[keep]
        return self._take(positions, accumulated)

    def give_back(self, indices: Indices, values: npt.NDArray[Any]) -> None:
        """Return to the residual a sparse push (or chunk) that was sent but never applied.

        Right after the :meth:`encode` that produced them this restores the residual
        exactly, so a shard that died with the push in flight loses nothing.
        """
        idx = np.asarray(indices)
        if idx.shape != values.shape or idx.ndim != 1:
            raise ValueError("indices and values must be 1-D arrays of the same length")
        if idx.size and int(idx.max()) >= self.size:
            raise ValueError(f"index {int(idx.max())} is outside a range of {self.size}")
        residual, self._finite = self._values(), False
        if np.all(idx[1:] > idx[:-1]):
            residual[idx] += to_float32(values)
        else:  # repeated indices (not from encode): add each occurrence
            np.add.at(residual, idx, to_float32(values))

    def give_back_dense(self, values: npt.NDArray[Any], offset: int = 0) -> None:
        """Return to the residual a dense push (or chunk of it, starting at ``offset``)."""
        if values.ndim != 1 or offset < 0 or offset + values.size > self.size:
            raise ValueError(f"{values.size} values at offset {offset} overflow {self.size}")
        self._values()[offset : offset + values.size] += to_float32(values)
        self._finite = False

    def reset(self) -> None:
        """Forget everything accumulated and not sent (after a divergence or a restore)."""
        self._stale_from, self._finite = 0, True

    def _check(self, update: FlatParams, offset: int | None = None) -> FlatParams:
        """``update`` as a contiguous float32 vector of this range, or with ``offset`` of a
        piece of it from there (copied only if needed)."""
        array = np.asarray(update)
        if offset is None and array.shape != (self.size,):
            raise ValueError(f"update of shape {array.shape}, encoder expects ({self.size},)")
        if offset is not None and (array.ndim != 1 or not 0 <= offset <= self.size - array.size):
            raise ValueError(
                f"update of shape {array.shape} at offset {offset} overflows a range of {self.size}"
            )
        return np.ascontiguousarray(array, np.float32)

    def _estimate(self, update: FlatParams | None, density: float) -> int:
        """Threshold key from a sample of the accumulated update (residual + update)."""
        residual = self._values()
        if self.size <= self.config.sample_size:
            sample = residual if update is None else residual + update
        else:
            pos = sample_positions(self.size, self.config.sample_size, self._rng)
            sample = np.take(residual, pos)
            if update is not None:
                sample += np.take(update, pos)
        return estimate_threshold_key(magnitude_keys(sample), density)

    def _select(self, update: FlatParams | None, key: int) -> tuple[Positions, FlatParams]:
        """Accumulate ``update``; take out every entry whose key is >= ``key``.

        Returns the positions (ascending) and their accumulated values, which are zeroed
        in the residual. One pass in cache-sized blocks: add, key, compare, nonzero,
        gather and zero all run on a block while it is still in L2, instead of a pass
        over the whole range for each step.
        """
        residual, block = self._values(), self._keys.size
        threshold = np.uint32(key)
        positions, values = [], []
        for start in range(0, self.size, block):
            stop = min(start + block, self.size)
            chunk = residual[start:stop]
            if update is not None:
                np.add(chunk, update[start:stop], out=chunk)
            keys, mask = self._keys[: stop - start], self._mask[: stop - start]
            np.bitwise_and(chunk.view(np.uint32), _SIGN_OFF, out=keys)
            np.greater_equal(keys, threshold, out=mask)
            hits = np.flatnonzero(mask)
            if hits.size:
                values.append(chunk[hits])
                chunk[hits] = 0.0
                positions.append(hits + start if start else hits)
        if not positions:
            return np.empty(0, np.intp), np.empty(0, np.float32)
        return np.concatenate(positions), np.concatenate(values)

    def _take(self, positions: Positions, accumulated: FlatParams) -> Encoded:
        """Send ``accumulated`` (already zeroed in the residual); keep what rounding loses."""
        if not np.isfinite(accumulated).all():
            self._values()[positions] = accumulated
            self._drop_nonfinite()
        sent = self._convert(accumulated, copy=False)
        if self._dtype != np.float32:
            self._values()[positions] = accumulated - to_float32(sent)
        return Encoded(positions.astype(INDEX_DTYPE), sent)

    def _encode_dense(self, update: FlatParams | None) -> Encoded:
        if update is not None:
            self._add(update)
        residual = self._values()
        if not self._finite and not self._all_finite(residual):
            self._drop_nonfinite()
        if self._dtype == np.float32:  # send the residual itself; start again from zeros
            self._residual, self._stale_from, self._finite = self._spare_buffer(), 0, True
            self._sent.append(residual)
            del self._sent[:-_SPARE_BUFFERS]
            return Encoded(None, residual)
        sent = self._convert(residual, copy=True)
        np.subtract(residual, to_float32(sent), out=residual)
        self._finite = False
        return Encoded(None, sent)

    def _spare_buffer(self) -> FlatParams:
        """The buffer of an earlier dense push that nothing else references, or a new one."""
        for i in range(len(self._sent)):
            # two references: the list's and getrefcount's argument. Any other (the
            # caller's Encoded, a view of it in a zero-copy frame not yet sent) keeps the
            # buffer out of reach until it is dropped.
            if sys.getrefcount(self._sent[i]) <= 2:
                return self._sent.pop(i)
        return np.empty(self.size, np.float32)

    def _all_finite(self, values: FlatParams) -> bool:
        """``np.isfinite(values).all()``, block by block into a reused mask."""
        block = self._mask.size
        for start in range(0, values.size, block):
            part = values[start : start + block]
            if not np.isfinite(part, out=self._mask[: part.size]).all():
                return False
        return True

    def _convert(self, accumulated: FlatParams, copy: bool) -> npt.NDArray[Any]:
        """``accumulated`` in the value dtype (clipped to its range, so never Inf)."""
        if self._dtype == np.float32:
            return accumulated.copy() if copy else accumulated
        return np.clip(accumulated, -self._clip, self._clip).astype(self._dtype)

    def _drop_nonfinite(self) -> None:
        residual = self._values()
        bad = ~np.isfinite(residual)
        count = int(np.count_nonzero(bad))
        residual[bad] = 0.0
        self._finite = True
        raise FloatingPointError(
            f"the accumulated update holds {count} NaN/Inf entries; they were dropped "
            "from the residual and nothing was sent"
        )
