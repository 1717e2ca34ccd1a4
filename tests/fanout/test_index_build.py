"""The IVF build in parts on a real local Ray and real FAISS: tiny parts, each its own files; the
search over the parts finds planted near-duplicates as exact search does; the stored split mean."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.core.config import ReplicaConfig
from pipeline.data.imageset import ImageSet
from pipeline.data.shards import read_image_shards, write_dataset
from pipeline.data.storage import open_store
from pipeline.data.subsets import split_mean
from pipeline.fanout.index_build import plan_parts, remote
from pipeline.fanout.index_files import ivf_name, keys_name, rows_name
from pipeline.fanout.replica_index import (
    ensure_replica_index,
    exact_search,
    fetch_rows,
    load_replica_index,
    open_replica_index,
    stored_mean,
)

N = 1200
TINY = ReplicaConfig(index="ivf", pca_dims=24, rows_per_task=250, measure_queries=64, nprobe=8)


def _images(rng, n: int) -> np.ndarray:
    """8x8x3 images: 2x2 colour blocks upsampled, plus noise."""
    blocks = rng.integers(0, 256, (n, 2, 2, 3)).astype(np.float32)
    up = np.repeat(np.repeat(blocks, 4, 1), 4, 2)
    return np.clip(up + rng.normal(0, 12, up.shape), 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def tiny_parts(tmp_path_factory, ray_local):
    """1200 training images in 12 shards of 100; parts of at most 250 rows: six parts of 200."""
    rng = np.random.default_rng(0)
    store = open_store(str(tmp_path_factory.mktemp("index-build")))
    train = ImageSet([f"t-{i:05d}" for i in range(N)], _images(rng, N))
    write_dataset(store, "syn", {"train": train}, shard_size=100)
    return store, train, ensure_replica_index(store, "syn", TINY)


def test_plan_parts_groups_whole_shards():
    shards = [("a", 100), ("b", 100), ("c", 300), ("d", 50)]
    got = plan_parts(shards, 250)
    assert [(p["start"], p["count"], p["shards"]) for p in got] == [
        (0, 200, ["a", "b"]), (200, 300, ["c"]), (500, 50, ["d"]),
    ]  # fmt: skip


def test_each_part_has_its_own_files_and_vectors(tiny_parts):
    store, _, sidecar = tiny_parts
    assert sidecar["params"]["format"] == 3
    assert [p["count"] for p in sidecar["parts"]] == [200, 200, 200, 200, 200, 200]
    assert [p["vectors"] for p in sidecar["parts"]] == [200] * 6
    names = set(store.listdir(sidecar["path"]))
    for p in range(6):
        assert {ivf_name(p), rows_name(p), keys_name(p)} <= names
    assert "index.faiss" not in names and {"trained.faiss", "split-mean.npy"} <= names


def test_planted_near_duplicates_are_found_as_exact_search_finds_them(tiny_parts):
    store, train, _ = tiny_parts
    rng = np.random.default_rng(3)
    planted = np.sort(rng.choice(N, 30, replace=False))
    noise = rng.integers(-3, 4, train.images[planted].shape)
    queries = np.clip(train.images[planted].astype(np.int16) + noise, 0, 255).astype(np.uint8)
    index = load_replica_index(store, "syn", TINY)
    sims, rows = index.search(queries)
    exact_s, exact_i = exact_search(index, queries, chunk=128)
    np.testing.assert_array_equal(exact_i, planted)
    np.testing.assert_array_equal(rows, planted)
    np.testing.assert_allclose(sims, exact_s, atol=1e-6)
    assert index.keys_of(rows) == [train.keys[i] for i in planted]
    index.close()


def test_fetch_rows_returns_the_shards_images(tiny_parts):
    store, _, sidecar = tiny_parts
    shards = read_image_shards(store, "data/syn/train")
    rows = [1199, 0, 199, 200, 201, 640]  # part edges, one run across parts
    np.testing.assert_array_equal(fetch_rows(store, sidecar, rows), shards.images[rows])


def test_the_stored_mean_is_the_split_mean(tiny_parts, tmp_path):
    store, train, _ = tiny_parts
    want = split_mean(store, "data/syn/train")
    got = stored_mean(store, "syn", TINY)
    assert got.shape == (8 * 8 * 3,) and got.dtype == np.float32
    np.testing.assert_allclose(got, want, atol=1e-6)
    assert (
        stored_mean(store, "syn", ReplicaConfig(index="ivf", embedding="raw")) is None
    )  # none built
    empty = open_store(str(tmp_path / "empty"))
    write_dataset(empty, "e", {"train": ImageSet(["a", "b"], train.images[:2])}, 2)
    assert stored_mean(empty, "e", ReplicaConfig()) is None


def test_gpu_requests_reach_the_tasks():
    """Asked for a GPU, a build task requests one from Ray (so an autoscaler adds GPU nodes)."""
    assert remote(plan_parts, True)._default_options["num_gpus"] == 1
    assert remote(plan_parts)._default_options["num_gpus"] == 0


def test_an_index_on_s3_is_searched_by_ranges_and_cached_parts(
    tiny_parts, s3_bucket, tmp_path, monkeypatch
):
    """The same build copied to loopback S3: rows by ranged GETs, only part files in the node cache,
    the same neighbours and keys as the local store's."""
    store, train, sidecar = tiny_parts
    monkeypatch.setenv("TMPDIR", str(tmp_path))  # this test's node cache
    monkeypatch.setattr("tempfile.tempdir", None)
    s3 = open_store(f"s3://{s3_bucket}/root")
    for name in store.listdir(sidecar["path"]):
        s3.write_bytes(store.read_bytes(sidecar["path"], name), sidecar["path"], name)
    rng = np.random.default_rng(5)
    planted = np.sort(rng.choice(N, 12, replace=False))
    queries = train.images[planted]
    local = open_replica_index(store, sidecar, TINY)
    remote_index = open_replica_index(s3, sidecar, TINY)
    want, got = local.search(queries, k=3), remote_index.search(queries, k=3)
    np.testing.assert_array_equal(got[1], want[1])
    np.testing.assert_allclose(got[0], want[0], atol=1e-6)
    assert got[1][:, 0].tolist() == planted.tolist()
    assert remote_index.keys_of(got[1][:, 0]) == [train.keys[i] for i in planted]
    np.testing.assert_array_equal(fetch_rows(s3, sidecar, [5, 900]), train.images[[5, 900]])
    cached = sorted(p.name for p in (tmp_path / "cpsample-index-parts").rglob("*") if p.is_file())
    assert cached == [ivf_name(p) for p in range(6)]  # codes only: no rows, keys or mean copied
    local.close()
    remote_index.close()
