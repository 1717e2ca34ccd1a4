"""Small parts the replica check's actors and the demo share.

:func:`train_index_spec`: the training embeddings in memory, for the demo's small figures and
sweep only. :func:`resolve_ref`, :func:`scorer_pool` and :func:`write_jsonl`: helpers of the actor
pools. The replica check itself streams shard by shard, its driver receiving per-shard summaries
only: :mod:`pipeline.fanout.scoring_stream`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import numpy as np

from pipeline.core.config import ReplicaConfig
from pipeline.data.imageset import ImageSet
from pipeline.data.layout import data_folder
from pipeline.data.shards import read_image_shards
from pipeline.data.storage import Store
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


def scorer_pool(requested: int) -> int:
    """Scorers hold one CPU each. On a private local Ray, leave one of its CPUs for the read tasks that
    feed them; on a cluster, ``requested`` (the autoscaler adds the nodes)."""
    from pipeline.data.parallel import read_fed_pool

    return read_fed_pool(requested)


def write_jsonl(store: Store, rows: list[dict[str, Any]], *parts: str) -> str:
    """Rows as JSON lines (numpy scalars as plain numbers), written atomically; returns the URI."""
    text = "\n".join(json.dumps({k: _plain(v) for k, v in r.items()}) for r in rows) + "\n"
    return store.write_bytes(text.encode(), *parts)


def _plain(v: Any) -> Any:
    return v.item() if isinstance(v, np.generic) else v
