"""Replica check: embeddings, a FAISS inner-product index, nearest neighbours, replication rate.

A sample is a *replicate* when the cosine similarity of its embedding to its nearest training image is
at or above the threshold (Somepalli et al. 2023; CPSample, sec. 5). Embeddings are L2-normalised so
inner product = cosine.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

# (N, H, W, C) uint8 images -> (N, D) float32 L2-normalised rows
Embedding = Callable[[np.ndarray], np.ndarray]


def l2_normalise(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def raw_pixel_embedding() -> Embedding:
    """Raw-pixel cosine: dominated by shared background, so it over-calls copies (kept for comparison)."""
    return lambda images: l2_normalise(images.reshape(len(images), -1).astype(np.float32) / 255.0)


def centred_pixel_embedding(train_images: np.ndarray) -> Embedding:
    """Mean-centred pixels: subtract the training set's mean image, then L2-normalise (the default)."""
    mean = train_images.reshape(len(train_images), -1).astype(np.float32).mean(axis=0) / 255.0

    def embed(images: np.ndarray) -> np.ndarray:
        return l2_normalise(images.reshape(len(images), -1).astype(np.float32) / 255.0 - mean)

    embed.mean = mean  # type: ignore[attr-defined]
    return embed


def embed_pixels(images: np.ndarray, mean: np.ndarray | None) -> np.ndarray:
    """(N, H, W, C) uint8 -> L2-normalised pixels in [0, 1], minus ``mean`` when given (centred)."""
    flat = np.asarray(images).reshape(len(images), -1).astype(np.float32) / 255.0
    return l2_normalise(flat - mean if mean is not None else flat)


def make_embedding(name: str, train_images: np.ndarray, **options) -> Embedding:
    """Embedding by name: ``centred`` (default), ``raw`` or ``module:<path>`` (a local TorchScript
    file, :mod:`pipeline.fanout.embedders`; ``options``: size, norm, channels, batch)."""
    if name == "centred":
        return centred_pixel_embedding(train_images)
    if name == "raw":
        return raw_pixel_embedding()
    if name.startswith("module:"):
        from pipeline.fanout.embedders import make_module_embedding

        return make_module_embedding(name, **options)
    raise ValueError(f"unknown embedding {name!r}: use 'centred', 'raw' or 'module:<path>'")


FAISS_DISTRIBUTIONS = ("faiss-cpu", "faiss-gpu", "faiss-gpu-cu11", "faiss-gpu-cu12")


def faiss_distributions() -> list[str]:
    """The installed distributions that provide the ``faiss`` module."""
    from importlib import metadata

    found = []
    for name in FAISS_DISTRIBUTIONS:
        try:
            metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
        found.append(name)
    return found


def import_faiss():
    """The ``faiss`` module, from exactly one distribution: the ``cpu`` or the ``gpu`` extra.

    faiss-cpu and faiss-gpu both install a top-level ``faiss``; with both present, which one loads is
    undefined (the last one unpacked wins), so that case is refused rather than guessed."""
    found = faiss_distributions()
    if len(found) > 1:
        raise ImportError(
            f"several FAISS builds are installed ({', '.join(found)}): they overwrite each other's "
            "`faiss` module; keep one (pip uninstall -y faiss-cpu, then reinstall the gpu extra)"
        )
    try:
        import faiss
    except ImportError as exc:
        raise ImportError(
            "FAISS is not installed: pip install 'cpsample-ray[cpu]' (or '[gpu]' on CUDA machines)"
        ) from exc
    return faiss


def gpu_available() -> bool:
    faiss = import_faiss()

    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


def build_index(
    train_emb: np.ndarray,
    kind: str = "flat",
    nlist: int = 1024,
    nprobe: int = 32,
    use_gpu: bool = False,
):
    """Exact ``IndexFlatIP`` or approximate ``IndexIVFFlat`` (inner product) over training embeddings."""
    faiss = import_faiss()

    train_emb = np.ascontiguousarray(train_emb, dtype=np.float32)
    d = train_emb.shape[1]
    if kind in ("flat", "auto"):  # in memory, "auto" is the exact index
        index = faiss.IndexFlatIP(d)
    elif kind == "ivf":
        nlist = max(1, min(nlist, len(train_emb) // 39 or 1))  # FAISS wants >= 39 points per list
        quantizer = faiss.IndexFlatIP(d)
        index = faiss.IndexIVFFlat(quantizer, d, nlist, faiss.METRIC_INNER_PRODUCT)
        index.train(train_emb)
        index.nprobe = min(nprobe, nlist)
    else:
        raise ValueError(f"unknown index kind {kind!r}: use 'flat' or 'ivf'")
    if use_gpu and gpu_available():
        index = faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), 0, index)
    index.add(train_emb)
    return index


def nearest(index, queries: np.ndarray, k: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Top-k similarities (N, k) and training indices (N, k) for L2-normalised queries."""
    sims, idx = index.search(np.ascontiguousarray(queries, dtype=np.float32), k)
    return sims, idx


@dataclass
class ReplicaStats:
    """Replication statistics of a set of queries against the training set."""

    num_samples: int
    replication_rate: float  # share of queries with nn similarity >= threshold
    mean_nn_similarity: float
    threshold: float

    def to_dict(self) -> dict:
        return {
            "num_samples": self.num_samples,
            "replication_rate": self.replication_rate,
            "mean_nn_similarity": self.mean_nn_similarity,
        }


def replica_stats(nn_sims: np.ndarray, threshold: float) -> ReplicaStats:
    """Replication rate ``#{s >= threshold} / N`` and the mean nearest-neighbour similarity."""
    s = np.asarray(nn_sims, dtype=np.float64).reshape(-1)
    if s.size == 0:
        raise ValueError("no similarities to summarise")
    return ReplicaStats(int(s.size), float((s >= threshold).mean()), float(s.mean()), threshold)


def index_recall(approx_sims: np.ndarray, exact_sims: np.ndarray, tol: float = 1e-5) -> float:
    """Recall@1 of an approximate index: the share of queries whose returned neighbour is as similar
    as the exact nearest neighbour (up to ``tol``; ties between equally close images count as hits)."""
    a = np.asarray(approx_sims, dtype=np.float64).reshape(-1)
    e = np.asarray(exact_sims, dtype=np.float64).reshape(-1)
    if a.shape != e.shape or a.size == 0:
        raise ValueError(f"need equal, non-empty similarity arrays, got {a.shape} and {e.shape}")
    return float((a >= e - tol).mean())


class GuardIndex:
    """Nearest-training-image search for guard mode over the stored replica index
    (:class:`pipeline.fanout.replica_index.ReplicaIndex`, loaded, never built here). ``check`` gives
    each image's similarity and the row of its nearest image.

    With the exact (flat) index the guarantee is exact: no image at or above the threshold passes.
    With the IVF index (large training sets) similarities are exact for every candidate found (the top
    ``rerank_k`` re-ranked in full dimension) and the replicate-decision agreement with exact search
    is measured at build time and recorded in the index's sidecar."""

    def __init__(self, index, threshold: float):
        self.index = index
        self.threshold = threshold

    @property
    def exact(self) -> bool:
        return getattr(self.index, "kind", "flat") == "flat"

    def check(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(N, H, W, C) uint8 -> nearest similarity (N,) float32 and training row (N,) int64."""
        return self.index.search(images, k=1)

    def keys_of(self, rows) -> list[str]:
        return self.index.keys_of(rows)

    def rejects(self, sims: np.ndarray) -> np.ndarray:
        """True where a sample is at or above the threshold (the replica rule, inclusive)."""
        return np.asarray(sims) >= self.threshold
