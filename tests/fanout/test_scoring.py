"""The replica check's shared parts (pipeline.fanout.scoring): the demo's in-memory training index,
ObjectRef resolution on a real local Ray, the scorer pool size and JSON-lines writing. The check
itself (actor pool, parts, annotation, resume) is tested in tests/fanout/test_scoring_stream*.py."""

from __future__ import annotations

import json

import numpy as np
import pytest

from pipeline.core.config import ReplicaConfig
from pipeline.data.imageset import ImageSet
from pipeline.data.shards import write_image_shards
from pipeline.data.storage import open_store
from pipeline.fanout.scoring import (
    TrainIndexSpec,
    resolve_ref,
    scorer_pool,
    train_index_spec,
    write_jsonl,
)


@pytest.fixture
def train_store(tmp_path):
    """24 random 8x8 training images in three shards."""
    rng = np.random.default_rng(7)
    store = open_store(str(tmp_path / "store"))
    train = rng.integers(0, 256, (24, 8, 8, 1), dtype=np.uint8)
    tkeys = [f"t-{i:04d}" for i in range(24)]
    write_image_shards(store, "data/rand/train", ImageSet(keys=tkeys, images=train), 10)
    return store, train


def test_train_index_spec_embeds_the_training_shards(train_store):
    store, train = train_store
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


def test_scorer_pool_leaves_a_cpu_of_a_private_ray_for_the_readers(ray_local):
    # the session's private local Ray has 2 CPUs: one scorer, whatever is asked
    assert scorer_pool(4) == scorer_pool(1) == 1


def test_write_jsonl_converts_numpy_scalars(tmp_path):
    store = open_store(str(tmp_path / "s"))
    rows = [
        {"key": "a", "n": np.int64(3), "sim": np.float32(0.5), "copy": np.bool_(True)},
        {"key": "b", "n": 4, "sim": 0.25, "copy": False},
    ]
    uri = write_jsonl(store, rows, "reports", "q", "out.jsonl")
    assert uri == store.uri_of("reports", "q", "out.jsonl")
    text = store.read_bytes("reports", "q", "out.jsonl").decode()
    assert text == (
        '{"key": "a", "n": 3, "sim": 0.5, "copy": true}\n'
        '{"key": "b", "n": 4, "sim": 0.25, "copy": false}\n'
    )
    assert [type(v) for v in json.loads(text.splitlines()[0]).values()] == [str, int, float, bool]
