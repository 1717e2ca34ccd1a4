"""Bounded reads of a split: a seeded uniform subset of its images, and its mean image, one shard at a
time.

Evaluation needs a few hundred members and non-members and the training set's mean image, not the
split itself: these read only the shards that hold the picked rows (each checked against the
dataset's manifest), so memory is one shard plus the picked images whatever the split's size.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np

from pipeline.data.imageset import DataError, ImageSet
from pipeline.data.shards import dataset_manifest, manifest_shards, read_checked_tar
from pipeline.data.storage import Store
from pipeline.data.tars import concat


def shard_counts(store: Store, folder: str) -> list[tuple[str, int | None]]:
    """``(name, count)`` of every shard under ``folder``, in name order: the counts are the
    manifest's; a folder without one (shards put there by hand) gives None counts."""
    manifest, split = dataset_manifest(store, folder)
    if manifest is not None and split in manifest["splits"]:
        entries = manifest["splits"][split]["shards"]
        return sorted((sh["name"], int(sh["count"])) for sh in entries)
    names = sorted(n for n in store.listdir(folder) if n.endswith((".tar", ".tar.gz", ".tgz")))
    return [(n, None) for n in names]


def read_shard(store: Store, folder: str, name: str, entries: dict | None = None) -> ImageSet:
    """One shard, checked against the manifest's sha256 when the folder has one (``entries``:
    :func:`pipeline.data.shards.manifest_shards`, read when None)."""
    return read_checked_tar(store, folder, name, entries)


def iter_shards(store: Store, folder: str) -> Iterator[ImageSet]:
    """The shards under ``folder`` one at a time (checked as :func:`read_shard` does)."""
    counts = shard_counts(store, folder)
    if not counts:
        raise DataError(f"no shards under {store.uri_of(folder)}")
    entries = manifest_shards(store, folder)
    for name, _ in counts:
        yield read_shard(store, folder, name, entries)


def split_mean(store: Store, folder: str) -> np.ndarray:
    """The mean image of the split, flattened, in [0, 1] (float64 sums, one shard at a time): the
    centring of the replica embedding, ``mu = (1/N) sum_i x_i / 255``."""
    total, n = None, 0
    for shard in iter_shards(store, folder):
        flat = shard.images.reshape(len(shard), -1).astype(np.float64)
        total = flat.sum(0) if total is None else total + flat.sum(0)
        n += len(shard)
    if not n:
        raise DataError(f"no images under {store.uri_of(folder)}")
    return (total / n / 255.0).astype(np.float32)


def pick_images(
    store: Store,
    folder: str,
    k: int,
    seed: int,
    keep: Callable[[str], bool] | None = None,
    round_size: int = 4096,
) -> tuple[ImageSet, dict[str, int]]:
    """A seeded uniform subset of ``k`` images of the split (those whose key ``keep`` accepts), sorted
    by key, and how it was found (``{"num_images", "num_candidates", "num_kept_candidates",
    "shards_read"}``).

    Rows are visited in a seeded random order of their global positions (the manifest's per-shard
    counts place each position in a shard) in rounds of ``round_size``; each round reads only the
    shards its positions fall in, once. Without counts (no manifest) every shard is read, one at a
    time. Fewer than ``k`` accepted images give them all.
    """
    if k <= 0:
        raise ValueError(f"k must be > 0, got {k}")
    counts = shard_counts(store, folder)
    if not counts:
        raise DataError(f"no shards under {store.uri_of(folder)}")
    keep = keep or (lambda _key: True)
    rng = np.random.default_rng(seed)
    if any(c is None for _, c in counts):  # unknown counts: stream every shard, then draw
        parts = []
        for shard in iter_shards(store, folder):
            idx = [i for i, key in enumerate(shard.keys) if keep(key)]
            parts.append(shard.subset(idx))
        pool = concat(parts, store.uri_of(folder))
        order = rng.permutation(len(pool))[:k]
        info = {"num_images": sum(len(p) for p in parts), "num_candidates": len(pool)}
        info.update(num_kept_candidates=len(pool), shards_read=len(counts))
        return pool.subset(np.sort(order)), info
    names, entries = [n for n, _ in counts], manifest_shards(store, folder)
    starts = np.cumsum([0] + [int(c) for _, c in counts])
    total = int(starts[-1])
    order = rng.permutation(total)
    picked: list[ImageSet] = []
    found, seen, kept, shards_read = 0, 0, 0, 0
    for lo in range(0, total, round_size):
        positions = order[lo : lo + round_size]
        seen += len(positions)
        shard_of = np.searchsorted(starts, positions, side="right") - 1
        rank = {int(p): r for r, p in enumerate(positions)}
        chosen: list[tuple[int, str, ImageSet, int]] = []
        for s in np.unique(shard_of):
            shard = read_shard(store, folder, names[s], entries)
            shards_read += 1
            if len(shard) != starts[s + 1] - starts[s]:
                raise DataError(
                    f"{store.uri_of(folder, names[s])} holds {len(shard)} images, the manifest "
                    f"says {starts[s + 1] - starts[s]}"
                )
            # a shard's rows in key order are its positions (read_tar sorts by key)
            for p in positions[shard_of == s]:
                i = int(p - starts[s])
                if keep(shard.keys[i]):
                    chosen.append((rank[int(p)], shard.keys[i], shard, i))
        kept += len(chosen)
        chosen.sort(key=lambda c: c[0])
        for _, _, shard, i in chosen[: k - found]:
            picked.append(shard.subset([i]))
        found = min(k, found + len(chosen))
        if found >= k:
            break
    if not picked:
        raise DataError(f"{store.uri_of(folder)}: no image passes the selection")
    subset = concat(picked, store.uri_of(folder))
    subset = subset.subset(np.argsort(subset.keys, kind="stable"))
    info = {"num_images": total, "num_candidates": seen, "num_kept_candidates": kept}
    return subset, {**info, "shards_read": shards_read}
