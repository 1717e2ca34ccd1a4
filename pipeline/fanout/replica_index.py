"""The replica index: built once with Ray, stored beside the data, opened by every scorer and guard.

Layout under the store (``indexes/<dataset>/<embedding>/<kind>/``)::

    sidecar.json          written last: names the build folder, the parameters (format 3), the
                          manifest digest, the parts, the measured recall@1 and decision agreement
    <build_id>/split-mean.npy   the training split's mean image (flattened, [0, 1]), a fold of the
                          parts' float64 pixel sums (:func:`stored_mean`)
    <build_id>/mean.npy   the centred embedding's mean image (absent for raw and module embeddings)
    <build_id>/rows-<p>.u8, keys-<p>.json   per part: the training images' uint8 rows and keys
    <build_id>/index.faiss          flat: IndexFlatIP over the full-dimensional embedding
    <build_id>/trained.faiss, ivf-<p>.faiss   ivf: the trained empty index (PCA, quantiser, SQ
                          ranges) and per part its rows' codes under their global ids

A build writes a fresh ``<build_id>/`` folder, then the sidecar (one atomic put), then removes older
build folders: a crashed build leaves a folder no sidecar names, which is never loaded. A sidecar whose
manifest digest, format or build parameters differ from the current ones is stale: the index is rebuilt
by :func:`ensure_replica_index` and refused by :func:`load_replica_index`, never silently used.

Two kinds (``ReplicaConfig.index``; "auto" picks by the number of training images N):

- ``flat`` (N <= ``exact_max_images``): exact ``IndexFlatIP`` built in one Ray task exactly as the
  in-memory index always was, so similarities and nearest keys equal plain exact search bit for bit.
- ``ivf``: parts of at most ``rows_per_task`` rows, each built by its own task at bounded memory;
  PCA and the quantiser trained once on a capped sample (:mod:`pipeline.fanout.index_build`). A
  search runs the parts one after another on one coarse assignment and re-ranks the top ``rerank_k``
  candidates by the exact full-dimensional similarity of their rows, fetched by byte ranges
  (:mod:`pipeline.fanout.index_parts`, :mod:`pipeline.fanout.index_files`): the reported similarity
  and the replicate decision are exact for every candidate found; recall@1 and decision agreement
  against exact brute force are measured at build time and recorded in the sidecar. Nothing merges
  the parts, so 100M images is more parts, not bigger tasks.
"""

from __future__ import annotations

import json
import shutil
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.core.config import ConfigError, ReplicaConfig
from pipeline.data.imageset import DataError
from pipeline.data.layout import data_folder
from pipeline.data.provenance import StaleArtifactError
from pipeline.data.shards import manifest_shards, read_checked_tar
from pipeline.data.storage import StorageError, Store, open_store
from pipeline.fanout.index_build import build_flat, build_ivf, remote
from pipeline.fanout.replica_store import (
    EXACT_CHUNK_ROWS,
    SIDECAR,
    LazyReplicaIndex,
    ReplicaIndex,
    TrainingRows,
    build_params,
    current_state,
    exact_search,
    exact_search_ray,
    fetch_rows,
    index_folder,
    index_spec,
    load_replica_index,
    local_index_dir,
    open_replica_index,
    read_sidecar,
    stale_reasons,
    stored_mean,
)

__all__ = [
    "EXACT_CHUNK_ROWS", "LazyReplicaIndex", "ReplicaIndex", "TrainingRows", "build_params",
    "build_replica_index", "ensure_replica_index", "exact_search", "exact_search_ray", "fetch_rows",
    "index_folder", "index_spec", "load_replica_index", "local_index_dir", "measure_index",
    "measure_recall", "measurement_queries", "open_replica_index", "stale_reasons", "stored_mean",
]  # fmt: skip

NOISE = 6  # +- grey levels of the perturbed training queries


