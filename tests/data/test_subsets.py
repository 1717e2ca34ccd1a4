"""Bounded reads of a split: seeded subsets that read only the shards they need, the streamed mean."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.data.imageset import DataError, ImageSet
from pipeline.data.shards import write_dataset
from pipeline.data.storage import open_store
from pipeline.data.subsets import iter_shards, pick_images, split_mean


def _dataset(tmp_path):
    store = open_store(str(tmp_path / "s"))
    rng = np.random.default_rng(0)
    images = ImageSet(
        keys=[f"k{i:04d}" for i in range(400)],
        images=rng.integers(0, 256, (400, 4, 4, 1), dtype=np.uint8),
    )
    write_dataset(store, "d", {"train": images.subset(range(300)),
                               "holdout": images.subset(range(300, 400))}, 10)  # fmt: skip
    return store, images


def test_pick_images_reads_only_the_shards_that_hold_picked_rows(tmp_path):
    store, images = _dataset(tmp_path)
    picked, info = pick_images(store, "data/d/train", 3, seed=1, round_size=3)
    first = np.random.default_rng(1).permutation(300)  # the visiting order; shard = row // 10
    assert len(picked) == 3 and info["num_candidates"] == 3
    assert info["shards_read"] == len(set(first[:3] // 10))
    assert info["num_images"] == 300 and picked.keys == sorted(picked.keys)
    pos = [images.keys.index(k) for k in picked.keys]
    np.testing.assert_array_equal(picked.images, images.images[pos])
    # a filter: candidates are visited in rounds until enough pass it
    odd, info = pick_images(store, "data/d/train", 5, 1, lambda k: int(k[1:]) % 2 == 1, 4)
    assert len(odd) == 5 and all(int(k[1:]) % 2 == 1 for k in odd.keys)
    rounds = next(r for r in range(1, 76) if sum(first[: 4 * r] % 2) >= 5)  # rounds of 4 rows
    assert info["num_candidates"] == 4 * rounds and info["num_kept_candidates"] == sum(
        first[: 4 * rounds] % 2
    )
    assert info["shards_read"] == sum(
        len(set(first[lo : lo + 4] // 10)) for lo in range(0, 4 * rounds, 4)
    )
    # seeded: the same seed gives the same rows; more than the split holds gives all of it
    assert pick_images(store, "data/d/train", 3, seed=1, round_size=3)[0].keys == picked.keys
    assert pick_images(store, "data/d/holdout", 1000, seed=2)[0].keys == images.keys[300:]


def test_split_mean_streams_and_shards_are_checked(tmp_path):
    store, images = _dataset(tmp_path)
    expected = images.images[:300].reshape(300, -1).astype(np.float64).mean(0) / 255.0
    np.testing.assert_allclose(split_mean(store, "data/d/train"), expected, atol=1e-6)
    assert sum(len(s) for s in iter_shards(store, "data/d/holdout")) == 100
    # a shard changed after make_shards is refused by name, by every reader here
    path = tmp_path / "s" / "data" / "d" / "train" / "shard-000003.tar"
    data = bytearray(path.read_bytes())
    data[600] ^= 1
    path.write_bytes(bytes(data))
    with pytest.raises(
        DataError, match=r"checksum mismatch for \S*/data/d/train/shard-000003\.tar"
    ):
        split_mean(store, "data/d/train")
    with pytest.raises(
        DataError, match=r"checksum mismatch for \S*/data/d/train/shard-000003\.tar"
    ):
        pick_images(store, "data/d/train", 300, 0)
    with pytest.raises(ValueError, match="k must be > 0"):
        pick_images(store, "data/d/train", 0, 0)
