"""The replica-check actor pool on a real local Ray: training index, scores, shard annotation, JSONL."""

from __future__ import annotations

import json

import numpy as np
import pytest

from pipeline.core.config import ReplicaConfig
from pipeline.data.imageset import ImageSet
from pipeline.data.shards import write_image_shards
from pipeline.data.storage import open_store
from pipeline.data.tars import read_tar
from pipeline.fanout.scoring import (
    TrainIndexSpec,
    annotate_shards,
    resolve_ref,
    score_shards,
    train_index_spec,
    write_jsonl,
)

FOLDER = "samples/q/ddim"
COPIES = {1: 3, 4: 17, 6: 0}  # sample index -> the training image it copies exactly


@pytest.fixture
def scored_store(tmp_path):
    """24 random 8x8 training images; 8 samples in two shards, three of them exact training copies."""
    rng = np.random.default_rng(7)
    store = open_store(str(tmp_path / "store"))
    train = rng.integers(0, 256, (24, 8, 8, 1), dtype=np.uint8)
    tkeys = [f"t-{i:04d}" for i in range(24)]
    write_image_shards(store, "data/rand/train", ImageSet(keys=tkeys, images=train), 10)
    samples = rng.integers(0, 256, (8, 8, 8, 1), dtype=np.uint8)
    for s, t in COPIES.items():
        samples[s] = train[t]
    skeys = [f"ddim-{i:06d}" for i in range(8)]
    meta = [{"seed": 100 + i} for i in range(8)]
    write_image_shards(store, FOLDER, ImageSet(keys=skeys, images=samples, meta=meta), 4)
    return store, train, samples, skeys


def test_train_index_spec_embeds_the_training_shards(scored_store):
    store, train, _, _ = scored_store
    spec, images = train_index_spec(store, "rand", ReplicaConfig())
    assert isinstance(spec, TrainIndexSpec)
    assert spec.keys == images.keys == [f"t-{i:04d}" for i in range(24)]
    np.testing.assert_array_equal(images.images, train)
    assert spec.embeddings.shape == (24, 64) and spec.embeddings.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(spec.embeddings, axis=1), 1.0, rtol=1e-5)
    expected_mean = train.reshape(24, -1).astype(np.float32).mean(0) / 255.0
    np.testing.assert_allclose(spec.mean, expected_mean, rtol=1e-6)
    # the raw embedding has no mean image and differs from the centred one
    raw, _ = train_index_spec(store, "rand", ReplicaConfig(embedding="raw"))
    assert raw.mean is None and raw.embeddings.shape == (24, 64)
    assert not np.allclose(raw.embeddings, spec.embeddings)


def test_resolve_ref_accepts_objects_and_object_refs(ray_local):
    spec = TrainIndexSpec(np.eye(2, dtype=np.float32), ["a", "b"], None)
    assert resolve_ref(spec) is spec
    got = resolve_ref(ray_local.put(spec))
    assert got.keys == ["a", "b"] and np.array_equal(got.embeddings, spec.embeddings)


