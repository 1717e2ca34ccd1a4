"""The Ray tasks that build a replica index, each at a memory bounded by one part or a capped sample.

``flat`` (N <= ``exact_max_images``): one task, exactly the in-memory exact index. ``ivf``:

1. per part (contiguous shards, at most ``rows_per_task`` rows), a task streams its shards (sha256
   checked) into ``rows-<p>.u8`` and ``keys-<p>.json`` and returns its float64 pixel sums, its count
   and the few PCA sample rows in it: memory one shard plus the sums;
2. the driver folds the sums into the split mean (``split-mean.npy``; ``mean.npy`` for the centred
   embedding): D float64;
3. one task trains PCA on at most ``PCA_SAMPLES`` rows (memory: those rows embedded, D x D);
4. per part, a task reads its share of the IVF training sample by byte ranges and reduces it; one
   task (a GPU when asked) trains the quantiser on at most ``MAX_TRAIN_SAMPLES`` reduced rows
   (memory: 4 d bytes each) and writes ``trained.faiss``;
5. per part, a task streams its rows (byte ranges, 8192 at a time) into a copy of the trained index
   and writes ``ivf-<p>.faiss`` (memory: the part's codes and ids, ``count * (code + 8)`` bytes).

No task holds more than one part; nothing merges the parts (they are searched one after another).
"""

from __future__ import annotations

import io
import json
import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.core.config import ReplicaConfig
from pipeline.data.imageset import DataError
from pipeline.data.layout import data_folder
from pipeline.data.shards import manifest_shards, read_checked_tar, read_image_shards
from pipeline.data.storage import Store
from pipeline.fanout.embedders import RowEmbedder
from pipeline.fanout.index import import_faiss, make_embedding
from pipeline.fanout.index_files import BuildRows, ivf_name, keys_name, rows_name
from pipeline.fanout.index_parts import PCA_SAMPLES, build_part, reduce, train_ivf, train_pca
from pipeline.fanout.index_parts import write_part as write_part_file

CHUNK_ROWS = 8192  # rows embedded at a time


def remote(fn, gpu: bool = False, **options):
    """``fn`` as a Ray task of one CPU (and one GPU when ``gpu``: the autoscaler launches one)."""
    import ray

    return ray.remote(num_cpus=1, num_gpus=1 if gpu else 0, max_retries=2, **options)(fn)


def put_file(store: Store, local: Path, *parts: str) -> None:
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


def npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.asarray(array))
    return buf.getvalue()


def build_flat(store: Store, dataset: str, path: str, embedding: str, module: dict | None):
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
    with tempfile.TemporaryDirectory(prefix="cpsample-index-") as tmp:
        faiss.write_index(index, f"{tmp}/index.faiss")
        put_file(store, Path(tmp) / "index.faiss", path, "index.faiss")
    if getattr(embed, "mean", None) is not None:
        store.write_bytes(npy(embed.mean), path, "mean.npy")
    flat = train.images.reshape(len(train), -1)
    total = sum(
        flat[lo : lo + CHUNK_ROWS].sum(0, dtype=np.float64)
        for lo in range(0, len(flat), CHUNK_ROWS)
    )
    store.write_bytes(npy((total / len(flat) / 255.0).astype(np.float32)), path, "split-mean.npy")
    store.write_bytes(np.ascontiguousarray(train.images).tobytes(), path, rows_name(0))
    store.write_bytes(json.dumps(train.keys).encode(), path, keys_name(0))
    return [{"part": 0, "start": 0, "count": len(train)}]


def plan_parts(shards: list[tuple[str, int]], rows_per_task: int) -> list[dict[str, Any]]:
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


def scan_part(store: Store, dataset: str, path: str, part: dict, picks: np.ndarray):
    """Stream a part's shards into its rows and keys files; return (count and float64 pixel sums,
    the rows at local positions ``picks``). Memory: one shard, the part's keys, the picks."""
    folder = data_folder(dataset, "train")
    entries = manifest_shards(store, folder)  # each shard's sha256 checked as it is read
    keys, total, picked, seen = [], None, [], 0
    with tempfile.TemporaryDirectory(prefix="cpsample-rows-") as tmp:
        local = Path(tmp) / "rows.u8"
        with open(local, "wb") as out:
            for name in part["shards"]:
                shard = read_checked_tar(store, folder, name, entries)
                keys += shard.keys
                flat = np.ascontiguousarray(shard.images.reshape(len(shard), -1))
                out.write(flat.tobytes())
                s = flat.sum(0, dtype=np.float64)
                total = s if total is None else total + s
                mine = picks[(picks >= seen) & (picks < seen + len(flat))] - seen
                picked.append(flat[mine])
                seen += len(flat)
        if seen != part["count"]:
            raise DataError(
                f"{store.uri_of(folder)}: a shard holds other counts than the manifest's"
            )
        put_file(store, local, path, rows_name(part["part"]))
    store.write_bytes(json.dumps(keys).encode(), path, keys_name(part["part"]))
    return {"count": seen, "sum": total}, np.concatenate(picked)


def serialise_transform(vt) -> np.ndarray:
    faiss = import_faiss()
    writer = faiss.VectorIOWriter()
    faiss.write_VectorTransform(vt, writer)
    return faiss.vector_to_array(writer.data)


def deserialise_transform(data: np.ndarray | None):
    if data is None:
        return None
    faiss = import_faiss()
    reader = faiss.VectorIOReader()
    faiss.copy_array_to_vector(np.asarray(data, dtype=np.uint8), reader.data)
    return faiss.read_VectorTransform(reader)


