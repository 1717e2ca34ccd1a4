"""Paged listing, chunking and completion records (pipeline.data.chunks): sorted pages of bounded
size from a local tree and from loopback S3, what the listing holds, and records that round-trip,
detect a changed shard and go when stale."""

from __future__ import annotations

import json
import os
from pathlib import Path

import boto3
import numpy as np
import pytest

from pipeline.data.chunks import (
    Held,
    check_consistent,
    chunked,
    key_hashes,
    local_pages,
    make_record,
    read_record,
    record_folder,
    remove_stale_records,
    result_of,
    s3_pages,
    shards_intact,
    write_record,
)
from pipeline.data.imageset import DataError
from pipeline.data.s3 import StorageError
from pipeline.data.shards import put_shard
from pipeline.data.storage import open_store


def _is_png(name: str) -> bool:
    return name.endswith(".png")


# names where a per-folder sort of bare names would differ from the sort of full paths
TRICKY = [
    "a.b/c.png",
    "a/b.png",
    "a/z/y.png",
    "a-/q.png",
    "ab.png",
    "a.png",
    "b/x.txt",
    "b/c/d.png",
]


def _local_tree(root: Path, rels: list[str]) -> None:
    for rel in rels:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(rel.encode())


def test_local_pages_are_sorted_bounded_and_hold_one_folder_level(tmp_path):
    rels = TRICKY + [f"d{i}/s{j}/im{k}.png" for i in range(4) for j in range(3) for k in range(5)]
    _local_tree(tmp_path, rels)
    held, peak = Held(), 0
    pages = []
    for page in local_pages(str(tmp_path), 4, _is_png, held):
        pages.append(page)
        peak = max(peak, held.now)
    assert all(1 <= len(p) <= 4 for p in pages) and len(pages) == -(-67 // 4)
    listed = [item[0] for p in pages for item in p]
    assert listed == sorted(r for r in rels if _is_png(r))  # the order of full relative paths
    rel, size, mtime = pages[0][0]
    st = os.stat(tmp_path / rel)
    assert (size, mtime) == (st.st_size, st.st_mtime_ns)
    # held: the top level (10 entries), one d*/ level (3) and one s*/ folder (5) at most
    assert 5 <= peak <= 10 + 3 + 5 and held.now == 0
    with pytest.raises(StorageError, match="cannot list"):
        next(local_pages(str(tmp_path / "missing"), 4, _is_png))


def test_chunked_regroups_pages_in_order_and_holds_a_page_at_most():
    pages = [list(range(a, min(a + 7, 50))) for a in range(0, 50, 7)]
    held, peak = Held(), 0
    chunks = []
    for chunk in chunked(iter(pages), 5, held):
        chunks.append(chunk)
        peak = max(peak, held.buffered)
    assert [len(c) for c in chunks] == [5] * 10 and [x for c in chunks for x in c] == list(
        range(50)
    )
    assert peak < 7 + 5 and held.buffered == 0
    assert [len(c) for c in chunked(iter([[1, 2, 3]]), 2)] == [2, 1]


def test_s3_pages_sorted_bounded_with_etags(s3_bucket, s3_env):
    s3 = boto3.client("s3", endpoint_url=s3_env["AWS_ENDPOINT_URL"])
    keys = TRICKY + [f"n/{i:02d}.png" for i in range(11)] + ["folder/"]
    for k in keys:
        s3.put_object(Bucket=s3_bucket, Key=f"in/{k}", Body=k.encode())
    s3.put_object(Bucket=s3_bucket, Key="other/z.png", Body=b"outside the prefix")
    pages = list(s3_pages(open_store(f"s3://{s3_bucket}/in", create=False), 3, _is_png))
    assert all(1 <= len(p) <= 3 for p in pages)
    listed = [item for p in pages for item in p]
    assert [rel for rel, _, _ in listed] == sorted(k for k in keys if _is_png(k))
    head = s3.head_object(Bucket=s3_bucket, Key="in/a/b.png")
    assert ("a/b.png", 7, head["ETag"].strip('"')) in listed
    with pytest.raises(StorageError, match="cannot list s3://no-such-bucket-x/in"):
        next(s3_pages(open_store("s3://no-such-bucket-x/in", create=False), 3, _is_png))


def _result(store, index: int) -> dict:
    """A chunk's result as write_chunk gives it: a train shard, no holdout shard."""
    shard = put_shard(store, "data/d/train", f"shard-{index:06d}.tar", b"tar bytes %d" % index, 2)
    return {"index": index, "label": f"chunk {index}", "hashes": key_hashes(["k1", "k2"]),
            "shape": (4, 4, 1), "channels": 1, "train": shard, "holdout": None}  # fmt: skip


def test_records_round_trip_detect_changed_shards_and_go_when_stale(tmp_path):
    store = open_store(str(tmp_path))
    for i in range(5):
        write_record(store, "d", i, make_record(_result(store, i), f"fp{i}", rgb=i == 2))
    record = read_record(store, "d", 3)
    assert record["inputs"] == "fp3" and record["rgb"] is False and record["shape"] == [4, 4, 1]
    back = result_of(record)
    expected = _result(store, 3)
    np.testing.assert_array_equal(back["hashes"], expected["hashes"])
    assert back["train"] == {**{k: expected["train"][k] for k in ("name", "count", "bytes",
                             "sha256")}, "written": False}  # fmt: skip
    assert back["shape"] == (4, 4, 1) and back["holdout"] is None and back["channels"] == 1
    assert read_record(store, "d", 2)["rgb"] is True
    assert shards_intact(store, "d", record)
    (tmp_path / "data/d/train/shard-000003.tar").write_bytes(b"tar bytes 9")  # same size
    assert not shards_intact(store, "d", record)
    (tmp_path / "data/d/train/shard-000003.tar").unlink()
    assert not shards_intact(store, "d", record)
    assert read_record(store, "d", 7) is None  # absent
    (tmp_path / record_folder("d") / "chunk-000001.json").write_text("{not json")
    assert read_record(store, "d", 1) is None
    (tmp_path / record_folder("d") / "chunk-000004.json").write_text(json.dumps({"format": 1}))
    assert read_record(store, "d", 4) is None
    remove_stale_records(store, "d", 2)
    assert sorted(os.listdir(tmp_path / record_folder("d"))) == ["chunk-000000.json",
                                                                 "chunk-000001.json"]  # fmt: skip


class _Source:
    name = "test"

    def describe(self) -> dict:
        return {"source": "test", "path": "in"}


def test_check_consistent_sizes_and_duplicate_keys():
    def result(label, shape, keys):
        return {"label": label, "shape": shape, "hashes": key_hashes(keys)}

    ok = {0: result("t0", (4, 4, 3), ["a", "b"]), 1: result("t1", (4, 4, 3), ["c"])}
    check_consistent(ok, {(4, 4, 3)}, _Source(), 8)
    mixed = {**ok, 2: result("t2", (5, 5, 3), ["d"])}
    with pytest.raises(DataError, match=r"mixed image sizes across inputs \(t0: 4x4, t2: 5x5\)"):
        check_consistent(mixed, {(4, 4, 3), (5, 5, 3)}, _Source(), 8)
    dup = {**ok, 2: result("t2", (4, 4, 3), ["e", "b"])}
    with pytest.raises(DataError, match=r"\['t0', 't2'\] hold the same key"):
        check_consistent(dup, {(4, 4, 3)}, _Source(), 8)
    with pytest.raises(DataError, match="in: no images"):
        check_consistent({}, set(), _Source(), 8)
