"""Near-duplicate clusters: union-find, exact blockwise pairs against brute force, clusters of a
stored training set with known copies (precision and recall), the stored artifact (sidecar, reuse,
staleness, crash safety), the grid figure, and the IVF path on a real local Ray."""

from __future__ import annotations

import hashlib
import itertools
import json

import numpy as np
import pytest

from pipeline.core.config import ConfigError, ReplicaConfig
from pipeline.data.duplicates import DuplicateSpec, add_near_duplicates
from pipeline.data.imageset import ImageSet
from pipeline.data.layout import data_folder
from pipeline.data.provenance import StaleArtifactError, manifest_digest
from pipeline.data.shards import read_manifest
from pipeline.data.sources import synthetic_image
from pipeline.data.storage import open_store
from pipeline.fanout import clusters as cl
from pipeline.fanout.clusters import (
    MEMBERS,
    SIDECAR,
    StaleClustersError,
    build_clusters,
    cluster_folder,
    ensure_clusters,
    find_duplicate_pairs,
    load_clusters,
    union_find_clusters,
)
from pipeline.orchestration.stages import make_shards

N, K, M, SIZE = 400, 8, 5, 16
EXACT = ReplicaConfig()


def _dataset(n: int = N, k: int = K, m: int = M, seed: int = 0):
    """``n`` distinct synthetic 16x16 RGB images plus ``m`` jittered copies of ``k`` of them."""
    images = np.stack([synthetic_image(seed, i, SIZE) for i in range(n + 40)])
    train = ImageSet([f"s-{i:05d}" for i in range(n)], images[:n])
    holdout = ImageSet([f"h-{i:05d}" for i in range(40)], images[n:])
    train, truth = add_near_duplicates(train, DuplicateSpec(k=k, m=m), seed=1)
    return train, holdout, truth


def _write(path, n: int = N, k: int = K, m: int = M, seed: int = 0):
    store = open_store(str(path))
    train, holdout, truth = _dataset(n, k, m, seed)
    make_shards(store, "dup", train, holdout, shard_size=100)
    return store, train, truth


def _same_cluster_pairs(groups: dict[str, str]) -> set[tuple[str, str]]:
    """Unordered key pairs that share a cluster, from {key: cluster id}."""
    by: dict[str, list[str]] = {}
    for key, cid in groups.items():
        by.setdefault(cid, []).append(key)
    return {tuple(sorted(p)) for keys in by.values() for p in itertools.combinations(keys, 2)}


def _truth_groups(truth: dict[str, str]) -> dict[str, str]:
    return {**truth, **{src: src for src in truth.values()}}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    store, train, truth = _write(tmp_path_factory.mktemp("clusters"))
    return store, train, truth, build_clusters(store, "dup", EXACT, 0.97)


# ----------------------------------------------------------------------------------- the maths
def test_union_find_merges_chains_names_by_smallest_key_and_leaves_singletons_out():
    keys = ["d", "b", "a", "c", "e", "f", "g"]
    # d-b, b-c: one chain; e-f; a and g alone; a repeated link and a self link change nothing
    pairs = [(0, 1), (1, 3), (4, 5), (3, 0), (6, 6)]
    assert union_find_clusters(keys, pairs) == {"d": "b", "b": "b", "c": "b", "e": "e", "f": "e"}
    assert union_find_clusters(keys, np.asarray(pairs)) == union_find_clusters(keys, pairs)
    assert union_find_clusters(keys, []) == {}
    # the smallest key names the cluster even when the last link joins it
    assert union_find_clusters(["z", "y", "x", "a"], [(0, 1), (1, 2), (2, 3)]) == dict.fromkeys(
        "zyxa", "a"
    )


def test_forest_keeps_the_components_with_one_link_per_row():
    rng = np.random.default_rng(0)
    pairs = rng.integers(0, 500, (300, 2)) * 7  # sparse global row ids
    forest = cl._forest(pairs)
    assert len(np.unique(forest[:, 0])) == len(forest) and (forest[:, 1] < forest[:, 0]).all()
    names = [str(r) for r in range(3500)]
    assert union_find_clusters(names, forest) == union_find_clusters(names, pairs)
    assert cl._forest(np.empty((0, 2), np.int64)).shape == (0, 2)


