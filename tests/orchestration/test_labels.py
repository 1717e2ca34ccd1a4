"""The classifier's bit source: key bits, cluster bits, and "auto" (cluster bits wherever the
near-duplicate clusters exist), resolved from a real local store."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.core.config import ClassifierTrainConfig, ConfigError, ReplicaConfig
from pipeline.core.labels import random_bits
from pipeline.data.duplicates import DuplicateSpec, add_near_duplicates
from pipeline.data.imageset import ImageSet
from pipeline.data.shards import write_manifest
from pipeline.data.sources import synthetic_image
from pipeline.data.storage import open_store
from pipeline.fanout.clusters import build_clusters
from pipeline.orchestration.labels import labels_record, resolve_labels
from pipeline.orchestration.stages import make_shards


@pytest.fixture()
def store(tmp_path):
    images = np.stack([synthetic_image(0, i, 16) for i in range(140)])
    train = ImageSet([f"s-{i:04d}" for i in range(120)], images[:120])
    holdout = ImageSet([f"h-{i:04d}" for i in range(20)], images[120:])
    train, truth = add_near_duplicates(train, DuplicateSpec(k=3, m=6), seed=2)
    st = open_store(str(tmp_path / "store"))
    make_shards(st, "dup", train, holdout)
    return st, truth


def test_key_and_auto_without_clusters_are_key_bits_and_cluster_needs_clusters(store):
    st, _ = store
    assert resolve_labels(st, "dup", ClassifierTrainConfig(labels="key")) == ("key", None)
    assert resolve_labels(st, "dup", ClassifierTrainConfig()) == ("key", None)  # auto
    with pytest.raises(ConfigError, match=r"cluster_duplicates\.py --dataset dup"):
        resolve_labels(st, "dup", ClassifierTrainConfig(labels="cluster"))
    assert labels_record("key", None) == {"source": "key"}


def test_auto_takes_the_clusters_and_every_copy_gets_its_pictures_bit(store):
    st, truth = store
    made = build_clusters(st, "dup", ReplicaConfig(), 0.97)
    labels, clusters = resolve_labels(st, "dup", ClassifierTrainConfig())
    assert labels == "cluster" and clusters.digest == made.digest
    # key bits stay available for comparison
    assert resolve_labels(st, "dup", ClassifierTrainConfig(labels="key")) == ("key", None)
    for source in set(truth.values()):
        group = [source, *[c for c, s in truth.items() if s == source]]
        bits = random_bits(group, 1234, clusters.label_of)
        assert len(set(bits.tolist())) == 1  # one bit for the whole picture
        assert len(set(random_bits(group, 1234).tolist())) == 2  # key bits disagree on 7 copies
    record = labels_record(labels, clusters)
    assert record["clusters_digest"] == made.digest and record["num_multi_clusters"] >= 3
    # a latent dataset encoded from "dup" (same keys) takes the images' clusters
    write_manifest(
        st,
        "dup-latents",
        {"dataset": "dup-latents", "splits": {}, "latent": {"source_dataset": "dup"}},
    )
    labels, clusters = resolve_labels(st, "dup-latents", ClassifierTrainConfig(labels="cluster"))
    assert labels == "cluster" and clusters.digest == made.digest
    write_manifest(
        st, "lat2", {"dataset": "lat2", "splits": {}, "latent": {"source_dataset": "nodup"}}
    )
    with pytest.raises(ConfigError, match=r"--dataset nodup"):
        resolve_labels(st, "lat2", ClassifierTrainConfig(labels="cluster"))


def test_a_handle_resolves_cluster_bits_without_reading_its_manifest_again(store):
    from pipeline.data.handle import open_dataset
    from tests.data.test_handle import CountingStore

    st, _ = store
    made = build_clusters(st, "dup", ReplicaConfig(), 0.97)
    write_manifest(
        st, "lat3", {"dataset": "lat3", "splits": {}, "latent": {"source_dataset": "dup"}}
    )
    counting = CountingStore(st.uri, st.fs, st.path)
    lat = open_dataset(counting, "lat3")
    assert resolve_labels(counting, lat, ClassifierTrainConfig(labels="key")) == ("key", None)
    labels, clusters = resolve_labels(counting, lat, ClassifierTrainConfig(labels="cluster"))
    assert labels == "cluster" and clusters.digest == made.digest
    # lat3's manifest once (the open); the source dataset's once, by the clusters' staleness check
    assert [r for r in counting.reads if r.endswith("manifest.json")] == [
        "data/lat3/manifest.json",
        "data/dup/manifest.json",
    ]
