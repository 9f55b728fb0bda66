"""The Caltech-101 loader, cache and model, on generated folders of the official layout
(the real data set is never needed: these folders are made by the tests)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dsgd.datasets import caltech101
from dsgd.errors import ModelError
from dsgd.examples.caltech101 import augment, cnn, cnn_init
from dsgd.model import CompiledModel, Rows, batches, load_model


def _image(path: Path, color: tuple[int, int, int], size: tuple[int, int] = (30, 20)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path, "JPEG")


def make_folder(root: Path, per_category: int = 6) -> Path:
    """Three categories of solid-colour JPEGs, the background class, a stray file."""
    folder = root / caltech101.CATEGORIES_DIR
    colors = {"airplanes": (250, 0, 0), "faces": (0, 250, 0), "zebra": (0, 0, 250)}
    for name, color in colors.items():
        for k in range(per_category):
            _image(folder / name / f"image_{k + 1:04d}.jpg", color, (30 + k, 20))
    _image(folder / caltech101.BACKGROUND / "image_0001.jpg", (9, 9, 9))
    (folder / caltech101.BACKGROUND / "tmp").write_bytes(b"not an image")
    return root


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "cache"
    monkeypatch.setenv("DSGD_CACHE", str(path))
    return path


def test_scan_finds_the_categories_and_skips_what_is_not_an_image(tmp_path: Path) -> None:
    found = caltech101.scan(make_folder(tmp_path))
    assert found.categories == ("airplanes", "faces", "zebra")
    assert len(found.paths) == 18 and found.paths[0] == "airplanes/image_0001.jpg"
    assert np.bincount(found.labels).tolist() == [6, 6, 6]
    with_background = caltech101.scan(tmp_path, background=True)
    assert with_background.categories[0] == caltech101.BACKGROUND
    assert with_background.skipped == 1  # BACKGROUND_Google/tmp, as in the real archive


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda root: root / "missing", "does not exist; download 101_ObjectCategories"),
        (lambda root: root, "has no 101_ObjectCategories/ folder"),
        (
            lambda root: (root / caltech101.CATEGORIES_DIR / "empty").mkdir(parents=True) or root,
            "no images under",
        ),
    ],
    ids=["missing", "wrong", "empty"],
)
def test_a_missing_empty_or_wrong_folder_is_one_line_naming_it(
    tmp_path: Path, make: object, message: str
) -> None:
    root = make(tmp_path)  # type: ignore[operator]
    with pytest.raises(ModelError, match=message) as info:
        caltech101.scan(root)
    assert str(tmp_path) in str(info.value) and "\n" not in str(info.value)


def test_an_unreadable_category_is_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    make_folder(tmp_path)
    original = Path.iterdir

    def iterdir(self: Path) -> object:
        if self.name == "faces":
            raise PermissionError(13, "Permission denied")
        return original(self)

    monkeypatch.setattr(Path, "iterdir", iterdir)
    with pytest.raises(ModelError, match=r"cannot read .*faces \(Permission denied\)"):
        caltech101.scan(tmp_path)


def test_an_empty_category_is_left_out(tmp_path: Path) -> None:
    root = make_folder(tmp_path)
    (root / caltech101.CATEGORIES_DIR / "ant").mkdir()
    assert "ant" not in caltech101.scan(root).categories


def test_load_decodes_once_into_a_cache_and_leaves_broken_images_out(
    tmp_path: Path, cache: Path
) -> None:
    root = make_folder(tmp_path)
    broken = root / caltech101.CATEGORIES_DIR / "zebra" / "image_0099.jpg"
    broken.write_bytes(b"\xff\xd8\xff garbage, not a JPEG")
    data = caltech101.load(root, size=16)
    assert data.images.shape == (18, 16, 16, 3) and data.images.dtype == np.uint8
    assert isinstance(data.images, np.memmap)  # a worker reads only what it touches
    assert data.failed == 1 and "zebra/image_0099.jpg" not in data.paths
    red = data.images[0].mean(axis=(0, 1))  # airplanes are red (give or take JPEG)
    np.testing.assert_allclose(red, [250, 0, 0], atol=3)
    assert data.labels.tolist() == [0] * 6 + [1] * 6 + [2] * 6
    cached = sorted(p.name for p in cache.iterdir())
    assert len(cached) == 2 and not [n for n in cached if n.endswith(".tmp")]

    again = caltech101.load(root, size=16)  # from the cache: nothing decoded
    np.testing.assert_array_equal(again.images, data.images)
    assert sorted(p.name for p in cache.iterdir()) == cached

    _image(root / caltech101.CATEGORIES_DIR / "faces" / "image_0050.jpg", (0, 250, 0))
    changed = caltech101.load(root, size=16)  # a new source file: a new cache entry
    assert len(changed.paths) == 19 and len(list(cache.iterdir())) == 4


def test_an_unwritable_cache_is_one_line(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(ModelError, match="cannot write the image cache"):
        caltech101.load(make_folder(tmp_path / "data"), size=16, cache_dir=blocker / "sub")


def test_split_uses_the_split_files_when_given(tmp_path: Path, cache: Path) -> None:
    root = make_folder(tmp_path)
    data = caltech101.load(root, size=8)
    train, test = caltech101.split(data, root)
    assert len(train) + len(test) == 18 and not set(train) & set(test)
    assert all(np.bincount(data.labels[test]) == 2)  # stratified: a third of each class
    (root / "train.txt").write_text("airplanes/image_0001.jpg\nfaces/image_0002.jpg\n")
    (root / "test.txt").write_text("zebra/image_0003.jpg\nBACKGROUND_Google/image_0001.jpg\n")
    train, test = caltech101.split(data, root)
    assert [data.paths[i] for i in train] == ["airplanes/image_0001.jpg", "faces/image_0002.jpg"]
    assert [data.paths[i] for i in test] == ["zebra/image_0003.jpg"]  # background left out


def test_rows_read_only_the_rows_asked_for() -> None:
    base = np.arange(40, dtype=np.uint8).reshape(10, 4)
    rows = Rows(base, np.array([7, 2, 5, 0]))
    assert len(rows) == 4 and rows.shape == (4, 4) and rows.dtype == np.uint8
    part = rows[1::2]
    assert isinstance(part, Rows) and part.indices.tolist() == [2, 0]
    np.testing.assert_array_equal(rows[np.array([3, 0])], base[[0, 7]])
    np.testing.assert_array_equal(np.asarray(rows), base[[7, 2, 5, 0]])
    np.testing.assert_array_equal(rows[2], base[5])


def test_augment_shifts_and_flips_within_the_image() -> None:
    rng = np.random.default_rng(0)
    x = rng.integers(0, 255, (8, 24, 24, 3), dtype=np.uint8)
    out = augment(x, np.random.default_rng(1))
    assert out.shape == x.shape and out.dtype == np.uint8
    np.testing.assert_array_equal(augment(x, np.random.default_rng(1)), out)  # seeded
    assert not np.array_equal(out, x)


def test_the_model_has_74_8_million_parameters() -> None:
    params = cnn_init(0, 96, 101)
    assert sum(p.size for p in params.values()) == 74_827_811
    assert sum(p.size for p in cnn_init(0, 48, 101).values()) == 19_089_443
    with pytest.raises(ModelError, match="multiple of 8"):
        cnn_init(0, 50, 101)


def test_the_model_trains_on_a_generated_folder(tmp_path: Path, cache: Path) -> None:
    root = make_folder(tmp_path, per_category=12)
    spec = load_model(
        "dsgd.examples.caltech101:cnn", data=str(root), args="image_size=16,batch_size=8"
    )
    assert isinstance(spec.dataset.x_train, Rows) and spec.batch_size == 8
    model = CompiledModel(spec, num_shards=2)
    flat = model.initial_flat()
    before = model.evaluate(flat)["loss"]
    stream = batches(spec.dataset.x_train, spec.dataset.y_train, 8, 0, spec.augment)
    for _ in range(30):
        _, grad = model.gradient(flat, *next(stream))
        flat -= np.float32(0.01) * grad
    after = model.evaluate(flat)
    assert after["loss"] < before and after["accuracy"] > 0.5


def test_the_model_says_where_its_data_is_missing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("DSGD_CALTECH101", raising=False)
    with pytest.raises(ModelError, match="needs its data: give --data DIR"):
        cnn()
    with pytest.raises(ModelError, match="--model-arg colour: .* takes no such argument"):
        load_model("dsgd.examples.caltech101:cnn", args="colour=red")