@pytest.mark.parametrize("chunk", [1, 37, 64, 1000])
def test_find_duplicate_pairs_equals_brute_force(chunk):
    rng = np.random.default_rng(1)
    base = rng.normal(size=(150, 12)).astype(np.float32)
    near = base[rng.integers(0, 150, 60)] + rng.normal(0, 0.15, (60, 12)).astype(np.float32)
    e = np.concatenate([base, near]) * rng.uniform(0.5, 3.0, (210, 1)).astype(np.float32)
    unit = e / np.linalg.norm(e, axis=1, keepdims=True)
    s = unit.astype(np.float64) @ unit.T.astype(np.float64)
    for threshold in (0.6, 0.97):
        want = np.argwhere(np.triu(s >= threshold, 1))
        got = find_duplicate_pairs(e, threshold, chunk=chunk)
        assert got.dtype == np.int64 and len(want) > 20
        np.testing.assert_array_equal(got, want)  # lexicographic, like argwhere


def test_bad_threshold_and_k_raise():
    e = np.eye(3, dtype=np.float32)
    for bad in (0.0, -0.5, 1.01, float("nan")):
        with pytest.raises(ConfigError, match=r"threshold must be in \(0, 1\]"):
            find_duplicate_pairs(e, bad)
    assert find_duplicate_pairs(e, 1.0).shape == (0, 2)
    assert issubclass(ConfigError, ValueError)


# ------------------------------------------------------------------------- clusters of a dataset
def test_clusters_find_the_known_copies(built):
    _, train, truth, clusters = built
    found = _same_cluster_pairs(clusters.label_of)
    true = _same_cluster_pairs(_truth_groups(truth))
    assert len(true) == K * (M + 1) * M // 2
    precision = len(found & true) / len(found)
    recall = len(found & true) / len(true)
    assert precision >= 0.95 and recall >= 0.99, (precision, recall)
    for src in set(truth.values()):  # each source names its cluster: its key is the smallest
        assert clusters.cluster_of(src) == src
    singleton = next(k for k in train.keys if k not in clusters.label_of)
    assert clusters.cluster_of(singleton) == singleton
    assert set(clusters.sizes().values()) == {M + 1} and len(clusters.sizes()) == K


def test_sidecar_and_members_are_stored(built):
    store, train, _, clusters = built
    folder = cluster_folder("dup", "centred")
    assert folder == "clusters/dup/centred"
    s = json.loads(store.read_bytes(folder, SIDECAR))
    assert s == clusters.sidecar
    assert s["threshold"] == 0.97 and s["embedding"] == "centred" and s["index"] == "flat"
    assert s["k"] == 32 and s["search"].startswith("exact")
    assert s["manifest_digest"] == manifest_digest(read_manifest(store, data_folder("dup")))
    n_dup = K * (M + 1)
    assert s["num_images"] == len(train) == N + K * M
    assert s["num_multi_clusters"] == K and s["num_duplicated_images"] == n_dup
    assert s["num_clusters"] == len(train) - n_dup + K
    assert s["largest"] == [[cid, M + 1] for cid in sorted(clusters.sizes())]
    members = store.read_bytes(folder, MEMBERS)
    assert json.loads(members) == clusters.label_of
    assert s["members_digest"] == clusters.digest == "sha256:" + hashlib.sha256(members).hexdigest()
    assert s["build_s"] >= 0 and s["built_at"].endswith("Z")
    loaded = load_clusters(store, "dup", "centred")
    assert loaded.label_of == clusters.label_of and loaded.digest == clusters.digest
    assert loaded.threshold == 0.97 and loaded.embedding == "centred"
    assert load_clusters(store, "dup", "raw") is None  # absent: None, not an error


def test_reuse_rebuild_and_staleness(tmp_path):
    store, _, _ = _write(tmp_path / "s", n=120, k=3, m=3)
    first = ensure_clusters(store, "dup", EXACT, 0.97)
    again = ensure_clusters(store, "dup", EXACT, 0.97)
    assert again.sidecar == first.sidecar  # reused: same build time
    assert ensure_clusters(store, "dup", EXACT, 0.97, k=8).sidecar == first.sidecar  # k: IVF only
    other = ensure_clusters(store, "dup", EXACT, 0.99)
    assert other.sidecar["built_at"] != first.sidecar["built_at"]
    assert other.sidecar["threshold"] == 0.99
    # the training set changes: loading refuses, ensuring rebuilds
    _write(tmp_path / "s", n=120, k=4, m=3)
    with pytest.raises(StaleClustersError, match="another training set") as err:
        load_clusters(store, "dup", "centred")
    assert isinstance(err.value, ValueError) and isinstance(err.value, StaleArtifactError)
    rebuilt = ensure_clusters(store, "dup", EXACT, 0.99)
    digest = manifest_digest(read_manifest(store, data_folder("dup")))
    assert rebuilt.sidecar["manifest_digest"] == digest != first.sidecar["manifest_digest"]
    assert rebuilt.sidecar["num_images"] == 132 and load_clusters(store, "dup", "centred")
    # a damaged members.json is refused, never used
    store.write_bytes(b"{}", cluster_folder("dup", "centred"), MEMBERS)
    with pytest.raises(StaleClustersError, match="does not match its sidecar"):
        load_clusters(store, "dup", "centred")
    assert ensure_clusters(store, "dup", EXACT, 0.99).label_of == rebuilt.label_of
    for bad in (0, 1.5):
        with pytest.raises(ConfigError, match="threshold"):
            build_clusters(store, "dup", EXACT, bad)
        with pytest.raises(ConfigError, match="threshold"):
            ensure_clusters(store, "dup", EXACT, bad)
    with pytest.raises(ConfigError, match="k must be >= 2"):
        build_clusters(store, "dup", EXACT, 0.97, k=1)


