"""A dataset opened once: one read of manifest.json, and the readers that take the handle's manifest
instead of fetching it again (counted on a real local store)."""

from __future__ import annotations

import tarfile
from dataclasses import dataclass, field

import numpy as np
import pytest

from pipeline.data.handle import as_handle, open_dataset
from pipeline.data.imageset import DataError, ImageSet
from pipeline.data.provenance import manifest_digest
from pipeline.data.shards import (
    MANIFEST,
    checked_stream,
    manifest_shards,
    read_checked_tar,
    read_image_shards,
    read_manifest,
    verify_dataset,
    verify_folder,
    write_dataset,
)
from pipeline.data.storage import Store, open_store


@dataclass(frozen=True)
class CountingStore(Store):
    """The real local store, recording the path of every ``read_bytes`` (nothing else changes)."""

    reads: list[str] = field(default_factory=list, compare=False)

    def read_bytes(self, *parts: str) -> bytes:
        self.reads.append("/".join(p.strip("/") for p in parts if p))
        return super().read_bytes(*parts)

    def manifest_reads(self) -> int:
        return sum(r.endswith(MANIFEST) for r in self.reads)


def counting_store(root) -> CountingStore:
    base = open_store(str(root))
    return CountingStore(base.uri, base.fs, base.path)


def small_dataset(store: Store, n: int = 40, shard_size: int = 10) -> ImageSet:
    """``data/d``: ``n`` 4x4 grey images, train the first three quarters, holdout the rest."""
    rng = np.random.default_rng(0)
    images = ImageSet(
        [f"k{i:04d}" for i in range(n)], rng.integers(0, 256, (n, 4, 4, 1), dtype=np.uint8)
    )
    cut = 3 * n // 4
    splits = {"train": images.subset(range(cut)), "holdout": images.subset(range(cut, n))}
    write_dataset(store, "d", splits, shard_size)
    if isinstance(store, CountingStore):
        store.reads.clear()  # what writing read is not counted
    return images


def test_open_dataset_reads_the_manifest_once_and_answers_from_it(tmp_path):
    store = counting_store(tmp_path)
    small_dataset(store)
    ds = open_dataset(store, "d")
    assert store.manifest_reads() == 1
    assert ds.folder == "data/d" and ds.split("train") == "data/d/train"
    assert ds.digest == manifest_digest(read_manifest(store, "data/d"))
    assert sorted(ds.shards("train")) == [f"shard-{i:06d}.tar" for i in range(3)]
    assert ds.count("train") == 30 and ds.count("holdout") == 10 and ds.latent is None
    assert as_handle(store, ds) is ds
    with pytest.raises(DataError, match=r"no split 'valid' \(it lists \['holdout', 'train'\]\)"):
        ds.shards("valid")
    with pytest.raises(DataError, match="opened in"):
        as_handle(open_store(str(tmp_path / "other")), ds)


def test_missing_and_corrupt_manifests_are_named(tmp_path):
    store = open_store(str(tmp_path))
    small_dataset(store)
    (tmp_path / "data" / "d" / MANIFEST).write_text("{not json")
    with pytest.raises(
        DataError, match=rf"{tmp_path}/data/d/manifest.json is not a valid manifest"
    ):
        open_dataset(store, "d")
    (tmp_path / "data" / "d" / MANIFEST).unlink()
    bare = open_dataset(store, "d")  # shards put there by hand: read unchecked
    assert bare.manifest is None and bare.shards("train") is None and bare.digest is None
    with pytest.raises(DataError, match=r"no manifest at \S+/data/d/manifest.json: write"):
        open_dataset(store, "d", required=True)
    with pytest.raises(DataError, match="one path segment"):
        open_dataset(store, "d/train")


def test_readers_given_the_manifest_never_fetch_it_and_still_check_shards(tmp_path):
    store = counting_store(tmp_path)
    images = small_dataset(store)
    ds = open_dataset(store, "d")
    folder, m = ds.split("train"), ds.manifest
    assert manifest_shards(store, folder, m) == ds.shards("train")
    assert (
        read_checked_tar(store, folder, "shard-000001.tar", manifest=m).keys == images.keys[10:20]
    )
    with (
        checked_stream(store, folder, "shard-000002.tar", manifest=m) as stream,
        tarfile.open(fileobj=stream, mode="r|*") as tar,
    ):
        assert next(iter(tar)).name == "k0020.png"
    assert verify_folder(store, folder, m) > 0
    assert read_image_shards(store, ds.split("holdout"), m).keys == images.keys[30:]
    assert verify_dataset(store, ds.folder, manifest=m) is m
    assert store.manifest_reads() == 1  # open_dataset's
    # the old call forms look it up, as before
    read_checked_tar(store, folder, "shard-000000.tar")
    assert store.manifest_reads() == 2
    # a handle's manifest checks the bytes like a fetched one does
    path = tmp_path / "data" / "d" / "train" / "shard-000001.tar"
    data = bytearray(path.read_bytes())
    data[600] ^= 1
    path.write_bytes(bytes(data))
    with pytest.raises(DataError, match=r"checksum mismatch for \S*/data/d/train/shard-000001"):
        read_checked_tar(store, folder, "shard-000001.tar", manifest=m)
    with pytest.raises(DataError, match=r"checksum mismatch for \S*/data/d/train/shard-000001"):
        verify_folder(store, folder, m)
