"""A build folder's files read by byte ranges and per part, through a real (counting) filesystem."""

from __future__ import annotations

import io
import json
import os
import time

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pytest

from pipeline.data.storage import StorageError, Store, open_store
from pipeline.fanout.index_files import BuildRows, evict, keys_name, rows_name
from pipeline.fanout.replica_store import fetch_rows

SHAPE = (4, 4, 3)
D = int(np.prod(SHAPE))
COUNTS = [5, 7, 3]  # three parts


class _CountingFile(io.RawIOBase):
    def __init__(self, path: str, log: list):
        self.f, self.path, self.log = open(path, "rb"), path, log  # noqa: SIM115 (closed in close)

    def readable(self):
        return True

    def seekable(self):
        return True

    def seek(self, offset, whence=0):
        return self.f.seek(offset, whence)

    def tell(self):
        return self.f.tell()

    def readinto(self, b):
        data = self.f.read(len(b))
        if data:  # a whole-file read ends with an empty read at EOF
            self.log.append((os.path.basename(self.path), len(data)))
        b[: len(data)] = data
        return len(data)

    def close(self):
        self.f.close()
        super().close()


class CountingHandler(pafs.FileSystemHandler):
    """The local filesystem, logging (file name, bytes) of every read."""

    def __init__(self):
        self.local, self.log = pafs.LocalFileSystem(), []

    def get_type_name(self):
        return "counting"

    def normalize_path(self, path):
        return path

    def get_file_info(self, paths):
        return self.local.get_file_info(paths)

    def get_file_info_selector(self, selector):
        return self.local.get_file_info(selector)

    def open_input_file(self, path):
        return pa.PythonFile(_CountingFile(path, self.log), mode="r")

    def open_input_stream(self, path):
        return self.open_input_file(path)

    def _refuse(self, *args, **kwargs):
        raise OSError("read-only in this test")

    create_dir = delete_dir = delete_dir_contents = delete_root_dir_contents = _refuse
    delete_file = move = copy_file = open_output_stream = open_append_stream = _refuse


@pytest.fixture
def build(tmp_path):
    """A hand-written build folder of 15 rows in three parts, its sidecar, and a counting store."""
    store = open_store(str(tmp_path))
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (sum(COUNTS), *SHAPE), dtype=np.uint8)
    keys = [f"k{i:02d}" for i in range(len(images))]
    parts, start = [], 0
    for p, n in enumerate(COUNTS):
        store.write_bytes(images[start : start + n].tobytes(), "b/id", rows_name(p))
        store.write_bytes(json.dumps(keys[start : start + n]).encode(), "b/id", keys_name(p))
        parts.append({"part": p, "start": start, "count": n})
        start += n
    sidecar = {"build_id": "id", "path": "b/id", "num_images": start, "image_shape": list(SHAPE),
               "parts": parts}  # fmt: skip
    handler = CountingHandler()
    counting = Store(uri=store.uri, fs=pafs.PyFileSystem(handler), path=store.path)
    return counting, handler.log, sidecar, images, keys


def test_fetch_rows_reads_exactly_the_requested_byte_ranges(build):
    store, log, sidecar, images, _ = build
    rows = [13, 2, 3, 4, 5, 2]  # 2..4 adjacent in part 0, 5 opens part 1, 13 in part 2; 2 twice
    got = fetch_rows(store, sidecar, rows)
    np.testing.assert_array_equal(got, images[rows])
    assert got.shape == (6, *SHAPE) and got.dtype == np.uint8
    # one read per run of adjacent rows of one part, and only the rows asked for
    assert sorted(log) == sorted([(rows_name(0), 3 * D), (rows_name(1), D), (rows_name(2), D)])
    assert not any(name.startswith("keys") for name, _ in log)


def test_keys_are_read_only_for_the_parts_touched(build):
    store, log, sidecar, _, keys = build
    reader = BuildRows(store, sidecar)
    assert reader.keys_of([14, 12]) == [keys[14], keys[12]]
    assert [name for name, _ in log if name.startswith("keys")] == [keys_name(2)]
    assert reader.keys_of(np.array([0, 13])) == [keys[0], keys[13]]  # part 2's keys kept
    assert sorted({name for name, _ in log}) == [keys_name(0), keys_name(2)]
    with pytest.raises(IndexError, match=r"rows must lie in \[0, 15\)"):
        reader.keys_of([15])
    reader.close()


def test_iter_rows_streams_a_span_of_parts(build):
    store, log, sidecar, images, _ = build
    reader = BuildRows(store, sidecar)
    got = list(reader.iter_rows(4, (5, 12)))  # part 1 only, 4 rows a read
    assert [s for s, _ in got] == [5, 9]
    np.testing.assert_array_equal(np.concatenate([b for _, b in got]), images[5:12].reshape(7, D))
    assert [n for _, n in log] == [4 * D, 3 * D]


def test_a_truncated_rows_file_is_a_clear_error(build, tmp_path):
    store, _, sidecar, _, _ = build
    path = tmp_path / "b" / "id" / rows_name(2)
    path.write_bytes(path.read_bytes()[:-1])
    with pytest.raises(StorageError, match="truncated index file"):
        fetch_rows(store, sidecar, [14])


def test_the_part_cache_evicts_the_least_recently_used_files(tmp_path):
    now = time.time()
    for i, name in enumerate(["a", "b", "c"]):
        (tmp_path / "build").mkdir(exist_ok=True)
        f = tmp_path / "build" / name
        f.write_bytes(b"x" * 100)
        os.utime(f, (now - 100 + i, now - 100 + i))  # a oldest, c newest
    removed = evict(tmp_path, 150, 300)  # 300 held + 150 incoming > 300: drop a and b
    assert [p.name for p in removed] == ["a", "b"]
    assert sorted(p.name for p in (tmp_path / "build").iterdir()) == ["c"]
    assert evict(tmp_path, 100, 300) == []
