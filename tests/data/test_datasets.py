"""Image sources (digits, folders, CIFAR-10 layout) and the train/holdout split."""

from __future__ import annotations

import re

import numpy as np
import pytest
from PIL import Image

from pipeline.data.datasets import digits_source, folder_source, split
from pipeline.data.imageset import DataError, ImageSet


@pytest.fixture(scope="module")
def core_digits16() -> ImageSet:
    return digits_source(16)


def _random_set(n=20, size=8, channels=1, seed=0, labels=True) -> ImageSet:
    rng = np.random.default_rng(seed)
    return ImageSet(
        keys=[f"img-{i:03d}" for i in range(n)],
        images=rng.integers(0, 256, (n, size, size, channels), dtype=np.uint8),
        labels=[int(v) for v in rng.integers(0, 10, n)] if labels else None,
    )


# ------------------------------------------------------------------------------------------ sources
def test_digits_source(core_digits16):
    ds = core_digits16
    assert ds.images.shape == (1797, 16, 16, 1)
    assert ds.images.dtype == np.uint8
    assert len(ds.labels) == 1797
    assert sorted(set(ds.labels)) == list(range(10))
    assert ds.keys[0] == "digits-0000"
    assert len(set(ds.keys)) == 1797
    assert ds.images.max() == 255
    assert ds.images.min() == 0


def test_digits_source_native_resolution_matches_sklearn():
    from sklearn.datasets import load_digits

    ds = digits_source(8)
    ref = np.round(load_digits().images / 16.0 * 255).astype(np.uint8)
    assert ds.images.shape == (1797, 8, 8, 1)
    np.testing.assert_array_equal(ds.images[..., 0], ref)


def test_split_deterministic_and_disjoint(core_digits16):
    train, hold = split(core_digits16, 64, seed=3)
    train2, hold2 = split(core_digits16, 64, seed=3)
    other, _ = split(core_digits16, 64, seed=4)
    assert len(train) == 64
    assert len(hold) == 1797 - 64
    assert train.keys == train2.keys
    assert hold.keys == hold2.keys
    assert train.keys != other.keys
    assert not set(train.keys) & set(hold.keys)
    assert set(train.keys) | set(hold.keys) == set(core_digits16.keys)
    idx = [core_digits16.keys.index(k) for k in train.keys[:5]]
    np.testing.assert_array_equal(train.images[:5], core_digits16.images[idx])
    assert train.labels[:5] == [core_digits16.labels[i] for i in idx]


def test_split_keeps_a_fifth_held_out():
    train, hold = split(_random_set(10), 100, seed=0)
    assert (len(train), len(hold)) == (8, 2)
    with pytest.raises(DataError, match="at least 2 images"):
        split(_random_set(1), 1, seed=0)


# ------------------------------------------------------------------------------------------- shards


# ------------------------------------------------------------------------------------------- folder
def _save(path, array):
    """2-D arrays are written as mode L, (H, W, 3) arrays as RGB."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def test_folder_source_mixed_sizes_and_modes(tmp_path):
    root = tmp_path / "imgs"
    rng = np.random.default_rng(0)
    gray = rng.integers(0, 256, (12, 12), dtype=np.uint8)
    _save(root / "a.png", gray)
    _save(root / "sub" / "b.png", rng.integers(0, 256, (20, 30, 3), dtype=np.uint8))
    _save(root / "c.my.png", rng.integers(0, 256, (8, 8, 3), dtype=np.uint8))
    (root / "notes.txt").write_text("ignored")
    ds = folder_source(root, 8)
    assert ds.images.shape == (3, 8, 8, 3)
    assert ds.images.dtype == np.uint8
    assert ds.keys == ["a", "c_my", "sub__b"]
    assert ds.labels is None
    # the grayscale image is replicated into equal RGB channels
    np.testing.assert_array_equal(ds.images[0, ..., 0], ds.images[0, ..., 1])
    np.testing.assert_array_equal(ds.images[0, ..., 0], ds.images[0, ..., 2])
    # an image already at the target size is kept pixel for pixel
    np.testing.assert_array_equal(ds.images[1], np.asarray(Image.open(root / "c.my.png")))


def test_folder_source_all_gray_is_one_channel(tmp_path):
    rng = np.random.default_rng(1)
    for i in range(3):
        _save(tmp_path / f"g{i}.png", rng.integers(0, 256, (16, 16), dtype=np.uint8))
    ds = folder_source(tmp_path, 8)
    assert ds.images.shape == (3, 8, 8, 1)


def test_folder_source_errors(tmp_path):
    with pytest.raises(DataError, match=re.escape(f"{tmp_path / 'missing'} does not exist")):
        folder_source(tmp_path / "missing", 8)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("no images")
    with pytest.raises(DataError, match=re.escape(f"{tmp_path / 'empty'} contains no PNG or JPEG")):
        folder_source(tmp_path / "empty", 8)
    a_file = tmp_path / "file.png"
    a_file.write_bytes(b"x")
    with pytest.raises(DataError, match="not a folder"):
        folder_source(a_file, 8)
    bad = tmp_path / "bad"
    _save(bad / "ok.png", np.zeros((8, 8), np.uint8))
    (bad / "broken.png").write_bytes(b"\x00garbage bytes, not an image")
    with pytest.raises(DataError, match=re.escape(f"unreadable image {bad / 'broken.png'}")):
        folder_source(bad, 8)


# ----------------------------------------------------------------- WebDataset input and manifests
def test_webdataset_source_checks_a_project_dataset_against_its_manifest(tmp_path):
    """Re-sharding make_shards' own output checks it (names and sha256); user shards have no
    manifest and are read as they are."""
    from pipeline.data.datasets import webdataset_source
    from pipeline.data.shards import write_dataset, write_image_shards
    from pipeline.data.storage import open_store

    store = open_store(str(tmp_path / "store"))
    images = _random_set(12, seed=3)
    write_dataset(store, "d", {"train": images, "holdout": _random_set(4, seed=4)}, shard_size=4)
    train = tmp_path / "store/data/d/train"
    assert webdataset_source(str(train)).keys == images.keys
    one = train / "shard-000001.tar"
    assert len(webdataset_source(str(one))) == 4
    data = one.read_bytes()
    one.write_bytes(data[: len(data) // 2] + b"\x00" * (len(data) - len(data) // 2))
    for spec in (str(train), str(one), f"{train}/shard-{{000000..000002}}.tar"):
        with pytest.raises(DataError, match=f"checksum mismatch for {re.escape(str(one))}"):
            webdataset_source(spec)
    assert len(webdataset_source(str(train / "shard-000000.tar"))) == 4  # an intact one reads
    one.write_bytes(data)
    (train / "extra.tar").write_bytes(data)
    with pytest.raises(DataError, match=r"not in the manifest: \[.*extra\.tar'\]"):
        webdataset_source(str(train))
    with pytest.raises(DataError, match=r"extra\.tar is not a shard of the dataset's manifest"):
        webdataset_source(str(train / "extra.tar"))
    # shards anyone made, with no manifest beside them
    write_image_shards(open_store(str(tmp_path / "user")), "mine", images, shard_size=5)
    assert webdataset_source(str(tmp_path / "user" / "mine")).keys == images.keys
