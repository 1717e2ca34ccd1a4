"""The stages: progress bars on unsplit Train datasets, and the replica-check report (IVF recall)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from pipeline.core.config import ReplicaConfig
from pipeline.data.imageset import ImageSet
from pipeline.data.shards import write_image_shards
from pipeline.data.storage import open_store
from pipeline.orchestration.stages import replica_check_report


def test_unsplit_datasets_lose_progress_bars_and_split_ones_keep_them(ray_local, monkeypatch):
    import ray

    from pipeline.orchestration.stages import quiet_unsplit

    ctx = ray.data.DataContext.get_current()
    monkeypatch.setattr(ctx, "enable_progress_bars", True)  # as in a job run from a terminal
    datasets = {"train": ray.data.range(8), "holdout": ray.data.range(4)}
    assert quiet_unsplit(datasets, ["train"]) is datasets
    assert datasets["train"].context.enable_progress_bars
    assert not datasets["holdout"].context.enable_progress_bars
    assert ctx.enable_progress_bars  # the driver's own context is untouched
    assert sorted(row["id"] for row in datasets["holdout"].take_all()) == [0, 1, 2, 3]
    every = {"train": ray.data.range(8), "holdout": ray.data.range(4)}
    quiet_unsplit(every, None)  # DataConfig's default: every dataset is split
    assert all(ds.context.enable_progress_bars for ds in every.values())


def test_ivf_replica_check_reports_recall(ray_local, tmp_path):
    rng = np.random.default_rng(3)
    store = open_store(str(tmp_path / "ivf"))
    train = rng.integers(0, 256, (400, 8, 8, 1), dtype=np.uint8)
    keys = [f"t-{i:04d}" for i in range(400)]
    write_image_shards(store, "data/rand/train", ImageSet(keys=keys, images=train), 200)
    queries = np.concatenate([train[:10], rng.integers(0, 256, (30, 8, 8, 1), dtype=np.uint8)])
    qkeys = [f"ddim-{i:06d}" for i in range(40)]
    write_image_shards(store, "samples/q/ddim", ImageSet(keys=qkeys, images=queries), 20)
    exhaustive = ReplicaConfig(index="ivf", nlist=8, nprobe=8, threshold=0.99)
    out = replica_check_report(store, "q", "rand", "ddim", exhaustive)
    assert out["ivf"]["recall_at_1"] == 1.0 and out["ivf"]["recall_queries"] == 40
    assert out["replication_rate"] == pytest.approx(10 / 40)
    probe_one = ReplicaConfig(index="ivf", nlist=8, nprobe=1, threshold=0.99, recall_queries=25)
    out1 = replica_check_report(store, "q", "rand", "ddim", probe_one)
    assert 0.0 <= out1["ivf"]["recall_at_1"] <= 1.0 and out1["ivf"]["recall_queries"] == 25
    # exact copies are always found (their own list is probed first), whatever the recall
    assert out1["replication_rate"] == pytest.approx(10 / 40)
    report = json.loads(store.read_bytes("reports", "q", "report.json"))
    assert report["replica_check"]["ddim"]["ivf"]["nprobe"] == 1


def test_shards_without_a_manifest_are_read_unchecked_with_a_warning(ray_local, tmp_path, caplog):
    """Shards put under data/<dataset>/<split> by hand (no make_shards, no manifest) are user data:
    the training reader takes them all, without a check, and says so."""
    import logging

    from pipeline.data.datasets import digits_source, split
    from pipeline.data.storage import open_store
    from pipeline.orchestration.stages import make_shards, webdataset

    store = open_store(str(tmp_path / "store"))
    train, holdout = split(digits_source(8), 24, 0)
    make_shards(store, "hand", train, holdout.subset(range(10)), shard_size=10)
    (tmp_path / "store" / "data" / "hand" / "manifest.json").unlink()
    with caplog.at_level(logging.WARNING, logger="pipeline.data.shards"):
        ds = webdataset(store, "data/hand/train")
    assert "its shards are read without checking them" in caplog.text
    assert sorted(r["__key__"] for r in ds.take_all()) == sorted(train.keys)
