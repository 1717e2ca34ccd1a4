"""The stored replica index, read side: where it lives, when it is stale, loading and searching it.

Built by :mod:`pipeline.fanout.replica_index` (Ray tasks); see there for the layout and the two kinds.
This module loads a build folder (:class:`ReplicaIndex`: the FAISS index memory-mapped where FAISS can,
the training rows read by positioned reads, never mapped whole), re-ranks IVF candidates by the exact
similarity, and searches exactly by brute force streamed over the stored rows.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.core.config import ReplicaConfig
from pipeline.data.imageset import DataError
from pipeline.data.layout import data_folder
from pipeline.data.provenance import StaleArtifactError, manifest_digest, value_digest
from pipeline.data.shards import read_manifest
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

SIDECAR = "sidecar.json"
FORMAT = 2  # 2: PCA output re-normalised (inner product = cosine in the reduced space)
EXACT_CHUNK_ROWS = 8192  # rows embedded at a time by exact brute-force search
RERANK_QUERIES = 64  # queries re-ranked at a time (bounds the candidate rows held)


def index_folder(dataset: str, embedding: str, kind: str) -> str:
    """``indexes/<dataset>/<embedding>/<kind>``: the sidecar and its build folders (``embedding``:
    :func:`pipeline.fanout.embedders.embedding_id`, e.g. ``centred`` or ``module-<sha256[:12]>``)."""
    return f"indexes/{dataset}/{embedding}/{kind}"


# ----------------------------------------------------------------------------------- the shards
def train_shards(store: Store, dataset: str) -> tuple[list[tuple[str, int]], str]:
    """``[(shard name, count)]`` of ``data/<dataset>/train`` in name order and the dataset's digest:
    the manifest's digest, or (shards put there by hand, no manifest) a digest of the shards' sha256,
    counted by reading them one at a time."""
    folder = data_folder(dataset, "train")
    manifest = read_manifest(store, data_folder(dataset))
    if manifest is not None and "train" in manifest["splits"]:
        entries = manifest["splits"]["train"]["shards"]
        return sorted((sh["name"], int(sh["count"])) for sh in entries), manifest_digest(manifest)
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
        train = cfg.train_samples or max(39 * nlist, 20_000)
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


def current_state(store: Store, dataset: str, cfg: ReplicaConfig) -> dict[str, Any]:
    """The shards, their digest, N, the image shape and the build parameters a valid index must have."""
    shards, digest = train_shards(store, dataset)
    n = sum(c for _, c in shards)
    if n == 0:
        raise DataError(f"no training images under {store.uri_of(data_folder(dataset, 'train'))}")
    manifest = read_manifest(store, data_folder(dataset))
    shape = _image_shape(store, dataset, shards, manifest)
    module = module_spec(cfg)
    dims = module_dims(module, shape) if module else int(np.prod(shape))  # a module: one probe
    params = build_params(cfg, n, dims)
    folder = index_folder(dataset, params["embedding"], params["kind"])
    return {"shards": shards, "digest": digest, "n": n, "shape": shape, "params": params,
            "folder": folder, "dims": dims, "module": module}  # fmt: skip


def _image_shape(store, dataset, shards, manifest) -> list[int]:
    if manifest is not None and "image_size" in manifest:
        h, w = manifest["image_size"]
        return [int(h), int(w), int(manifest.get("channels", 1))]
    first = shards[0][0]
    folder = data_folder(dataset, "train")
    return list(read_tar(store.read_bytes(folder, first), first).images.shape[1:])


def stale_reasons(sidecar: dict[str, Any] | None, state: dict[str, Any]) -> list[str]:
    """Why a stored sidecar cannot serve the current data and parameters (empty: it can)."""
    if sidecar is None:
        return ["no stored index"]
    reasons = []
    if sidecar.get("manifest_digest") != state["digest"]:
        reasons.append("the dataset changed (manifest digest)")
    old, new = sidecar.get("params") or {}, state["params"]
    if (old.get("module") or {}).get("sha256") != (new.get("module") or {}).get("sha256"):
        reasons.append("the embedding module's weights changed (sha256)")
    elif old != new:
        reasons.append("the build parameters changed")
    return reasons


def _local_file(store: Store, folder: str, name: str, scratch: Path) -> Path:
    if store.is_local:
        return Path(store.join(folder, name))
    dest = scratch / name
    with store.fs.open_input_stream(store.join(folder, name)) as src, open(dest, "wb") as dst:
        while chunk := src.read(1 << 24):
            dst.write(chunk)
    return dest


# ---------------------------------------------------------------------------------------- load
class TrainingRows:
    """The stored training images of a build: keys, uint8 rows by positioned reads, the mean image."""

    def __init__(self, local_dir: str | Path, sidecar: dict[str, Any]):
        self.dir = Path(local_dir)
        self.sidecar = sidecar
        self.build_id = sidecar["build_id"]
        self.shape = tuple(sidecar["image_shape"])
        self.row_bytes = int(np.prod(self.shape))
        self.ntotal = int(sidecar["num_images"])
        mean_path = self.dir / "mean.npy"
        self.mean = np.load(mean_path) if mean_path.exists() else None
        self.embed_rows = row_embedder(sidecar, self.mean)  # pixels, or the module (loaded lazily)
        self.parts = sidecar["parts"]
        self.starts = np.asarray([p["start"] for p in self.parts], dtype=np.int64)
        self._fds: dict[int, int] = {}
        self._keys: list[str] | None = None

    # ------------------------------------------------------------------------------- rows, keys
    @property
    def keys(self) -> list[str]:
        if self._keys is None:
            keys: list[str] = []
            for p in self.parts:
                keys += json.loads((self.dir / f"keys-{p['part']:05d}.json").read_text())
            self._keys = keys
        return self._keys

    def keys_of(self, idx) -> list[str]:
        keys = self.keys
        return [keys[int(i)] for i in np.asarray(idx).reshape(-1)]

    def _fd(self, part: int) -> int:
        if part not in self._fds:
            self._fds[part] = os.open(self.dir / f"rows-{part:05d}.u8", os.O_RDONLY)
        return self._fds[part]

    def rows(self, idx) -> np.ndarray:
        """The uint8 training images (n, H, W, C) at global rows ``idx``, by positioned reads."""
        idx = np.asarray(idx, dtype=np.int64).reshape(-1)
        out = np.empty((len(idx), self.row_bytes), dtype=np.uint8)
        parts = np.searchsorted(self.starts, idx, side="right") - 1
        for j in np.argsort(idx, kind="stable"):
            p = int(parts[j])
            off = (int(idx[j]) - int(self.starts[p])) * self.row_bytes
            out[j] = np.frombuffer(os.pread(self._fd(p), self.row_bytes, off), np.uint8)
        return out.reshape(len(idx), *self.shape)

    def iter_rows(self, chunk: int = EXACT_CHUNK_ROWS):
        """(first global row, uint8 rows (n, D)) over the whole training set, ``chunk`` at a time."""
        for p in self.parts:
            for lo in range(0, p["count"], chunk):
                n = min(chunk, p["count"] - lo)
                data = os.pread(self._fd(p["part"]), n * self.row_bytes, lo * self.row_bytes)
                yield p["start"] + lo, np.frombuffer(data, np.uint8).reshape(n, self.row_bytes)

    def embed(self, images: np.ndarray) -> np.ndarray:
        return self.embed_rows(images)

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def __del__(self):
        with contextlib.suppress(Exception):
            self.close()


class ReplicaIndex(TrainingRows):
    """A loaded replica index: ``search`` (exact similarity for every candidate found), the training
    keys, the training rows by positioned reads, and exact brute force over the rows."""

    def __init__(self, local_dir: str | Path, sidecar: dict[str, Any], cfg: ReplicaConfig):
        super().__init__(local_dir, sidecar)
        faiss = import_faiss()
        self.kind = sidecar["kind"]
        self.rerank_k = cfg.rerank_k
        self.index = _read_index(faiss, self.dir / "index.faiss")
        if self.kind == "ivf":
            self.ivf = faiss.extract_index_ivf(self.index)
            self.ivf.nprobe = min(cfg.nprobe, self.ivf.nlist)
        self.gpu = False
        if cfg.use_gpu and gpu_available():
            try:
                self.index = faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), 0, self.index)
                self.gpu = True
            except RuntimeError:  # an index type the GPU build cannot hold: search on the CPU
                pass

    # ---------------------------------------------------------------------------------- search
    def search(self, images: np.ndarray, k: int = 1) -> tuple[np.ndarray, np.ndarray]:
        """(N, H, W, C) uint8 -> nearest similarities and training rows: (N,) each for k=1, else
        (N, k). Flat: plain exact search. IVF: the top ``rerank_k`` candidates re-ranked by the
        exact similarity (ties: the lower row)."""
        q = np.ascontiguousarray(self.embed(images), dtype=np.float32)
        if self.kind == "flat":
            sims, idx = self.index.search(q, k)
        else:
            sims, idx = self._rerank(q, k)
        return (sims[:, 0], idx[:, 0]) if k == 1 else (sims, idx)

    def _rerank(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        kk = max(k, self.rerank_k)
        out_s = np.full((len(q), k), -np.inf, dtype=np.float32)
        out_i = np.full((len(q), k), -1, dtype=np.int64)
        for lo in range(0, len(q), RERANK_QUERIES):
            qb = q[lo : lo + RERANK_QUERIES]
            _, cand = self.index.search(qb, kk)
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


def _read_index(faiss, path: Path):
    """Memory-map the index file where FAISS can (IVF lists, flat codes); else read it."""
    for flags in (faiss.IO_FLAG_MMAP_IFC | faiss.IO_FLAG_MMAP, faiss.IO_FLAG_MMAP, 0):
        try:
            return faiss.read_index(str(path), flags)
        except RuntimeError:
            continue
    raise RuntimeError(f"cannot read the FAISS index {path}")


def local_index_dir(store: Store, sidecar: dict[str, Any]) -> Path:
    """The build folder on local disk: the store's own folder, or (s3://) a copy in local scratch,
    made once per node and build (a finished copy is renamed into place)."""
    if store.is_local:
        return Path(store.join(sidecar["path"]))
    scratch = Path(tempfile.gettempdir()) / f"cpsample-index-{sidecar['build_id']}"
    if (scratch / ".complete").exists():
        return scratch
    stage = Path(tempfile.mkdtemp(prefix=f".{scratch.name}-", dir=scratch.parent))
    for name in store.listdir(sidecar["path"]):  # streamed: the index file may be large
        _local_file(store, sidecar["path"], name, stage)
    (stage / ".complete").write_text(sidecar["build_id"])
    try:
        stage.rename(scratch)
    except OSError:  # another actor on this node finished first
        shutil.rmtree(stage, ignore_errors=True)
    return scratch


def open_replica_index(
    store: Store | str, sidecar: dict[str, Any], cfg: ReplicaConfig, s3_endpoint: str | None = None
) -> ReplicaIndex:
    """Load the index a sidecar names (actors: the driver checked the sidecar; nothing is built)."""
    store = open_store(store, s3_endpoint, create=False)
    return ReplicaIndex(local_index_dir(store, sidecar), sidecar, cfg)


def load_replica_index(
    store: Store | str, dataset: str, cfg: ReplicaConfig | None = None, s3_endpoint=None
) -> ReplicaIndex:
    """Load the stored, valid index of ``dataset``; a missing or stale one raises
    :class:`StaleArtifactError` (build it with :func:`build_replica_index`, jobs/build_index.py)."""
    cfg = cfg or ReplicaConfig()
    store = open_store(store, s3_endpoint, create=False)
    state = current_state(store, dataset, cfg)
    sidecar = read_sidecar(store, state["folder"])
    reasons = stale_reasons(sidecar, state)
    if reasons:
        raise StaleArtifactError(
            f"the replica index {store.uri_of(state['folder'])} cannot be used "
            f"({'; '.join(reasons)}): run jobs/build_index.py --dataset {dataset}"
        )
    return ReplicaIndex(local_index_dir(store, sidecar), sidecar, cfg)


# ------------------------------------------------------------------------------- exact search
def exact_search(index: TrainingRows, images: np.ndarray, rows=None, chunk: int = EXACT_CHUNK_ROWS):
    """Exact brute force: the nearest training row of each image, streamed over the stored rows
    ``chunk`` at a time (``rows``: only the parts whose numbers are given). Returns (sims, rows)."""
    q = np.ascontiguousarray(index.embed(images), dtype=np.float32)
    best_s = np.full(len(q), -np.inf, dtype=np.float32)
    best_i = np.full(len(q), -1, dtype=np.int64)
    for start, block in index.iter_rows(chunk):
        if rows is not None and not (rows[0] <= start < rows[1]):
            continue
        s = index.embed(block) @ q.T  # (n, Q)
        j = np.argmax(s, axis=0)
        top = s[j, np.arange(len(q))]
        better = top > best_s
        best_s[better], best_i[better] = top[better], start + j[better]
    return best_s, best_i


def measure_recall(
    sims: np.ndarray, exact_sims: np.ndarray, threshold: float, tol: float = 1e-5
) -> dict[str, Any]:
    """recall@1 (the found neighbour is as similar as the exact one, up to ``tol``) and the share of
    queries whose replicate decision (similarity >= threshold) equals the exact one."""
    a = np.asarray(sims, dtype=np.float64).reshape(-1)
    e = np.asarray(exact_sims, dtype=np.float64).reshape(-1)
    return {
        "queries": int(a.size),
        "recall_at_1": float((a >= e - tol).mean()),
        "decision_agreement": float(((a >= threshold) == (e >= threshold)).mean()),
        "replicates_exact": int((e >= threshold).sum()),
        "replicates_index": int((a >= threshold).sum()),
        "threshold": threshold,
    }


def measure_index(index: ReplicaIndex, queries: np.ndarray, threshold: float) -> dict[str, Any]:
    """Search ``queries`` with the index and by exact brute force (in process); compare."""
    t0 = time.perf_counter()
    sims, _ = index.search(queries)
    t_index = time.perf_counter() - t0
    t0 = time.perf_counter()
    exact, _ = exact_search(index, queries)
    t_exact = time.perf_counter() - t0
    return {**measure_recall(sims, exact, threshold), "index_s": t_index, "exact_s": t_exact}


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
