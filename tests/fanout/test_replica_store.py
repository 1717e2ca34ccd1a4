"""The stored index's read side without Ray: build parameters, staleness, recall and agreement."""

from __future__ import annotations

import pytest

from pipeline.core.config import ConfigError, ReplicaConfig
from pipeline.fanout.index_parts import MAX_TRAIN_SAMPLES
from pipeline.fanout.replica_index import measure_recall
from pipeline.fanout.replica_store import build_params, resolve_kind, stale_reasons


def test_kind_and_parameters_follow_the_training_set_size():
    cfg = ReplicaConfig()
    assert cfg.index == "auto" and cfg.exact_max_images == 50_000
    assert resolve_kind(cfg, 50_000) == "flat" and resolve_kind(cfg, 50_001) == "ivf"
    assert build_params(cfg, 64, 768) == {"format": 3, "kind": "flat", "embedding": "centred"}
    big = build_params(cfg, 1_000_000, 3072)
    assert big["kind"] == "ivf" and big["nlist"] == 4000 and big["pca_dims"] == 256
    assert big["train_samples"] == 39 * 4000 and big["codec"] == "sq8"
    huge = build_params(cfg, 100_000_000, 3072)  # 39 * nlist = 1.56M rows: capped
    assert huge["nlist"] == 40_000 and huge["train_samples"] == MAX_TRAIN_SAMPLES == 262_144
    small_dims = build_params(ReplicaConfig(index="ivf"), 3000, 192)
    assert small_dims["pca_dims"] is None and small_dims["nlist"] == 3000 // 39
    assert build_params(ReplicaConfig(index="ivf", nprobe=1, rerank_k=8), 3000, 192) == small_dims
    with pytest.raises(ConfigError, match="index must be 'flat' or 'ivf'"):
        ReplicaConfig(index="hnsw")
    with pytest.raises(ConfigError, match="nlist must be >= 0"):
        ReplicaConfig(nlist=-1)


def test_a_sidecar_is_stale_when_the_data_or_the_parameters_change():
    params = build_params(ReplicaConfig(), 120, 192)
    sidecar = {"manifest_digest": "sha256:a", "params": params}
    assert stale_reasons(sidecar, {"digest": "sha256:a", "params": params}) == []
    assert stale_reasons(sidecar, {"digest": "sha256:b", "params": params}) == [
        "the dataset changed (manifest digest)"
    ]
    raw = {**params, "embedding": "raw"}
    assert stale_reasons(sidecar, {"digest": "sha256:a", "params": raw}) == [
        "the build parameters changed"
    ]
    assert stale_reasons(None, {"digest": "sha256:a", "params": params}) == ["no stored index"]
    old = {"manifest_digest": "sha256:a", "params": {**params, "format": 2}}  # a format-2 build
    assert stale_reasons(old, {"digest": "sha256:a", "params": params}) == [
        "the index format changed (2 -> 3): it is rebuilt"
    ]


def test_measure_recall_counts_hits_and_decisions():
    got = measure_recall([0.99, 0.5, 0.96, 0.7], [0.99, 0.6, 0.98, 0.7], threshold=0.97)
    assert got["recall_at_1"] == 0.5 and got["decision_agreement"] == 0.75
    assert got["replicates_exact"] == 2 and got["replicates_index"] == 1 and got["queries"] == 4


def test_current_state_reads_the_manifest_once_and_not_at_all_given_a_handle(tmp_path):
    from pipeline.data.handle import open_dataset
    from pipeline.fanout.replica_store import current_state, train_shards
    from tests.data.test_handle import counting_store, small_dataset

    store = counting_store(tmp_path)
    small_dataset(store)  # data/d: 30 training 4x4 grey images in 3 shards, 10 held out
    state = current_state(store, "d", ReplicaConfig())
    assert store.manifest_reads() == 1  # was 2: train_shards, then the image shape
    assert state["shards"] == [(f"shard-{i:06d}.tar", 10) for i in range(3)]
    assert state["n"] == 30 and state["shape"] == [4, 4, 1] and state["dims"] == 16
    assert state["folder"] == "indexes/d/centred/flat"
    ds = open_dataset(store, "d")
    store.reads.clear()
    assert current_state(store, ds, ReplicaConfig()) == state
    assert train_shards(store, ds) == (state["shards"], ds.digest)
    assert store.reads == []  # the handle's manifest: nothing read, no shard either
