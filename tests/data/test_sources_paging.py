"""write_sharded over a folder listed in pages, with completion records (pipeline.data.sources): the
driver's peak of held paths stays bounded, a rerun skips every chunk without reading an image and
gives a byte-identical manifest, a touched image or a deleted record redoes only its chunk, and the
same on loopback S3. Real local Ray, real PNGs and tars."""

from __future__ import annotations

import io
import os
from pathlib import Path

import boto3
import numpy as np
import pytest
from PIL import Image

from pipeline.data.chunks import record_folder
from pipeline.data.imageset import DataError
from pipeline.data.shards import read_image_shards
from pipeline.data.sources import FolderSource, write_sharded
from pipeline.data.storage import open_store

SHARD, PAGE, IN_FLIGHT = 10, 16, 2


def _images(root: Path) -> list[str]:
    """300 tiny PNGs, 10 folders x 3 sub-folders x 10 files; their relative paths, sorted."""
    rng = np.random.default_rng(0)
    rels = sorted(f"d{i}/s{j}/im{k}.png" for i in range(10) for j in range(3) for k in range(10))
    for rel in rels:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (4, 4, 3), np.uint8)).save(root / rel)
    return rels


def _stored(root: Path) -> dict[str, tuple[bytes, int]]:
    return {str(p.relative_to(root)): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*")) if p.is_file()}  # fmt: skip


def _changed(before: dict, after: dict) -> list[str]:
    return sorted(k for k in after if before.get(k) != after[k])


def _write(store, source, shard_size: int = SHARD) -> dict:
    return write_sharded(store, "p", source, shard_size=shard_size, train_fraction=0.5,
                         page_size=PAGE, max_in_flight=IN_FLIGHT)  # fmt: skip


def test_folder_in_pages_bounded_driver_and_records(ray_local, tmp_path):
    src, out = tmp_path / "in", tmp_path / "out"
    rels = _images(src)
    source = FolderSource(str(src), image_size=4)
    pages = list(source.pages(PAGE))
    assert all(len(p) <= PAGE for p in pages) and [r for p in pages for r, _, _ in p] == rels
    store = open_store(str(out))
    first = _write(store, source)
    chunks = first["chunks"]
    assert chunks["total"] == 30 and chunks["loaded"] == 30 and chunks["skipped"] == 0
    # in flight (2 x 10) + the chunker (< a page + a chunk) + the listing (10 + 3 + 10 entries)
    assert SHARD <= chunks["peak_items"] <= IN_FLIGHT * SHARD + PAGE + SHARD + 23 < len(rels)
    assert len(os.listdir(out / record_folder("p"))) == 30
    keys = {k for s in ("train", "holdout") for k in read_image_shards(store, f"data/p/{s}").keys}
    assert keys == {r[:-4].replace("/", "__") for r in rels}
    manifest = (out / "data/p/manifest.json").read_bytes()
    before = _stored(out)

    # a rerun reads no image: each is replaced by garbage of its size, its mtime put back
    originals = {}
    for rel in rels:
        path, st = src / rel, (src / rel).stat()
        originals[rel] = (path.read_bytes(), st.st_atime_ns, st.st_mtime_ns)
        path.write_bytes(b"\0" * st.st_size)
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    again = _write(store, source)
    assert again["chunks"]["skipped"] == 30 and again["chunks"]["loaded"] == 0
    assert again["written"] == [] and _stored(out) == before
    assert (out / "data/p/manifest.json").read_bytes() == manifest
    for rel, (data, atime, mtime) in originals.items():
        (src / rel).write_bytes(data)
        os.utime(src / rel, ns=(atime, mtime))

    # a touched image redoes its chunk only: the same shards, a new record
    os.utime(src / rels[123], ns=(10**18, 10**18))
    touched = _write(store, source)
    assert touched["chunks"]["loaded"] == 1 and touched["written"] == []
    assert _changed(before, _stored(out)) == [f"{record_folder('p')}/chunk-000012.json"]
    assert (out / "data/p/manifest.json").read_bytes() == manifest

    # a deleted record redoes that chunk only
    before = _stored(out)
    (out / record_folder("p") / "chunk-000007.json").unlink()
    redone = _write(store, source)
    assert redone["chunks"]["loaded"] == 1 and redone["written"] == []
    assert _changed(before, _stored(out)) == [f"{record_folder('p')}/chunk-000007.json"]

    # a changed image redoes its chunk and rewrites its shard; a removed one its chunk and the rest
    Image.fromarray(np.full((4, 4, 3), 7, np.uint8)).save(src / rels[5])
    (src / rels[295]).unlink()
    changed = _write(store, source)
    assert changed["chunks"]["loaded"] == 2 and changed["written"]
    assert {w.rsplit("-", 1)[1] for w in changed["written"]} <= {"000000.tar", "000029.tar"}
    # larger chunks: every chunk redone, the stale records and shards gone
    assert _write(store, source, shard_size=100)["chunks"]["loaded"] == 3
    assert sorted(os.listdir(out / record_folder("p"))) == [f"chunk-{i:06d}.json" for i in range(3)]
    assert len(os.listdir(out / "data/p/train")) == 3


def test_grayscale_chunk_redone_as_rgb_once_and_back(ray_local, tmp_path):
    """A gray chunk stored as RGB (another chunk is colour) is skipped on a rerun; once every chunk
    is gray, it is redone as gray: the result is what a fresh run gives."""
    src = tmp_path / "in"
    src.mkdir()
    rng = np.random.default_rng(1)
    for i in range(9):
        shape = (5, 5) if i < 3 else (5, 5, 3)
        Image.fromarray(rng.integers(0, 256, shape, np.uint8)).save(src / f"im{i}.png")
    store = open_store(str(tmp_path / "out"))
    kwargs = {"shard_size": 3, "train_fraction": 0.5, "page_size": 2}
    first = write_sharded(store, "g", FolderSource(str(src), 5), **kwargs)
    assert first["mode"] == "RGB" and first["chunks"]["loaded"] == 3
    again = write_sharded(store, "g", FolderSource(str(src), 5), **kwargs)
    assert again["chunks"]["loaded"] == 0 and again["written"] == []
    for i in range(3, 9):
        (src / f"im{i}.png").unlink()
    gray = write_sharded(store, "g", FolderSource(str(src), 5), **kwargs)
    fresh = write_sharded(
        open_store(str(tmp_path / "fresh")), "g", FolderSource(str(src), 5), **kwargs
    )
    assert gray["mode"] == "L" and gray["chunks"]["loaded"] == 1
    assert gray["splits"] == fresh["splits"]


def test_s3_folder_in_pages_skips_and_redoes_a_changed_object(ray_local, s3_bucket, s3_env):
    s3 = boto3.client("s3", endpoint_url=s3_env["AWS_ENDPOINT_URL"])
    rng = np.random.default_rng(2)

    def put(key: str, value: int | None = None) -> None:
        img = (
            rng.integers(0, 256, (6, 6, 3), np.uint8)
            if value is None
            else np.full((6, 6, 3), value, np.uint8)
        )
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="PNG")
        s3.put_object(Bucket=s3_bucket, Key=f"imgs/{key}", Body=buf.getvalue())

    for i in range(12):
        put(f"{'ab'[i % 2]}/im{i:02d}.png")
    store = open_store(f"s3://{s3_bucket}/out")
    source = FolderSource(f"s3://{s3_bucket}/imgs", image_size=6)
    assert [len(p) for p in source.pages(5)] == [5, 5, 2]
    kwargs = {"shard_size": 3, "train_fraction": 0.5, "page_size": 5, "max_in_flight": 2}
    first = write_sharded(store, "s", source, **kwargs)
    assert first["chunks"]["loaded"] == 4 and first["chunks"]["peak_items"] <= 2 * 3 + 5 + 3
    again = write_sharded(store, "s", source, **kwargs)
    assert again["chunks"]["skipped"] == 4 and again["written"] == []
    put("b/im07.png", 9)  # the 10th key in order: chunk 3
    changed = write_sharded(store, "s", source, **kwargs)
    assert changed["chunks"]["loaded"] == 1
    assert changed["written"] and all(w.endswith("shard-000003.tar") for w in changed["written"])
    put("a/im04.jpg", 1)  # gives key a__im04 a second time: named after the run, no manifest
    with pytest.raises(DataError, match=r"imgs: a/im04.jpg and a/im04.png both give key 'a__im04'"):
        write_sharded(open_store(f"s3://{s3_bucket}/o2"), "s", source, **kwargs)
    listed = s3.list_objects_v2(Bucket=s3_bucket, Prefix="o2/").get("Contents", [])
    assert not [o for o in listed if o["Key"].endswith("manifest.json")]
