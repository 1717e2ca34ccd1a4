"""The streaming replica check (pipeline.fanout.scoring_stream) on a real local Ray: actors write
per-shard parts and summaries, the driver gets summaries only, a rerun resumes shard by shard."""

from __future__ import annotations

import json

import numpy as np
import pytest

from pipeline.core.config import ConfigError, ReplicaConfig
from pipeline.data.imageset import DataError, ImageSet
from pipeline.data.shards import write_image_shards
from pipeline.data.storage import open_store
from pipeline.data.tars import read_tar
from pipeline.fanout.index import embed_pixels
from pipeline.fanout.replica_index import ensure_replica_index, index_spec, open_replica_index
from pipeline.fanout.replica_summary import HIST_BINS, ShardSummary, fold
from pipeline.fanout.scoring_stream import (
    part_names,
    score_job,
    score_shard,
    score_shard_summaries,
    stored_summary,
)
from pipeline.orchestration.replica_report import iter_per_sample, parts_folder
from tests.ray_actors import actors_started

FOLDER, OUT = "samples/q/ddim", "reports/q/replicas-ddim"
PCT = {"holdout_p95": 0.2, "holdout_p99": 0.5}
SHARDS, PER_SHARD = 10, 3


@pytest.fixture
def stream_store(tmp_path):
    """24 random 8x8 training images; 30 samples in 10 shards of 3, every third an exact copy."""
    rng = np.random.default_rng(11)
    store = open_store(str(tmp_path / "store"))
    train = rng.integers(0, 256, (24, 8, 8, 1), dtype=np.uint8)
    tkeys = [f"t-{i:04d}" for i in range(24)]
    write_image_shards(store, "data/rand/train", ImageSet(tkeys, train), 12)
    samples = rng.integers(0, 256, (SHARDS * PER_SHARD, 8, 8, 1), dtype=np.uint8)
    samples[::3] = train[: len(samples[::3])]
    keys = [f"ddim-{i:06d}" for i in range(len(samples))]
    meta = [{"seed": i} for i in range(len(samples))]
    write_image_shards(store, FOLDER, ImageSet(keys, samples, meta=meta), PER_SHARD)
    return store, train, samples, keys


def _spec(store, cfg):
    return index_spec(store, "rand", cfg, ensure_replica_index(store, "rand", cfg))


def _parts(store) -> list[dict]:
    names = sorted(n for n in store.listdir(OUT) if n.endswith(".jsonl"))
    return [json.loads(x) for n in names for x in store.read_bytes(OUT, n).decode().splitlines()]


def test_the_driver_gets_summaries_only_and_actors_write_parts(ray_local, stream_store):
    store, train, samples, keys = stream_store
    cfg = ReplicaConfig(threshold=0.97, pairs_k=2)
    got = score_shard_summaries(store, FOLDER, _spec(store, cfg), cfg, OUT, PCT, concurrency=2)
    # one bounded summary per shard: fixed bins, k pairs, no per-sample rows
    assert [type(s) for s in got] == [ShardSummary] * SHARDS
    assert [s.shard for s in got] == [f"shard-{i:06d}.tar" for i in range(SHARDS)]
    for s in got:
        assert s.num_samples == PER_SHARD and len(s.hist) == HIST_BINS and len(s.closest) == 2
        assert set(json.loads(s.to_json())) == {
            "shard", "inputs", "num_samples", "num_replicates", "sum_similarity", "hist", "above",
            "closest", "shard_sha256", "scored_id",
        }  # fmt: skip
    # one part per shard; their union is every sample once, exact against brute force
    assert sorted(store.listdir(OUT)) == sorted(n for s in got for n in part_names(s.shard))
    rows = _parts(store)
    assert [r["key"] for r in rows] == keys
    mean = train.reshape(24, -1).astype(np.float32).mean(0) / 255.0
    sims = embed_pixels(samples, mean) @ embed_pixels(train, mean).T
    for i, r in enumerate(rows):
        assert set(r) == {"key", "nn_key", "nn_similarity", "is_replicate"}
        assert r["nn_key"] == f"t-{int(sims[i].argmax()):04d}"
        assert r["nn_similarity"] == pytest.approx(float(sims[i].max()), abs=1e-5)
        assert r["is_replicate"] == (i % 3 == 0)
    # the annotated shards carry the same results; pixels and metadata kept
    by_key = {r["key"]: r for r in rows}
    for name in store.listdir(FOLDER):
        shard = read_tar(store.read_bytes(FOLDER, name), name)
        for key, image, meta in zip(shard.keys, shard.images, shard.meta):
            np.testing.assert_array_equal(image, samples[keys.index(key)])
            assert meta["seed"] == keys.index(key) and meta["nn_key"] == by_key[key]["nn_key"]
            assert meta["nn_similarity"] == pytest.approx(by_key[key]["nn_similarity"])
    total = fold(got, cfg.threshold, PCT, cfg.pairs_k)
    best = sims.max(1).astype(np.float64)
    assert total.num_samples == 30 and total.num_replicates == 10
    assert total.above == {k: int((best > p).sum()) for k, p in PCT.items()}
    assert [p["similarity"] for p in total.closest] == pytest.approx([1.0, 1.0], abs=1e-5)


