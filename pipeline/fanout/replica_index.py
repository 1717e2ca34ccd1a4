"""The replica index: built once with Ray, stored beside the data, loaded by every scorer and guard.

Layout under the store (``indexes/<dataset>/<embedding>/<kind>/``)::

    sidecar.json          written last: names the build folder, the parameters, the manifest digest,
                          the measured recall@1 and replicate-decision agreement
    <build_id>/index.faiss  the FAISS index (IndexFlatIP, or IndexPreTransform(PCA) over an IVF index)
    <build_id>/mean.npy     the centred embedding's mean image (flattened, in [0, 1]); absent for raw
    <build_id>/rows-<part>.u8, keys-<part>.json   the training images' uint8 rows and keys, in parts

A build writes a fresh ``<build_id>/`` folder, then the sidecar (one atomic put), then removes older
build folders: a crashed build leaves a folder no sidecar names, which is never loaded. A sidecar whose
manifest digest or build parameters differ from the current ones is stale: the index is rebuilt by
:func:`ensure_replica_index` and refused by :func:`load_replica_index`, never silently used.

Two kinds (``ReplicaConfig.index``; "auto" picks by the number of training images N):

- ``flat`` (N <= ``exact_max_images``): exact ``IndexFlatIP`` over the full-dimensional embedding,
  built in one Ray task exactly as the in-memory index always was (same mean image, same embeddings),
  so similarities and nearest keys equal plain exact search bit for bit.
- ``ivf``: Ray tasks over groups of shards (``rows_per_task`` rows each) write the uint8 rows and sum
  the pixels (the mean image); one task trains PCA (to ``pca_dims``, when the embedding is larger) and
  the IVF quantiser (``nlist`` about 4 sqrt(N)) on a seeded sample; tasks add their rows to copies of
  the trained empty index and a merge task joins them. A search takes the top ``rerank_k`` candidates
  of the IVF index, reads their rows (positioned reads, never a whole-file map) and re-ranks them by
  the exact full-dimensional similarity: the reported similarity and the replicate decision are exact
  for every candidate found; recall@1 and decision agreement against exact brute force (streamed over
  the rows in chunks) are measured at build time and recorded in the sidecar.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.core.config import ConfigError, ReplicaConfig
from pipeline.data.imageset import DataError
from pipeline.data.layout import data_folder
from pipeline.data.provenance import StaleArtifactError
from pipeline.data.shards import manifest_shards, read_checked_tar, read_image_shards
from pipeline.data.storage import StorageError, Store, open_store
from pipeline.fanout.embedders import RowEmbedder
from pipeline.fanout.index import import_faiss, l2_normalise, make_embedding
from pipeline.fanout.replica_store import (
    EXACT_CHUNK_ROWS,
    SIDECAR,
    LazyReplicaIndex,
    ReplicaIndex,
    TrainingRows,
    _local_file,
    build_params,
    current_state,
    exact_search,
    exact_search_ray,
    index_folder,
    index_spec,
    load_replica_index,
    local_index_dir,
    measure_index,
    measure_recall,
    open_replica_index,
    read_sidecar,
    stale_reasons,
)

__all__ = [
    "LazyReplicaIndex", "ReplicaIndex", "TrainingRows", "build_params", "build_replica_index",
    "ensure_replica_index", "exact_search", "exact_search_ray", "index_folder", "index_spec",
    "load_replica_index", "local_index_dir", "measure_index", "measure_recall", "measurement_queries",
    "open_replica_index", "stale_reasons",
]  # fmt: skip

NOISE = 6  # +- grey levels of the perturbed training queries


def ensure_replica_index(
    store: Store, dataset: str, cfg: ReplicaConfig, s3_endpoint: str | None = None
) -> dict[str, Any]:
    """The sidecar of a valid stored index, building one (:func:`build_replica_index`) when there is
    none or the stored one is stale."""
    state = current_state(store, dataset, cfg)
    sidecar = read_sidecar(store, state["folder"])
    if not stale_reasons(sidecar, state) and store.exists(sidecar["path"], "index.faiss"):
        return sidecar
    return build_replica_index(store, dataset, cfg, state=state, s3_endpoint=s3_endpoint)


# --------------------------------------------------------------------------------------- build
def build_replica_index(
    store: Store | str,
    dataset: str,
    cfg: ReplicaConfig | None = None,
    state: dict[str, Any] | None = None,
    s3_endpoint: str | None = None,
) -> dict[str, Any]:
    """Build the replica index of ``data/<dataset>/train`` with Ray tasks, store it and return its
    sidecar (always builds; :func:`ensure_replica_index` reuses a valid one). The driver holds no
    training embeddings: only counts, pixel sums and the measurement's few hundred queries."""
    import ray

    from pipeline.fanout.ray_init import init_ray

    cfg = cfg or ReplicaConfig()
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
            build = _remote(_build_flat).remote(
                store, dataset, path, cfg.embedding, state["module"]
            )
            parts, extra = ray.get(build)
        else:
            parts, extra = _build_ivf(store, dataset, path, cfg, state)
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
        "build_s": None, **extra,
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


