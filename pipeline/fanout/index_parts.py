"""An IVF replica index in parts, without Ray: train once, build one part, search the parts.

The *trained* index is ``IndexPreTransform(PCA, L2-normalise)`` over an empty ``IndexIVF`` (SQ8 or
float32 codes; the bare ``IndexIVF`` when the embedding is not reduced): PCA on at most
:data:`PCA_SAMPLES` rows, the coarse quantiser (k-means, on the GPU when asked and present) and the
SQ ranges on at most :data:`MAX_TRAIN_SAMPLES` reduced rows, trained once. A *part* is a copy of it
holding only its rows' codes under their global row ids (``add_with_ids``); its file is the bare
``IndexIVF`` with an empty quantiser (the trained file holds the one quantiser every part shares).

Parts are searched one after another against one coarse assignment (the quantiser runs once per
query batch): the lists a part scans are the merged index's lists restricted to its rows, so the
top-k merged over the parts is the top-k of one merged index (ties aside), and no process ever holds
more than one part's codes. Memory of a part: ``count * (code_size + 8)`` bytes (codes and ids).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.fanout.index import import_faiss, l2_normalise

MAX_TRAIN_SAMPLES = 262_144  # rows the quantiser is trained on, at most: 262144 * d * 4 bytes
PCA_SAMPLES = 32_768  # rows PCA is trained on, at most: 32768 * D * 4 bytes plus D * D * 8 bytes


def train_pca(sample: np.ndarray, dims: int):
    """PCA of the (n, D) float32 embeddings ``sample`` to ``dims`` dimensions (no whitening). The
    full D x D eigenvector matrix is dropped once the (dims, D) projection is made: every process
    that opens the index would otherwise hold it (604 MB at 64x64x3 pixels)."""
    faiss = import_faiss()
    sample = np.ascontiguousarray(sample, dtype=np.float32)
    pca = faiss.PCAMatrix(sample.shape[1], dims, 0.0, False)
    pca.train(sample)
    pca.PCAMat.resize(0)  # apply() uses A and b only
    return pca


def reduce(pca, x: np.ndarray) -> np.ndarray:
    """The PCA projection of ``x`` re-normalised (inner product = cosine in the reduced space);
    ``x`` itself when there is no PCA."""
    if pca is None:
        return np.ascontiguousarray(x, dtype=np.float32)
    return np.ascontiguousarray(l2_normalise(pca.apply(np.ascontiguousarray(x, np.float32))))


def train_ivf(
    reduced: np.ndarray, dim: int, params: dict[str, Any], pca=None, use_gpu: bool = False
):
    """The trained, empty index: IVF (``params``: nlist, codec "sq8" or "flat", seed) trained on
    the (n, d) ``reduced`` rows, behind ``pca`` and an L2 normalisation when given (``dim``: the
    embedding's dimension). ``use_gpu``: k-means assigns on the GPU when FAISS has one."""
    faiss = import_faiss()
    reduced = np.ascontiguousarray(reduced, dtype=np.float32)
    d = reduced.shape[1]
    if pca is None and d != dim:
        raise ValueError(f"the training rows have {d} dims, the embedding {dim}, and no PCA")
    quantizer = faiss.IndexFlatIP(d)
    if params["codec"] == "sq8":
        ivf = faiss.IndexIVFScalarQuantizer(
            quantizer, d, params["nlist"], faiss.ScalarQuantizer.QT_8bit, faiss.METRIC_INNER_PRODUCT
        )
    else:
        ivf = faiss.IndexIVFFlat(quantizer, d, params["nlist"], faiss.METRIC_INNER_PRODUCT)
    ivf.cp.seed = params["seed"]
    if use_gpu and hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0:
        ivf.clustering_index = faiss.index_cpu_to_all_gpus(faiss.IndexFlatIP(d))
    ivf.train(reduced)
    ivf.clustering_index = None
    if pca is None:
        return ivf
    index = faiss.IndexPreTransform(faiss.NormalizationTransform(d, 2.0), ivf)
    index.prepend_transform(pca)
    index.is_trained = True
    return index


def build_part(trained, chunks: Iterable[np.ndarray], start: int = 0):
    """One part: a copy of the ``trained`` index (an index or its serialised bytes) holding the
    rows of ``chunks`` ((n, dim) float32 embeddings, in order) under the global ids ``start``,
    ``start + 1``, ... Memory: the part's codes and ids plus one chunk."""
    faiss = import_faiss()
    if not isinstance(trained, np.ndarray | bytes):
        trained = faiss.serialize_index(trained)  # a copy (clone_index refuses the PCA transform)
    index = faiss.deserialize_index(np.frombuffer(trained, dtype=np.uint8))
    n = start
    for chunk in chunks:
        chunk = np.ascontiguousarray(chunk, dtype=np.float32)
        index.add_with_ids(chunk, np.arange(n, n + len(chunk), dtype=np.int64))
        n += len(chunk)
    return index


def write_part(part, path: str | Path) -> int:
    """Write a part's ``IndexIVF`` with an empty quantiser (the trained file holds the shared one);
    returns the number of vectors written."""
    faiss = import_faiss()
    ivf = faiss.extract_index_ivf(part)
    own, quantizer = ivf.own_fields, ivf.quantizer
    empty = faiss.IndexFlatIP(ivf.d)
    ivf.own_fields = False
    ivf.quantizer = empty
    try:
        faiss.write_index(ivf, str(path))
    finally:
        ivf.quantizer = quantizer
        ivf.own_fields = own
    return int(ivf.ntotal)


def read_part(path: str | Path, trained):
    """A part file memory-mapped (its codes stay on disk until a search touches them), given the
    shared quantiser of ``trained``. Keep ``trained`` alive while the part is used."""
    faiss = import_faiss()
    part = faiss.read_index(str(path), faiss.IO_FLAG_MMAP)
    part.own_fields = False  # the empty quantiser read from the file is dropped, the shared kept
    part.quantizer = faiss.extract_index_ivf(trained).quantizer
    return part


def merge_topk(sims: np.ndarray, ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` best of (Q, m) candidates per row: highest similarity first, then the lower id;
    missing candidates (id -1) last with similarity -inf."""
    sims = np.where(ids >= 0, sims, -np.inf).astype(np.float32)
    order = np.lexsort((np.where(ids >= 0, ids, np.iinfo(np.int64).max), -sims), axis=-1)[:, :k]
    return np.take_along_axis(sims, order, 1), np.take_along_axis(ids, order, 1)


class PartSearch:
    """Approximate top-k over the parts of one trained index: the queries are transformed (PCA,
    normalisation) and assigned to their ``nprobe`` lists once, then each part scans those lists."""

    def __init__(self, trained, nprobe: int):
        faiss = import_faiss()
        self.trained = trained
        self.ivf = faiss.extract_index_ivf(trained)
        self.nprobe = min(int(nprobe), self.ivf.nlist)
        self.quantizer = self.ivf.quantizer  # may be replaced by a GPU copy (assignment only)
        self.chain = []
        pre = faiss.downcast_index(trained)
        if isinstance(pre, faiss.IndexPreTransform):
            self.chain = [pre.chain.at(i) for i in range(pre.chain.size())]

    def transform(self, q: np.ndarray) -> np.ndarray:
        """(Q, dim) embeddings -> (Q, d) vectors of the IVF's space."""
        x = np.ascontiguousarray(q, dtype=np.float32)
        for vt in self.chain:
            x = np.ascontiguousarray(vt.apply(x))
        return x

    def search(self, q: np.ndarray, k: int, parts: Iterable) -> tuple[np.ndarray, np.ndarray]:
        """(Q, k) similarities in the IVF space and global ids of the best ``k`` over ``parts``
        (``IndexIVF`` parts sharing this index's quantiser; an iterable, consumed once)."""
        x = self.transform(q)
        coarse_d, coarse_i = self.quantizer.search(x, self.nprobe)
        best_s = np.full((len(x), k), -np.inf, dtype=np.float32)
        best_i = np.full((len(x), k), -1, dtype=np.int64)
        for part in parts:
            part.nprobe = self.nprobe
            s, i = part.search_preassigned(x, k, coarse_i, coarse_d)
            best_s, best_i = merge_topk(np.hstack([best_s, s]), np.hstack([best_i, i]), k)
        return best_s, best_i


def code_bytes(params: dict[str, Any], dims: int) -> int:
    """Bytes one vector takes in a part (its code and its id): sq8 d, flat 4 d, plus 8."""
    d = params.get("pca_dims") or dims
    return (d if params["codec"] == "sq8" else 4 * d) + 8
