"""The stored replica index, read side: where it lives, when it is stale, loading and searching it.

Built by :mod:`pipeline.fanout.replica_index` (Ray tasks); see there for the layout and the two kinds.
This module opens a build in its store, never copying its folder (:class:`ReplicaIndex`: the flat
index or the IVF parts memory-mapped, from a bounded node cache on S3; training rows fetched by byte
ranges, keys read per part: :mod:`pipeline.fanout.index_files`), searches the IVF parts one after
another and re-ranks their candidates by the exact similarity, and searches exactly by brute force
streamed over the stored rows.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
from dataclasses import asdict
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from pipeline.core.config import ReplicaConfig
from pipeline.data.handle import DatasetHandle, as_handle
from pipeline.data.imageset import DataError
from pipeline.data.provenance import StaleArtifactError, value_digest
from pipeline.data.storage import ObjectNotFound, Store, open_store
from pipeline.data.tars import read_tar
from pipeline.fanout.embedders import (
    embedding_id,
    module_dims,
    module_params,
    module_spec,
    row_embedder,
)
from pipeline.fanout.index import gpu_available, import_faiss
from pipeline.fanout.index_files import BuildRows, ivf_name
from pipeline.fanout.index_parts import MAX_TRAIN_SAMPLES, PartSearch, read_part

SIDECAR = "sidecar.json"
FORMAT = (
    3  # 2: PCA output re-normalised; 3: IVF in parts (trained.faiss, ivf-<p>.faiss), split-mean.npy
)
EXACT_CHUNK_ROWS = 8192  # rows embedded at a time by exact brute-force search
RERANK_QUERIES = 64  # queries re-ranked at a time (bounds the candidate rows held)


def index_folder(dataset: str, embedding: str, kind: str) -> str:
    """``indexes/<dataset>/<embedding>/<kind>``: the sidecar and its build folders (``embedding``:
    :func:`pipeline.fanout.embedders.embedding_id`, e.g. ``centred`` or ``module-<sha256[:12]>``)."""
    return f"indexes/{dataset}/{embedding}/{kind}"


# ----------------------------------------------------------------------------------- the shards
def train_shards(store: Store, dataset: str | DatasetHandle) -> tuple[list[tuple[str, int]], str]:
    """``[(shard name, count)]`` of ``data/<dataset>/train`` in name order and the dataset's digest:
    the manifest's digest, or (shards put there by hand, no manifest) a digest of the shards' sha256,
    counted by reading them one at a time. ``dataset``: a name, or a handle already opened (its
    manifest is not read again)."""
    ds = as_handle(store, dataset)
    folder = ds.split("train")
    if ds.manifest is not None and "train" in ds.manifest["splits"]:
        entries = ds.manifest["splits"]["train"]["shards"]
        return sorted((sh["name"], int(sh["count"])) for sh in entries), ds.digest
    names = sorted(
        n for n in store.listdir(folder) if n.startswith("shard-") and n.endswith(".tar")
    )
    if not names:
        raise DataError(f"no shards under {store.uri_of(folder)}")
    counts, digests = [], {}
    for name in names:
        data = store.read_bytes(folder, name)
        digests[name] = _sha(data)
        counts.append((name, len(read_tar(data, name))))
    return counts, value_digest({"unmanifested": digests})


def _sha(data: bytes) -> str:
    import hashlib

    return hashlib.sha256(data).hexdigest()


def resolve_kind(cfg: ReplicaConfig, n: int) -> str:
    if cfg.index != "auto":
        return cfg.index
    return "flat" if n <= cfg.exact_max_images else "ivf"


def build_params(cfg: ReplicaConfig, n: int, dim: int) -> dict[str, Any]:
    """What the stored index is a function of (besides the data): a change means a rebuild. Search
    settings (nprobe, rerank_k) are not among them. ``dim``: the embedding's dimension; a module
    embedding adds its weights' sha256 and preprocessing."""
    kind = resolve_kind(cfg, n)
    params: dict[str, Any] = {"format": FORMAT, "kind": kind, "embedding": embedding_id(cfg)}
    if (module := module_params(cfg)) is not None:
        params["module"] = module
    if kind == "ivf":
        nlist = cfg.nlist or round(4 * math.sqrt(n))
        nlist = max(1, min(nlist, n // 39 or 1))  # FAISS wants >= 39 training points per list
        train = min(cfg.train_samples or max(39 * nlist, 20_000), MAX_TRAIN_SAMPLES)
        params.update(
            pca_dims=cfg.pca_dims if cfg.pca_dims < dim else None, nlist=nlist,
            codec=cfg.ivf_codec, train_samples=min(n, train), seed=0,
        )  # fmt: skip
    return params


# ------------------------------------------------------------------------------ sidecar checks
def read_sidecar(store: Store, folder: str) -> dict[str, Any] | None:
    try:
        return json.loads(store.read_bytes(folder, SIDECAR))
    except ObjectNotFound:
        return None
    except ValueError:
        return None  # a damaged sidecar is no index


def current_state(store: Store, dataset: str | DatasetHandle, cfg: ReplicaConfig) -> dict[str, Any]:
    """The shards, their digest, N, the image shape and the build parameters a valid index must have
    (``dataset``: a name, or a handle: its manifest is read once, here or by the caller)."""
    ds = as_handle(store, dataset)
    shards, digest = train_shards(store, ds)
    n = sum(c for _, c in shards)
    if n == 0:
        raise DataError(f"no training images under {store.uri_of(ds.split('train'))}")
    shape = _image_shape(store, ds, shards)
    module = module_spec(cfg)
    dims = module_dims(module, shape) if module else int(np.prod(shape))  # a module: one probe
    params = build_params(cfg, n, dims)
    folder = index_folder(ds.dataset, params["embedding"], params["kind"])
    return {"shards": shards, "digest": digest, "n": n, "shape": shape, "params": params,
            "folder": folder, "dims": dims, "module": module}  # fmt: skip


def _image_shape(store: Store, ds: DatasetHandle, shards) -> list[int]:
    manifest = ds.manifest
    if manifest is not None and "image_size" in manifest:
        h, w = manifest["image_size"]
        return [int(h), int(w), int(manifest.get("channels", 1))]
    first = shards[0][0]
    return list(read_tar(store.read_bytes(ds.split("train"), first), first).images.shape[1:])


def stale_reasons(sidecar: dict[str, Any] | None, state: dict[str, Any]) -> list[str]:
    """Why a stored sidecar cannot serve the current data and parameters (empty: it can)."""
    if sidecar is None:
        return ["no stored index"]
    reasons = []
    old_format, new_format = (sidecar.get("params") or {}).get("format"), state["params"]["format"]
    if old_format != new_format:
        return [f"the index format changed ({old_format} -> {new_format}): it is rebuilt"]
    if sidecar.get("manifest_digest") != state["digest"]:
        reasons.append("the dataset changed (manifest digest)")
    old, new = sidecar.get("params") or {}, state["params"]
    if (old.get("module") or {}).get("sha256") != (new.get("module") or {}).get("sha256"):
        reasons.append("the embedding module's weights changed (sha256)")
    elif old != new:
        reasons.append("the build parameters changed")
    return reasons


# ---------------------------------------------------------------------------------------- load
class IndexLocation(NamedTuple):
    """Where a build's files are: the store and the build folder (nothing is copied)."""

    store: Store
    path: str


def local_index_dir(store: Store, sidecar: dict[str, Any]) -> IndexLocation:
    """The build folder a sidecar names, as a location to read from (kept for callers that built
    :class:`TrainingRows` from a local copy: nothing is copied any more)."""
    return IndexLocation(store, sidecar["path"])


def _rows_source(where, sidecar: dict[str, Any]) -> tuple[Store, dict[str, Any]]:
    """(store, sidecar) for a location, or a local build folder (its path replaces the sidecar's)."""
    if isinstance(where, IndexLocation):
        return where.store, {**sidecar, "path": where.path}
    folder = Path(where).resolve()
    return open_store(str(folder.parent), create=False), {**sidecar, "path": folder.name}


class TrainingRows(BuildRows):
    """The stored training images of a build: keys per part, uint8 rows by byte-range reads, the
    mean image, and the embedding of rows (pixels, or the module, loaded lazily)."""

    def __init__(self, where: IndexLocation | str | Path, sidecar: dict[str, Any]):
        store, sidecar = _rows_source(where, sidecar)
        super().__init__(store, sidecar)
        self.store = store
        self.mean = (
            _read_npy(self.files.read_file("mean.npy")) if self.files.exists("mean.npy") else None
        )
        self.embed_rows = row_embedder(sidecar, self.mean)

    def embed(self, images: np.ndarray) -> np.ndarray:
        return self.embed_rows(images)

    def __del__(self):
        with contextlib.suppress(Exception):
            self.close()


def _read_npy(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)


class ReplicaIndex(TrainingRows):
    """A loaded replica index: ``search`` (exact similarity for every candidate found), the training
    keys per part, the training rows by byte ranges, and exact brute force over the rows. Memory:
    the flat index (N <= ``exact_max_images``) or, for IVF, the trained index (quantiser, PCA) plus
    per part its list sizes; the parts' codes are memory-mapped files, paged in as lists are scanned."""

    def __init__(
        self, where: IndexLocation | str | Path, sidecar: dict[str, Any], cfg: ReplicaConfig
    ):
        super().__init__(where, sidecar)
        faiss = import_faiss()
        self.kind = self.sidecar["kind"]
        self.rerank_k = cfg.rerank_k
        self.gpu = False
        self._parts: dict[int, Any] = {}
        if self.kind == "flat":
            self.index = _read_index(faiss, self.files.local_path("index.faiss"))
        else:
            trained = np.frombuffer(self.files.read_file("trained.faiss"), dtype=np.uint8)
            self.index = faiss.deserialize_index(trained)  # quantiser, PCA, SQ ranges: no rows
            self.searcher = PartSearch(self.index, cfg.nprobe)
        if cfg.use_gpu and gpu_available():
            self._to_gpu(faiss)

    def _to_gpu(self, faiss) -> None:
        """Flat: the whole index on the GPU; IVF: the coarse assignment (the lists stay mapped)."""
        try:
            res = faiss.StandardGpuResources()
            if self.kind == "flat":
                self.index = faiss.index_cpu_to_gpu(res, 0, self.index)
            else:
                self.searcher.quantizer = faiss.index_cpu_to_gpu(res, 0, self.searcher.quantizer)
            self._gpu_res, self.gpu = res, True
        except RuntimeError:  # an index type the GPU build cannot hold: search on the CPU
            pass

    def _part(self, pos: int):
        if pos not in self._parts:
            name = ivf_name(self.parts[pos]["part"])
            self._parts[pos] = read_part(self.files.local_path(name), self.index)
        return self._parts[pos]

    def _iter_parts(self):
        return (self._part(pos) for pos in range(len(self.parts)))

    # ---------------------------------------------------------------------------------- search
    def search(self, images: np.ndarray, k: int = 1) -> tuple[np.ndarray, np.ndarray]:
        """(N, H, W, C) uint8 -> nearest similarities and training rows: (N,) each for k=1, else
        (N, k). Flat: plain exact search. IVF: the top ``rerank_k`` candidates over the parts,
        re-ranked by the exact similarity (ties: the lower row)."""
        q = np.ascontiguousarray(self.embed(images), dtype=np.float32)
        if self.kind == "flat":
            sims, idx = self.index.search(q, k)
        else:
            sims, idx = self._rerank(q, k)
        return (sims[:, 0], idx[:, 0]) if k == 1 else (sims, idx)

    def _rerank(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        kk = max(k, self.rerank_k)
        _, cands = self.searcher.search(q, kk, self._iter_parts())  # (Q, kk) global rows
        out_s = np.full((len(q), k), -np.inf, dtype=np.float32)
        out_i = np.full((len(q), k), -1, dtype=np.int64)
        for lo in range(0, len(q), RERANK_QUERIES):
            qb, cand = q[lo : lo + RERANK_QUERIES], cands[lo : lo + RERANK_QUERIES]
            uniq, inv = np.unique(cand[cand >= 0], return_inverse=True)
            if not len(uniq):
                continue
            emb = self.embed(self.rows(uniq))  # exact full-dimensional embedding
            pos = np.full(cand.shape, -1, dtype=np.int64)
            pos[cand >= 0] = inv
            # each query against its own candidates only: (B, kk, D) @ (B, D, 1)
            full = np.matmul(emb[np.maximum(pos, 0)], qb[:, :, None])[:, :, 0]
            s = np.where(pos >= 0, full, -np.inf)
            ids = np.where(pos >= 0, cand, np.iinfo(np.int64).max)
            order = np.lexsort((ids, -s), axis=-1)[:, :k]  # by similarity, then the lower row
            out_s[lo : lo + len(qb)] = np.take_along_axis(s, order, 1)
            chosen = np.take_along_axis(ids, order, 1)
            out_i[lo : lo + len(qb)] = np.where(np.isfinite(out_s[lo : lo + len(qb)]), chosen, -1)
        return out_s, out_i

    def close(self) -> None:
        self._parts.clear()
        super().close()


def _read_index(faiss, path: Path):
    """Memory-map the index file where FAISS can (flat codes); else read it."""
    for flags in (faiss.IO_FLAG_MMAP_IFC | faiss.IO_FLAG_MMAP, faiss.IO_FLAG_MMAP, 0):
        try:
            return faiss.read_index(str(path), flags)
        except RuntimeError:
            continue
    raise RuntimeError(f"cannot read the FAISS index {path}")


def open_replica_index(
    store: Store | str, sidecar: dict[str, Any], cfg: ReplicaConfig, s3_endpoint: str | None = None
) -> ReplicaIndex:
    """Open the index a sidecar names (actors: the driver checked the sidecar; nothing is built,
    nothing copied but the flat index or the IVF part files, on S3, into the node's bounded cache)."""
    store = open_store(store, s3_endpoint, create=False)
    return ReplicaIndex(local_index_dir(store, sidecar), sidecar, cfg)


def valid_sidecar(
    store: Store, dataset: str | DatasetHandle, cfg: ReplicaConfig
) -> tuple[dict | None, list, str]:
    """The stored sidecar of ``dataset``'s index (a name or a handle), why it cannot serve (empty:
    it can), its folder."""
    state = current_state(store, dataset, cfg)
    sidecar = read_sidecar(store, state["folder"])
    return sidecar, stale_reasons(sidecar, state), state["folder"]


def load_replica_index(
    store: Store | str, dataset: str, cfg: ReplicaConfig | None = None, s3_endpoint=None
) -> ReplicaIndex:
    """Load the stored, valid index of ``dataset``; a missing or stale one raises
    :class:`StaleArtifactError` (build it with :func:`build_replica_index`, jobs/build_index.py)."""
    cfg = cfg or ReplicaConfig()
    store = open_store(store, s3_endpoint, create=False)
    sidecar, reasons, folder = valid_sidecar(store, dataset, cfg)
    if reasons:
        raise StaleArtifactError(
            f"the replica index of {dataset} ({store.uri_of(folder)}) cannot be used "
            f"({'; '.join(reasons)}): run jobs/build_index.py --dataset {dataset}"
        )
    return ReplicaIndex(local_index_dir(store, sidecar), sidecar, cfg)


def fetch_rows(store: Store, sidecar: dict[str, Any], rows: list[int]) -> np.ndarray:
    """The raw uint8 training images (n, H, W, C) of global ``rows`` of the build ``sidecar``
    names, by byte-range reads of its rows files only (adjacent rows in one read)."""
    reader = BuildRows(store, sidecar)
    try:
        return reader.rows(np.asarray(rows, dtype=np.int64))
    finally:
        reader.close()


def stored_mean(
    store: Store, dataset: str | DatasetHandle, cfg: ReplicaConfig
) -> np.ndarray | None:
    """The mean training image of ``dataset`` (flattened, float32 in [0, 1]: ``(1/N) sum_i x_i /
    255``) that the valid stored index build computed as a fold of per-part float64 sums and
    stored as ``split-mean.npy``; None without a valid stored index (then compute it otherwise)."""
    sidecar, reasons, _ = valid_sidecar(store, dataset, cfg)
    return None if reasons else sidecar_mean(store, sidecar)


def sidecar_mean(store: Store, sidecar: dict[str, Any]) -> np.ndarray | None:
    """The split mean stored with the index build that ``sidecar`` describes (``split-mean.npy``,
    as :func:`stored_mean`); None when that build has none."""
    try:
        return _read_npy(store.read_bytes(sidecar["path"], "split-mean.npy"))
    except ObjectNotFound:
        return None


# ------------------------------------------------------------------------------- exact search
def exact_search(index: TrainingRows, images: np.ndarray, rows=None, chunk: int = EXACT_CHUNK_ROWS):
    """Exact brute force: the nearest training row of each image, streamed over the stored rows
    ``chunk`` at a time by byte-range reads (``rows``: a (first, end) span, only the parts
    starting in it). Returns (sims, rows)."""
    q = np.ascontiguousarray(index.embed(images), dtype=np.float32)
    best_s = np.full(len(q), -np.inf, dtype=np.float32)
    best_i = np.full(len(q), -1, dtype=np.int64)
    for start, block in index.iter_rows(chunk, rows):
        s = index.embed(block) @ q.T  # (n, Q)
        j = np.argmax(s, axis=0)
        top = s[j, np.arange(len(q))]
        better = top > best_s
        best_s[better], best_i[better] = top[better], start + j[better]
    return best_s, best_i


def index_spec(
    store: Store, dataset: str, cfg: ReplicaConfig, sidecar: dict[str, Any]
) -> dict[str, Any]:
    """What an actor needs to load the index: small and picklable (no embeddings)."""
    return {"store": store, "dataset": dataset, "replicas": asdict(cfg), "sidecar": sidecar}


class LazyReplicaIndex:
    """A picklable handle on a stored index (Ray Tune contexts, task arguments): ``search`` loads
    the index in the process that first searches, once; pickling drops the loaded copy."""

    def __init__(self, store: Store, sidecar: dict[str, Any], cfg: ReplicaConfig):
        self.store, self.sidecar, self.cfg = store, sidecar, cfg
        self._index: ReplicaIndex | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_index": None}

    def load(self) -> ReplicaIndex:
        if self._index is None:
            self._index = open_replica_index(self.store, self.sidecar, self.cfg)
        return self._index

    def search(self, images: np.ndarray, k: int = 1) -> tuple[np.ndarray, np.ndarray]:
        return self.load().search(images, k)

    def keys_of(self, idx) -> list[str]:
        return self.load().keys_of(idx)


def _exact_part(store: Store, sidecar: dict[str, Any], part: dict, images: np.ndarray):
    index = TrainingRows(local_index_dir(store, sidecar), sidecar)
    try:
        return exact_search(index, images, rows=(part["start"], part["start"] + part["count"]))
    finally:
        index.close()


def exact_search_ray(store: Store, sidecar: dict[str, Any], images: np.ndarray):
    """:func:`exact_search` with one Ray task per stored part; the driver keeps only (Q,) arrays."""
    import ray

    task = ray.remote(num_cpus=1, max_retries=2)(_exact_part)
    q_ref = ray.put(np.asarray(images))
    refs = [task.remote(store, sidecar, p, q_ref) for p in sidecar["parts"]]
    best_s = np.full(len(images), -np.inf, dtype=np.float32)
    best_i = np.full(len(images), -1, dtype=np.int64)
    for ref in refs:
        s, i = ray.get(ref)
        better = s > best_s
        best_s[better], best_i[better] = s[better], i[better]
    return best_s, best_i