def test_a_dataset_name_builds_its_index_once_and_annotation_is_optional(ray_local, stream_store):
    """Scoring by dataset name: the stored index is built first, then loaded (never rebuilt) by a
    second check; ``annotate=False`` leaves the sample shards' bytes alone, a later annotating check
    rescores every shard (another input) and writes the same results into them."""
    store, _, _, keys = stream_store
    cfg = ReplicaConfig(threshold=0.97, pairs_k=2)
    assert parts_folder("q", "ddim") == OUT  # where iter_per_sample reads the parts back
    before = {n: store.read_bytes(FOLDER, n) for n in store.listdir(FOLDER)}
    first = score_shard_summaries(store.uri, FOLDER, "rand", cfg, OUT, PCT, concurrency=4,
                                  annotate=False)  # fmt: skip
    sidecar = json.loads(store.read_bytes("indexes/rand/centred/flat/sidecar.json"))
    assert {s.inputs["index_build"] for s in first} == {sidecar["build_id"]}
    assert {n: store.read_bytes(FOLDER, n) for n in store.listdir(FOLDER)} == before
    rows = list(iter_per_sample(store, "q", "ddim"))
    assert [r["key"] for r in rows] == keys  # every sample once, in shard order
    for i, r in enumerate(rows):
        if i % 3 == 0:  # an exact copy of training image i // 3
            assert r["nn_key"] == f"t-{i // 3:04d}" and r["is_replicate"]
            assert r["nn_similarity"] == pytest.approx(1.0, abs=1e-5)
        else:
            assert r["nn_similarity"] < cfg.threshold and not r["is_replicate"]
    for j, s in enumerate(first):  # each shard's part holds its own samples
        part = store.read_bytes(OUT, part_names(s.shard)[0]).decode().splitlines()
        assert [json.loads(x)["key"] for x in part] == keys[PER_SHARD * j : PER_SHARD * (j + 1)]
        assert all(p["nn_row"] == int(p["nn_key"][2:]) for p in s.closest)
    again = score_shard_summaries(store.uri, FOLDER, "rand", cfg, OUT, PCT, concurrency=2)
    assert json.loads(store.read_bytes("indexes/rand/centred/flat/sidecar.json")) == sidecar
    assert {s.inputs["index_build"] for s in again} == {sidecar["build_id"]}  # loaded, not rebuilt
    assert all(a.scored_id != b.scored_id for a, b in zip(first, again))  # annotate: rescored
    assert list(iter_per_sample(store, "q", "ddim")) == rows
    by_key = {r["key"]: r for r in rows}
    for name in store.listdir(FOLDER):
        shard = read_tar(store.read_bytes(FOLDER, name), name)
        assert [m["nn_key"] for m in shard.meta] == [by_key[k]["nn_key"] for k in shard.keys]


def test_a_killed_check_resumes_shard_by_shard(ray_local, stream_store):
    store, *_ = stream_store
    cfg = ReplicaConfig(threshold=0.97, pairs_k=3)
    spec = _spec(store, cfg)
    first = score_shard_summaries(store, FOLDER, spec, cfg, OUT, PCT, samples="fp-1")
    ids = {s.shard: s.scored_id for s in first}
    before = {n: store.read_bytes(FOLDER, n) for n in store.listdir(FOLDER)}
    lost = ["shard-000002.tar", "shard-000007.tar"]
    for name in lost:  # killed before these shards' summaries were written
        store.delete(OUT, part_names(name)[1])
    again = score_shard_summaries(store, FOLDER, spec, cfg, OUT, PCT, samples="fp-1")
    assert sorted(s.shard for s in again if s.scored_id != ids[s.shard]) == lost
    assert fold(again, 0.97, PCT, 3) == fold(first, 0.97, PCT, 3)  # the same result
    shards = {n: store.read_bytes(FOLDER, n) for n in store.listdir(FOLDER)}
    assert shards == before  # already annotated: nothing rewritten
    # a shard gone from the folder: its part and summary go too
    store.delete(FOLDER, "shard-000009.tar")
    scorers = actors_started("ShardScorer")
    assert scorers > 0
    out = score_shard_summaries(store, FOLDER, spec, cfg, OUT, PCT, samples="fp-1")
    assert len(out) == 9 and not any("000009" in n for n in store.listdir(OUT))
    assert [s.scored_id for s in out] == [s.scored_id for s in again[:9]]  # none rescored
    assert actors_started("ShardScorer") == scorers  # the driver resumed them all: no actor started


