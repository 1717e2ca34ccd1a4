"""Streamed image sources and the parallel shard writer: make_shards at any scale.

A source is listed in pages and planned, page by page, into small chunks of input items (an index
range, a list of files with their sizes and mtimes or ETags, one input tar; see
:mod:`pipeline.data.chunks`); :func:`write_sharded` runs one Ray task per chunk, a bounded number at
a time. Each task (:func:`run_chunk`) skips its chunk when the chunk's completion record matches its
inputs, else reads or draws the images, encodes PNGs, splits them by a keyed hash of each key
(:func:`is_train_key`: no global permutation), puts the chunk's train tar and holdout tar
(byte-reproducible) atomically unless already stored with the same sha256, then its record. The
driver folds the chunks' small results into ``manifest.json``, written last. Memory per task
depends on the chunk, never on the number of images.

Output: chunk ``i`` gives ``train/shard-i.tar`` and ``holdout/shard-i.tar`` (a split that gets no
image of the chunk has no shard ``i``), so ``shard_size`` is the number of input images per chunk
(webdataset input: one chunk per input tar, whatever ``shard_size``).

Sources: :class:`SyntheticSource` (procedural images, :func:`synthetic_image`), :class:`FolderSource`
(PNG/JPEG files under a local or ``s3://`` folder) and :class:`WebDatasetSource` (existing
WebDataset tars). The in-memory sources (digits, CIFAR-10) stay in :mod:`pipeline.data.datasets`.
"""

from __future__ import annotations

import hashlib
import io
import os
from collections.abc import Iterator
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from pipeline.core.config import ConfigError
from pipeline.data.chunks import (
    RECORD_FORMAT,
    Held,
    Item,
    check_consistent,
    chunked,
    fingerprint,
    key_hashes,
    local_pages,
    make_record,
    read_record,
    remove_stale_records,
    result_of,
    run_tasks,
    s3_pages,
    shards_intact,
    write_record,
)
from pipeline.data.datasets import IMAGE_SUFFIXES, webdataset_inputs
from pipeline.data.imageset import DataError, fit_square, safe_key, stack_images
from pipeline.data.layout import data_folder
from pipeline.data.shards import (
    check_blobs,
    put_shard,
    remove_stale_shards,
    shard_name,
    split_entry,
    write_manifest,
)
from pipeline.data.storage import StorageError, Store, open_store
from pipeline.data.synthetic import png_bytes, synthetic_image
from pipeline.data.tars import build_tar, read_tar

PAGE_SIZE = 4096  # input items listed per page (make_shards --page-size)
SPLIT_HASH = (
    "blake2b-512 of the key (UTF-8) keyed with the seed (8 bytes, big-endian, signed); "
    "train when its first 8 bytes (big-endian) / 2**64 < train_fraction"
)


def is_train_key(key: str, seed: int, fraction: float) -> bool:
    """Whether ``key`` goes to the training split: see :data:`SPLIT_HASH`. Stable across runs,
    shard sizes and machines; about ``fraction`` of the keys are chosen, independently."""
    h = hashlib.blake2b(key.encode(), key=seed.to_bytes(8, "big", signed=True)).digest()
    return int.from_bytes(h[:8], "big") / 2**64 < fraction


# ------------------------------------------------------------------------------------------- sources
Loaded = tuple[list[str], np.ndarray, list[dict[str, Any]]]  # keys, (N, H, W, C) uint8, metas


class SyntheticSource:
    """``num_images`` images of :func:`synthetic_image` (``seed``), keys ``synthetic-{index:09d}``."""

    name = "synthetic"

    def __init__(self, num_images: int, image_size: int = 32, seed: int = 0):
        if num_images <= 0:
            raise ConfigError(f"--num-images must be > 0, got {num_images}")
        if not 1 <= image_size <= 4096:
            raise ConfigError(f"--image-size must be in [1, 4096], got {image_size}")
        self.num_images, self.image_size, self.seed = num_images, image_size, seed

    def describe(self) -> dict[str, Any]:
        return {"source": self.name, "num_images": self.num_images, "image_size": self.image_size,
                "seed": self.seed, "generator": "pipeline.data.sources.synthetic_image"}  # fmt: skip

    def chunks(self, shard_size: int, page_size: int = 0, held=None) -> Iterator[tuple[int, int]]:
        n = self.num_images
        return ((a, min(a + shard_size, n)) for a in range(0, n, shard_size))

    def count(self, page_size: int = 0) -> int:
        return self.num_images

    def fingerprint(self, spec: tuple[int, int]) -> Any:
        return list(spec)

    def label(self, spec: tuple[int, int]) -> str:
        return f"synthetic images {spec[0]}..{spec[1] - 1}"

    def load(self, spec: tuple[int, int], force_rgb: bool = False) -> Loaded:
        idx = range(*spec)
        images = np.stack([synthetic_image(self.seed, i, self.image_size) for i in idx])
        return [f"synthetic-{i:09d}" for i in idx], images, [{"index": i} for i in idx]


