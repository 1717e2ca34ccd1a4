"""Ray Data edge: the replica check's actor pool.

``read_webdataset`` over sample (or held-out) shards; an actor loads the stored replica index
(:mod:`pipeline.fanout.replica_index`, built once per dataset and embedding) and searches each batch.
Results go back into the shards' ``<key>.json`` and into a JSON-lines report.
"""

from __future__ import annotations

import dataclasses
import io
import json
from dataclasses import dataclass
from typing import Any

import numpy as np

from pipeline.core.config import ReplicaConfig, from_dict
from pipeline.data.imageset import ImageSet
from pipeline.data.layout import data_folder
from pipeline.data.shards import read_image_shards, verify_folder
from pipeline.data.storage import Store, open_store
from pipeline.data.tars import build_tar, encode_png, read_tar
from pipeline.fanout.embedders import is_module, module_options
from pipeline.fanout.index import make_embedding


def resolve_ref(ref: Any) -> Any:
    """An object passed to an actor either as itself or as an ObjectRef."""
    import ray

    return ray.get(ref) if isinstance(ref, ray.ObjectRef) else ref


@dataclass
class TrainIndexSpec:
    """What a scoring actor needs to rebuild the training index: embeddings and their keys."""

    embeddings: np.ndarray  # (N, D) float32, L2-normalised
    keys: list[str]
    mean: np.ndarray | None  # (D_pixels,) mean image for the centred embedding, else None


def train_index_spec(
    store: Store, dataset: str, replicas: ReplicaConfig
) -> tuple[TrainIndexSpec, ImageSet]:
    """Training embeddings in memory (the mean image is kept for centring queries). Only for small
    training sets (the demo's figures and sweep); the replica check and guard mode load the stored
    index instead (:func:`pipeline.fanout.replica_index.ensure_replica_index`)."""
    train = read_image_shards(store, data_folder(dataset, "train"))
    options = {}
    if is_module(replicas.embedding):  # a TorchScript module: its preprocessing and batch size
        options = {**module_options(replicas), "batch": replicas.embedding_batch}
    embed = make_embedding(replicas.embedding, train.images, **options)
    mean = getattr(embed, "mean", None)
    return TrainIndexSpec(embeddings=embed(train.images), keys=train.keys, mean=mean), train


class ReplicaScorer:
    """Ray Data actor: loads the stored replica index once (never builds it), then scores batches of
    decoded WebDataset rows. ``nn_row`` is the neighbour's row in the stored index, ``index_build``
    the index build each row was scored with (neither goes into the JSON-lines report)."""

    def __init__(self, spec: Any, replicas: dict[str, Any]):
        from pipeline.fanout.replica_index import open_replica_index

        spec = resolve_ref(spec)
        self.cfg = from_dict(ReplicaConfig, replicas)
        self.index = open_replica_index(spec["store"], spec["sidecar"], self.cfg)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        images = np.stack([np.asarray(a) for a in batch["png"]])
        sims, idx = self.index.search(images, k=1)
        return {
            "key": np.asarray([str(k) for k in batch["__key__"]]),
            "path": np.asarray([str(p) for p in batch["path"]]),
            "nn_key": np.asarray(self.index.keys_of(idx)),
            "nn_row": np.asarray(idx, dtype=np.int64),
            "nn_similarity": sims.astype(np.float32),
            "is_replicate": sims >= self.cfg.threshold,
            "index_build": np.asarray([self.index.build_id] * len(images)),
        }


def score_shards(
    store_uri: str | Store,
    folder: str,
    spec_ref: Any,
    replicas: ReplicaConfig,
    concurrency: int = 1,
    s3_endpoint: str | None = None,
) -> list[dict[str, Any]]:
    """Nearest training image of every sample in the shards under ``folder`` (Ray Data + FAISS).

    ``spec_ref``: :func:`pipeline.fanout.replica_index.index_spec` (or its ObjectRef), naming the
    stored index the actors load; or a dataset name, whose index is built first if it has no valid
    one (:func:`pipeline.fanout.replica_index.ensure_replica_index`)."""

    import ray

    from pipeline.fanout.replica_index import ensure_replica_index, index_spec

    store = open_store(store_uri, s3_endpoint, create=False)
    if isinstance(spec_ref, str):
        sidecar = ensure_replica_index(store, spec_ref, replicas, s3_endpoint)
        spec_ref = index_spec(store, spec_ref, replicas, sidecar)
    verify_folder(store, folder)  # a dataset split: Ray Data would read it unchecked
    paths = [store.join(folder, n) for n in store.listdir(folder) if n.endswith(".tar")]
    ds = ray.data.read_webdataset(
        paths,
        filesystem=store.fs,
        include_paths=True,
        decoder=_decode_png_only,
        override_num_blocks=len(paths),
    )
    scored = ds.map_batches(
        ReplicaScorer,
        fn_constructor_kwargs={"spec": spec_ref, "replicas": dataclasses.asdict(replicas)},
        batch_size=512, compute=ray.data.ActorPoolStrategy(size=_scorer_pool(concurrency)), num_cpus=1,
    )  # fmt: skip
    return sorted(scored.take_all(), key=lambda r: r["key"])


def _scorer_pool(requested: int) -> int:
    """Scorers hold one CPU each: leave one CPU of the cluster for the read tasks that feed them."""
    import ray

    cpus = int(ray.cluster_resources().get("CPU", 1))
    return max(1, min(requested, cpus - 1))


def _decode_png_only(sample: dict[str, Any]) -> dict[str, Any]:
    """Decode ``.png`` members to arrays; keep the rest as raw bytes (metadata is merged later)."""
    from PIL import Image

    out = dict(sample)
    for key, value in sample.items():
        if key.endswith("png") and isinstance(value, bytes):
            out[key] = np.asarray(Image.open(io.BytesIO(value)))
        elif key.endswith("json") and isinstance(value, bytes):
            out[key] = value.decode()
    return out


def annotate_shards(
    store_uri: str | Store,
    folder: str,
    results: list[dict[str, Any]],
    s3_endpoint: str | None = None,
) -> None:
    """Rewrite each sample shard with ``nn_key``/``nn_similarity`` in every ``<key>.json`` (atomic)."""
    store = open_store(store_uri, s3_endpoint, create=False)
    by_key = {r["key"]: r for r in results}
    for name in store.listdir(folder):
        if not name.endswith(".tar"):
            continue
        original = store.read_bytes(folder, name)
        shard, records = read_tar(original, name), []
        for key, image, meta in zip(shard.keys, shard.images, shard.meta):
            r = by_key.get(key)
            if r is not None:
                meta = {
                    **meta,
                    "nn_key": str(r["nn_key"]),
                    "nn_similarity": float(r["nn_similarity"]),
                }
            records.append((key, encode_png(image), meta))
        if (data := build_tar(records)) != original:  # a rerun's same results rewrite nothing
            store.write_bytes(data, folder, name)


def write_jsonl(store, rows: list[dict[str, Any]], *parts: str) -> str:
    """Rows as JSON lines, written atomically."""
    text = "\n".join(json.dumps({k: _plain(v) for k, v in r.items()}) for r in rows) + "\n"
    return store.write_bytes(text.encode(), *parts)


def _plain(v: Any) -> Any:
    return v.item() if isinstance(v, np.generic) else v