def ensure_replica_index(
    store: Store,
    dataset: str,
    cfg: ReplicaConfig,
    s3_endpoint: str | None = None,
    use_gpu: bool | None = None,
) -> dict[str, Any]:
    """The sidecar of a valid stored index, building one (:func:`build_replica_index`) when there is
    none or the stored one is stale (``use_gpu``: the build's tasks ask for GPUs; default
    ``cfg.use_gpu``)."""
    state = current_state(store, dataset, cfg)
    sidecar = read_sidecar(store, state["folder"])
    main = "index.faiss" if state["params"]["kind"] == "flat" else "trained.faiss"
    if not stale_reasons(sidecar, state) and store.exists(sidecar["path"], main):
        return sidecar
    return build_replica_index(
        store, dataset, cfg, state=state, s3_endpoint=s3_endpoint, use_gpu=use_gpu
    )


# --------------------------------------------------------------------------------------- build
def build_replica_index(
    store: Store | str,
    dataset: str,
    cfg: ReplicaConfig | None = None,
    state: dict[str, Any] | None = None,
    s3_endpoint: str | None = None,
    use_gpu: bool | None = None,
) -> dict[str, Any]:
    """Build the replica index of ``data/<dataset>/train`` with Ray tasks, store it and return its
    sidecar (always builds; :func:`ensure_replica_index` reuses a valid one). The driver holds no
    training embeddings: only counts, one pixel-sum vector and the measurement's few hundred
    queries. ``use_gpu`` (default ``cfg.use_gpu``): k-means, module embeddings and the
    measurement's search ask for one GPU each, so an autoscaler launches GPU nodes."""
    import dataclasses

    import ray

    from pipeline.fanout.ray_init import init_ray

    cfg = cfg or ReplicaConfig()
    if use_gpu is not None:
        cfg = dataclasses.replace(cfg, use_gpu=use_gpu)
    store = open_store(store, s3_endpoint, create=False)
    state = state or current_state(store, dataset, cfg)
    init_ray()
    t0 = time.time()
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(t0)) + f".{int(t0 % 1 * 1e6):06d}"
    build_id = f"{stamp}-{uuid.uuid4().hex[:8]}"  # sorts by start time (older builds go)
    path = f"{state['folder']}/{build_id}"
    params = state["params"]
    try:
        if params["kind"] == "flat":
            gpu = cfg.use_gpu and state["module"] is not None
            build = remote(build_flat, gpu).remote(
                store, dataset, path, cfg.embedding, state["module"]
            )
            parts = ray.get(build)
        else:
            parts = build_ivf(store, dataset, path, cfg, state)
    except ray.exceptions.RayTaskError as exc:  # a corrupt shard, a bad module: its own error
        own = DataError | StorageError | ConfigError | StaleArtifactError
        raise exc.cause if isinstance(exc.cause, own) else exc from None
    sidecar = {
        "build_id": build_id, "path": path, "dataset": dataset, "embedding": cfg.embedding,
        "kind": params["kind"], "params": params, "manifest_digest": state["digest"],
        "num_images": state["n"], "image_shape": state["shape"],
        "dims": state["dims"], "index_dims": params.get("pca_dims") or state["dims"],
        "module": state["module"],  # a module embedding: its file, sha256, preprocessing
        "parts": parts, "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "build_s": None, "use_gpu": cfg.use_gpu,
    }  # fmt: skip
    if params["kind"] == "flat":
        sidecar["measurement"] = {
            "recall_at_1": 1.0, "decision_agreement": 1.0, "exact": True,
            "note": "exact IndexFlatIP over the full-dimensional embedding",
        }  # fmt: skip
    else:
        sidecar["measurement"] = _measure_build(store, dataset, cfg, sidecar)
    sidecar["build_s"] = round(time.time() - t0, 3)
    store.write_bytes(
        json.dumps(sidecar, indent=2, sort_keys=True).encode(), state["folder"], SIDECAR
    )
    _remove_other_builds(store, state["folder"], build_id)
    return sidecar


def _remove_other_builds(store: Store, folder: str, keep: str) -> None:
    if store.is_local:
        root = Path(store.join(folder))
        for child in root.iterdir() if root.is_dir() else []:
            if child.is_dir() and child.name < keep:  # older builds (later ones may be running)
                shutil.rmtree(child, ignore_errors=True)
        return
    for obj in store._list((folder,), recursive=True):
        rel = obj["Key"].split(f"{folder.strip('/')}/", 1)[-1]
        if "/" in rel and rel.split("/", 1)[0] < keep:
            store.delete(folder, rel)


