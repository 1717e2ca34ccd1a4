"""Carlini et al.'s extraction criterion, a second replication rule beside the cosine threshold
(Ray-free).

Carlini et al. 2023 ("Extracting Training Data from Diffusion Models", USENIX Security, the CIFAR-10
section on unconditional models) call a generated image ``x^`` *extracted* from its nearest training
image ``x`` when

    l(x^, x; S) = l2(x^, x) / (alpha * E_{y in S}[l2(x^, y)])  <=  delta

with ``S`` the ``n`` training images nearest to ``x^`` in pixel l2 (``x`` among them), ``alpha`` =
0.5, ``n`` = 50 and ``delta`` = 1/3. The nearest image must be far closer than the typical near
neighbour, so a sample in a dense region, close to many training images at once, is not counted as
a copy of any one of them; a cosine threshold counts it.

What was checked: the ratio (the nearest distance over ``alpha`` times the mean of the ``n``
nearest, the nearest included), ``n = 50`` and ``alpha = 0.5`` agree with a public reimplementation
(``carlini_distance``: ``neighbors[0] / (alpha * neighbors.mean())`` over the 50 smallest
``torch.cdist`` distances). The paper's own text was not reachable from here beyond its opening
sections, so ``delta = 1/3`` is the value as the brief recalls it; all three are arguments.

The search is exact: FAISS ``IndexFlatL2`` (squared distances, square-rooted here) on pixels scaled
to [0, 1] (the ratio does not depend on the scale). :class:`NearestTrainingL2` keeps each sample's
``n`` smallest distances while the training images stream past in chunks; :func:`extraction_section`
streams both the samples (blocks of ``block``) and the training split (shard by shard): memory is
one block of samples, one training shard and ``block x n`` distances, whatever the sizes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np

CARLINI_ALPHA = 0.5
CARLINI_N = 50
CARLINI_DELTA = 1.0 / 3.0
CRITERION = "Carlini et al. 2023: l2(x^, x) / (alpha * mean l2 to the n nearest) <= delta"


def carlini_scores(distances: np.ndarray, alpha: float = CARLINI_ALPHA) -> np.ndarray:
    """``l(x^, x; S) = d_1 / (alpha * mean(d_1..d_n))`` per row of ``distances`` (N, n): each
    sample's l2 distances to its ``n`` nearest training images, in any order. A row of zeros (an
    exact copy of an image stored ``n`` times) scores 0: it is extracted."""
    d = np.asarray(distances, dtype=np.float64)
    if d.ndim != 2 or d.shape[1] < 1:
        raise ValueError(f"need (samples, n >= 1) distances, got shape {d.shape}")
    if not alpha > 0:
        raise ValueError(f"alpha must be > 0, got {alpha}")
    d = np.sort(d, axis=1)
    denom = alpha * d.mean(axis=1)
    out = np.zeros(len(d))
    np.divide(d[:, 0], denom, out=out, where=denom > 0)
    return out


def _pixels(images: np.ndarray) -> np.ndarray:
    """uint8 (N, H, W, C) -> float32 (N, H W C) rows in [0, 1]."""
    images = np.asarray(images)
    return np.ascontiguousarray(images.reshape(len(images), -1), dtype=np.float32) / 255.0


class NearestTrainingL2:
    """Each query's ``n`` smallest pixel l2 distances to the training images folded in by
    :meth:`update` (any number of calls, ``chunk`` training images per exact FAISS search); equals
    the dense top-``n`` of ``||q_i - x_j||`` over everything folded so far."""

    def __init__(self, queries: np.ndarray, n: int = CARLINI_N, chunk: int = 4096):
        if n < 1 or chunk < 1:
            raise ValueError(f"n and chunk must be >= 1, got n={n}, chunk={chunk}")
        self.queries = _pixels(queries)
        self.n, self.chunk, self.count = n, chunk, 0
        self.sq = np.zeros((len(self.queries), 0), dtype=np.float32)  # squared, ascending

    def update(self, train_images: np.ndarray) -> NearestTrainingL2:
        """Fold a batch of uint8 (M, H, W, C) training images."""
        import faiss

        train_images = np.asarray(train_images)
        dim = int(np.prod(train_images.shape[1:])) if train_images.ndim > 1 else -1
        if dim != self.queries.shape[1]:
            raise ValueError(
                f"training images of shape {train_images.shape[1:]} ({dim} values) do not match "
                f"the samples' {self.queries.shape[1]} values per image"
            )
        for lo in range(0, len(train_images), self.chunk):
            rows = _pixels(train_images[lo : lo + self.chunk])
            index = faiss.IndexFlatL2(rows.shape[1])
            index.add(rows)
            sq, _ = index.search(self.queries, min(self.n, len(rows)))  # (Q, k), squared
            merged = np.concatenate([self.sq, sq], axis=1)
            self.sq = np.sort(merged, axis=1)[:, : self.n]
            self.count += len(rows)
        return self

    def distances(self) -> np.ndarray:
        """(Q, min(n, training images seen)) l2 distances, ascending."""
        if self.count == 0:
            raise ValueError("no training images to measure distances to")
        return np.sqrt(np.maximum(self.sq, 0.0)).astype(np.float64)


def _blocks(batches: Iterable[np.ndarray], size: int) -> Iterator[np.ndarray]:
    """Regroup uint8 image batches of any sizes into blocks of at most ``size`` images."""
    held: list[np.ndarray] = []
    count = 0
    for batch in batches:
        for lo in range(0, len(batch), size):
            part = batch[lo : lo + size]
            if count + len(part) > size:
                yield np.concatenate(held)
                held, count = [], 0
            held.append(part)
            count += len(part)
    if count:
        yield np.concatenate(held)


def extraction_counts(
    samples: Iterable[np.ndarray],
    train: Callable[[], Iterable[np.ndarray]],
    n: int = CARLINI_N,
    alpha: float = CARLINI_ALPHA,
    delta: float = CARLINI_DELTA,
    block: int = 4096,
) -> dict[str, Any]:
    """The criterion over a stream of sample batches (uint8 (B, H, W, C)): per block of at most
    ``block`` samples, one pass over ``train()`` (a fresh iterable of training-image batches each
    call). Returns ``{"num_samples", "extracted", "extracted_share", "min_score",
    "median_score", "n_used"}`` (``n_used``: ``n``, or the training set's size when smaller)."""
    if not delta > 0:
        raise ValueError(f"delta must be > 0, got {delta}")
    scores, n_used = [], 0
    for queries in _blocks(samples, block):
        nearest = NearestTrainingL2(queries, n)
        for images in train():
            nearest.update(images)
        d = nearest.distances()
        scores.append(carlini_scores(d, alpha))
        n_used = d.shape[1]
    s = np.concatenate(scores) if scores else np.zeros(0)
    hits = int((s <= delta).sum())
    return {
        "num_samples": int(s.size), "extracted": hits,
        "extracted_share": hits / s.size if s.size else None,
        "min_score": float(s.min()) if s.size else None,
        "median_score": float(np.median(s)) if s.size else None, "n_used": n_used,
    }  # fmt: skip


def extraction_section(
    store,
    run: str,
    dataset,
    max_reference: int = 2000,
    seed: int = 0,
    n: int = CARLINI_N,
    alpha: float = CARLINI_ALPHA,
    delta: float = CARLINI_DELTA,
    block: int = 4096,
) -> dict[str, Any]:
    """The report's ``extraction`` section: :func:`extraction_counts` of every sampler with shards
    under ``samples/<run>/`` against ``data/<dataset>/train`` (``dataset``: a name or a
    :class:`pipeline.data.handle.DatasetHandle`), both streamed shard by shard, and of a seeded
    subset of at most ``max_reference`` held-out real images (the baseline, ``"holdout"``: real
    images no model trained on; 0 leaves it out)."""
    from pipeline.data.handle import as_handle
    from pipeline.data.subsets import iter_shards, pick_images
    from pipeline.evaluation.inputs import sampler_folders

    ds = as_handle(store, dataset)
    folder, manifest = ds.split("train"), ds.manifest

    def train() -> Iterator[np.ndarray]:
        return (sh.images for sh in iter_shards(store, folder, manifest))

    def count(batches: Iterable[np.ndarray]) -> dict[str, Any]:
        return extraction_counts(batches, train, n, alpha, delta, block)

    out: dict[str, Any] = {"criterion": CRITERION, "alpha": alpha, "n": n, "delta": delta}
    out["samplers"] = {
        name: count(sh.images for sh in iter_shards(store, f))
        for name, f in sampler_folders(store, run).items()
    }
    if max_reference > 0:
        ref, _ = pick_images(store, ds.split("holdout"), max_reference, seed, manifest=manifest)
        out["holdout"] = count([ref.images])
    return out
