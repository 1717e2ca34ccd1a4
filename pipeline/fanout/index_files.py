"""The files of one replica-index build in its store: byte ranges, keys per part, cached part files.

A build folder (``indexes/<dataset>/<embedding>/<kind>/<build_id>/``) holds, per part ``p``,
``rows-<p>.u8`` (the uint8 training images, row after row), ``keys-<p>.json`` and, for IVF,
``ivf-<p>.faiss``. Readers here never copy a folder:

- rows are byte ranges of the rows files (a local store: positioned reads; S3: ranged GETs through
  the store's pyarrow filesystem, one open handle per file, at most :data:`OPEN_FILES`), adjacent
  rows in one read;
- keys are read per part, only for parts a reported row lies in (at most :data:`KEY_PARTS` parts'
  keys held);
- a part's FAISS file is memory-mapped where it lies (local store) or from a node-local cache
  (S3: ``$TMPDIR/cpsample-index-parts/``, at most ``CPSAMPLE_INDEX_CACHE_GB`` GiB, default
  :data:`DEFAULT_CACHE_GB`, least recently used files removed first).
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import uuid
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.data.storage import ObjectNotFound, StorageError, Store

OPEN_FILES = 64  # open rows-file handles per reader
KEY_PARTS = 8  # parts whose keys a reader keeps
DEFAULT_CACHE_GB = 32.0  # node-local cache of part files (S3 stores)
CACHE_ENV = "CPSAMPLE_INDEX_CACHE_GB"
CACHE_ROOT = "cpsample-index-parts"


def rows_name(part: int) -> str:
    return f"rows-{part:05d}.u8"


def keys_name(part: int) -> str:
    return f"keys-{part:05d}.json"


def ivf_name(part: int) -> str:
    return f"ivf-{part:05d}.faiss"


class BuildFolder:
    """Reads of one build folder through the store's filesystem: byte ranges, small whole files,
    and local paths of part files (see the module's docstring for the bounds)."""

    def __init__(self, store: Store, path: str, build_id: str):
        self.store, self.path, self.build_id = store, path, build_id
        self._files: OrderedDict[str, Any] = OrderedDict()

    def _open(self, name: str):
        f = self._files.pop(name, None)
        if f is None:
            try:
                f = self.store.fs.open_input_file(self.store.join(self.path, name))
            except (FileNotFoundError, OSError) as exc:
                raise _missing(self.store, self.path, name, exc) from None
        self._files[name] = f
        while len(self._files) > OPEN_FILES:
            self._files.popitem(last=False)[1].close()
        return f

    def read_range(self, name: str, offset: int, size: int) -> bytes:
        """``size`` bytes of ``name`` from ``offset`` (one positioned read or ranged GET)."""
        data = self._open(name).read_at(size, offset)
        if len(data) != size:
            raise StorageError(
                f"{self.store.uri_of(self.path, name)}: {len(data)} bytes at {offset}, "
                f"expected {size} (a truncated index file: rebuild with jobs/build_index.py)"
            )
        return data

    def read_file(self, name: str) -> bytes:
        """A whole small file of the folder (keys, the mean image, the trained index)."""
        try:
            with self.store.fs.open_input_stream(self.store.join(self.path, name)) as f:
                return f.read()
        except (FileNotFoundError, OSError) as exc:
            raise _missing(self.store, self.path, name, exc) from None

    def exists(self, name: str) -> bool:
        import pyarrow.fs as pafs

        info = self.store.fs.get_file_info(self.store.join(self.path, name))
        return info.type == pafs.FileType.File

    def local_path(self, name: str) -> Path:
        """A local file with ``name``'s content: the store's own file, or (S3) a copy in the node's
        bounded cache, fetched once per node and build (a finished copy is renamed into place)."""
        if self.store.is_local:
            return Path(self.store.join(self.path, name))
        root = Path(tempfile.gettempdir()) / CACHE_ROOT
        dest = root / self.build_id / name
        if dest.exists():
            os.utime(dest)  # recently used: evicted last
            return dest
        size = self.store.fs.get_file_info(self.store.join(self.path, name)).size or 0
        evict(root, size, cache_bytes())
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".{name}.{uuid.uuid4().hex[:8]}.tmp")
        try:
            src_path = self.store.join(self.path, name)
            with self.store.fs.open_input_stream(src_path) as src, open(tmp, "wb") as dst:
                while chunk := src.read(1 << 24):
                    dst.write(chunk)
            os.replace(tmp, dest)
        finally:
            tmp.unlink(missing_ok=True)
        return dest

    def close(self) -> None:
        for f in self._files.values():
            with contextlib.suppress(Exception):
                f.close()
        self._files.clear()

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_files": OrderedDict()}