def _remote(fn, **options):
    import ray

    return ray.remote(num_cpus=1, max_retries=2, **options)(fn)


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


def _put_file(store: Store, local: Path, *parts: str) -> None:
    """Copy a local file into the store (streamed; atomic on a local store)."""
    if store.is_local:
        target = Path(store.join(*parts))
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex[:8]}.tmp")
        shutil.copyfile(local, tmp)
        os.replace(tmp, target)
        return
    with open(local, "rb") as src, store.fs.open_output_stream(store.join(*parts)) as dst:
        while chunk := src.read(1 << 24):
            dst.write(chunk)


def _write_index(store: Store, index, *parts: str) -> None:
    faiss = import_faiss()
    with tempfile.TemporaryDirectory(prefix="cpsample-index-") as tmp:
        local = Path(tmp) / "index.faiss"
        faiss.write_index(index, str(local))
        _put_file(store, local, *parts)


def _build_flat(store: Store, dataset: str, path: str, embedding: str, module: dict | None):
    """One task: exactly the in-memory exact index (same reader, same mean, same embeddings)."""
    faiss = import_faiss()
    train = read_image_shards(store, data_folder(dataset, "train"))
    if module is None:
        embed = make_embedding(embedding, train.images)
    else:  # the module the sidecar will name (its digest checked)
        embed = RowEmbedder(train.images.shape[1:], None, module)
    emb = np.ascontiguousarray(embed(train.images), dtype=np.float32)
    index = faiss.IndexFlatIP(emb.shape[1])
    index.add(emb)
    _write_index(store, index, path, "index.faiss")
    mean = getattr(embed, "mean", None)
    if mean is not None:
        store.write_bytes(_npy(mean), path, "mean.npy")
    store.write_bytes(np.ascontiguousarray(train.images).tobytes(), path, "rows-00000.u8")
    store.write_bytes(json.dumps(train.keys).encode(), path, "keys-00000.json")
    return [{"part": 0, "start": 0, "count": len(train)}], {}


def _npy(array: np.ndarray) -> bytes:
    import io

    buf = io.BytesIO()
    np.save(buf, np.asarray(array))
    return buf.getvalue()


def _plan_parts(shards: list[tuple[str, int]], rows_per_task: int) -> list[dict[str, Any]]:
    """Contiguous groups of shards (name order) of at most ``rows_per_task`` rows (a bigger shard
    is a group of its own); each with its first global row."""
    parts, current, start, count = [], [], 0, 0
    for name, n in shards:
        if current and count + n > rows_per_task:
            parts.append({"part": len(parts), "start": start, "count": count, "shards": current})
            start, current, count = start + count, [], 0
        current.append(name)
        count += n
    if current:
        parts.append({"part": len(parts), "start": start, "count": count, "shards": current})
    return parts


