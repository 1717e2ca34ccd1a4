"""Bounded reads of a split: a seeded uniform subset of its images, and its mean image, shard by shard.

Evaluation needs a few hundred members and non-members and the training set's mean image, not the
split itself. :func:`pick_images` chooses the rows first (from the manifest's per-shard counts), then
reads only the shards that hold them, one at a time, keeping only the picked rows: memory is one
shard plus the picked images whatever the split's size. :func:`split_mean` streams the shards a few
threads at a time and folds float64 sums: memory is one shard per thread. Every shard is checked
against the dataset's manifest; ``manifest`` (a :class:`pipeline.data.handle.DatasetHandle`'s)
spares every call here a fetch of it.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import numpy as np

from pipeline.data.imageset import DataError, ImageSet
from pipeline.data.shards import dataset_manifest, manifest_shards, read_checked_tar
from pipeline.data.storage import Store
from pipeline.data.tars import concat

T, R = TypeVar("T"), TypeVar("R")
Manifest = dict[str, Any] | None


def shard_counts(
    store: Store, folder: str, manifest: Manifest = None
) -> list[tuple[str, int | None]]:
    """``(name, count)`` of every shard under ``folder``, in name order: the counts are the
    manifest's (``manifest``: already read, else looked up); a folder without one (shards put there
    by hand) gives None counts."""
    manifest, split = dataset_manifest(store, folder, manifest)
    if manifest is not None and split in manifest["splits"]:
        entries = manifest["splits"][split]["shards"]
        return sorted((sh["name"], int(sh["count"])) for sh in entries)
    names = sorted(n for n in store.listdir(folder) if n.endswith((".tar", ".tar.gz", ".tgz")))
    return [(n, None) for n in names]


def read_shard(store: Store, folder: str, name: str, entries: dict | None = None) -> ImageSet:
    """One shard, checked against the manifest's sha256 when the folder has one (``entries``:
    :func:`pipeline.data.shards.manifest_shards`, read when None)."""
    return read_checked_tar(store, folder, name, entries)


def _shard_plan(store: Store, folder: str, manifest: Manifest):
    """(``(name, count)`` per shard, the entries to check them against); a folder without shards
    is a :class:`DataError`."""
    counts = shard_counts(store, folder, manifest)
    if not counts:
        raise DataError(f"no shards under {store.uri_of(folder)}")
    return counts, manifest_shards(store, folder, manifest)


def iter_shards(store: Store, folder: str, manifest: Manifest = None) -> Iterator[ImageSet]:
    """The shards under ``folder`` one at a time (checked as :func:`read_shard` does)."""
    counts, entries = _shard_plan(store, folder, manifest)
    for name, _ in counts:
        yield read_shard(store, folder, name, entries)


def bounded_map(fn: Callable[[T], R], items: Iterable[T], threads: int) -> Iterator[R]:
    """``fn`` over ``items`` in ``threads`` threads, results in order, at most ``2 * threads`` calls
    submitted and not yet consumed (``ThreadPoolExecutor.map`` submits them all at once)."""
    if threads <= 1:
        yield from map(fn, items)
        return
    pool, pending = ThreadPoolExecutor(threads), []
    try:
        for item in items:
            pending.append(pool.submit(fn, item))
            if len(pending) >= 2 * threads:
                yield pending.pop(0).result()
        while pending:
            yield pending.pop(0).result()
    finally:
        pool.shutdown(cancel_futures=True)  # an error stops the rest


def split_mean(
    store: Store, folder: str, manifest: Manifest = None, threads: int = 4
) -> np.ndarray:
    """The mean image of the split, flattened, in [0, 1]: ``mu = (1/N) sum_i x_i / 255``, the
    centring of the replica embedding. Each shard's float64 pixel sum is computed in one of
    ``threads`` threads (reads and PNG decoding release the GIL) and the sums are folded in shard
    order, so the result does not depend on ``threads``; memory is one shard per thread."""
    counts, entries = _shard_plan(store, folder, manifest)

    def shard_sum(name: str) -> tuple[np.ndarray, int]:
        images = read_shard(store, folder, name, entries).images
        return images.reshape(len(images), -1).sum(0, dtype=np.float64), len(images)

    total, n = None, 0
    for part, count in bounded_map(shard_sum, [name for name, _ in counts], threads):
        if count:
            total = part if total is None else total + part
            n += count
    if not n:
        raise DataError(f"no images under {store.uri_of(folder)}")
    return (total / n / 255.0).astype(np.float32)


def draw_rows(
    rng: np.random.Generator, total: int, size: int, drawn: np.ndarray | None = None
) -> np.ndarray:
    """``size`` distinct row positions of ``[0, total)`` less ``drawn`` (sorted, distinct), uniform
    without replacement and in random order: one more stretch of a seeded uniform permutation.

    ``Generator.choice`` draws ranks among the free positions (Floyd's algorithm: memory O(size)
    for a small share of a large split); the r-th free position is r plus the number of drawn
    positions at or below it."""
    drawn = np.zeros(0, np.int64) if drawn is None else drawn
    free = total - len(drawn)
    ranks = rng.choice(free, size=min(size, free), replace=False).astype(np.int64)
    below = drawn - np.arange(len(drawn))  # free positions before each drawn one
    return ranks + np.searchsorted(below, ranks, side="right")


def _pick_round(
    store: Store, folder: str, names: list[str], starts: np.ndarray, positions: np.ndarray,
    entries: dict | None, keep: Callable[[str], bool], need: int,
) -> tuple[list[tuple[int, ImageSet]], int, int]:  # fmt: skip
    """Read the shards holding ``positions`` (drawn in this order), one at a time, and keep the
    first ``need`` rows (by draw order) that ``keep`` accepts: ``([(rank, one-row ImageSet)], rows
    accepted, shards read)``. Only the kept rows outlive their shard."""
    shard_of = np.searchsorted(starts, positions, side="right") - 1
    by_shard = np.argsort(shard_of, kind="stable")  # ranks grouped by shard, in draw order
    shard_ids, firsts = np.unique(shard_of[by_shard], return_index=True)
    best: list[tuple[int, str, ImageSet]] = []  # a max-heap on rank (negated) of at most need rows
    accepted, shards_read = 0, 0
    for s, ranks in zip(shard_ids, np.split(by_shard, firsts[1:]), strict=True):
        shard = read_shard(store, folder, names[s], entries)
        shards_read += 1
        expected = int(starts[s + 1] - starts[s])
        if len(shard) != expected:
            raise DataError(
                f"{store.uri_of(folder, names[s])} holds {len(shard)} images, the manifest says "
                f"{expected}"
            )
        # a shard's rows in key order are its positions (read_tar sorts by key)
        for rank in ranks:
            i = int(positions[rank] - starts[s])
            if not keep(shard.keys[i]):
                continue
            accepted += 1
            row = (-int(rank), shard.keys[i], shard.subset([i]))  # a copy: the shard can go
            if len(best) < need:
                heapq.heappush(best, row)
            elif row[0] > best[0][0]:
                heapq.heapreplace(best, row)
        del shard  # before the next shard is read
    return [(-r, row) for r, _, row in best], accepted, shards_read


def _pick_unknown_counts(
    store: Store, folder: str, k: int, rng: np.random.Generator, keep: Callable[[str], bool],
    manifest: Manifest,
) -> tuple[ImageSet, dict[str, int]]:  # fmt: skip
    """Shards without counts (no manifest): every shard read once, each accepted row given a
    seeded uniform priority, the ``k`` smallest kept (bottom-k sampling: a uniform subset without
    replacement); memory one shard plus ``k`` rows."""
    best: list[tuple[float, str, ImageSet]] = []  # a max-heap on priority (negated)
    seen = accepted = shards = 0
    for shard in iter_shards(store, folder, manifest):
        priority = rng.random(len(shard))
        seen, shards = seen + len(shard), shards + 1
        for i, key in enumerate(shard.keys):
            if not keep(key):
                continue
            accepted += 1
            row = (-float(priority[i]), key, shard.subset([i]))
            if len(best) < k:
                heapq.heappush(best, row)
            elif row[0] > best[0][0]:
                heapq.heapreplace(best, row)
        del shard  # before the next shard is read
    info = {"num_images": seen, "num_candidates": seen, "num_kept_candidates": accepted}
    return _sorted_set(store, folder, [row for _, _, row in best]), {**info, "shards_read": shards}


def _sorted_set(store: Store, folder: str, rows: list[ImageSet]) -> ImageSet:
    if not rows:
        raise DataError(f"{store.uri_of(folder)}: no image passes the selection")
    picked = concat(rows, store.uri_of(folder))
    return picked.subset(np.argsort(picked.keys, kind="stable"))


def pick_images(
    store: Store,
    folder: str,
    k: int,
    seed: int,
    keep: Callable[[str], bool] | None = None,
    round_size: int = 4096,
    manifest: Manifest = None,
) -> tuple[ImageSet, dict[str, int]]:
    """A seeded uniform subset of ``k`` images of the split (those whose key ``keep`` accepts), sorted
    by key, and how it was found (``{"num_images", "num_candidates", "num_kept_candidates",
    "shards_read"}``).

    Rows first, then shards: positions of the split are drawn uniformly without replacement
    (:func:`draw_rows`, seeded by ``seed``), placed in shards by the manifest's per-shard counts, and
    only the shards holding them are read, one at a time, keeping only the drawn rows that ``keep``
    accepts. A first round draws ``k`` rows; while fewer than ``k`` are accepted, the next round
    draws what is missing scaled by the acceptance seen so far (at least what is missing, at most
    ``round_size`` or the rows drawn so far, whichever is larger). The result is the first ``k`` accepted rows of a seeded uniform permutation.
    Memory: one shard plus the picked images. Without counts (no manifest) every shard is read once
    (bottom-k sampling, same bound). Fewer than ``k`` accepted images give them all.
    """
    if k <= 0:
        raise ValueError(f"k must be > 0, got {k}")
    if round_size <= 0:
        raise ValueError(f"round_size must be > 0, got {round_size}")
    counts, entries = _shard_plan(store, folder, manifest)
    keep = keep or (lambda _key: True)
    rng = np.random.default_rng(seed)
    if any(c is None for _, c in counts):
        return _pick_unknown_counts(store, folder, k, rng, keep, manifest)
    names = [n for n, _ in counts]
    starts = np.cumsum([0] + [int(c) for _, c in counts])
    total = int(starts[-1])
    drawn = np.zeros(0, np.int64)  # sorted: every position drawn so far
    picked: list[ImageSet] = []
    accepted = shards_read = 0
    while len(picked) < k and len(drawn) < total:
        need = k - len(picked)
        rate = accepted / len(drawn) if len(drawn) else 1.0
        size = need if rate >= 1.0 else math.ceil(need / max(rate, 1.0 / total) * 1.2)
        cap = max(round_size, len(drawn))  # rounds grow geometrically when few rows pass
        positions = draw_rows(rng, total, max(need, min(size, cap)), drawn)
        rows, got, read = _pick_round(store, folder, names, starts, positions, entries, keep, need)
        drawn = np.union1d(drawn, positions)
        accepted, shards_read = accepted + got, shards_read + read
        picked += [row for _, row in sorted(rows, key=lambda r: r[0])]
    info = {"num_images": total, "num_candidates": len(drawn), "num_kept_candidates": accepted}
    return _sorted_set(store, folder, picked), {**info, "shards_read": shards_read}
