"""The replica-check report of jobs/check_replicas.py (pipeline.orchestration.replica_report)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from pipeline.core.config import ReplicaConfig
from pipeline.data.imageset import ImageSet
from pipeline.data.shards import write_image_shards
from pipeline.data.storage import open_store
from pipeline.orchestration.replica_report import replica_check_report


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


def test_the_report_carries_the_shares_above_the_held_out_percentiles(ray_local, tmp_path):
    rng = np.random.default_rng(4)
    store = open_store(str(tmp_path / "flat"))
    train = rng.integers(0, 256, (200, 8, 8, 1), dtype=np.uint8)
    write_image_shards(store, "data/r/train", ImageSet([f"t-{i}" for i in range(200)], train), 100)
    held = rng.integers(0, 256, (100, 8, 8, 1), dtype=np.uint8)
    write_image_shards(store, "data/r/holdout", ImageSet([f"h-{i}" for i in range(100)], held), 100)
    # 10 copies of training images and 30 new random images: only the copies sit above the p99
    queries = np.concatenate([train[:10], rng.integers(0, 256, (30, 8, 8, 1), dtype=np.uint8)])
    write_image_shards(
        store, "samples/q/ddim", ImageSet([f"ddim-{i:06d}" for i in range(40)], queries), 40
    )
    out = replica_check_report(store, "q", "r", "ddim", ReplicaConfig(threshold=0.99))
    assert out["holdout_p95"] < out["holdout_p99"] < 0.99
    assert out["above_holdout_p99"] >= 10 / 40 and out["above_holdout_p95"] <= 1.0
    assert out["above_holdout_p99"] <= 12 / 40  # random images rarely beat the held-out p99
