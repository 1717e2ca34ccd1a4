"""Bounded reads of a split: rows drawn first, then only their shards read, one at a time; the mean
streamed in threads."""

from __future__ import annotations

import logging
import tracemalloc

import numpy as np
import pytest

from pipeline.data.handle import open_dataset
from pipeline.data.imageset import DataError, ImageSet
from pipeline.data.shards import read_checked_tar, write_dataset
from pipeline.data.storage import open_store
from pipeline.data.subsets import draw_rows, iter_shards, pick_images, split_mean
from tests.data.test_handle import counting_store


def _dataset(store, n=400, cut=300, shard_size=10, size=4, channels=1):
    rng = np.random.default_rng(0)
    images = ImageSet(
        keys=[f"k{i:04d}" for i in range(n)],
        images=rng.integers(0, 256, (n, size, size, channels), dtype=np.uint8),
    )
    splits = {"train": images.subset(range(cut)), "holdout": images.subset(range(cut, n))}
    write_dataset(store, "d", splits, shard_size)
    if hasattr(store, "reads"):
        store.reads.clear()  # what writing read is not counted
    return images


def _shards_read(store) -> set[str]:
    return {r.rsplit("/", 1)[-1] for r in store.reads if r.endswith(".tar")}


def test_draw_rows_continues_a_uniform_permutation_without_repeats():
    rng = np.random.default_rng(3)
    first = draw_rows(rng, 50, 20)
    drawn = np.sort(first)
    more = draw_rows(rng, 50, 40, drawn)  # only 30 are left
    assert len(set(first)) == 20 and len(more) == 30
    assert sorted(np.concatenate([first, more])) == list(range(50))
    # uniform: over 2000 seeded draws of 10 rows of 100, each row is drawn about 200 times
    hits = np.zeros(100, int)
    for seed in range(2000):
        rng = np.random.default_rng(seed)
        a = draw_rows(rng, 100, 5)
        b = draw_rows(rng, 100, 5, np.sort(a))
        hits[np.concatenate([a, b])] += 1
    assert hits.sum() == 20_000 and hits.min() > 150 and hits.max() < 250
    assert abs(hits[:50].sum() - hits[50:].sum()) < 600  # no side favoured by the exclusion map