class FolderSource:
    """Every PNG/JPEG under ``path`` (a local folder or ``s3://`` prefix, nested subfolders
    included), listed in pages in sorted order (:func:`pipeline.data.chunks.local_pages`,
    :func:`~pipeline.data.chunks.s3_pages`), centre-cropped and resized to ``image_size``. A chunk is
    a list of ``(rel, size, mtime_ns or ETag)``: its own fingerprint. Keys: the relative path without
    suffix, ``/`` -> ``__``, made safe. A chunk whose images are all grayscale is 1 channel."""

    name = "folder"

    def __init__(self, path: str, image_size: int = 16, s3_endpoint: str | None = None):
        self.path, self.image_size = path, image_size
        self.store = open_store(path, s3_endpoint, create=False)
        if self.store.is_local and not os.path.isdir(self.store.path):
            raise DataError(f"data folder {path} does not exist or is not a folder")

    def describe(self) -> dict[str, Any]:
        return {"source": self.name, "path": self.path, "image_size": self.image_size}

    def pages(self, page_size: int, held: Held | None = None) -> Iterator[list[Item]]:
        """The image files in sorted order of their relative path, ``page_size`` at most a page."""
        if self.store.is_local:
            return local_pages(self.store.path, page_size, _is_image, held)
        return s3_pages(self.store, page_size, _is_image, held)

    def chunks(self, shard_size: int, page_size: int, held: Held | None = None) -> Iterator[list]:
        empty = True
        for chunk in chunked(self.pages(page_size, held), shard_size, held):
            empty = False
            yield chunk
        if empty:
            raise DataError(f"data folder {self.store.uri} contains no PNG or JPEG images")

    def count(self, page_size: int) -> int:
        """The number of images (one listing, page by page)."""
        if total := sum(len(page) for page in self.pages(page_size)):
            return total
        raise DataError(f"data folder {self.store.uri} contains no PNG or JPEG images")

    def fingerprint(self, spec: list[Item]) -> Any:
        return [list(item) for item in spec]

    def explain_duplicate(self, key_hash: int, page_size: int) -> DataError | None:
        """The error naming two files whose keys hash to ``key_hash`` (a second listing), None when
        the keys differ (64-bit hashes of distinct keys can collide)."""
        seen: dict[str, str] = {}
        for page in self.pages(page_size):
            for rel, *_ in page:
                key = self.key(rel)
                if int(key_hashes([key])[0]) == key_hash:
                    if key in seen:
                        return DataError(
                            f"{self.store.uri}: {seen[key]} and {rel} both give key {key!r}"
                        )
                    seen[key] = rel
        return None

    @staticmethod
    def key(rel: str) -> str:
        stem = rel.rsplit(".", 1)[0] if "." in rel.rsplit("/", 1)[-1] else rel
        return safe_key(stem.replace("/", "__"))

    def label(self, spec: list[Item]) -> str:
        return f"{self.store.uri_of(spec[0][0])} (+{len(spec) - 1} more)"

    def load(self, spec: list[Item], force_rgb: bool = False) -> Loaded:
        loaded = []
        for rel, *_ in spec:
            uri = self.store.uri_of(rel)
            try:
                with self.store.fs.open_input_file(self.store.join(rel)) as fh:
                    data = fh.read()
                with Image.open(io.BytesIO(data)) as im:
                    im.load()
                    loaded.append(fit_square(im.copy(), self.image_size))
            except (UnidentifiedImageError, SyntaxError, OSError) as exc:
                raise DataError(f"unreadable image {uri}: {exc}") from None
        keys = [self.key(rel) for rel, *_ in spec]
        return keys, _rgb(stack_images(loaded), force_rgb), [{}] * len(spec)


def _is_image(name: str) -> bool:
    return "." in name and f".{name.rsplit('.', 1)[1].lower()}" in IMAGE_SUFFIXES


