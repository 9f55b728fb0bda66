"""Caltech-101 in its official layout, decoded once into a uint8 cache.

    DIR/101_ObjectCategories/<category>/image_NNNN.jpg   (the official archive, unpacked)
    DIR/train.txt, DIR/test.txt                          (optional: a fixed split)

:func:`load` scans the folder (the 101 object categories; ``BACKGROUND_Google`` only
on request), decodes and resizes every image once (Pillow, two processes) into the
user's cache directory (``$DSGD_CACHE``, else ``~/.cache/dsgd``) as one ``.npy`` of
uint8 images per size, written atomically and keyed by the source files (names, sizes,
modification times), and returns the images memory-mapped: a worker that takes its
partition reads only those pages, so it never holds more than its own share. Files
that are not images are skipped and counted, as are images that fail to decode. Get
the data from CaltechDATA (DOI 10.22002/D1.20086, ``101_ObjectCategories.tar.gz``,
CC BY 4.0).
"""

from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dsgd.errors import ModelError

log = logging.getLogger("dsgd.datasets")

CATEGORIES_DIR = "101_ObjectCategories"
BACKGROUND = "BACKGROUND_Google"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
CACHE_VERSION = 1
WHERE = (
    "download 101_ObjectCategories.tar.gz from CaltechDATA (DOI 10.22002/D1.20086) and "
    "unpack it there"
)


@dataclass(frozen=True)
class Scan:
    """The images of a Caltech-101 folder: relative paths, labels, category names."""

    root: Path
    paths: tuple[str, ...]  # "category/image_NNNN.jpg", sorted
    labels: np.ndarray  # int32, index into categories
    categories: tuple[str, ...]
    skipped: int  # files that are not images

    def key(self, size: int) -> str:
        """Names the cache of this scan at ``size``: changes when any source file does."""
        source = f"v{CACHE_VERSION} {self.root.resolve()} {size} {self.categories}"
        digest = hashlib.sha256(source.encode())
        for rel in self.paths:
            stat = (self.root / CATEGORIES_DIR / rel).stat()
            digest.update(f"{rel} {stat.st_size} {stat.st_mtime_ns}\n".encode())
        return digest.hexdigest()[:16]


@dataclass(frozen=True)
class Images:
    """Decoded images (uint8, N x size x size x 3, memory-mapped) with their labels."""

    images: np.ndarray
    labels: np.ndarray
    paths: tuple[str, ...]
    categories: tuple[str, ...]
    skipped: int  # not images
    failed: int  # images that did not decode (left out)


def scan(root: str | os.PathLike[str], *, background: bool = False) -> Scan:
    """The images under ``root/101_ObjectCategories``; a one-line ModelError if none."""
    root = Path(root)
    folder = root / CATEGORIES_DIR
    if not folder.is_dir():
        found = "does not exist" if not root.exists() else f"has no {CATEGORIES_DIR}/ folder"
        raise ModelError(f"Caltech-101 data: {root} {found}; {WHERE}")
    try:
        entries = sorted(p for p in folder.iterdir() if p.is_dir())
    except OSError as exc:
        raise ModelError(f"Caltech-101 data: cannot read {folder} ({exc.strerror})") from None
    categories = [p.name for p in entries if background or p.name != BACKGROUND]
    paths: list[str] = []
    labels: list[int] = []
    skipped = 0
    kept: list[str] = []
    for name in categories:
        try:
            files = sorted((folder / name).iterdir())
        except OSError as exc:
            raise ModelError(
                f"Caltech-101 data: cannot read {folder / name} ({exc.strerror})"
            ) from None
        images = [f for f in files if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES]
        skipped += sum(1 for f in files if f.is_file()) - len(images)
        if not images:
            log.warning("Caltech-101: category %s holds no images; left out", name)
            continue
        label = len(kept)
        kept.append(name)
        paths += [f"{name}/{f.name}" for f in images]
        labels += [label] * len(images)
    if not paths:
        raise ModelError(f"Caltech-101 data: no images under {folder}; {WHERE}")
    return Scan(root, tuple(paths), np.asarray(labels, np.int32), tuple(kept), skipped)


def _decode(args: tuple[str, int]) -> np.ndarray | None:
    """One image, center-cropped to a square and resized to size x size RGB; None if broken."""
    from PIL import Image, UnidentifiedImageError

    path, size = args
    try:
        with Image.open(path) as source:
            source.draft("RGB", (size, size))  # JPEG: decode at a reduced scale, much faster
            rgb = source.convert("RGB")
            w, h = rgb.size
            side = min(w, h)
            box = ((w - side) // 2, (h - side) // 2, (w + side) // 2, (h + side) // 2)
            square = rgb.resize((size, size), Image.Resampling.BILINEAR, box=box)
            return np.asarray(square, np.uint8)
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError):
        return None