def _missing(store: Store, path: str, name: str, exc: Exception) -> StorageError:
    msg = f"cannot read {store.uri_of(path, name)}: {exc}"
    if isinstance(exc, FileNotFoundError) or "not found" in str(exc).lower():
        return ObjectNotFound(f"{msg} (rebuild the index with jobs/build_index.py)")
    return StorageError(msg)


def cache_bytes() -> int:
    """The node-local part cache's bound in bytes (``CPSAMPLE_INDEX_CACHE_GB``)."""
    return int(float(os.environ.get(CACHE_ENV, DEFAULT_CACHE_GB)) * (1 << 30))


def evict(root: Path, incoming: int, limit: int) -> list[Path]:
    """Remove the least recently used cached files under ``root`` until ``incoming`` more bytes fit
    in ``limit`` (a file a process still maps stays readable by it). Returns the removed files."""
    files = [p for p in root.rglob("*") if p.is_file() and not p.name.startswith(".")]
    stats = {p: p.stat() for p in files}
    total = sum(s.st_size for s in stats.values())
    removed = []
    for p in sorted(files, key=lambda p: stats[p].st_mtime):
        if total + incoming <= limit:
            break
        p.unlink(missing_ok=True)
        total -= stats[p].st_size
        removed.append(p)
    return removed


class BuildRows:
    """The training rows and keys of a build (``sidecar``: its parts, image shape, path), read by
    byte ranges and per part; nothing is read at construction."""

    def __init__(self, store: Store, sidecar: dict[str, Any]):
        self.sidecar = sidecar
        self.build_id = sidecar["build_id"]
        self.files = BuildFolder(store, sidecar["path"], self.build_id)
        self.shape = tuple(sidecar["image_shape"])
        self.row_bytes = int(np.prod(self.shape))
        self.ntotal = int(sidecar["num_images"])
        self.parts = sidecar["parts"]
        self.starts = np.asarray([p["start"] for p in self.parts], dtype=np.int64)
        self._keys: OrderedDict[int, list[str]] = OrderedDict()

    def part_of(self, idx: np.ndarray) -> np.ndarray:
        """The part position (into ``parts``) of each global row; out-of-range rows raise."""
        idx = np.asarray(idx, dtype=np.int64).reshape(-1)
        if len(idx) and (idx.min() < 0 or idx.max() >= self.ntotal):
            raise IndexError(f"rows must lie in [0, {self.ntotal}), got {idx.min()}..{idx.max()}")
        return np.searchsorted(self.starts, idx, side="right") - 1

    def keys_of(self, idx) -> list[str]:
        """The keys of global rows ``idx``; reads the keys file of each part touched, only."""
        idx = np.asarray(idx, dtype=np.int64).reshape(-1)
        parts = self.part_of(idx)
        return [
            self._part_keys(int(p))[int(i - self.starts[p])]
            for i, p in zip(idx, parts, strict=True)
        ]

    def _part_keys(self, pos: int) -> list[str]:
        keys = self._keys.pop(pos, None)
        if keys is None:
            keys = json.loads(self.files.read_file(keys_name(self.parts[pos]["part"])))
        self._keys[pos] = keys
        while len(self._keys) > KEY_PARTS:
            self._keys.popitem(last=False)
        return keys

    def rows(self, idx) -> np.ndarray:
        """The uint8 training images (n, H, W, C) at global rows ``idx``: byte ranges of the rows
        files, one read per run of adjacent rows."""
        idx = np.asarray(idx, dtype=np.int64).reshape(-1)
        uniq, inv = np.unique(idx, return_inverse=True)
        parts = self.part_of(uniq)
        out = np.empty((len(uniq), self.row_bytes), dtype=np.uint8)
        j = 0
        while j < len(uniq):  # a run: adjacent rows of one part
            e = j + 1
            while e < len(uniq) and uniq[e] == uniq[e - 1] + 1 and parts[e] == parts[j]:
                e += 1
            p = int(parts[j])
            off = int(uniq[j] - self.starts[p]) * self.row_bytes
            data = self.files.read_range(
                rows_name(self.parts[p]["part"]), off, (e - j) * self.row_bytes
            )
            out[j:e] = np.frombuffer(data, np.uint8).reshape(e - j, self.row_bytes)
            j = e
        return out[inv].reshape(len(idx), *self.shape)

    def iter_rows(self, chunk: int, span: tuple[int, int] | None = None):
        """(first global row, uint8 rows (n, D)) over the parts (those starting in ``span``, when
        given), ``chunk`` rows per read."""
        for p in self.parts:
            if span is not None and not span[0] <= p["start"] < span[1]:
                continue
            for lo in range(0, p["count"], chunk):
                n = min(chunk, p["count"] - lo)
                data = self.files.read_range(
                    rows_name(p["part"]), lo * self.row_bytes, n * self.row_bytes
                )
                yield p["start"] + lo, np.frombuffer(data, np.uint8).reshape(n, self.row_bytes)

    def close(self) -> None:
        self.files.close()
