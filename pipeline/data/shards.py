"""WebDataset shards (``<key>.png`` + ``<key>.json``): writing, the dataset manifest, and reading.

Shards are tars in the format of :mod:`pipeline.data.tars`, written in one atomic put, so that
rewriting the same data gives the same bytes; ``manifest.json`` records each shard's count and sha256,
and every reader checks them: the whole-shard readers hash the bytes they load, the others stream each
object (:func:`verify_shards`).
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any

import numpy as np

from pipeline.data.imageset import DataError, ImageSet, image_mode
from pipeline.data.layout import data_folder
from pipeline.data.storage import ObjectNotFound, StorageError, Store
from pipeline.data.tars import build_tar, concat, encode_png, read_tar

log = logging.getLogger(__name__)


def shard_name(index: int) -> str:
    return f"shard-{index:06d}.tar"


def shard_records(images: ImageSet, start: int, stop: int) -> list[tuple[str, bytes, dict]]:
    """``(key, png, meta)`` records of images ``start:stop`` (the label goes into the meta)."""
    records = []
    for i in range(start, min(stop, len(images))):
        meta = dict(images.meta[i]) if images.meta else {}
        if images.labels is not None:
            meta["label"] = images.labels[i]
        records.append((images.keys[i], encode_png(images.images[i]), meta))
    return records


def write_image_shards(
    store: Store, folder: str, images: ImageSet, shard_size: int = 1000
) -> list[str]:
    """Write ``images`` as shards under ``folder`` (:func:`put_image_shards`); the shard URIs."""
    return [sh["uri"] for sh in put_image_shards(store, folder, images, shard_size)]


def put_image_shards(
    store: Store, folder: str, images: ImageSet, shard_size: int = 1000, progress=None
) -> list[dict[str, Any]]:
    """Write ``images`` as WebDataset shards under ``folder``, resumably and idempotently.

    Shard bytes are a function of the images: a shard stored with the same sha256 is skipped. Each
    is put atomically (:func:`put_shard`); stale ``shard-*.tar`` are removed. Returns, per shard,
    ``{"name", "uri", "count", "bytes", "sha256", "written"}``."""
    if shard_size <= 0:
        raise DataError(f"shard_size must be > 0, got {shard_size}")
    if len(images):
        image_mode(images.images)
    shards = []
    for s, start in enumerate(range(0, len(images), shard_size)):
        records = shard_records(images, start, start + shard_size)
        shards.append(put_shard(store, folder, shard_name(s), build_tar(records), len(records)))
        if progress is not None:
            progress.update(shards[-1]["count"])
    remove_stale_shards(store, folder, {sh["name"] for sh in shards})
    return shards


def put_shard(store: Store, folder: str, name: str, data: bytes, count: int) -> dict[str, Any]:
    """Put a shard atomically unless stored with this sha256: ``{name, uri, count, bytes, sha256,
    written}``."""
    digest = hashlib.sha256(data).hexdigest()
    written = store.sha256(folder, name) != digest
    uri = store.write_bytes(data, folder, name) if written else store.uri_of(folder, name)
    return {"name": name, "uri": uri, "count": count, "bytes": len(data), "sha256": digest,
            "written": written}  # fmt: skip


def remove_stale_shards(store: Store, folder: str, keep: set[str]) -> None:
    """Delete ``shard-*.tar`` not in ``keep`` (an earlier, larger run's) and crashed local writes."""
    for name in store.listdir(folder):
        stale_shard = name.startswith("shard-") and name.endswith(".tar") and name not in keep
        if stale_shard or (name.startswith(".shard-") and name.endswith(".tmp")):
            store.delete(folder, name)


# ----------------------------------------------------------------------------------------- manifest
MANIFEST = "manifest.json"


def read_manifest(store: Store, dataset_folder: str) -> dict[str, Any] | None:
    """The ``manifest.json`` under ``dataset_folder`` (``data/<dataset>``), None if absent."""
    try:
        data = store.read_bytes(dataset_folder, MANIFEST)
    except ObjectNotFound:
        return None
    try:
        manifest = json.loads(data)
        if not isinstance(manifest.get("splits"), dict):
            raise ValueError("no splits")
    except (ValueError, AttributeError):
        uri = store.uri_of(dataset_folder, MANIFEST)
        raise DataError(f"{uri} is not a valid manifest") from None
    return manifest


def dataset_manifest(
    store: Store, folder: str, manifest: dict[str, Any] | None = None
) -> tuple[dict[str, Any] | None, str]:
    """(the ``manifest.json`` beside ``folder``, the split name): ``data/<dataset>/<split>`` ->
    (``data/<dataset>/manifest.json``, ``<split>``); None when there is none. ``manifest``: the
    dataset's, already read (:class:`pipeline.data.handle.DatasetHandle`): not fetched again.

    A dataset folder without a manifest holds WebDataset shards put there by hand, not by make_shards:
    they are read unchecked, with a warning. Other folders (``samples/...``) have no manifest."""
    parent, _, split = folder.rstrip("/").rpartition("/")
    if manifest is not None:
        return manifest, split
    manifest = read_manifest(store, parent) if parent else None
    if manifest is None and folder.strip("/").count("/") == 2 and folder.startswith("data/"):
        log.warning(
            "no %s beside %s: its shards are read without checking them (make_shards writes one)",
            MANIFEST, store.uri_of(folder),
        )  # fmt: skip
    return manifest, split


def check_shards(
    store: Store, folder: str, manifest: dict[str, Any], split: str, blobs: dict[str, bytes] | None
) -> list[dict[str, Any]]:
    """The tars under ``folder`` must be exactly the manifest's shards of ``split``; with ``blobs``
    (name -> bytes, all of them) their sha256 must match too. Returns the manifest's shard entries
    ``{name, count, bytes, sha256}``; raises :class:`DataError` naming the offending object."""
    entry = manifest["splits"].get(split)
    if entry is None:
        raise DataError(
            f"{store.uri_of(folder)}: the dataset's manifest has no split {split!r} "
            f"(it lists {sorted(manifest['splits'])})"
        )
    listed = {sh["name"] for sh in entry["shards"]}
    found = {n for n in store.listdir(folder) if n.endswith((".tar", ".tar.gz", ".tgz"))}
    if listed != found:
        missing, extra = sorted(listed - found), sorted(found - listed)
        raise DataError(
            f"{store.uri_of(folder)}: the shards do not match the manifest "
            f"(missing: {[store.uri_of(folder, n) for n in missing]}, "
            f"not in the manifest: {[store.uri_of(folder, n) for n in extra]})"
        )
    if blobs is not None:
        check_blobs(store, folder, entry["shards"], blobs)
    return entry["shards"]


def _check_digest(uri: str, sh: dict[str, Any], digest: str, size: int) -> None:
    if digest != sh["sha256"]:
        raise DataError(
            f"checksum mismatch for {uri}: the manifest says sha256 {sh['sha256'][:16]}... "
            f"({sh.get('bytes')} bytes), the object has {digest[:16]}... ({size} bytes); the shard "
            "was changed or cut after make_shards wrote it (rerun make_shards to rewrite it)"
        )


def check_blobs(
    store: Store, folder: str, entries: list[dict[str, Any]], blobs: dict[str, bytes]
) -> None:
    """Each of ``blobs`` (name -> bytes read from ``folder``) must be a shard of ``entries`` (the
    manifest's) with its sha256."""
    by_name = {sh["name"]: sh for sh in entries}
    for name, data in blobs.items():
        uri = store.uri_of(folder, name)
        if name not in by_name:
            raise DataError(f"{uri} is not a shard of the dataset's manifest")
        _check_digest(uri, by_name[name], hashlib.sha256(data).hexdigest(), len(data))


CHUNK_BYTES = 1 << 20


def stream_sha256(store: Store, folder: str, name: str) -> tuple[str, int]:
    """(sha256, size) of an object read in 1 MiB chunks through ``store.fs``: memory stays bounded
    whatever the shard's size, and a Ray worker reaches S3 with the credentials the store carries."""
    digest, size = hashlib.sha256(), 0
    try:
        with store.fs.open_input_stream(store.join(folder, name)) as stream:
            while chunk := stream.read(CHUNK_BYTES):
                digest.update(chunk)
                size += len(chunk)
    except FileNotFoundError:
        raise DataError(f"{store.uri_of(folder, name)} is in the manifest but missing") from None
    except OSError as exc:
        text = store.s3.scrub(str(exc)) if store.s3 else str(exc)
        raise StorageError(f"cannot read {store.uri_of(folder, name)}: {text}") from None
    return digest.hexdigest(), size


def verify_shards(
    store: Store, folder: str, entries: list[dict[str, Any]], threads: int = 1
) -> int:
    """Stream every shard of ``entries`` (the manifest's) under ``folder`` and check its sha256
    (``threads`` at a time: hashing and reads release the GIL). Returns the bytes checked; the first
    mismatch raises :class:`DataError` naming the shard's URI."""

    def one(sh: dict[str, Any]) -> int:
        digest, size = stream_sha256(store, folder, sh["name"])
        _check_digest(store.uri_of(folder, sh["name"]), sh, digest, size)
        return size

    if threads <= 1:
        return sum(one(sh) for sh in entries)
    pool = ThreadPoolExecutor(threads)
    try:
        return sum(pool.map(one, entries))
    finally:
        pool.shutdown(cancel_futures=True)  # the first mismatch stops the rest


def manifest_shards(
    store: Store, folder: str, manifest: dict[str, Any] | None = None
) -> dict[str, dict[str, Any]] | None:
    """The manifest's shard entries of the split ``folder`` (``data/<dataset>/<split>``) by name;
    None for a folder without a manifest beside it (see :func:`dataset_manifest`; ``manifest``: the
    dataset's, already read). A manifest that lacks the split is a :class:`DataError`: its shards
    could not be checked."""
    manifest, split = dataset_manifest(store, folder, manifest)
    if manifest is None:
        return None
    entry = manifest["splits"].get(split)
    if entry is None:
        raise DataError(
            f"{store.uri_of(folder)}: the dataset's manifest has no split {split!r} "
            f"(it lists {sorted(manifest['splits'])})"
        )
    return {sh["name"]: sh for sh in entry["shards"]}


def read_checked_shard(
    store: Store,
    folder: str,
    name: str,
    entries: dict[str, dict[str, Any]] | None = None,
    manifest: dict[str, Any] | None = None,
) -> bytes:
    """One shard's bytes, their sha256 checked against the manifest (``entries``: from
    :func:`manifest_shards`, taken from ``manifest`` or else looked up when None); the hash is of the
    bytes already read, so the check costs no extra I/O. A corrupt shard raises :class:`DataError`."""
    data = store.read_bytes(folder, name)
    if entries is None:
        entries = manifest_shards(store, folder, manifest)
    if entries is not None:
        check_blobs(store, folder, list(entries.values()), {name: data})
    return data


def read_checked_tar(
    store: Store,
    folder: str,
    name: str,
    entries: dict[str, dict[str, Any]] | None = None,
    manifest: dict[str, Any] | None = None,
) -> ImageSet:
    """:func:`read_tar` of :func:`read_checked_shard`."""
    data = read_checked_shard(store, folder, name, entries, manifest)
    return read_tar(data, store.uri_of(folder, name))


class _HashingReader:
    """A read-only file object over a stream that hashes every byte it hands out."""

    def __init__(self, raw) -> None:
        self.raw, self.digest, self.size = raw, hashlib.sha256(), 0

    def read(self, n: int = -1) -> bytes:
        chunk = self.raw.read() if n is None or n < 0 else self.raw.read(n)
        self.digest.update(chunk)
        self.size += len(chunk)
        return chunk

    def drain(self) -> None:
        while self.read(CHUNK_BYTES):
            pass


@contextmanager
def checked_stream(
    store: Store,
    folder: str,
    name: str,
    entries: dict[str, dict[str, Any]] | None = None,
    manifest: dict[str, Any] | None = None,
) -> Iterator[_HashingReader]:
    """A shard opened as a stream (for ``tarfile.open(fileobj=..., mode="r|*")``) whose sha256 is
    checked against the manifest (``entries``: :func:`manifest_shards`, from ``manifest`` or looked up
    when None) once the body is done: what it did not read is read then, so a reader that stops early
    is checked too. A mismatch raises :class:`DataError` naming the shard before its use."""
    if entries is None:
        entries = manifest_shards(store, folder, manifest)
    with store.fs.open_input_stream(store.join(folder, name)) as raw:
        stream = _HashingReader(raw)
        yield stream
        if entries is not None:
            stream.drain()
            uri = store.uri_of(folder, name)
            if name not in entries:
                raise DataError(f"{uri} is not a shard of the dataset's manifest")
            _check_digest(uri, entries[name], stream.digest.hexdigest(), stream.size)


def verify_folder(store: Store, folder: str, manifest: dict[str, Any] | None = None) -> int:
    """Check every shard under ``folder`` against the manifest (``manifest``: already read, or looked
    up) before a reader that cannot hash what it reads (Ray Data's ``read_webdataset``) opens them:
    the names, then each sha256 streamed one shard at a time. Returns the bytes checked (0 for a
    folder without a manifest)."""
    manifest, split = dataset_manifest(store, folder, manifest)
    if manifest is None:
        return 0
    return verify_shards(store, folder, check_shards(store, folder, manifest, split, None))


def shard_groups(entries: list[dict[str, Any]], groups: int) -> list[list[dict[str, Any]]]:
    """``entries`` dealt, largest first and back and forth, into at most ``groups`` groups of about
    equal bytes."""
    ordered = sorted(entries, key=lambda sh: -int(sh.get("bytes", 0)))
    n = max(1, min(groups, len(ordered)))
    dealt: list[list[dict[str, Any]]] = [[] for _ in range(n)]
    for i, sh in enumerate(ordered):
        turn, g = divmod(i, n)
        dealt[g if turn % 2 == 0 else n - 1 - g].append(sh)
    return [group for group in dealt if group]


def verify_dataset(
    store: Store, dataset_folder: str, threads: int = 8, manifest: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Check every shard of a dataset against its manifest (``manifest``: already read, or looked
    up; names, and sha256 streamed in chunks ``threads`` shards at a time); returns the manifest."""
    manifest = manifest if manifest is not None else read_manifest(store, dataset_folder)
    if manifest is None:
        raise DataError(f"no manifest at {store.uri_of(dataset_folder, MANIFEST)}")
    for split in manifest["splits"]:
        folder = f"{dataset_folder}/{split}"
        verify_shards(store, folder, check_shards(store, folder, manifest, split, None), threads)
    return manifest


def write_dataset(
    store: Store,
    dataset: str,
    splits: dict[str, ImageSet],
    shard_size: int = 1000,
    source: dict[str, Any] | None = None,
    progress: bool = False,
    split: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write each split's shards under ``data/<dataset>/<split>``, then ``manifest.json`` (last).

    The manifest holds the counts, the shard list with count, size and sha256 per shard, the image
    size and mode, ``source`` (how the data was made) and, when given, ``split`` (the rule that made
    the splits, e.g. ``{"rule": "permutation", "seed": 0, "num_train": 64}``). No timestamps: a
    rerun on the same input rewrites nothing. The returned dict adds ``"written"`` (the names of the
    shards this call wrote), which the stored manifest leaves out."""
    from tqdm import tqdm

    shapes = {tuple(s.images.shape[1:]) for s in splits.values() if len(s)}
    if len(shapes) != 1:
        raise DataError(
            f"dataset {dataset!r}: every split needs one image size, got {sorted(shapes)}"
        )
    (shape,) = shapes
    mode = image_mode(next(s.images for s in splits.values() if len(s)))
    manifest: dict[str, Any] = {
        "dataset": dataset, "format": "webdataset", "members": ["png", "json"],
        "image_size": [shape[0], shape[1]], "channels": shape[2], "mode": mode,
        "shard_size": shard_size, "source": source or {}, "splits": {},
        **({"split": split} if split is not None else {}),
    }  # fmt: skip
    written = []
    total = sum(len(s) for s in splits.values())
    with tqdm(total=total, desc=f"shards {dataset}", unit="img", disable=not progress) as bar:
        for split_name, images in splits.items():
            shards = put_image_shards(
                store, data_folder(dataset, split_name), images, shard_size, bar
            )
            written += [f"{split_name}/{sh['name']}" for sh in shards if sh["written"]]
            manifest["splits"][split_name] = split_entry(shards)
    write_manifest(store, dataset, manifest)
    return {**manifest, "written": written}


def split_entry(shards: list[dict[str, Any]]) -> dict[str, Any]:
    """A split's manifest entry from its shards' ``{name, count, bytes, sha256, ...}``."""
    keep, count = ("name", "count", "bytes", "sha256"), sum(sh["count"] for sh in shards)
    return {"count": count, "shards": [{k: sh[k] for k in keep} for sh in shards]}


def write_manifest(store: Store, dataset: str, manifest: dict[str, Any]) -> None:
    """Put ``data/<dataset>/manifest.json`` (sorted keys, no timestamps) unless it is unchanged."""
    data = json.dumps(manifest, indent=2, sort_keys=True).encode()
    if store.sha256(data_folder(dataset), MANIFEST) != hashlib.sha256(data).hexdigest():
        store.write_bytes(data, data_folder(dataset), MANIFEST)


# ------------------------------------------------------------------------------------------ readers
def read_image_shards(
    store: Store, folder: str, manifest: dict[str, Any] | None = None
) -> ImageSet:
    """Read every ``shard-*.tar`` under ``folder`` into one :class:`ImageSet` (one size required).

    When a ``manifest.json`` sits beside the folder (``data/<dataset>/<split>``; ``manifest``: already
    read), the shards must be exactly the manifest's and their sha256 must match it (hashed from the
    bytes already read: no extra I/O); see :func:`dataset_manifest` for a folder without one."""
    names = [n for n in store.listdir(folder) if n.startswith("shard-") and n.endswith(".tar")]
    if not names:
        raise DataError(f"no shards under {store.uri_of(folder)}")
    blobs = {n: store.read_bytes(folder, n) for n in names}
    manifest, split_name = dataset_manifest(store, folder, manifest)
    if manifest is not None:
        check_shards(store, folder, manifest, split_name, blobs)
    parts = [read_tar(blobs[n], store.uri_of(folder, n)) for n in names]
    return concat(parts, store.uri_of(folder))


def images_of(
    rows: list[dict[str, Any]], store: Store, folder: str, manifest: dict[str, Any] | None = None
) -> tuple[np.ndarray, list[str]]:
    """Images (N, H, W, C) under ``folder`` ordered like ``rows`` (by key)."""
    images = read_image_shards(store, folder, manifest)
    pos = {k: i for i, k in enumerate(images.keys)}
    order = [pos[r["key"]] for r in rows]
    return images.images[order], [images.keys[i] for i in order]