class WebDatasetSource:
    """The images of existing WebDataset tars (``spec``: a path, ``s3://`` URI, brace pattern or
    folder; see :func:`pipeline.data.datasets.webdataset_source`), one chunk per input tar. Keys are
    made safe; ``.json``/``.cls`` metadata and labels are kept. ``image_size`` None keeps the stored
    size, which must be one for every image. A project dataset's tars are checked against its
    manifest (names and sha256)."""

    name = "webdataset"

    def __init__(self, spec: str, image_size: int | None = None, s3_endpoint: str | None = None):
        self.spec, self.image_size, self.s3_endpoint = spec, image_size, s3_endpoint

    def describe(self) -> dict[str, Any]:
        return {"source": self.name, "path": self.spec, "image_size": self.image_size}

    def chunks(self, shard_size: int = 0, page_size: int = 0, held=None) -> Iterator[tuple]:
        return (
            (store, n, None if e is None else [sh for sh in e if sh["name"] == n])
            for store, n, e in webdataset_inputs(self.spec, self.s3_endpoint)
        )

    def fingerprint(self, spec: tuple[Store, str, list[dict] | None]) -> Any:
        """The input tar's URI, size and mtime (one stat, in the task) and its manifest entry."""
        store, name, entries = spec
        try:
            info = store.fs.get_file_info(store.join(name))
        except OSError as exc:
            text = store.s3.scrub(str(exc)) if store.s3 else str(exc)
            raise StorageError(f"cannot read {store.uri_of(name)}: {text}") from None
        return [store.uri_of(name), info.size, info.mtime_ns, entries]

    def label(self, spec: tuple[Store, str, Any]) -> str:
        return spec[0].uri_of(spec[1])

    def load(self, spec: tuple[Store, str, list[dict] | None], force_rgb: bool = False) -> Loaded:
        store, name, entries = spec
        data = store.read_bytes(name)
        if entries is not None:
            check_blobs(store, "", entries, {name: data})
        images = read_tar(data, store.uri_of(name), self.image_size)
        keys = [safe_key(k) for k in images.keys]
        if len(set(keys)) < len(keys):
            raise DataError(f"{store.uri_of(name)}: sample keys collide once made safe")
        return keys, _rgb(images.images, force_rgb), images.meta


def _rgb(images: np.ndarray, force: bool) -> np.ndarray:
    return np.repeat(images, 3, -1) if force and images.shape[-1] == 1 else images


def write_chunk(
    store: Store, dataset: str, source, index: int, spec, seed: int, fraction: float,
    force_rgb: bool = False,
) -> dict[str, Any]:  # fmt: skip
    """One task: chunk ``index`` of ``source`` -> ``train/shard-index.tar`` and
    ``holdout/shard-index.tar`` (each only when it gets images). Returns the chunk's stored shape,
    native channels (before ``force_rgb``) and label, its key hashes (for the duplicate check) and
    per split :func:`put_shard`'s result."""
    keys, images, metas = source.load(spec, False)
    channels = int(images.shape[-1]) if len(keys) else None
    images = _rgb(images, force_rgb)
    records: dict[str, list] = {"train": [], "holdout": []}
    for key, image, meta in zip(keys, images, metas):
        split = "train" if is_train_key(key, seed, fraction) else "holdout"
        records[split].append((key, png_bytes(image), meta))
    out: dict[str, Any] = {
        "index": index, "label": source.label(spec), "hashes": key_hashes(keys),
        "shape": tuple(images.shape[1:]) if len(keys) else None, "channels": channels,
    }  # fmt: skip
    for split, recs in records.items():
        folder, name = data_folder(dataset, split), shard_name(index)
        out[split] = put_shard(store, folder, name, build_tar(recs), len(recs)) if recs else None
    return out


def run_chunk(
    store: Store, dataset: str, source, index: int, spec, seed: int, fraction: float,
    rgb: bool | None = None,
) -> dict[str, Any]:  # fmt: skip
    """One task: chunk ``index`` done once. With ``rgb`` None, a completion record with the same
    input fingerprint (source, chunk inputs, index, seed, fraction) and shards still stored with the
    recorded sha256 gives the result without reading an input (``loaded`` False); otherwise (and
    always with ``rgb`` set: store grayscale as RGB or not) :func:`write_chunk`, then its record."""
    inputs = fingerprint({
        "format": RECORD_FORMAT, "source": source.describe(), "inputs": source.fingerprint(spec),
        "index": index, "seed": seed, "train_fraction": fraction,
    })  # fmt: skip
    if rgb is None:
        record = read_record(store, dataset, index)
        if (
            record is not None
            and record["inputs"] == inputs
            and shards_intact(store, dataset, record)
        ):
            return {**result_of(record), "loaded": False}
    out = write_chunk(store, dataset, source, index, spec, seed, fraction, bool(rgb))
    write_record(store, dataset, index, make_record(out, inputs, bool(rgb)))
    return {**out, "loaded": True}


