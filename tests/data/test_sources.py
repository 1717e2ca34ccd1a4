"""Streamed sources and the parallel shard writer (pipeline.data.sources): the keyed split and
write_sharded on real local Ray with real tars, locally and on loopback S3 (paging and completion
records: test_sources_paging.py)."""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import boto3
import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from pipeline.core.config import ConfigError
from pipeline.data.imageset import DataError
from pipeline.data.shards import read_image_shards, verify_dataset
from pipeline.data.sources import (
    FolderSource,
    SyntheticSource,
    WebDatasetSource,
    is_train_key,
    write_sharded,
)
from pipeline.data.storage import open_store
from pipeline.data.synthetic import png_bytes, synthetic_image
from pipeline.data.tars import build_tar


def test_keyed_split_respects_the_fraction_and_is_stable():
    keys = [f"synthetic-{i:09d}" for i in range(20000)]
    chosen = [is_train_key(k, 3, 0.9) for k in keys]
    assert abs(np.mean(chosen) - 0.9) < 0.01
    assert chosen == [is_train_key(k, 3, 0.9) for k in keys]  # a pure function of (key, seed)
    assert chosen != [is_train_key(k, 4, 0.9) for k in keys]
    small = [is_train_key(k, 3, 0.2) for k in keys]
    assert abs(np.mean(small) - 0.2) < 0.01
    assert all(c for c, s in zip(chosen, small) if s)  # nested: a smaller fraction is a subset


