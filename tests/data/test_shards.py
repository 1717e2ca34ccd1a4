"""WebDataset shards: writing, reading, reproducible tars, and the readers' errors on cut or bad shards."""

from __future__ import annotations

import io
import tarfile

import numpy as np
import pytest
import webdataset as wds

from pipeline.data.imageset import DataError, ImageSet
from pipeline.data.shards import (
    checked_stream,
    read_image_shards,
    shard_name,
    write_dataset,
    write_image_shards,
)
from pipeline.data.storage import open_store
from pipeline.data.tars import build_tar
from tests.data.test_tars import random_set, records


@pytest.mark.parametrize("channels", [1, 3])
def test_shards_round_trip(tmp_path, channels):
    store = open_store(str(tmp_path / "store"))
    ds = random_set(20, channels=channels, seed=channels)
    uris = write_image_shards(store, "data/train", ds, shard_size=7)
    assert uris == [str(tmp_path / "store" / "data" / "train" / shard_name(i)) for i in range(3)]
    assert store.listdir("data/train") == [shard_name(i) for i in range(3)]
    back = read_image_shards(store, "data/train")
    assert back.keys == ds.keys
    assert back.labels == ds.labels
    assert back.images.dtype == np.uint8
    np.testing.assert_array_equal(back.images, ds.images)
    assert back.meta == [{"label": lab} for lab in ds.labels]


def test_shards_round_trip_without_labels(tmp_path):
    store = open_store(str(tmp_path))
    ds = random_set(5, labels=False)
    ds.meta = [{"source": f"s{i}"} for i in range(5)]
    write_image_shards(store, "x", ds)
    back = read_image_shards(store, "x")
    assert back.labels is None
    assert back.meta == ds.meta


def test_write_image_shards_rejects_bad_shard_size(tmp_path):
    with pytest.raises(DataError, match="shard_size must be > 0"):
        write_image_shards(open_store(str(tmp_path)), "x", random_set(2), shard_size=0)


def test_read_image_shards_missing_folder(tmp_path):
    store = open_store(str(tmp_path))
    with pytest.raises(DataError, match=r"no shards under .*nothing-here"):
        read_image_shards(store, "nothing-here")


def test_shards_readable_by_webdataset(tmp_path):
    store = open_store(str(tmp_path))
    ds = random_set(12, channels=1, seed=9)
    uris = write_image_shards(store, "wds", ds, shard_size=5)
    dataset = wds.WebDataset(uris, shardshuffle=False).decode("rgb8")
    samples = list(dataset)
    assert [s["__key__"] for s in samples] == ds.keys
    for s, img, lab in zip(samples, ds.images, ds.labels):
        assert s["png"].shape == (8, 8, 3)
        # grayscale decoded as RGB: every channel equals the stored pixels
        for c in range(3):
            np.testing.assert_array_equal(s["png"][..., c], img[..., 0])
        assert s["json"] == {"label": lab}


def test_build_tar_is_reproducible(tmp_path):
    ds = random_set(6, channels=3)
    a = build_tar(records(ds))
    b = build_tar(records(ds))
    assert a == b
    with tarfile.open(fileobj=io.BytesIO(a)) as tar:
        members = tar.getmembers()
    assert [m.name for m in members] == [f"{k}.{e}" for k in ds.keys for e in ("png", "json")]
    assert {m.mtime for m in members} == {0}
    assert {m.mode for m in members} == {0o644}
    # writing the same set twice gives the same shard bytes
    s1, s2 = open_store(str(tmp_path / "a")), open_store(str(tmp_path / "b"))
    (u1,) = write_image_shards(s1, "f", ds)
    (u2,) = write_image_shards(s2, "f", ds)
    with open(u1, "rb") as f1, open(u2, "rb") as f2:
        assert f1.read() == f2.read() == a


def test_read_image_shards_mixed_sizes_across_shards(tmp_path):
    store = open_store(str(tmp_path))
    store.write_bytes(build_tar(records(random_set(2, size=8))), "d", shard_name(0))
    store.write_bytes(build_tar(records(random_set(2, size=4, seed=1))), "d", shard_name(1))
    with pytest.raises(DataError, match="shards hold mixed image sizes"):
        read_image_shards(store, "d")


def test_write_dataset_rejects_mixed_split_sizes(tmp_path):
    from pipeline.data.shards import write_dataset

    with pytest.raises(DataError, match="every split needs one image size"):
        write_dataset(
            open_store(str(tmp_path)), "d", {"train": random_set(2, size=8),
                                             "holdout": random_set(2, size=4)}
        )  # fmt: skip
    assert not (tmp_path / "data").exists()


# ------------------------------------------------------------------- shards against the manifest
def _dataset(store, n_train=20, shard_size=5):
    """data/d with a manifest: ``n_train`` training images in shards of ``shard_size``, 5 held out."""
    from pipeline.data.shards import write_dataset

    return write_dataset(
        store, "d", {"train": random_set(n_train, seed=1), "holdout": random_set(5, seed=2)},
        shard_size=shard_size,
    )  # fmt: skip


def _half_plus_garbage(data: bytes) -> bytes:
    """The first half, then garbage up to the same size: only the sha256 can tell."""
    return data[: len(data) // 2] + b"\xa5" * (len(data) - len(data) // 2)


@pytest.mark.parametrize("how", ["truncate", "garbage"])
def test_verify_shards_streams_and_names_the_changed_shard(tmp_path, how):
    from pipeline.data.shards import verify_shards

    store = open_store(str(tmp_path))
    manifest = _dataset(store)
    entries = manifest["splits"]["train"]["shards"]
    total = sum(sh["bytes"] for sh in entries)
    assert verify_shards(store, "data/d/train", entries) == total
    assert verify_shards(store, "data/d/train", entries, threads=3) == total
    path = tmp_path / "data/d/train/shard-000002.tar"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2] if how == "truncate" else _half_plus_garbage(data))
    for threads in (1, 3):
        with pytest.raises(DataError, match=rf"checksum mismatch for {path}: the manifest says"):
            verify_shards(store, "data/d/train", entries, threads=threads)
    with pytest.raises(DataError, match=rf"checksum mismatch for {path}"):
        read_image_shards(store, "data/d/train")  # the in-memory reader hashes what it read


