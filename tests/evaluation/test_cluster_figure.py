"""The near-duplicate clusters drawn as rows (pipeline.evaluation.cluster_figure)."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from pipeline.core.config import ReplicaConfig
from pipeline.data.duplicates import DuplicateSpec, add_near_duplicates
from pipeline.data.imageset import ImageSet
from pipeline.data.sources import synthetic_image
from pipeline.data.storage import open_store
from pipeline.evaluation.cluster_figure import cluster_grid_figure
from pipeline.fanout.clusters import Clusters, build_clusters
from pipeline.orchestration.stages import make_shards


def _height(png: bytes) -> int:
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    return np.asarray(Image.open(io.BytesIO(png))).shape[0]


def test_one_row_per_cluster_up_to_n(tmp_path):
    images = np.stack([synthetic_image(3, i, 16) for i in range(90)])
    train = ImageSet([f"s-{i:04d}" for i in range(80)], images[:80])
    train, _ = add_near_duplicates(train, DuplicateSpec(k=4, m=5), seed=0)
    store = open_store(str(tmp_path))
    make_shards(store, "dup", train, ImageSet([f"h-{i}" for i in range(10)], images[80:]))
    clusters = build_clusters(store, "dup", ReplicaConfig(), 0.97)
    assert sorted(clusters.sizes().values()) == [6, 6, 6, 6]  # each original and its 5 copies
    one, three = (_height(cluster_grid_figure(store, "dup", clusters, n=k)) for k in (1, 3))
    assert three > 2 * one * 0.8  # each cluster adds a row
    empty = cluster_grid_figure(store, "dup", Clusters(0.97, "centred", {}, {}))
    assert _height(empty) == one  # one row saying there are no clusters