def _search_task(store: Store, sidecar: dict[str, Any], cfg: ReplicaConfig, images: np.ndarray):
    index = open_replica_index(store, sidecar, cfg)
    try:
        return index.search(images)
    finally:
        index.close()


def search_in_task(store: Store, sidecar: dict[str, Any], cfg: ReplicaConfig, images: np.ndarray):
    """``(sims, rows)`` of ``images`` in the stored index, searched in one Ray task (the caller never
    loads the index)."""
    import ray

    return ray.get(remote(_search_task, cfg.use_gpu).remote(store, sidecar, cfg, images))


def _measure_build(store: Store, dataset: str, cfg: ReplicaConfig, sidecar: dict[str, Any]):
    """recall@1 and decision agreement on perturbed training images and held-out images."""

    queries = measurement_queries(store, dataset, sidecar, cfg.measure_queries)
    sims, _ = search_in_task(store, sidecar, cfg, queries)
    exact, _ = exact_search_ray(store, sidecar, queries)
    return {
        **measure_recall(sims, exact, cfg.threshold),
        "nprobe": cfg.nprobe, "rerank_k": cfg.rerank_k,
        "queries_from": f"training images +-{NOISE} grey levels of noise, and held-out images",
    }  # fmt: skip


def measurement_queries(
    store: Store, dataset: str, sidecar: dict[str, Any], num: int, seed: int = 1
) -> np.ndarray:
    """Half (or all, without held-out images) seeded training rows with uniform noise, the rest the
    first held-out images. Only these rows are read (byte ranges of the stored rows)."""
    rng = np.random.default_rng(seed)
    held = _holdout_images(store, dataset, num - num // 2, tuple(sidecar["image_shape"]))
    n_train = num - len(held)
    pick = np.sort(rng.choice(sidecar["num_images"], min(n_train, sidecar["num_images"]), False))
    rows = fetch_rows(store, sidecar, pick).astype(np.int16)  # byte ranges of those rows only
    noisy = np.clip(rows + rng.integers(-NOISE, NOISE + 1, rows.shape), 0, 255).astype(np.uint8)
    return np.concatenate([noisy, held]) if len(held) else noisy


def _holdout_images(store: Store, dataset: str, num: int, shape: tuple) -> np.ndarray:
    folder = data_folder(dataset, "holdout")
    out, have = [], 0
    names = sorted(n for n in store.listdir(folder) if n.endswith(".tar"))
    entries = manifest_shards(store, folder) if names else None  # no held-out split: none
    for name in names:
        if have >= num:
            break
        images = read_checked_tar(store, folder, name, entries).images
        if tuple(images.shape[1:]) != shape:
            break
        out.append(images[: num - have])
        have += len(out[-1])
    return np.concatenate(out) if out else np.empty((0, *shape), np.uint8)


def ivf_report(
    store: Store, sidecar: dict[str, Any], cfg: ReplicaConfig, images: np.ndarray, sims: np.ndarray
) -> dict[str, Any]:
    """The report's ``ivf`` block: recall@1 and decision agreement of the scored ``images`` (found
    similarities ``sims``) against exact brute force (Ray tasks over the stored rows), the IVF
    parameters, and the build's own measurement."""
    pick = np.unique(np.linspace(0, len(sims) - 1, min(cfg.recall_queries, len(sims))).astype(int))
    exact_sims, _ = exact_search_ray(store, sidecar, images[pick])
    measured = measure_recall(np.asarray(sims)[pick], exact_sims, cfg.threshold)
    params = sidecar["params"]
    return {
        "recall_at_1": measured["recall_at_1"],
        "decision_agreement": measured["decision_agreement"],
        "recall_queries": len(pick), "nlist": params["nlist"], "nprobe": cfg.nprobe,
        "pca_dims": params["pca_dims"], "codec": params["codec"], "rerank_k": cfg.rerank_k,
        "build_measurement": sidecar["measurement"],
        "guarantee": "exact similarity for every candidate found; recall@1 and decision "
        "agreement measured against exact brute force",
    }  # fmt: skip


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