def test_verify_shards_on_s3_streams_through_the_store_filesystem(s3_bucket, s3_env):
    import boto3

    from pipeline.data.shards import stream_sha256, verify_dataset

    store = open_store(f"s3://{s3_bucket}/p")
    manifest = _dataset(store)
    sh = manifest["splits"]["train"]["shards"][1]
    assert stream_sha256(store, "data/d/train", sh["name"]) == (sh["sha256"], sh["bytes"])
    assert verify_dataset(store, "data/d")["splits"] == manifest["splits"]
    key = f"p/data/d/train/{sh['name']}"
    s3 = boto3.client("s3", endpoint_url=s3_env["AWS_ENDPOINT_URL"])
    body = s3.get_object(Bucket=s3_bucket, Key=key)["Body"].read()
    # the object's sha256 metadata still says the old digest: the check must hash the bytes
    s3.put_object(
        Bucket=s3_bucket, Key=key, Body=_half_plus_garbage(body), Metadata={"sha256": sh["sha256"]}
    )
    assert store.sha256("data/d/train", sh["name"]) == sh["sha256"]
    with pytest.raises(DataError, match=rf"checksum mismatch for s3://{s3_bucket}/{key}"):
        verify_dataset(store, "data/d")


def test_check_shards_names_missing_extra_shards_and_unknown_splits(tmp_path):
    from pipeline.data.shards import check_shards, read_manifest

    store = open_store(str(tmp_path))
    _dataset(store)
    manifest = read_manifest(store, "data/d")
    folder = tmp_path / "data/d/train"
    entries = check_shards(store, "data/d/train", manifest, "train", None)
    assert [sh["name"] for sh in entries] == [shard_name(i) for i in range(4)]
    (folder / "extra.tar").write_bytes(b"")  # Ray's read_webdataset would read it too
    with pytest.raises(DataError, match=rf"not in the manifest: \['{folder}/extra.tar'\]"):
        check_shards(store, "data/d/train", manifest, "train", None)
    (folder / "extra.tar").unlink()
    (folder / shard_name(3)).unlink()
    with pytest.raises(DataError, match=rf"missing: \['{folder}/{shard_name(3)}'\]"):
        read_image_shards(store, "data/d/train")
    with pytest.raises(DataError, match=r"the dataset's manifest has no split 'valid'"):
        check_shards(store, "data/d/valid", manifest, "valid", None)


def test_dataset_manifest_warns_only_for_a_dataset_folder_without_one(tmp_path, caplog):
    from pipeline.data.shards import dataset_manifest

    store = open_store(str(tmp_path))
    _dataset(store)
    manifest, split_name = dataset_manifest(store, "data/d/train")
    assert split_name == "train" and manifest["splits"]["train"]["count"] == 20
    (tmp_path / "data/d/manifest.json").unlink()
    with caplog.at_level("WARNING", logger="pipeline.data.shards"):
        assert dataset_manifest(store, "data/d/train") == (None, "train")
        assert dataset_manifest(store, "samples/r/ddim") == (None, "ddim")
    assert [r.getMessage() for r in caplog.records] == [
        f"no manifest.json beside {tmp_path}/data/d/train: its shards are read without checking "
        "them (make_shards writes one)"
    ]
    assert len(read_image_shards(store, "data/d/train")) == 20  # read, unchecked


def test_shard_groups_balance_bytes_and_cover_every_shard_once():
    from pipeline.data.shards import shard_groups

    entries = [{"name": f"s{i}", "bytes": b} for i, b in enumerate([9, 1, 5, 5, 3, 7, 2, 8])]
    groups = shard_groups(entries, 4)
    assert len(groups) == 4
    assert sorted(sh["name"] for g in groups for sh in g) == sorted(e["name"] for e in entries)
    assert [sum(sh["bytes"] for sh in g) for g in groups] == [10, 10, 10, 10]
    assert [len(g) for g in shard_groups(entries, 100)] == [1] * 8
    assert shard_groups([], 4) == [] and len(shard_groups(entries, 0)) == 1


def test_checked_stream_checks_what_a_streaming_reader_reads(tmp_path):
    """The latent readers stream shards through tarfile ("r|*"), stopping early: the stream is
    hashed to its end on exit and compared with the manifest."""
    store = open_store(str(tmp_path))
    images = ImageSet([f"k{i}" for i in range(6)], np.zeros((6, 4, 4, 1), np.uint8))
    write_dataset(store, "d", {"train": images}, shard_size=3)

    def first_member(name: str) -> str:
        with (
            checked_stream(store, "data/d/train", name) as stream,
            tarfile.open(fileobj=stream, mode="r|*") as tar,
        ):
            return next(iter(tar)).name  # stops after the first member

    assert first_member("shard-000001.tar") == "k3.png"
    path = tmp_path / "data/d/train/shard-000001.tar"
    data = bytearray(path.read_bytes())
    data[-1] ^= 1  # the last byte: never read by a reader that stops early
    path.write_bytes(bytes(data))
    with pytest.raises(DataError, match=r"checksum mismatch for \S*/data/d/train/shard-000001"):
        first_member("shard-000001.tar")
    assert first_member("shard-000000.tar") == "k0.png"
