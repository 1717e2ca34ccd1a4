"""Chunks of a streamed source: the input listed in pages, cut into chunks, and each chunk's
completion record (make_shards at any scale; the Ray driver is
:func:`pipeline.data.sources.write_sharded`).

Listing: :func:`local_pages` walks a local folder and :func:`s3_pages` lists an ``s3://`` prefix, both
in the sorted order of the relative paths (by code point, as ``sorted`` gives), yielding pages of at
most ``page_size`` items ``(rel, size, token)``: the token is ``st_mtime_ns`` locally and the ETag on
S3. :func:`chunked` regroups pages into chunks of ``size`` items. A :class:`Held` counts the items the
listing and the chunker hold at the moment: at most one page, one partial chunk and, locally, the
not yet listed entries of the folders on the current path (a flat folder's names, all of them).

Records: a chunk that is done puts ``data/<dataset>/.chunks/chunk-NNNNNN.json`` after its shards
(:func:`make_record`): the sha256 of its inputs' fingerprint, the entries of its shards, its image
shape and its key hashes. A rerun whose chunk has the same fingerprint and whose shards still have
the recorded sha256 (:func:`shards_intact`) takes the chunk's result from the record
(:func:`result_of`) without reading an input.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from pipeline.data.imageset import DataError
from pipeline.data.layout import data_folder
from pipeline.data.s3 import ObjectNotFound, StorageError, _client, s3_error
from pipeline.data.storage import Store

CLUSTER_IN_FLIGHT = 64  # chunk tasks in flight on a cluster: the autoscaler adds CPU nodes for them

Item = tuple[str, int, Any]  # (relative path, size in bytes, mtime_ns or ETag)
RECORDS = ".chunks"
RECORD_FORMAT = 1
SPLITS = ("train", "holdout")


@dataclass
class Held:
    """Items held now: ``listed`` by the listing (not yet in a page handed out), ``buffered`` by
    the chunker (not yet in a chunk handed out)."""

    listed: int = 0
    buffered: int = 0

    @property
    def now(self) -> int:
        return self.listed + self.buffered


# ------------------------------------------------------------------------------------------ listing
def _entries(root: str, rel_dir: str, keep: Callable[[str], bool]) -> list[tuple]:
    """The sub-folders and kept files of ``root/rel_dir``, sorted so that ``pop()`` gives the next
    in the order of full relative paths: a folder sorts as ``name/``, the prefix of its paths."""
    path = os.path.join(root, rel_dir) if rel_dir else root
    out = []
    try:
        with os.scandir(path) as found:
            for e in found:
                rel = f"{rel_dir}/{e.name}" if rel_dir else e.name
                if e.is_dir(follow_symlinks=False):
                    out.append((e.name + "/", rel, True, 0, 0))
                elif keep(e.name) and e.is_file():
                    st = e.stat()
                    out.append((e.name, rel, False, st.st_size, st.st_mtime_ns))
    except OSError as exc:
        raise StorageError(f"cannot list {path}: {exc.strerror or exc}") from None
    out.sort(reverse=True)
    return [t[1:] for t in out]


def local_pages(
    root: str, page_size: int, keep: Callable[[str], bool], held: Held | None = None
) -> Iterator[list[Item]]:
    """The files under the local folder ``root`` whose name ``keep`` accepts, recursively (symlinked
    folders are not followed), as pages of at most ``page_size`` ``(rel, size, st_mtime_ns)`` in
    sorted order of ``rel``. One folder's entries are read at a time (``os.scandir``)."""
    held = held if held is not None else Held()
    return _paged(_local_items(root, keep, held), page_size, held)


def _local_items(root: str, keep: Callable[[str], bool], held: Held) -> Iterator[Item]:
    """:func:`local_pages`' files one by one; ``held.listed`` counts the entries listed and not yet
    handed on (the open folders' remaining entries)."""
    stack = [_entries(root, "", keep)]
    held.listed += len(stack[0])
    while stack:
        if not stack[-1]:
            stack.pop()
            continue
        rel, is_dir, size, mtime = stack[-1].pop()
        if is_dir:
            stack.append(_entries(root, rel, keep))
            held.listed += len(stack[-1]) - 1
            continue
        yield (rel, size, mtime)


def s3_pages(
    store: Store, page_size: int, keep: Callable[[str], bool], held: Held | None = None
) -> Iterator[list[Item]]:
    """The objects under the S3 folder ``store`` whose base name ``keep`` accepts, as pages of at
    most ``page_size`` ``(rel, size, etag)``, listed by ``ListObjectsV2`` pages (in key order, the
    sorted order of ``rel`` for UTF-8 keys); one response (<= 1000 keys) is held at a time."""
    held = held if held is not None else Held()
    return _paged(_s3_items(store, page_size, keep, held), page_size, held)


