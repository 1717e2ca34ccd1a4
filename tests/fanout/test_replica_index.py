"""The stored replica index on a real local Ray and real FAISS: built once (Ray tasks), loaded by the
scoring actors, exact re-ranking, measured recall, staleness, and the exact flat path."""

from __future__ import annotations

import json

import numpy as np
import pytest

from pipeline.core.config import ReplicaConfig
from pipeline.data.imageset import ImageSet
from pipeline.data.provenance import StaleArtifactError
from pipeline.data.shards import read_image_shards, write_dataset, write_image_shards
from pipeline.data.storage import open_store
from pipeline.fanout.index import build_index, centred_pixel_embedding, embed_pixels, nearest
from pipeline.fanout.replica_index import (
    SIDECAR,
    build_params,
    ensure_replica_index,
    exact_search,
    index_folder,
    load_replica_index,
    measure_recall,
)
from pipeline.fanout.scoring_stream import score_shard_summaries
from pipeline.orchestration.replica_report import iter_per_sample, parts_folder

N, SIZE = 3000, 8
IVF = ReplicaConfig(index="ivf", pca_dims=48, rows_per_task=1000, measure_queries=256)


def _images(rng, n: int) -> np.ndarray:
    """Structured 8x8x3 images: 2x2 colour blocks upsampled, plus a little noise."""
    blocks = rng.integers(0, 256, (n, 2, 2, 3)).astype(np.float32)
    up = np.repeat(np.repeat(blocks, SIZE // 2, 1), SIZE // 2, 2)
    return np.clip(up + rng.normal(0, 12, up.shape), 0, 255).astype(np.uint8)


def _noisy(rng, images: np.ndarray) -> np.ndarray:
    return np.clip(images.astype(np.int16) + rng.integers(-4, 5, images.shape), 0, 255).astype(
        np.uint8
    )


@pytest.fixture(scope="module")
def ivf_store(tmp_path_factory, ray_local):
    """3000 training images in 6 shards (manifest), 200 held out; the IVF index built once."""
    rng = np.random.default_rng(0)
    store = open_store(str(tmp_path_factory.mktemp("replica-index")))
    train = ImageSet([f"t-{i:05d}" for i in range(N)], _images(rng, N))
    holdout = ImageSet([f"h-{i:05d}" for i in range(200)], _images(rng, 200))
    write_dataset(store, "syn", {"train": train, "holdout": holdout}, shard_size=500)
    sidecar = ensure_replica_index(store, "syn", IVF)
    return store, train, sidecar


def test_ivf_index_is_built_once_stored_and_measured(ivf_store):
    store, _, sidecar = ivf_store
    folder = index_folder("syn", "centred", "ivf")
    assert json.loads(store.read_bytes(folder, SIDECAR)) == sidecar
    assert sidecar["kind"] == "ivf" and sidecar["num_images"] == N and sidecar["dims"] == 192
    assert sidecar["params"] == build_params(IVF, N, 192)
    assert sidecar["params"]["pca_dims"] == 48 and sidecar["index_dims"] == 48
    assert sidecar["params"]["nlist"] == N // 39  # 4 sqrt(N) = 219, capped at N / 39
    assert [p["count"] for p in sidecar["parts"]] == [1000, 1000, 1000]  # three build tasks
    names = set(store.listdir(sidecar["path"]))
    assert {"trained.faiss", "ivf-00002.faiss", "mean.npy", "split-mean.npy"} <= names
    assert {"rows-00002.u8", "keys-00002.json"} <= names and "index.faiss" not in names
    m = sidecar["measurement"]
    assert m["queries"] == 256 and m["recall_at_1"] >= 0.95 and m["decision_agreement"] >= 0.99
    # a valid stored index is reused; search settings (nprobe, rerank_k) rebuild nothing
    for cfg in (IVF, ReplicaConfig(**{**IVF.__dict__, "nprobe": 4, "rerank_k": 16})):
        assert ensure_replica_index(store, "syn", cfg)["build_id"] == sidecar["build_id"]


def test_actors_load_the_stored_index_and_rerank_exactly(ivf_store):
    store, train, sidecar = ivf_store
    rng = np.random.default_rng(1)
    copies = [5, 1234, 2999]
    queries = np.concatenate(
        [train.images[copies], _noisy(rng, train.images[100:120]), _images(rng, 20)]
    )
    keys = [f"ddim-{i:06d}" for i in range(len(queries))]
    write_image_shards(store, "samples/q/ddim", ImageSet(keys=keys, images=queries), 16)
    summaries = score_shard_summaries(
        store, "samples/q/ddim", "syn", IVF, parts_folder("q", "ddim"), concurrency=2
    )
    rows = list(iter_per_sample(store, "q", "ddim"))
    assert [r["key"] for r in rows] == keys
    # every actor loaded the one stored build; nothing was rebuilt
    assert {s.inputs["index_build"] for s in summaries} == {sidecar["build_id"]}
    assert json.loads(store.read_bytes(index_folder("syn", "centred", "ivf"), SIDECAR)) == sidecar
    row_of = {k: i for i, k in enumerate(train.keys)}
    for i, t in enumerate(copies):
        assert rows[i]["nn_key"] == train.keys[t] and rows[i]["is_replicate"]
    closest = [p for s in summaries for p in s.closest]
    assert closest and all(p["nn_row"] == row_of[p["nn_key"]] for p in closest)
    # the reported similarity is the exact full-dimensional one of the candidate found
    index = load_replica_index(store, "syn", IVF)
    nn = np.asarray([row_of[r["nn_key"]] for r in rows])
    exact_of_found = np.sum(embed_pixels(train.images[nn], index.mean) * index.embed(queries), 1)
    sims = np.asarray([float(r["nn_similarity"]) for r in rows])
    np.testing.assert_allclose(sims, exact_of_found, atol=1e-6)
    assert index.keys_of(nn) == [r["nn_key"] for r in rows]
    np.testing.assert_array_equal(index.rows(nn), train.images[nn])  # positioned reads
    # against exact brute force streamed over the stored rows
    exact, exact_idx = exact_search(index, queries, chunk=700)
    got = measure_recall(sims, exact, IVF.threshold)
    assert got["recall_at_1"] >= 0.95 and got["decision_agreement"] == 1.0
    assert (exact_idx[:3] == copies).all()
    s1, i1 = index.search(queries[:4])
    assert s1.shape == i1.shape == (4,)
    s5, i5 = index.search(queries[:4], k=5)
    assert s5.shape == i5.shape == (4, 5) and (np.diff(s5, axis=1) <= 1e-7).all()
    index.close()


def test_a_changed_dataset_is_rebuilt_never_used(tmp_path, ray_local):
    rng = np.random.default_rng(2)
    store = open_store(str(tmp_path / "stale"))
    images = _images(rng, 120)
    write_dataset(store, "d", {"train": ImageSet([f"t{i:03d}" for i in range(120)], images)}, 50)
    cfg = ReplicaConfig()  # auto: exact at 120 images
    first = ensure_replica_index(store, "d", cfg)
    assert first["kind"] == "flat" and first["measurement"]["exact"] is True
    folder = index_folder("d", "centred", "flat")
    # a crashed build (a folder no sidecar names) is never loaded, and goes with the next build
    (tmp_path / "stale" / folder / "20000101T000000-crashed").mkdir()
    assert load_replica_index(store, "d", cfg).build_id == first["build_id"]
    images[7] = 255 - images[7]
    write_dataset(store, "d", {"train": ImageSet([f"t{i:03d}" for i in range(120)], images)}, 50)
    with pytest.raises(StaleArtifactError, match="dataset changed"):
        load_replica_index(store, "d", cfg)
    second = ensure_replica_index(store, "d", cfg)
    assert second["build_id"] != first["build_id"]
    assert second["manifest_digest"] != first["manifest_digest"]
    assert sorted(p.name for p in (tmp_path / "stale" / folder).iterdir() if p.is_dir()) == [
        second["build_id"]
    ]
    index = load_replica_index(store, "d", cfg)
    sims, idx = index.search(images[[7]])
    assert idx[0] == 7 and sims[0] == pytest.approx(1.0, abs=1e-5)


def test_flat_path_equals_exact_indexflatip(digits_store, ray_local):
    """Below exact_max_images the stored index is today's exact index: same similarities, same keys."""
    train = read_image_shards(digits_store, "data/digits/train")
    queries = read_image_shards(digits_store, "data/digits/holdout").images[:50]
    embed = centred_pixel_embedding(train.images)
    want_s, want_i = nearest(build_index(embed(train.images), "flat"), embed(queries))
    ensure_replica_index(digits_store, "digits", ReplicaConfig())
    index = load_replica_index(digits_store, "digits", ReplicaConfig())
    assert index.kind == "flat"
    sims, idx = index.search(queries)
    np.testing.assert_array_equal(sims, want_s[:, 0])
    np.testing.assert_array_equal(idx, want_i[:, 0])
    assert index.keys_of(idx) == [train.keys[i] for i in want_i[:, 0]]
    np.testing.assert_array_equal(index.mean, embed.mean)