def decode(found: Scan, size: int, workers: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """Decode every image of ``found``: (images, ok) with ``ok`` False where decoding failed."""
    jobs = [(str(found.root / CATEGORIES_DIR / rel), size) for rel in found.paths]
    images = np.zeros((len(jobs), size, size, 3), np.uint8)
    ok = np.zeros(len(jobs), bool)
    chunk = max(1, len(jobs) // (workers * 8))
    if workers > 1 and len(jobs) > 64:
        # spawned, not forked: the caller may already run gRPC threads, which fork breaks
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            decoded = list(pool.map(_decode, jobs, chunksize=chunk))
    else:
        decoded = [_decode(job) for job in jobs]
    for i, image in enumerate(decoded):
        if image is not None:
            images[i], ok[i] = image, True
    return images, ok


def load(
    root: str | os.PathLike[str],
    size: int = 96,
    *,
    background: bool = False,
    cache_dir: str | os.PathLike[str] | None = None,
) -> Images:
    """The images of ``root`` at ``size``, from the cache when it is current."""
    if not 8 <= size <= 512:
        raise ModelError(f"Caltech-101 image size must be between 8 and 512, got {size}")
    found = scan(root, background=background)
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    key = found.key(size)
    array_path, meta_path = cache / f"caltech101-{size}-{key}.npy", cache / f"{key}.json"
    if not (array_path.exists() and meta_path.exists()):
        images, ok = decode(found, size)
        meta = {
            "paths": [p for p, good in zip(found.paths, ok, strict=True) if good],
            "labels": found.labels[ok].tolist(),
            "categories": list(found.categories),
            "skipped": found.skipped,
            "failed": int((~ok).sum()),
        }
        _write_atomically(cache, array_path, meta_path, images[ok], meta)
        log.info(
            "Caltech-101: decoded %d images at %dx%d into %s (%d not images, %d broken)",
            int(ok.sum()),
            size,
            size,
            array_path,
            found.skipped,
            meta["failed"],
        )
    meta = json.loads(meta_path.read_text())
    return Images(
        images=np.load(array_path, mmap_mode="r"),
        labels=np.asarray(meta["labels"], np.int32),
        paths=tuple(meta["paths"]),
        categories=tuple(meta["categories"]),
        skipped=int(meta["skipped"]),
        failed=int(meta["failed"]),
    )


def default_cache_dir() -> Path:
    """``$DSGD_CACHE``, else ``$XDG_CACHE_HOME/dsgd``, else ``~/.cache/dsgd`` (never the data
    folder itself, which may be read-only or shared)."""
    if os.environ.get("DSGD_CACHE"):
        return Path(os.environ["DSGD_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "dsgd"


def _write_atomically(
    cache: Path, array_path: Path, meta_path: Path, images: np.ndarray, meta: dict[str, object]
) -> None:
    """Array first, then its metadata, each renamed into place: a reader never sees half."""
    try:
        cache.mkdir(parents=True, exist_ok=True)
        tmp = array_path.with_name(f".{array_path.name}.{os.getpid()}.tmp")
        with open(tmp, "wb") as out:
            np.save(out, images, allow_pickle=False)
        tmp.replace(array_path)
        tmp_meta = meta_path.with_name(f".{meta_path.name}.{os.getpid()}.tmp")
        tmp_meta.write_text(json.dumps(meta))
        tmp_meta.replace(meta_path)
    except OSError as exc:
        raise ModelError(
            f"Caltech-101: cannot write the image cache in {cache} ({exc.strerror}); "
            "give a writable cache directory"
        ) from None


def split(
    data: Images, root: str | os.PathLike[str], *, test_fraction: float = 1 / 3, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Indices of the training and test images: from ``train.txt``/``test.txt`` when the
    folder has them, else a stratified split with a fixed seed."""
    root = Path(root)
    files = root / "train.txt", root / "test.txt"
    if all(f.exists() for f in files):
        where = {p: i for i, p in enumerate(data.paths)}
        picked = []
        for f in files:
            lines = (line.strip() for line in f.read_text().splitlines())
            picked.append(np.asarray(sorted(where[x] for x in lines if x in where), np.int64))
        if len(picked[0]) and len(picked[1]):
            return picked[0], picked[1]
    rng = np.random.default_rng(seed)
    train, test = [], []
    for label in np.unique(data.labels):
        members = rng.permutation(np.flatnonzero(data.labels == label))
        n_test = max(1, round(len(members) * test_fraction)) if len(members) > 1 else 0
        test.append(members[:n_test])
        train.append(members[n_test:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))