def _s3_items(
    store: Store, page_size: int, keep: Callable[[str], bool], held: Held
) -> Iterator[Item]:
    """:func:`s3_pages`' objects one by one, each counted in ``held.listed`` as it is listed."""
    bucket, _, key = store.path.partition("/")
    prefix = key.strip("/") + "/" if key.strip("/") else ""
    responses = iter(
        _client(store.s3)
        .get_paginator("list_objects_v2")
        .paginate(Bucket=bucket, Prefix=prefix, PaginationConfig={"PageSize": min(page_size, 1000)})
    )
    while True:
        try:
            resp = next(responses, None)
        except Exception as exc:  # boto3 raises many types
            raise s3_error(exc, store.uri, "list", store.s3) from None
        if resp is None:
            return
        for obj in resp.get("Contents", []):
            k = obj["Key"]
            if k.endswith("/") or not keep(k.rsplit("/", 1)[-1]):
                continue
            held.listed += 1
            yield (k[len(prefix) :], int(obj["Size"]), obj["ETag"].strip('"'))


def _paged(items: Iterator[Item], page_size: int, held: Held) -> Iterator[list[Item]]:
    """``items`` as pages of at most ``page_size``, in order; an item leaves ``held.listed`` (where
    its source counted it) when its page is handed on."""
    page: list[Item] = []
    for item in items:
        page.append(item)
        if len(page) == page_size:
            held.listed -= len(page)
            yield page
            page = []
    held.listed -= len(page)
    if page:
        yield page


def chunked(pages: Iterable[list], size: int, held: Held | None = None) -> Iterator[list]:
    """The items of ``pages`` regrouped into chunks of ``size`` (the last may be shorter), in order;
    holds at most one page and one partial chunk (``held.buffered``)."""
    held = held if held is not None else Held()
    buf: list = []
    for page in pages:
        buf.extend(page)
        start = 0
        while len(buf) - start >= size:
            chunk = buf[start : start + size]
            start += size
            held.buffered = len(buf) - start
            yield chunk
        buf = buf[start:]
        held.buffered = len(buf)
    held.buffered = 0
    if buf:
        yield buf