def _tree(root: Path) -> dict[str, tuple[bytes, int]]:
    return {str(p.relative_to(root)): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*")) if p.is_file()}  # fmt: skip


def test_synthetic_write_sharded_manifest_idempotence_and_shard_size(ray_local, tmp_path):
    store = open_store(str(tmp_path / "s"))
    source = SyntheticSource(300, image_size=8, seed=1)
    out = write_sharded(store, "syn", source, shard_size=64, train_fraction=0.8, seed=5)
    assert len(out["written"]) == 10  # 5 chunks, a train and a holdout shard each
    manifest = json.loads((tmp_path / "s/data/syn/manifest.json").read_text())
    assert manifest["split"] == {"rule": "keyed-hash", "hash": manifest["split"]["hash"],
                                 "seed": 5, "train_fraction": 0.8}  # fmt: skip
    assert manifest["image_size"] == [8, 8] and manifest["mode"] == "RGB"
    assert manifest["source"]["num_images"] == 300
    keys = [f"synthetic-{i:09d}" for i in range(300)]
    train_keys = [k for k in keys if is_train_key(k, 5, 0.8)]
    assert manifest["splits"]["train"]["count"] == len(train_keys)
    assert manifest["splits"]["holdout"]["count"] == 300 - len(train_keys)
    for split, entry in manifest["splits"].items():
        assert entry["count"] == sum(sh["count"] for sh in entry["shards"])
        for sh in entry["shards"]:
            data = (tmp_path / "s/data/syn" / split / sh["name"]).read_bytes()
            assert hashlib.sha256(data).hexdigest() == sh["sha256"] and len(data) == sh["bytes"]
    train = read_image_shards(store, "data/syn/train")  # checked against the manifest
    assert sorted(train.keys) == train_keys
    i = train.keys.index(train_keys[3])
    np.testing.assert_array_equal(train.images[i], synthetic_image(1, int(train_keys[3][-9:]), 8))
    before = _tree(tmp_path / "s")
    again = write_sharded(store, "syn", source, shard_size=64, train_fraction=0.8, seed=5)
    assert again["written"] == [] and _tree(tmp_path / "s") == before  # nothing rewritten
    # other shard sizes: the same split, fewer shards, the stale ones gone
    write_sharded(store, "syn", source, shard_size=128, train_fraction=0.8, seed=5)
    assert sorted(read_image_shards(store, "data/syn/train").keys) == train_keys
    assert sorted(p.name for p in (tmp_path / "s/data/syn/holdout").iterdir()) == [
        f"shard-{i:06d}.tar" for i in range(3)
    ]
    verify_dataset(store, "data/syn")


def _save(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def test_nested_folder_source_and_its_errors(ray_local, tmp_path):
    rng = np.random.default_rng(0)
    src = tmp_path / "in"
    for i in range(12):  # nested folders; the first chunk all grayscale, the others colour
        shape = (10, 14) if i < 4 else (14, 10, 3)
        _save(src / f"d{i % 3}" / "sub" / f"im.{i:02d}.png", rng.integers(0, 256, shape, np.uint8))
    store = open_store(str(tmp_path / "out"))
    source = FolderSource(str(src), image_size=6)
    out = write_sharded(store, "f", source, shard_size=4, train_fraction=0.5, seed=0)
    assert out["mode"] == "RGB" and out["image_size"] == [6, 6]  # the gray chunk redone as RGB
    both = [read_image_shards(store, f"data/f/{s}") for s in ("train", "holdout")]
    keys = sorted(k for part in both for k in part.keys)
    assert keys == sorted(f"d{i % 3}__sub__im_{i:02d}" for i in range(12))
    assert all(is_train_key(k, 0, 0.5) for k in both[0].keys)
    assert all(part.images.shape[1:] == (6, 6, 3) for part in both)
    _save(src / "d0" / "sub" / "im.00.jpg", rng.integers(0, 256, (8, 8, 3), np.uint8))
    with pytest.raises(DataError, match="both give key 'd0__sub__im_00'"):
        write_sharded(store, "g", FolderSource(str(src), 6), shard_size=4)
    (src / "d0" / "sub" / "im.00.jpg").write_bytes(b"not an image")
    (src / "d0" / "sub" / "im.00.png").unlink()
    with pytest.raises(DataError, match=r"unreadable image .*im\.00\.jpg"):
        write_sharded(store, "g", FolderSource(str(src), 6), shard_size=4)
    assert not (tmp_path / "out/data/g/manifest.json").exists()
    with pytest.raises(DataError, match="does not exist or is not a folder"):
        FolderSource(str(tmp_path / "missing"))
    with pytest.raises(DataError, match="contains no PNG or JPEG"):
        write_sharded(store, "g", FolderSource(str(tmp_path / "out/data/f")), shard_size=4)
    wds_in = tmp_path / "wds"  # WebDataset tars of two sizes: named, no manifest
    wds_in.mkdir()
    for i, side in enumerate((5, 7)):
        img = rng.integers(0, 256, (side, side, 3), np.uint8)
        (wds_in / f"t{i}.tar").write_bytes(build_tar([(f"k{i}", png_bytes(img), {})]))
    with pytest.raises(DataError, match=r"mixed image sizes across inputs \(.*t0.tar: 5x5, .*t1"):
        write_sharded(store, "h", WebDatasetSource(str(wds_in)), train_fraction=0.5)
    assert not (tmp_path / "out/data/h/manifest.json").exists()


def test_webdataset_prefix_on_s3_one_task_per_tar(ray_local, s3_bucket, s3_env, tmp_path):
    rng = np.random.default_rng(2)
    with wds.ShardWriter(str(tmp_path / "in-%06d.tar"), maxcount=5, verbose=0) as sink:
        for i in range(13):
            img = rng.integers(0, 256, (8, 8), dtype=np.uint8)
            sink.write({"__key__": f"sample{i:04d}", "png": img, "cls": i % 10})
    s3 = boto3.client("s3", endpoint_url=s3_env["AWS_ENDPOINT_URL"])
    for p in sorted(tmp_path.glob("in-*.tar")):
        s3.put_object(Bucket=s3_bucket, Key=f"in/{p.name}", Body=p.read_bytes())
    store = open_store(f"s3://{s3_bucket}/out")
    source = WebDatasetSource(f"s3://{s3_bucket}/in")
    out = write_sharded(store, "w", source, shard_size=2, train_fraction=0.6, seed=0)
    shards = {s: [sh["count"] for sh in e["shards"]] for s, e in out["splits"].items()}
    assert len(shards["train"]) <= 3 and sum(shards["train"]) + sum(shards["holdout"]) == 13
    train = read_image_shards(store, "data/w/train")
    assert train.labels == [int(k[-4:]) % 10 for k in train.keys]
    assert train.images.shape[1:] == (8, 8, 1) and out["mode"] == "L"
    with pytest.raises(ConfigError, match="--num-train needs the number of images"):
        write_sharded(store, "w", source, num_train=5)
    for key in ["imgs/a/x.png", "imgs/a/b/y.png", "imgs/z.jpg"]:  # a folder on S3
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (9, 9, 3), np.uint8)).save(buf, format="PNG")
        s3.put_object(Bucket=s3_bucket, Key=key, Body=buf.getvalue())
    folder = FolderSource(f"s3://{s3_bucket}/imgs", image_size=4)
    out = write_sharded(store, "s3f", folder, shard_size=2, train_fraction=0.5, seed=1)
    keys = {k for s in ("train", "holdout") for k in read_image_shards(store, f"data/s3f/{s}").keys}
    assert keys == {"a__x", "a__b__y", "z"} and out["image_size"] == [4, 4]
    s3.put_object(Bucket=s3_bucket, Key="in/in-000001.tar", Body=b"\x07" * 4096)
    with pytest.raises(DataError, match=f"corrupt or truncated tar s3://{s3_bucket}/in/in-000001"):
        write_sharded(open_store(f"s3://{s3_bucket}/o2"), "w", source)
    assert not [o for o in s3.list_objects_v2(Bucket=s3_bucket, Prefix="o2/").get("Contents", [])
                if o["Key"].endswith("manifest.json")]  # fmt: skip