def test_pick_images_reads_only_the_shards_of_the_drawn_rows(tmp_path):
    store = counting_store(tmp_path)
    images = _dataset(store)
    m = open_dataset(store, "d").manifest
    store.reads.clear()
    picked, info = pick_images(store, "data/d/train", 7, seed=1, manifest=m)
    pos = draw_rows(np.random.default_rng(1), 300, 7)  # no filter: one round of exactly k rows
    assert picked.keys == sorted(images.keys[p] for p in pos) and len(set(picked.keys)) == 7
    np.testing.assert_array_equal(picked.images, images.images[np.sort(pos)])
    wanted = {f"shard-{s:06d}.tar" for s in pos // 10}
    assert _shards_read(store) == wanted and len(store.reads) == len(
        wanted
    )  # once each, no manifest
    assert info == {"num_images": 300, "num_candidates": 7, "num_kept_candidates": 7,
                    "shards_read": len(wanted)}  # fmt: skip
    # seeded: the same seed gives the same rows, another seed others; more than the split: all of it
    assert pick_images(store, "data/d/train", 7, seed=1)[0].keys == picked.keys
    assert pick_images(store, "data/d/train", 7, seed=2)[0].keys != picked.keys
    assert pick_images(store, "data/d/holdout", 1000, seed=2)[0].keys == images.keys[300:]


def test_a_filter_draws_more_rounds_until_enough_rows_pass(tmp_path):
    store = counting_store(tmp_path)
    _dataset(store)

    def rare(key: str) -> bool:
        return int(key[1:]) % 10 == 3  # 30 of 300 rows

    picked, info = pick_images(store, "data/d/train", 12, 4, rare, round_size=16)
    assert len(picked) == 12 and len(set(picked.keys)) == 12 and all(map(rare, picked.keys))
    assert info["num_kept_candidates"] >= 12 and info["num_candidates"] > 12  # more than 1 round
    assert info["shards_read"] == len([r for r in store.reads if r.endswith(".tar")])
    assert pick_images(store, "data/d/train", 12, 4, rare, round_size=16)[0].keys == picked.keys
    every, info = pick_images(store, "data/d/train", 100, 0, rare)  # fewer pass than asked
    assert len(every) == 30 and info["num_candidates"] == 300
    with pytest.raises(DataError, match="no image passes the selection"):
        pick_images(store, "data/d/train", 3, 0, lambda key: False)


def test_pick_images_holds_one_shard_at_a_time(tmp_path):
    """Peak traced memory while picking rows from 24 shards stays under twice what reading one
    shard takes (holding every shard a round touches would be about 12 times it)."""
    store = open_store(str(tmp_path))
    _dataset(store, n=960, cut=960 - 40, shard_size=40, size=16, channels=3)
    m = open_dataset(store, "d").manifest
    tracemalloc.start()
    read_checked_tar(store, "data/d/train", "shard-000000.tar", manifest=m)
    one_shard = tracemalloc.get_traced_memory()[1]
    tracemalloc.reset_peak()
    before = tracemalloc.get_traced_memory()[0]
    picked, info = pick_images(store, "data/d/train", 30, seed=0, manifest=m)
    peak = tracemalloc.get_traced_memory()[1] - before
    tracemalloc.stop()
    assert len(picked) == 30 and info["shards_read"] >= 12
    assert peak < 2 * one_shard, (peak, one_shard)


def test_without_a_manifest_every_shard_is_read_once_and_k_are_kept(tmp_path, caplog):
    store = counting_store(tmp_path)
    images = _dataset(store)
    (tmp_path / "data" / "d" / "manifest.json").unlink()
    with caplog.at_level(logging.WARNING, logger="pipeline.data.shards"):
        picked, info = pick_images(store, "data/d/train", 9, 5, lambda k: int(k[1:]) % 2 == 0)
    assert "read without checking them" in caplog.text
    assert len(picked) == 9 and all(int(k[1:]) % 2 == 0 for k in picked.keys)
    assert info == {"num_images": 300, "num_candidates": 300, "num_kept_candidates": 150,
                    "shards_read": 30}  # fmt: skip
    assert len(_shards_read(store)) == 30 == len([r for r in store.reads if r.endswith(".tar")])
    again, _ = pick_images(store, "data/d/train", 9, 5, lambda k: int(k[1:]) % 2 == 0)
    assert again.keys == picked.keys
    pos = [images.keys.index(k) for k in picked.keys]
    np.testing.assert_array_equal(picked.images, images.images[pos])


def test_split_mean_streams_in_threads_and_shards_are_checked(tmp_path):
    store = counting_store(tmp_path)
    images = _dataset(store)
    m = open_dataset(store, "d").manifest
    expected = images.images[:300].reshape(300, -1).astype(np.float64).mean(0) / 255.0
    store.reads.clear()
    threaded = split_mean(store, "data/d/train", m, threads=4)
    np.testing.assert_allclose(threaded, expected, atol=1e-6)
    assert len(store.reads) == 30  # the 30 shards once each, no manifest
    np.testing.assert_array_equal(split_mean(store, "data/d/train", threads=1), threaded)
    assert sum(len(s) for s in iter_shards(store, "data/d/holdout")) == 100
    # a shard changed after make_shards is refused by name, by every reader here
    path = tmp_path / "data" / "d" / "train" / "shard-000003.tar"
    data = bytearray(path.read_bytes())
    data[600] ^= 1
    path.write_bytes(bytes(data))
    with pytest.raises(
        DataError, match=r"checksum mismatch for \S*/data/d/train/shard-000003\.tar"
    ):
        split_mean(store, "data/d/train", threads=4)
    with pytest.raises(
        DataError, match=r"checksum mismatch for \S*/data/d/train/shard-000003\.tar"
    ):
        pick_images(store, "data/d/train", 300, 0)
    with pytest.raises(ValueError, match="k must be > 0"):
        pick_images(store, "data/d/train", 0, 0)
