"""The storage-layout contract: where dataset shards and sample shards live under a store root."""

from __future__ import annotations

import pytest

from pipeline.data.layout import data_folder, samples_folder
from pipeline.data.storage import open_store


@pytest.mark.parametrize(
    ("dataset", "split", "expected"),
    [
        ("digits", None, "data/digits"),
        ("digits", "train", "data/digits/train"),
        ("digits", "holdout", "data/digits/holdout"),
        ("cifar10", "train", "data/cifar10/train"),
    ],
)
def test_data_folder_is_the_dataset_or_one_split(dataset, split, expected):
    assert data_folder(dataset, split) == expected


def test_data_folder_without_split_is_the_parent_of_every_split():
    # the manifest sits in data/<dataset>, the shards of each split one level below
    assert data_folder("digits") == data_folder("digits", None)
    for split in ("train", "holdout"):
        parent, _, name = data_folder("digits", split).rpartition("/")
        assert parent == data_folder("digits") and name == split


@pytest.mark.parametrize(
    ("run", "sampler", "expected"),
    [
        ("demo", "ddim", "samples/demo/ddim"),
        ("demo", "cpsample", "samples/demo/cpsample"),
        ("run-2024", "cpsample", "samples/run-2024/cpsample"),
    ],
)
def test_samples_folder_is_per_run_and_sampler(run, sampler, expected):
    assert samples_folder(run, sampler) == expected


def test_layout_paths_are_store_relative_and_distinct(tmp_path):
    store = open_store(str(tmp_path / "store"))
    folders = [
        data_folder("digits"),
        data_folder("digits", "train"),
        data_folder("digits", "holdout"),
        samples_folder("a", "ddim"),
        samples_folder("a", "cpsample"),
        samples_folder("b", "ddim"),
    ]
    assert len(set(folders)) == len(folders)
    for folder in folders:
        assert not folder.startswith("/") and not folder.endswith("/")
        assert store.join(folder) == f"{tmp_path / 'store'}/{folder}"
    # the same folder through the split helper and through join: one object under the store
    store.write_bytes(b"x", data_folder("digits", "train"), "shard-000000.tar")
    assert store.listdir("data", "digits", "train") == ["shard-000000.tar"]
    assert store.exists(samples_folder("a", "ddim")) is False