def _embedded(embed, rows: np.ndarray, pca=None) -> np.ndarray:
    """Embed (and reduce) uint8 rows ``CHUNK_ROWS`` at a time."""
    out = [reduce(pca, embed(rows[lo : lo + CHUNK_ROWS])) for lo in range(0, len(rows), CHUNK_ROWS)]
    return np.concatenate(out) if out else np.empty((0, 0), np.float32)


def pca_task(sample_refs: list, embed: RowEmbedder, dims: int) -> np.ndarray:
    """One task: PCA of the embedded sample rows to ``dims`` dims, serialised."""
    import ray

    sample = np.concatenate([ray.get(r) for r in sample_refs[0]])
    return serialise_transform(train_pca(_embedded(embed, sample), dims))


def sample_task(store: Store, rows_sidecar: dict, picks: np.ndarray, embed, pca_data) -> np.ndarray:
    """One task: the rows at global ``picks`` (byte ranges) embedded and reduced: (m, d) float32."""
    reader = BuildRows(store, rows_sidecar)
    try:
        rows = reader.rows(picks)
    finally:
        reader.close()
    return _embedded(embed, rows.reshape(len(rows), -1), deserialise_transform(pca_data))


def train_task(store: Store, path: str, reduced_refs: list, dim: int, params, pca_data, gpu: bool):
    """One task: the quantiser (and SQ ranges) trained on the reduced sample; writes and returns
    the serialised trained empty index."""
    import ray

    faiss = import_faiss()
    reduced = np.concatenate([a for a in (ray.get(r) for r in reduced_refs[0]) if len(a)])
    index = train_ivf(reduced, dim, params, deserialise_transform(pca_data), use_gpu=gpu)
    data = faiss.serialize_index(index)
    store.write_bytes(data.tobytes(), path, "trained.faiss")
    return data


def add_task(store: Store, rows_sidecar: dict, part: dict, embed, trained: np.ndarray) -> int:
    """One task: the part's rows (byte ranges, ``CHUNK_ROWS`` at a time) added under their global
    ids to a copy of the trained index, written as ``ivf-<p>.faiss``; returns its vector count."""
    reader = BuildRows(store, rows_sidecar)
    span = (part["start"], part["start"] + 1)
    chunks = (embed(block) for _, block in reader.iter_rows(CHUNK_ROWS, span))
    try:
        index = build_part(trained, chunks, part["start"])
    finally:
        reader.close()
    with tempfile.TemporaryDirectory(prefix="cpsample-part-") as tmp:
        n = write_part_file(index, Path(tmp) / "part.faiss")
        put_file(store, Path(tmp) / "part.faiss", rows_sidecar["path"], ivf_name(part["part"]))
    return n


def build_ivf(store: Store, dataset: str, path: str, cfg: ReplicaConfig, state: dict[str, Any]):
    """The IVF build's tasks (see the module's docstring); returns the sidecar's parts."""
    import ray

    params, n, gpu = state["params"], state["n"], cfg.use_gpu
    parts = plan_parts(state["shards"], cfg.rows_per_task)
    rng = np.random.default_rng(params["seed"])
    ivf_pick = np.sort(rng.choice(n, params["train_samples"], replace=False))
    pca_pick = np.sort(rng.choice(ivf_pick, min(len(ivf_pick), PCA_SAMPLES), replace=False))
    scan = remote(scan_part, num_returns=2)
    stats_refs, sample_refs = [], []
    for p in parts:
        lo, hi = p["start"], p["start"] + p["count"]
        s, r = scan.remote(
            store, dataset, path, p, pca_pick[(pca_pick >= lo) & (pca_pick < hi)] - lo
        )
        stats_refs.append(s)
        sample_refs.append(r)
    total, count = None, 0
    for ref in stats_refs:  # one part's sums at a time: the split mean as a fold
        st = ray.get(ref)
        count += st["count"]
        total = st["sum"] if total is None else total + st["sum"]
    split_mean = (total / count / 255.0).astype(np.float32)
    store.write_bytes(npy(split_mean), path, "split-mean.npy")
    mean = split_mean if cfg.embedding == "centred" else None
    if mean is not None:
        store.write_bytes(npy(mean), path, "mean.npy")
    module_gpu = gpu and state["module"] is not None  # a module embeds on the GPU; pixels need none
    embed_ref = ray.put(RowEmbedder(state["shape"], mean, state["module"]))
    pca_ref = None
    if params["pca_dims"]:
        pca_ref = remote(pca_task, module_gpu).remote([sample_refs], embed_ref, params["pca_dims"])
    del sample_refs
    rows_sidecar = {"build_id": path.rsplit("/", 1)[-1], "path": path, "num_images": n,
                    "image_shape": state["shape"], "parts": [_entry(p) for p in parts]}  # fmt: skip
    sample = remote(sample_task, module_gpu)
    reduced = [sample.remote(store, rows_sidecar, ivf_pick[(ivf_pick >= p["start"]) & (ivf_pick < p["start"] + p["count"])], embed_ref, pca_ref) for p in parts]  # fmt: skip
    trained = remote(train_task, gpu).remote(
        store, path, [reduced], state["dims"], params, pca_ref, gpu
    )
    add = remote(add_task, module_gpu)
    counts = ray.get([add.remote(store, rows_sidecar, p, embed_ref, trained) for p in parts])
    if sum(counts) != n:
        raise RuntimeError(f"the parts hold {sum(counts)} vectors, expected {n}")
    return [{**_entry(p), "vectors": c} for p, c in zip(parts, counts, strict=True)]


def _entry(part: dict) -> dict:
    return {k: part[k] for k in ("part", "start", "count")}