def test_score_annotate_and_write_jsonl(ray_local, scored_store):
    store, _, samples, skeys = scored_store
    cfg = ReplicaConfig(threshold=0.97)
    # the dataset's stored index is built first (exact: 24 images), then loaded by every actor
    rows = score_shards(store.uri, FOLDER, "rand", cfg, concurrency=4)
    assert [str(r["key"]) for r in rows] == skeys  # every sample once, sorted by key
    sidecar = json.loads(store.read_bytes("indexes/rand/centred/flat/sidecar.json"))
    assert {str(r["index_build"]) for r in rows} == {sidecar["build_id"]}
    again = score_shards(store.uri, FOLDER, "rand", cfg, concurrency=2)
    assert {str(r["index_build"]) for r in again} == {sidecar["build_id"]}  # loaded, not rebuilt
    for i, r in enumerate(rows):
        shard = f"shard-{i // 4:06d}.tar"
        assert str(r["path"]).endswith(f"{FOLDER}/{shard}")
        sim = float(r["nn_similarity"])
        if i in COPIES:
            assert str(r["nn_key"]) == f"t-{COPIES[i]:04d}" and int(r["nn_row"]) == COPIES[i]
            assert sim == pytest.approx(1.0, abs=1e-5)
            assert bool(r["is_replicate"])
        else:
            assert str(r["nn_key"]).startswith("t-")
            assert sim < cfg.threshold and not bool(r["is_replicate"])
    assert sum(bool(r["is_replicate"]) for r in rows) == len(COPIES)

    annotate_shards(store.uri, FOLDER, rows)
    assert store.listdir(FOLDER) == ["shard-000000.tar", "shard-000001.tar"]
    by_key = {str(r["key"]): r for r in rows}
    seen = []
    for name in store.listdir(FOLDER):
        shard = read_tar(store.read_bytes(FOLDER, name), name)
        for key, image, meta in zip(shard.keys, shard.images, shard.meta):
            i = skeys.index(key)
            seen.append(key)
            np.testing.assert_array_equal(image, samples[i])  # pixels unchanged
            assert meta["seed"] == 100 + i  # the existing metadata is kept
            assert meta["nn_key"] == str(by_key[key]["nn_key"])
            assert meta["nn_similarity"] == pytest.approx(float(by_key[key]["nn_similarity"]))
    assert sorted(seen) == skeys

    uri = write_jsonl(store, rows, "reports", "q", "replicas-ddim.jsonl")
    assert uri == store.uri_of("reports", "q", "replicas-ddim.jsonl")
    text = store.read_bytes("reports", "q", "replicas-ddim.jsonl").decode()
    assert text.endswith("\n")
    lines = [json.loads(x) for x in text.splitlines()]
    assert [x["key"] for x in lines] == skeys
    for x, r in zip(lines, rows):
        assert set(x) == {
            "key", "path", "nn_key", "nn_row", "nn_similarity", "is_replicate", "index_build"
        }  # fmt: skip
        assert isinstance(x["nn_similarity"], float) and isinstance(x["is_replicate"], bool)
        assert x["nn_key"] == str(r["nn_key"]) and x["is_replicate"] == bool(r["is_replicate"])
        assert x["nn_similarity"] == pytest.approx(float(r["nn_similarity"]), abs=1e-6)


def test_annotate_leaves_samples_without_a_result_alone(scored_store):
    store, _, _, skeys = scored_store
    before = {n: store.read_bytes(FOLDER, n) for n in store.listdir(FOLDER)}
    one = [{"key": skeys[5], "nn_key": "t-0009", "nn_similarity": np.float32(0.25)}]
    annotate_shards(store, FOLDER, one)
    first = read_tar(store.read_bytes(FOLDER, "shard-000000.tar"), "a")
    assert store.read_bytes(FOLDER, "shard-000000.tar") == before["shard-000000.tar"]
    assert all("nn_key" not in m for m in first.meta)
    second = read_tar(store.read_bytes(FOLDER, "shard-000001.tar"), "b")
    annotated = dict(zip(second.keys, second.meta))
    assert annotated[skeys[5]]["nn_key"] == "t-0009"
    assert annotated[skeys[5]]["nn_similarity"] == pytest.approx(0.25)
    assert [k for k, m in annotated.items() if "nn_key" in m] == [skeys[5]]


def test_write_jsonl_converts_numpy_scalars(tmp_path):
    store = open_store(str(tmp_path / "s"))
    rows = [
        {"key": "a", "n": np.int64(3), "sim": np.float32(0.5), "copy": np.bool_(True)},
        {"key": "b", "n": 4, "sim": 0.25, "copy": False},
    ]
    write_jsonl(store, rows, "out.jsonl")
    text = store.read_bytes("out.jsonl").decode()
    assert text == (
        '{"key": "a", "n": 3, "sim": 0.5, "copy": true}\n'
        '{"key": "b", "n": 4, "sim": 0.25, "copy": false}\n'
    )