def _scan_part(store: Store, dataset: str, path: str, part: dict, picks: np.ndarray):
    """Write a part's rows and keys; return (count and pixel sums, the rows at ``picks`` (local))."""
    folder = data_folder(dataset, "train")
    rows, keys, total = [], [], None
    entries = manifest_shards(store, folder)  # each shard's sha256 checked as it is read
    for name in part["shards"]:
        shard = read_checked_tar(store, folder, name, entries)
        flat = shard.images.reshape(len(shard), -1)
        rows.append(np.ascontiguousarray(flat))
        keys += shard.keys
        s = flat.sum(0, dtype=np.float64)
        total = s if total is None else total + s
    block = np.concatenate(rows)
    if len(block) != part["count"]:
        raise DataError(f"{store.uri_of(folder)}: a shard holds other counts than the manifest's")
    store.write_bytes(block.tobytes(), path, f"rows-{part['part']:05d}.u8")
    store.write_bytes(json.dumps(keys).encode(), path, f"keys-{part['part']:05d}.json")
    return {"count": len(block), "sum": total}, block[picks]


def _train_ivf(sample_refs: list, embed: RowEmbedder, params: dict[str, Any], dim: int):
    """One task: PCA (on at most 32768 rows) and the IVF quantiser, on the sample (``embed``: the
    embedding of uint8 rows, ``dim`` its dimension); returns the serialised trained empty index."""
    import ray

    faiss = import_faiss()
    sample = np.concatenate([ray.get(r) for r in sample_refs[0]])
    rng = np.random.default_rng(params["seed"])
    pca = None
    d = dim
    if params["pca_dims"]:
        d = params["pca_dims"]
        pca = faiss.PCAMatrix(dim, d, 0.0, False)
        few = np.sort(rng.choice(len(sample), min(len(sample), 32768), replace=False))
        pca.train(np.ascontiguousarray(embed(sample[few])))
    quantizer = faiss.IndexFlatIP(d)
    if params["codec"] == "sq8":
        ivf = faiss.IndexIVFScalarQuantizer(
            quantizer, d, params["nlist"], faiss.ScalarQuantizer.QT_8bit, faiss.METRIC_INNER_PRODUCT
        )
    else:
        ivf = faiss.IndexIVFFlat(quantizer, d, params["nlist"], faiss.METRIC_INNER_PRODUCT)
    ivf.cp.seed = params["seed"]
    if pca is None:
        index = ivf
    else:  # PCA, then L2-normalise: the coarse lists and the ranking compare directions
        index = faiss.IndexPreTransform(faiss.NormalizationTransform(d, 2.0), ivf)
        index.prepend_transform(pca)
    reduced = np.concatenate([
        _reduce(pca, embed(sample[lo : lo + 8192]))
        for lo in range(0, len(sample), 8192)
    ])  # fmt: skip
    ivf.train(reduced)
    index.is_trained = True
    return faiss.serialize_index(index)


def _reduce(pca, x: np.ndarray) -> np.ndarray:
    if pca is None:
        return np.ascontiguousarray(x)
    return np.ascontiguousarray(l2_normalise(pca.apply(np.ascontiguousarray(x))))


def _add_part(store: Store, path: str, part: dict, embed, trained: np.ndarray, row_bytes: int):
    """One task: the part's rows added (global ids) to a copy of the trained empty index."""
    faiss = import_faiss()
    index = faiss.deserialize_index(trained)
    name = f"rows-{part['part']:05d}.u8"
    with tempfile.TemporaryDirectory(prefix="cpsample-rows-") as tmp:
        local = _local_file(store, path, name, Path(tmp))
        with open(local, "rb") as fh:
            for lo in range(0, part["count"], EXACT_CHUNK_ROWS):
                n = min(EXACT_CHUNK_ROWS, part["count"] - lo)
                rows = np.frombuffer(os.pread(fh.fileno(), n * row_bytes, lo * row_bytes), np.uint8)
                emb = np.ascontiguousarray(embed(rows.reshape(n, row_bytes)))
                ids = np.arange(part["start"] + lo, part["start"] + lo + n, dtype=np.int64)
                index.add_with_ids(emb, ids)
    return faiss.serialize_index(index)