# -------------------------------------------------------------------------------------------- driver
def write_sharded(
    store: Store,
    dataset: str,
    source: SyntheticSource | FolderSource | WebDatasetSource,
    *,
    shard_size: int = 1000,
    train_fraction: float | None = 0.9,
    seed: int = 0,
    num_train: int | None = None,
    progress: bool = False,
    max_in_flight: int | None = None,
    page_size: int = PAGE_SIZE,
) -> dict[str, Any]:
    """Write ``source`` as train/holdout shards under ``data/<dataset>``, one Ray task per chunk of
    ``shard_size`` input images (:func:`run_chunk`), then ``manifest.json`` (last, and only when
    every task succeeded), folded from the chunks' results.

    The input is listed in pages of ``page_size`` and planned while at most ``max_in_flight`` tasks
    run: the driver holds at most (in flight + 1) x ``shard_size`` + ``page_size`` input items
    (plus, locally, one folder's names), reported as ``peak_items``, and per chunk its shard entries
    and 8 bytes per key (the duplicate check). The split is keyed (:func:`is_train_key`).
    ``num_train`` instead of a fraction needs a source that counts its images (synthetic; folder:
    one more listing) and means the fraction ``num_train / N``. Idempotent: a chunk whose record
    matches is skipped unread, a shard stored with the same sha256 is not rewritten, shards and
    records beyond the plan are removed. Grayscale chunks become RGB when another chunk is colour.
    Call :func:`pipeline.fanout.ray_init.init_ray` first. Returns the manifest plus ``"written"``
    (the shards this call put) and ``"chunks"`` (``total``, ``loaded``, ``skipped``, ``peak_items``,
    ``page_size``).
    """
    if shard_size <= 0:
        raise ConfigError(f"--shard-size must be > 0, got {shard_size}")
    if page_size <= 0:
        raise ConfigError(f"--page-size must be > 0, got {page_size}")
    if not -(2**63) <= seed < 2**63:
        raise ConfigError(f"--seed must fit in 64 bits, got {seed}")
    if num_train is not None and isinstance(source, WebDatasetSource):
        raise ConfigError(
            "--num-train needs the number of images up front, which a WebDataset input does not "
            "give without reading it: use --train-fraction"
        )
    split: dict[str, Any] = {"rule": "keyed-hash", "hash": SPLIT_HASH, "seed": seed}
    if num_train is not None:
        total = source.count(page_size)
        if not 0 < num_train < total:
            raise ConfigError(f"--num-train must be in [1, {total - 1}] for {total} images")
        train_fraction, split["num_train"] = num_train / total, num_train
    if train_fraction is None or not 0 < train_fraction < 1:
        raise ConfigError(f"--train-fraction must be in (0, 1), got {train_fraction}")
    split["train_fraction"] = train_fraction

    def run(rgb: bool | None, only: set[int] | None, desc: str) -> tuple[dict[int, dict], int]:
        held = Held()
        planned = enumerate(source.chunks(shard_size, page_size, held))
        tasks = (
            (i, spec, (store, dataset, source, i, spec, seed, train_fraction, rgb))
            for i, spec in planned if only is None or i in only
        )  # fmt: skip
        return run_tasks(run_chunk, tasks, held, progress, desc, max_in_flight)

    results, peak = run(None, None, f"shards {dataset}")
    channels = {r["channels"] for r in results.values() if r["channels"] is not None}
    target = max(channels, default=None)  # 3 when any chunk is colour: gray chunks stored as RGB
    redo = {i for i, r in results.items() if r["shape"] is not None and r["shape"][-1] != target}
    if redo:
        more, peak2 = run(target == 3, redo, f"shards {dataset} (grayscale chunks, {target} ch)")
        results.update(more)
        peak = max(peak, peak2)
    shapes = {r["shape"] for r in results.values() if r["shape"] is not None}
    check_consistent(results, shapes, source, page_size)
    manifest: dict[str, Any] = {
        "dataset": dataset, "format": "webdataset", "members": ["png", "json"],
        "image_size": list(next(iter(shapes))[:2]), "channels": next(iter(shapes))[2],
        "mode": "L" if next(iter(shapes))[2] == 1 else "RGB", "shard_size": shard_size,
        "source": source.describe(), "splits": {}, "split": split,
    }  # fmt: skip
    written, by_split = [], {}
    for name in ("train", "holdout"):
        by_split[name] = [results[i][name] for i in sorted(results) if results[i][name] is not None]
        if not by_split[name]:
            raise DataError(
                f"dataset {dataset!r}: the keyed split put no image in {name} (train fraction "
                f"{train_fraction:.4g}); use more images or another --train-fraction"
            )
    for name, shards in by_split.items():
        remove_stale_shards(store, data_folder(dataset, name), {sh["name"] for sh in shards})
        manifest["splits"][name] = split_entry(shards)
        written += [f"{name}/{sh['name']}" for sh in shards if sh["written"]]
    remove_stale_records(store, dataset, len(results))
    write_manifest(store, dataset, manifest)
    loaded = sum(r["loaded"] for r in results.values())
    chunks = {"total": len(results), "loaded": loaded, "skipped": len(results) - loaded,
              "peak_items": peak, "page_size": page_size}  # fmt: skip
    return {**manifest, "written": written, "chunks": chunks}
