"""The replica-check report of jobs/check_replicas.py (pipeline.orchestration.replica_report)."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest

from pipeline.core.config import ReplicaConfig
from pipeline.data.imageset import ImageSet
from pipeline.data.provenance import StaleArtifactError
from pipeline.data.shards import write_image_shards
from pipeline.data.storage import open_store
from pipeline.fanout.resume import run_fingerprint
from pipeline.orchestration.replica_report import iter_per_sample, replica_check_report

# what ShardSampler records in every sample: the digests of its inputs and their short hash
PROV = {"sampler": "sha256:" + "a" * 64, "denoiser": "sha256:" + "d" * 64}


def _samples(store, run: str, images: np.ndarray, per_shard: int, prov=PROV) -> None:
    keys = [f"ddim-{i:06d}" for i in range(len(images))]
    meta = [{"provenance": prov, "run_fingerprint": run_fingerprint(prov)}] * len(images)
    write_image_shards(store, f"samples/{run}/ddim", ImageSet(keys, images, meta=meta), per_shard)


def test_ivf_replica_check_reports_recall(ray_local, tmp_path):
    rng = np.random.default_rng(3)
    store = open_store(str(tmp_path / "ivf"))
    train = rng.integers(0, 256, (400, 8, 8, 1), dtype=np.uint8)
    keys = [f"t-{i:04d}" for i in range(400)]
    write_image_shards(store, "data/rand/train", ImageSet(keys=keys, images=train), 200)
    queries = np.concatenate([train[:10], rng.integers(0, 256, (30, 8, 8, 1), dtype=np.uint8)])
    _samples(store, "q", queries, 20)
    exhaustive = ReplicaConfig(index="ivf", nlist=8, nprobe=8, threshold=0.99)
    out = replica_check_report(store, "q", "rand", "ddim", exhaustive)
    assert out["ivf"]["recall_at_1"] == 1.0 and out["ivf"]["recall_queries"] == 40
    assert out["replication_rate"] == pytest.approx(10 / 40)
    probe_one = ReplicaConfig(index="ivf", nlist=8, nprobe=1, threshold=0.99, recall_queries=25)
    out1 = replica_check_report(store, "q", "rand", "ddim", probe_one)
    assert out1["ivf"]["recall_queries"] == 25
    # recall@1 recomputed here: the found similarity of the 25 samples spread over the two shards
    # (at most min(recall_queries, 512) samples, never all of them) vs brute force
    from pipeline.fanout.index import embed_pixels
    from pipeline.fanout.replica_summary import spread_picks

    names = store.listdir("reports", "q", "replicas-ddim")
    assert names == [f"shard-00000{i}.{x}" for i in (0, 1) for x in ("jsonl", "summary.json")]
    assert not store.exists("reports", "q", "replicas-ddim.jsonl")  # parts, not one object
    rows = list(iter_per_sample(store, "q", "ddim"))
    pick = [20 * i + r for i, rs in spread_picks([20, 20], 25) for r in rs]
    assert len(pick) == 25
    mean = train.reshape(400, -1).astype(np.float32).mean(0) / 255.0
    exact = (embed_pixels(queries, mean) @ embed_pixels(train, mean).T).max(1)
    found = np.asarray([r["nn_similarity"] for r in rows])
    assert [r["key"] for r in rows] == [f"ddim-{i:06d}" for i in range(40)]
    assert out1["ivf"]["recall_at_1"] == pytest.approx(float((found >= exact - 1e-5)[pick].mean()))
    # exact copies are always found (their own list is probed first), whatever the recall
    assert out1["replication_rate"] == pytest.approx(10 / 40)
    report = json.loads(store.read_bytes("reports", "q", "report.json"))
    section = report["replica_check"]["ddim"]
    assert section["ivf"]["nprobe"] == 1 and section["per_sample"] == "replicas-ddim/"
    assert section["num_shards"] == 2 and report["samplers"]["ddim"]["num_samples"] == 40


def test_the_report_carries_the_shares_above_the_held_out_percentiles(ray_local, tmp_path):
    rng = np.random.default_rng(4)
    store = open_store(str(tmp_path / "flat"))
    train = rng.integers(0, 256, (200, 8, 8, 1), dtype=np.uint8)
    write_image_shards(store, "data/r/train", ImageSet([f"t-{i}" for i in range(200)], train), 100)
    held = rng.integers(0, 256, (100, 8, 8, 1), dtype=np.uint8)
    write_image_shards(store, "data/r/holdout", ImageSet([f"h-{i}" for i in range(100)], held), 100)
    # 10 copies of training images and 30 new random images: only the copies sit above the p99
    queries = np.concatenate([train[:10], rng.integers(0, 256, (30, 8, 8, 1), dtype=np.uint8)])
    _samples(store, "q", queries, 40)
    out = replica_check_report(store, "q", "r", "ddim", ReplicaConfig(threshold=0.99))
    assert out["holdout_p95"] < out["holdout_p99"] < 0.99
    # the same shares by brute force: every held-out image (100 < 2000) and sample, centred pixels
    from pipeline.fanout.index import embed_pixels

    mean = train.reshape(200, -1).astype(np.float32).mean(0) / 255.0
    emb = embed_pixels(train, mean)
    held_sims = (embed_pixels(held, mean) @ emb.T).max(1)
    sims = (embed_pixels(queries, mean) @ emb.T).max(1)
    for q in (95, 99):
        p = np.percentile(held_sims.astype(np.float64), q)
        assert out[f"holdout_p{q}"] == pytest.approx(p, abs=1e-5)
        assert out[f"above_holdout_p{q}"] == float((sims > p).mean())
    assert out["above_holdout_p99"] >= 10 / 40  # the 10 copies at least
    # the histogram comes from the folded counts, the held-out percentiles marked on it
    from PIL import Image

    png = Image.open(io.BytesIO(store.read_bytes("reports", "q", "replicas_ddim_hist.png")))
    described = json.loads(png.info["Description"])
    assert [ln["name"] for ln in described["lines"]] == ["threshold", "holdout_p95", "holdout_p99"]
    assert described["lines"][2]["x"] == out["holdout_p99"] and described["counts"] == {"ddim": 40}
    # the closest pairs: the 16 kept are exact copies first (similarity 1)
    assert store.exists("reports", "q", "replicas_ddim_closest.png")
    # a rerun resumes every shard from its summary and reports the same numbers
    summary = ("reports", "q", "replicas-ddim", "shard-000000.summary.json")
    scored_id = json.loads(store.read_bytes(*summary))["scored_id"]
    again = replica_check_report(store, "q", "r", "ddim", ReplicaConfig(threshold=0.99))
    assert again == out and json.loads(store.read_bytes(*summary))["scored_id"] == scored_id


def test_stale_samples_and_a_wrong_dataset_are_refused_before_anything_is_scored(tmp_path):
    """The run's models in the store must be the ones that drew the samples, and the denoiser must
    have been trained on the dataset checked against; each refusal writes nothing (no Ray needed)."""
    from pipeline.core.config import UNetConfig
    from pipeline.core.diffusion import linear_schedule
    from pipeline.core.models import build_unet, save_denoiser
    from pipeline.data.provenance import dir_digest, manifest_digest, write_provenance
    from pipeline.data.shards import read_manifest
    from pipeline.orchestration.stages import make_shards

    rng = np.random.default_rng(5)
    store = open_store(str(tmp_path / "s"))
    for name, seed in (("rand", 0), ("other", 1)):
        imgs = np.random.default_rng(seed).integers(0, 256, (20, 16, 16, 1), dtype=np.uint8)
        make_shards(store, name, ImageSet([f"{name}-{i}" for i in range(10)], imgs[:10]),
                    ImageSet([f"{name}-h{i}" for i in range(10)], imgs[10:]), shard_size=10)  # fmt: skip
    den = tmp_path / "den"
    unet = UNetConfig(sample_size=16, channels=1, block_out_channels=(8, 16), norm_num_groups=8)
    save_denoiser(build_unet(unet), den, {"unet": {}}, linear_schedule())
    write_provenance(den, {"data": manifest_digest(read_manifest(store, "data/rand"))})
    store.put_dir(den, "models", "q", "denoiser")
    queries = rng.integers(0, 256, (8, 16, 16, 1), dtype=np.uint8)
    _samples(store, "q", queries, 4, {**PROV, "denoiser": dir_digest(den)})
    with pytest.raises(StaleArtifactError, match=r"models/q/denoiser was trained on data with "
                       r"manifest digest .*data/other has .*a wrong --dataset"):  # fmt: skip
        replica_check_report(store, "q", "other", "ddim", ReplicaConfig())
    _samples(store, "q", queries, 4)  # drawn by another denoiser than models/q's
    with pytest.raises(StaleArtifactError, match=r"samples under .*samples/q/ddim are stale: drawn "
                       r"by other models than the ones evaluated \(changed: denoiser\)"):  # fmt: skip
        replica_check_report(store, "q", "rand", "ddim", ReplicaConfig())
    assert not store.exists("reports") and not store.exists("indexes")