def _merge(store: Store, path: str, trained: np.ndarray, part_refs: list) -> int:
    """One task: the parts' inverted lists merged into the trained index, written to the store."""
    import ray

    faiss = import_faiss()
    index = faiss.deserialize_index(trained)
    ivf = faiss.extract_index_ivf(index)
    for ref in part_refs[0]:
        other = faiss.deserialize_index(ray.get(ref))
        ivf.merge_from(faiss.extract_index_ivf(other), 0)
        del other
    index.ntotal = ivf.ntotal
    _write_index(store, index, path, "index.faiss")
    return int(index.ntotal)


def _build_ivf(store: Store, dataset: str, path: str, cfg: ReplicaConfig, state: dict[str, Any]):
    import ray

    params, n = state["params"], state["n"]
    dim = int(np.prod(state["shape"]))
    parts = _plan_parts(state["shards"], cfg.rows_per_task)
    rng = np.random.default_rng(params["seed"])
    train_pick = np.sort(rng.choice(n, params["train_samples"], replace=False))
    scan = _remote(_scan_part, num_returns=2)
    stats_refs, sample_refs = [], []
    for p in parts:
        lo, hi = p["start"], p["start"] + p["count"]
        local = train_pick[(train_pick >= lo) & (train_pick < hi)] - lo
        s, r = scan.remote(store, dataset, path, p, local)
        stats_refs.append(s)
        sample_refs.append(r)
    total, count = None, 0
    for ref in stats_refs:  # one part's sums at a time
        st = ray.get(ref)
        count += st["count"]
        total = st["sum"] if total is None else total + st["sum"]
    mean = (total / count / 255.0).astype(np.float32) if cfg.embedding == "centred" else None
    if mean is not None:
        store.write_bytes(_npy(mean), path, "mean.npy")
    embed_ref = ray.put(RowEmbedder(state["shape"], mean, state["module"]))
    trained = _remote(_train_ivf).remote([sample_refs], embed_ref, params, state["dims"])
    del sample_refs
    add = _remote(_add_part)
    added = [add.remote(store, path, p, embed_ref, trained, dim) for p in parts]
    ntotal = ray.get(_remote(_merge).remote(store, path, trained, [added]))
    if ntotal != n:
        raise RuntimeError(f"the merged index holds {ntotal} vectors, expected {n}")
    return [{k: p[k] for k in ("part", "start", "count")} for p in parts], {}


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

    return ray.get(_remote(_search_task).remote(store, sidecar, cfg, images))


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
    first held-out images. Only these rows are read (positioned reads of the stored rows)."""
    rng = np.random.default_rng(seed)
    held = _holdout_images(store, dataset, num - num // 2, tuple(sidecar["image_shape"]))
    n_train = num - len(held)
    index = TrainingRows(local_index_dir(store, sidecar), sidecar)  # no FAISS index loaded
    pick = np.sort(rng.choice(sidecar["num_images"], min(n_train, sidecar["num_images"]), False))
    rows = index.rows(pick).astype(np.int16)
    index.close()
    noisy = np.clip(rows + rng.integers(-NOISE, NOISE + 1, rows.shape), 0, 255).astype(np.uint8)
    return np.concatenate([noisy, held]) if len(held) else noisy


def _holdout_images(store: Store, dataset: str, num: int, shape: tuple) -> np.ndarray:
    folder = data_folder(dataset, "holdout")
    out, have = [], 0
    entries = manifest_shards(store, folder)
    for name in sorted(n for n in store.listdir(folder) if n.endswith(".tar")):
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