def test_a_failed_build_leaves_no_clusters(tmp_path, monkeypatch):
    store, _, _ = _write(tmp_path / "s", n=60, k=2, m=2)
    ensure_clusters(store, "dup", EXACT, 0.97)

    def boom(*args, **kwargs):
        raise RuntimeError("killed mid-build")

    monkeypatch.setattr(cl, "find_duplicate_pairs", boom)
    with pytest.raises(RuntimeError, match="killed"):
        build_clusters(store, "dup", EXACT, 0.97)
    assert not store.exists(cluster_folder("dup", "centred"), SIDECAR)
    assert load_clusters(store, "dup", "centred") is None


def test_missing_dataset_is_a_clear_error(tmp_path):
    from pipeline.data.imageset import DataError

    with pytest.raises(DataError, match=r"no dataset 'nope'.*make_shards"):
        ensure_clusters(open_store(str(tmp_path)), "nope", EXACT, 0.97)


def test_a_job_that_opened_the_dataset_reads_its_manifest_once(tmp_path):
    from pipeline.data.handle import open_dataset
    from pipeline.fanout.clusters import member_images
    from tests.data.test_handle import CountingStore

    store, train, _ = _write(tmp_path / "s", n=60, k=2, m=2)
    counting = CountingStore(store.uri, store.fs, store.path)
    made = build_clusters(counting, "dup", EXACT, 0.97)
    assert counting.manifest_reads() == 1  # was 3: the dataset check, the shard list, the read
    assert made.sidecar["num_images"] == 64 and made.sidecar["num_multi_clusters"] == 2
    counting.reads.clear()
    assert ensure_clusters(counting, "dup", EXACT, 0.97).sidecar == made.sidecar  # reused
    assert counting.manifest_reads() == 1
    ds = open_dataset(counting, "dup")
    counting.reads.clear()
    assert ensure_clusters(counting, ds, EXACT, 0.97).sidecar == made.sidecar
    assert load_clusters(counting, ds, "centred").digest == made.digest
    keys = {train.keys[0], train.keys[-1]}
    got = member_images(counting, ds, keys)
    assert sorted(got) == sorted(keys) and got[train.keys[-1]].shape == (SIZE, SIZE, 3)
    assert counting.manifest_reads() == 0  # the handle's manifest, passed down


# ------------------------------------------------------------------------------------ IVF path
def test_ivf_path_finds_the_same_clusters_with_ray_tasks(built, ray_local):
    store, _, _, exact = built
    # auto above exact_max_images: the stored IVF replica index, one Ray task per stored part
    ivf = ReplicaConfig(exact_max_images=100, pca_dims=32, rows_per_task=150, measure_queries=64)
    clusters = ensure_clusters(store, "dup", ivf, 0.97, k=8)
    s = clusters.sidecar
    assert s["index"] == "ivf" and s["k"] == 8 and "Ray tasks" in s["search"]
    assert s["replica_index"]
    assert clusters.label_of == exact.label_of
    assert ensure_clusters(store, "dup", ivf, 0.97, k=8).sidecar == s  # reused
    assert ensure_clusters(store, "dup", ivf, 0.97, k=6).sidecar["k"] == 6  # k matters here
    # the exact search is asked for again: the kind changed, so the clusters are rebuilt
    assert ensure_clusters(store, "dup", EXACT, 0.97).sidecar["index"] == "flat"


def test_a_module_embedding_is_refused_for_clusters(tmp_path):
    import torch

    path = tmp_path / "m.pt"
    net = torch.jit.script(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(768, 4)))
    torch.jit.save(net, str(path))
    store = open_store(str(tmp_path / "s"))
    with pytest.raises(ConfigError, match="need the 'centred' or 'raw' embedding"):
        ensure_clusters(store, "dup", ReplicaConfig(embedding=f"module:{path}"), 0.97)