# ------------------------------------------------------------------------------------------ records
def fingerprint(inputs: Any) -> str:
    """sha256 of the canonical JSON (sorted keys, no spaces) of ``inputs``."""
    text = json.dumps(inputs, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def key_hashes(keys: list[str]) -> np.ndarray:
    """The first 8 bytes (big-endian) of blake2b of each key, (N,) uint64: the duplicate check."""
    return np.array(
        [int.from_bytes(hashlib.blake2b(k.encode(), digest_size=8).digest(), "big") for k in keys],
        dtype=np.uint64,
    )


def record_folder(dataset: str) -> str:
    return f"{data_folder(dataset)}/{RECORDS}"


def record_name(index: int) -> str:
    return f"chunk-{index:06d}.json"


def make_record(result: dict[str, Any], inputs: str, rgb: bool) -> dict[str, Any]:
    """The completion record of a chunk :func:`pipeline.data.sources.write_chunk` just wrote:
    ``inputs`` (the fingerprint's sha256), ``rgb`` (grayscale stored as RGB), its shape, native
    channels, label, key hashes (base64 of big-endian uint64) and per split the shard's entry."""
    hashes = np.asarray(result["hashes"], dtype=">u8").tobytes()
    shards = {
        s: None if result[s] is None else {k: result[s][k] for k in ("name", "count", "bytes", "sha256")}
        for s in SPLITS
    }  # fmt: skip
    return {
        "format": RECORD_FORMAT, "index": result["index"], "inputs": inputs, "rgb": rgb,
        "label": result["label"], "channels": result["channels"],
        "shape": None if result["shape"] is None else list(result["shape"]),
        "keys": base64.b64encode(hashes).decode(), "shards": shards,
    }  # fmt: skip


def read_record(store: Store, dataset: str, index: int) -> dict[str, Any] | None:
    """Chunk ``index``'s record, None when absent or not a record of this format (then the chunk is
    redone)."""
    try:
        data = store.read_bytes(record_folder(dataset), record_name(index))
    except ObjectNotFound:
        return None
    try:
        record = json.loads(data)
        ok = record.get("format") == RECORD_FORMAT and record.get("index") == index
        ok = ok and isinstance(record.get("shards"), dict) and isinstance(record.get("keys"), str)
    except (ValueError, AttributeError):
        return None
    return record if ok else None


def write_record(store: Store, dataset: str, index: int, record: dict[str, Any]) -> None:
    """Put chunk ``index``'s record (one atomic put, sorted keys); call it after its shards."""
    data = json.dumps(record, indent=1, sort_keys=True).encode()
    store.write_bytes(data, record_folder(dataset), record_name(index))


def shards_intact(store: Store, dataset: str, record: dict[str, Any]) -> bool:
    """Whether every shard the record names is stored with the recorded sha256 (S3: the sha256 its
    put recorded, one HEAD; locally: the shard hashed)."""
    for split in SPLITS:
        entry = record["shards"].get(split)
        if (
            entry is not None
            and store.sha256(data_folder(dataset, split), entry["name"]) != entry["sha256"]
        ):
            return False
    return True


def result_of(record: dict[str, Any]) -> dict[str, Any]:
    """The chunk's result as :func:`pipeline.data.sources.write_chunk` returns it, from its record:
    nothing written."""
    shards = {
        s: None if e is None else {**e, "written": False} for s, e in record["shards"].items()
    }
    return {
        "index": record["index"], "label": record["label"], "channels": record["channels"],
        "shape": None if record["shape"] is None else tuple(record["shape"]),
        "hashes": np.frombuffer(base64.b64decode(record["keys"]), dtype=">u8").astype(np.uint64),
        **{s: shards.get(s) for s in SPLITS},
    }  # fmt: skip


def remove_stale_records(store: Store, dataset: str, count: int) -> None:
    """Delete the records of chunks ``>= count`` (an earlier run's, with smaller chunks)."""
    for name in store.listdir(record_folder(dataset)):
        stem = name.removeprefix("chunk-").removesuffix(".json")
        if (
            name.startswith("chunk-")
            and name.endswith(".json")
            and stem.isdigit()
            and int(stem) >= count
        ):
            store.delete(record_folder(dataset), name)


# ------------------------------------------------------------------------------------------- driver
def check_consistent(results: dict[int, dict], shapes: set, source, page_size: int) -> None:
    """One image size across the chunks' ``results``, and no key twice (by 64-bit key hashes; a
    source with ``explain_duplicate`` names the two inputs or clears a hash collision)."""
    if not shapes:
        raise DataError(f"{source.describe().get('path') or source.name}: no images")
    if len({s[:2] for s in shapes}) > 1:
        first: dict[tuple, str] = {}
        for r in results.values():
            if r["shape"] is not None:
                first.setdefault(r["shape"][:2], r["label"])
        where = ", ".join(f"{label}: {h}x{w}" for (h, w), label in sorted(first.items()))
        raise DataError(
            f"mixed image sizes across inputs ({where}); one size is required (pass --image-size)"
        )
    hashes = np.concatenate([r["hashes"] for r in results.values()])
    uniq, counts = np.unique(hashes, return_counts=True)
    del hashes
    for dup in uniq[counts > 1]:
        if hasattr(source, "explain_duplicate"):
            if (err := source.explain_duplicate(int(dup), page_size)) is not None:
                raise err
            continue
        where = [r["label"] for r in results.values() if (r["hashes"] == dup).any()]
        raise DataError(f"duplicate sample keys across inputs: {where[:2]} hold the same key")


def run_tasks(
    fn: Callable, tasks: Iterator[tuple[int, Any, tuple]], held: Held, progress: bool, desc: str,
    max_in_flight: int | None,
) -> tuple[dict[int, dict], int]:  # fmt: skip
    """Run ``fn(*args)`` as a Ray task (1 CPU) for each ``(index, spec, args)`` of ``tasks``, drawn
    from the plan only as slots free: at most ``max_in_flight`` at a time (default: twice the CPUs
    of a private local Ray, :data:`CLUSTER_IN_FLIGHT` on an autoscaling cluster, whose head has none). Returns the results by index and the peak of input items held (the specs in flight,
    ``len(spec)`` for a list else 1, plus ``held`` by the plan). The first failure cancels the rest
    and raises the task's own :class:`DataError`, :class:`StorageError` or ``ConfigError``."""
    import ray
    from ray.exceptions import RayTaskError
    from tqdm import tqdm

    from pipeline.core.config import ConfigError
    from pipeline.data.parallel import parallelism

    remote = ray.remote(num_cpus=1)(fn)
    local_cap = 2 * int(ray.cluster_resources().get("CPU", 1))
    window = max_in_flight or max(2, parallelism(CLUSTER_IN_FLIGHT, local_cap))
    pending: dict[Any, tuple[int, int]] = {}  # ref -> (index, items in its spec)
    results: dict[int, dict] = {}
    peak = 0
    with tqdm(desc=desc, unit="shard", disable=not progress) as bar:
        try:
            while True:
                while len(pending) < window and (task := next(tasks, None)) is not None:
                    i, spec, args = task
                    items = len(spec) if isinstance(spec, list) else 1
                    pending[remote.remote(*args)] = (i, items)
                    del task, spec, args
                    peak = max(peak, held.now + sum(n for _, n in pending.values()))
                if not pending:
                    return results, peak
                done, _ = ray.wait(list(pending), num_returns=1)
                for ref in done:
                    i, _ = pending.pop(ref)
                    try:
                        results[i] = ray.get(ref)
                    except RayTaskError as exc:
                        cause = getattr(exc, "cause", None)
                        if isinstance(cause, (DataError, StorageError, ConfigError)):
                            raise cause from None
                        raise
                    bar.update(1)
        finally:
            for ref in pending:
                ray.cancel(ref)