def test_a_shard_is_rescored_when_its_inputs_or_bytes_change(ray_local, stream_store):
    """The per-shard rule, without the actor pool: the index searched in this process."""
    store, _, samples, keys = stream_store
    cfg, name = ReplicaConfig(threshold=0.97, pairs_k=3), "shard-000001.tar"
    spec = _spec(store, cfg)
    index = open_replica_index(store, spec["sidecar"], cfg)
    job = score_job(store, FOLDER, OUT, spec, cfg, PCT, "fp-1")
    first, scored = score_shard(job, name, lambda: index)
    assert scored and first.num_samples == PER_SHARD
    assert (stored_summary(store, OUT, name), store.exists(OUT, part_names(name)[0])) == (
        first,
        True,
    )

    def unused():
        raise AssertionError("a resumed shard loads no index")

    assert score_shard(job, name, unused) == (first, False)
    other = {**spec, "sidecar": {**spec["sidecar"], "build_id": "another-build"}}
    for changed in (
        score_job(store, FOLDER, OUT, spec, ReplicaConfig(threshold=0.5, pairs_k=3), PCT, "fp-1"),
        score_job(store, FOLDER, OUT, other, cfg, PCT, "fp-1"),  # another index build
        score_job(store, FOLDER, OUT, spec, cfg, {"holdout_p99": 0.4}, "fp-1"),
        score_job(store, FOLDER, OUT, spec, cfg, PCT, "fp-2"),  # other samples
        job,
    ):
        summary, scored = score_shard(changed, name, lambda: index)
        assert scored and summary.inputs == changed.inputs
        assert summary.scored_id != first.scored_id
    assert summary.num_replicates == first.num_replicates and summary.hist == first.hist
    store.delete(OUT, part_names(name)[0])  # a lost part: rescored
    assert score_shard(job, name, lambda: index)[1]
    # a shard whose bytes changed (redrawn under the same name) is rescored, same inputs
    write_image_shards(store, "tmp", ImageSet(keys[3:6], samples[6:9], meta=[{}] * 3), 3)
    store.write_bytes(store.read_bytes("tmp", "shard-000000.tar"), FOLDER, name)
    redrawn, scored = score_shard(job, name, lambda: index)
    assert scored and redrawn.num_replicates == 1  # samples[6] copies a training image
    rows = [json.loads(x) for x in store.read_bytes(OUT, part_names(name)[0]).splitlines()]
    assert [r["is_replicate"] for r in rows] == [True, False, False]
    index.close()


def test_bad_shards_and_gpu_requests_are_refused_by_name(ray_local, stream_store):
    store, *_ = stream_store
    cfg = ReplicaConfig(threshold=0.97)
    spec = _spec(store, cfg)
    store.write_bytes(b"not a tar", FOLDER, "shard-000099.tar")
    with pytest.raises(DataError, match=r"corrupt or truncated tar .*shard-000099.tar"):
        score_shard_summaries(store, FOLDER, spec, cfg, OUT, PCT)
    assert not any("000099" in n for n in store.listdir(OUT))  # nothing half-written for it
    with pytest.raises(DataError, match="no shards under"):
        score_shard_summaries(store, "samples/none", spec, cfg, OUT, PCT)
    # the scorers ask Ray for a GPU each: a private local Ray without GPUs refuses it up front
    with pytest.raises(
        ConfigError, match="the scorers ask for a GPU each, but the Ray cluster has no GPUs"
    ):
        score_shard_summaries(store, FOLDER, spec, ReplicaConfig(use_gpu=True), OUT, PCT)


def test_a_shard_on_s3_is_scored_and_resumed_by_its_recorded_sha256(
    ray_local, stream_store, s3_bucket
):
    """Loopback S3: the part, summary and annotated shard are put there; a rerun resumes from the
    shard's sha256 (S3 metadata), a changed shard is rescored. The index is searched in process."""
    store, *_ = stream_store
    cfg = ReplicaConfig(threshold=0.97, pairs_k=2)
    spec = _spec(store, cfg)
    s3 = open_store(f"s3://{s3_bucket}/root")
    name = "shard-000004.tar"
    s3.write_bytes(store.read_bytes(FOLDER, name), FOLDER, name)
    index = open_replica_index(store, spec["sidecar"], cfg)
    job = score_job(s3, FOLDER, OUT, spec, cfg, PCT, "fp-1")
    first, scored = score_shard(job, name, lambda: index)
    assert scored and s3.listdir(OUT) == ["shard-000004.jsonl", "shard-000004.summary.json"]
    annotated = read_tar(s3.read_bytes(FOLDER, name), name)
    assert all("nn_key" in m for m in annotated.meta)
    assert s3.sha256(FOLDER, name) == first.shard_sha256
    assert score_shard(job, name, lambda: index) == (first, False)
    s3.write_bytes(store.read_bytes(FOLDER, "shard-000005.tar"), FOLDER, name)  # replaced
    again, scored = score_shard(job, name, lambda: index)
    assert scored and again.scored_id != first.scored_id
    index.close()
