"""The classifier's random bits: per training key (the paper) or per near-duplicate cluster.

Near-duplicates under different keys get independent key bits, so the classifier is asked to fit
contradictory labels on one picture and stays unsure exactly where the denoiser copies most. Cluster
bits (``random_bit(cluster_id)``, :mod:`pipeline.fanout.clusters`) give every copy the same bit.
"""

from __future__ import annotations

from typing import Any

from pipeline.core.config import ClassifierTrainConfig
from pipeline.data.handle import DatasetHandle, as_handle
from pipeline.data.storage import Store


def resolve_labels(store: Store, dataset: str | DatasetHandle, train: ClassifierTrainConfig):
    """``(labels, clusters)``: the classifier's bit source as trained, ``"key"`` or ``"cluster"``, and
    the near-duplicate clusters it draws cluster bits from (None for key bits).

    ``train.labels == "auto"`` takes cluster bits wherever ``clusters/<dataset>/<clusters_embedding>``
    exists; ``"cluster"`` without them is a :class:`~pipeline.core.config.ConfigError` naming the job
    that makes them. Stale clusters (made from other shards) raise from :func:`load_clusters`. A
    latent dataset (:mod:`pipeline.fanout.latents`) keeps its images' keys, so its bits come from
    the clusters of the image dataset it was encoded from (its manifest's ``latent.source_dataset``):
    near-duplicates are found among images, not latents. ``dataset``: a name, or a handle already
    opened (its manifest is not read again; key bits read nothing)."""
    from pipeline.core.config import ConfigError
    from pipeline.fanout.clusters import cluster_folder, load_clusters

    if train.labels == "key":
        return "key", None
    ds = as_handle(store, dataset)
    dataset = ds.dataset
    if ds.latent is not None and ds.latent.get("source_dataset"):
        dataset = str(ds.latent["source_dataset"])
    clusters = load_clusters(
        store, ds if dataset == ds.dataset else dataset, train.clusters_embedding
    )
    if clusters is None and train.labels == "cluster":
        raise ConfigError(
            f"labels='cluster' needs near-duplicate clusters under "
            f"{store.uri_of(cluster_folder(dataset, train.clusters_embedding))}; make them with "
            f"jobs/cluster_duplicates.py --dataset {dataset}, or use labels='key'"
        )
    return ("cluster", clusters) if clusters is not None else ("key", None)


def labels_record(labels: str, clusters) -> dict[str, Any]:
    """What the exported classifier records about its bits: the source, and for cluster bits the
    clusters' digest, threshold and counts."""
    if clusters is None:
        return {"source": labels}
    side = clusters.sidecar
    return {
        "source": labels,
        "clusters_digest": clusters.digest,
        "threshold": clusters.threshold,
        "embedding": clusters.embedding,
        **{k: side.get(k) for k in ("num_clusters", "num_multi_clusters", "num_duplicated_images")},
    }
