"""The (alpha, s) sweep: Ray-free choice logic, and Ray Tune end to end on a tiny store; the evaluate job."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pipeline.core.diffusion import ddim_timesteps
from pipeline.evaluation.sweep import (
    make_points,
    merge_points,
    pareto_front,
    recommend,
    score_point,
    summarise,
)

ROOT = Path(__file__).resolve().parents[2]


def _pt(i, label, rate, fd, sampler="cpsample"):
    return {"index": i, "label": label, "sampler": sampler, "alpha": 0.5, "scale": float(i),
            "replication_rate": rate, "mean_nn_similarity": 0.5, "guidance_fired_fraction": 0.1,
            "quality": {"fd": fd}}  # fmt: skip


def test_pareto_front_and_recommendation():
    pts = [
        _pt(0, "ddim", 0.40, 1.0, "ddim"),
        _pt(1, "a", 0.05, 2.0),
        _pt(2, "b", 0.01, 3.0),
        _pt(3, "c", 0.02, 2.5),
        _pt(4, "d", 0.02, 4.0),  # dominated by c
    ]
    assert pareto_front(pts, "fd") == ["ddim", "a", "b", "c"]
    rec = recommend(pts, "fd", 0.02)
    assert rec["label"] == "c" and rec["fd"] == 2.5  # best fd among rate <= 0.02
    assert recommend(pts, "fd", 0.005) == {
        "label": None,
        "reason": "no point reaches replication rate <= 0.005",
        "closest": "b",
        "rule": "best fd among CPSample points with replication rate <= 0.005; "
        "ties: the lower replication rate",
    }
    summary = summarise(list(reversed(pts)), 0.02)
    assert [p["label"] for p in summary["points"]] == ["ddim", "a", "b", "c", "d"]
    assert summary["quality_metric"] == "fd" and summary["recommended"]["label"] == "c"
    assert rec["quality_vs_ddim"] == {"fd": 2.5}  # the cost of protection, against DDIM's 1.0


def test_folder_rows_choose_by_the_encoder_fd_and_show_the_cost():
    from pipeline.evaluation.sweep import QUALITY_KEYS, quality_key, quality_ratios

    pts = [_pt(0, "ddim", 0.4, 1.0, "ddim"), _pt(1, "a", 0.0, 1.0), _pt(2, "b", 0.01, 1.0)]
    for p, enc, conf in zip(pts, (2.0, 8.0, 3.0), (0.9, 0.45, 0.81), strict=True):
        p["quality"] = {"fd_encoder": enc, "confident_fraction": conf}
    assert QUALITY_KEYS.index("fd") < QUALITY_KEYS.index("fd_encoder")
    assert quality_key(pts) == "fd_encoder"
    summary = summarise(pts, 0.02)
    rec = summary["recommended"]
    assert summary["quality_metric"] == "fd_encoder" and rec["label"] == "b"
    assert rec["quality_vs_ddim"] == pytest.approx({"fd_encoder": 1.5, "confident_fraction": 0.9})
    pts[1]["quality"]["fd"] = 5.0  # only one row has the domain FD: not the shared metric
    assert quality_key(pts) == "fd_encoder"
    assert quality_ratios({"fd": 2.0, "x": 1.0}, {"fd": 0.0, "x": 4.0}) == {"x": 0.25}


def test_score_point_counts_copies_and_merge_reorders_rows():
    import numpy as np

    from pipeline.fanout.index import l2_normalise

    rng = np.random.default_rng(0)
    train = rng.integers(0, 256, size=(6, 4, 4, 1), dtype=np.uint8)
    flat = train.reshape(6, -1).astype(np.float32) / 255.0
    mean = flat.mean(0)
    emb = l2_normalise(flat - mean)
    # 3 exact copies of training images and 5 fresh random images
    pixels = np.concatenate([train[:3], rng.integers(0, 256, size=(5, 4, 4, 1), dtype=np.uint8)])
    point = {"index": 0, "label": "ddim", "sampler": "ddim", "alpha": None, "scale": 0.0}
    row = score_point(point, pixels, 0.0, emb, mean, 0.97)
    assert row["num_samples"] == 8 and row["replication_rate"] == pytest.approx(3 / 8)
    assert row["quality"] == {}  # neither an evaluator nor a reference
    s3, s7 = _pt(0, "a=0.5 s=3", 0.10, 3.0), _pt(1, "a=0.5 s=7", 0.0, 9.0)
    s3["scale"], s7["scale"] = 3.0, 7.0
    sweep = summarise([s3, s7], 0.02, num_samples=8, wall_s=1.0)
    main = [_pt(0, "ddim", 0.4, 2.0, "ddim"), {**_pt(0, "a=0.5 s=5", 0.01, 4.0), "scale": 5.0}]
    main[0]["alpha"] = None
    merged = merge_points(sweep, main, 0.02)
    assert [p["label"] for p in merged["points"]] == ["ddim", "a=0.5 s=3", "a=0.5 s=5", "a=0.5 s=7"]
    assert [p["index"] for p in merged["points"]] == [0, 1, 2, 3]
    assert merged["recommended"]["label"] == "a=0.5 s=5"  # best quality with rate <= 2%
    assert merged["num_samples"] == 8 and merged["wall_s"] == 1.0


def test_recommend_refuses_a_point_piled_up_above_the_held_out_p99():
    """Point "a" has the best quality and no copies at the threshold, but 30% of its samples lie
    above the held-out p99 (real images: 1%): refused while its share exceeds the p99 target."""
    pts = [
        {**_pt(0, "ddim", 0.40, 1.0, "ddim"), "above_holdout_p99": 0.6},
        {**_pt(1, "a", 0.00, 2.0), "above_holdout_p99": 0.30},
        {**_pt(2, "b", 0.01, 3.0), "above_holdout_p99": 0.02},
        {**_pt(3, "c", 0.01, 4.0), "above_holdout_p99": 0.01},
    ]
    rec = recommend(pts, "fd", 0.02)  # the default p99 target: 0.05
    assert rec["label"] == "b" and rec["above_holdout_p99"] == 0.02 and rec["fd"] == 3.0
    assert "share above the held-out p99 <= 0.05" in rec["rule"]
    assert recommend(pts, "fd", 0.02, target_above_p99=0.5)["label"] == "a"
    # rows without the shares: the rate alone decides, as before
    plain = [{k: v for k, v in p.items() if k != "above_holdout_p99"} for p in pts]
    assert recommend(plain, "fd", 0.02)["label"] == "a"
    assert "held-out" not in recommend(plain, "fd", 0.02)["rule"]
    # no point meets both: the closest misses them by the least summed excess
    none = recommend(pts, "fd", 0.02, target_above_p99=0.0)
    assert none["label"] is None and none["closest"] == "c"
    assert none["reason"] == (
        "no point reaches replication rate <= 0.02 and share above the held-out p99 <= 0.0"
    )
    summary = summarise(pts, 0.02, 0.015)
    assert summary["target_above_p99"] == 0.015 and summary["recommended"]["label"] == "c"
    assert summarise(pts, 0.02)["target_above_p99"] == 0.05
    with pytest.raises(ValueError, match="target_above_p99 must be in"):
        summarise(pts, 0.02, 1.5)


def test_sweep_config_validates_the_p99_target():
    from pipeline.core.config import ConfigError, SweepConfig

    assert SweepConfig().target_above_p99 == 0.05 and SweepConfig().max_holdout == 2000
    assert SweepConfig(target_above_p99=0.0).target_above_p99 == 0.0
    for bad in (-0.1, 1.01):
        with pytest.raises(ConfigError, match="target_above_p99 must be in"):
            SweepConfig(target_above_p99=bad)
    with pytest.raises(ConfigError, match="max_holdout"):
        SweepConfig(max_holdout=0)


def test_score_point_adds_threshold_free_shares_and_the_sample_only_attack():
    import numpy as np

    from pipeline.evaluation.mia import SampleOnlyAttack
    from pipeline.evaluation.shares import holdout_percentiles
    from pipeline.fanout.index import l2_normalise

    rng = np.random.default_rng(0)
    train = rng.integers(0, 256, size=(6, 4, 4, 1), dtype=np.uint8)
    flat = train.reshape(6, -1).astype(np.float32) / 255.0
    mean = flat.mean(0)
    emb = l2_normalise(flat - mean)
    fresh = rng.integers(0, 256, size=(5, 4, 4, 1), dtype=np.uint8)
    pixels = np.concatenate([train[:3], fresh])  # 3 copies, 5 fresh images
    point = {"index": 0, "label": "ddim", "sampler": "ddim", "alpha": None, "scale": 0.0}
    # held-out images at most 0.999 similar: only the 3 copies (about 1.0) lie above p95 and p99
    holdout = np.r_[np.linspace(-0.2, 0.5, 90), np.full(10, 0.999)]
    row = score_point(point, pixels, 0.0, emb, mean, 0.97, holdout_sims=holdout)
    assert row["above_holdout_p95"] == row["above_holdout_p99"] == pytest.approx(3 / 8)
    assert row["holdout_p99"] == pytest.approx(0.999)
    assert "mia_auc" not in row
    # the percentiles instead of the similarities: the same row
    again = score_point(
        point, pixels, 0.0, emb, mean, 0.97, holdout_sims=holdout_percentiles(holdout)
    )
    assert again == row
    # members = the copied training images, non-members never sampled: a perfect attack
    groups = {"dup": np.array([True, False, False]), "none": np.zeros(3, bool)}
    attack = SampleOnlyAttack(train[:3], rng.integers(0, 256, (7, 4, 4, 1), np.uint8), mean, groups)
    row = score_point(point, pixels, 0.0, emb, mean, 0.97, attack=attack)
    assert row["mia_auc"] == 1.0 and row["mia_auc_dup"] == 1.0 and "mia_auc_none" not in row
    assert "above_holdout_p95" not in row
    # samples that copy nothing: the attack has nothing to find
    row = score_point(point, fresh, 0.0, emb, mean, 0.97, attack=attack)
    assert row["mia_auc"] < 1.0


def test_merge_points_keeps_the_privacy_details_and_the_p99_target():
    a = {**_pt(0, "a=0.5 s=3", 0.0, 1.0), "scale": 3.0, "above_holdout_p99": 0.2, "mia_auc": 0.9}
    sweep = summarise([a], 0.02, 0.1, holdout_percentiles={"holdout_p99": 0.9}, mia={"x": 1})
    assert sweep["recommended"]["label"] is None  # 0.2 > 0.1
    b = {**_pt(0, "a=0.5 s=5", 0.01, 2.0), "scale": 5.0, "above_holdout_p99": 0.01}
    merged = merge_points(sweep, [b], 0.02, 0.1)
    assert merged["recommended"]["label"] == "a=0.5 s=5"
    assert merged["holdout_percentiles"] == {"holdout_p99": 0.9} and merged["mia"] == {"x": 1}
    assert merged["target_above_p99"] == 0.1
    assert merge_points(sweep, [b], 0.02, 0.5)["recommended"]["label"] == "a=0.5 s=3"


def test_sweep_job_refuses_a_p99_target_outside_zero_one():
    proc = _job("sweep.py", "--store", "/nonexistent", "--target-above-p99", "1.5")
    assert proc.returncode == 2 and "target_above_p99 must be in [0, 1]" in proc.stderr


def test_make_points_validates_knobs():
    pts = make_points([(0.5, 3), (0.1, 10)])
    assert [p["label"] for p in pts] == ["ddim", "a=0.5 s=3", "a=0.1 s=10"]
    with pytest.raises(ValueError, match="alpha must be in"):
        make_points([(0.7, 3)])
    with pytest.raises(ValueError, match="at least one"):
        make_points([], include_ddim=False)


@pytest.fixture(scope="module")
def tiny_store(tmp_path_factory):
    """A store with 8x8 digit shards and tiny untrained denoiser and classifier under models/t/."""
    from pipeline.core.config import ClassifierArchConfig, UNetConfig, to_dict
    from pipeline.core.diffusion import linear_schedule
    from pipeline.core.models import NoiseClassifier, build_unet, save_classifier, save_denoiser
    from pipeline.data.datasets import digits_source, split
    from pipeline.data.storage import open_store
    from pipeline.orchestration.stages import make_shards

    root = tmp_path_factory.mktemp("sweep-store")
    store = open_store(str(root / "store"))
    train, holdout = split(digits_source(8), 16, 0)
    make_shards(store, "digits", train, holdout.subset(range(120)), shard_size=60)
    torch.manual_seed(0)
    ucfg = UNetConfig(sample_size=8, block_out_channels=(8, 16))
    ccfg = ClassifierArchConfig(8, 1, 8, (1, 2), time_embed_dim=8, num_groups=4)
    save_denoiser(build_unet(ucfg), root / "den", {"unet": to_dict(ucfg)}, linear_schedule())
    save_classifier(NoiseClassifier(ccfg), root / "clf", {"arch": to_dict(ccfg)})
    store.put_dir(root / "den", "models", "t", "denoiser")
    store.put_dir(root / "clf", "models", "t", "classifier")
    return store


def test_sweep_with_ray_tune_writes_plot_matching_report(ray_local, tiny_store):
    import numpy as np

    from pipeline.core.config import ReplicaConfig, SamplerConfig
    from pipeline.data.handle import open_dataset
    from pipeline.data.shards import read_image_shards
    from pipeline.evaluation.domain import train_domain_evaluator
    from pipeline.evaluation.evaluate import attack_sets, holdout_similarities, sample_only_attack
    from pipeline.evaluation.report import merge_report
    from pipeline.evaluation.shares import holdout_percentiles
    from pipeline.evaluation.sweep import run_sweep
    from pipeline.fanout.replica_index import LazyReplicaIndex, ensure_replica_index

    holdout = read_image_shards(tiny_store, "data/digits/holdout")
    evaluator = train_domain_evaluator(holdout.to_tensor(), torch.tensor(holdout.labels), 2)
    sampler = SamplerConfig(steps=4, batch_size=16)
    # the privacy references: held-out similarities in the stored index, a sample-only attack
    replicas = ReplicaConfig()
    sidecar = ensure_replica_index(tiny_store, "digits", replicas)
    index = LazyReplicaIndex(tiny_store, sidecar, replicas)
    ds = open_dataset(tiny_store, "digits")  # as a job does: opened once, passed down
    holdout_sims = holdout_similarities(tiny_store, ds, index, 100, seed=0)
    assert holdout_sims.shape == (100,) and np.all(holdout_sims < 1.0)
    assert np.array_equal(holdout_sims, holdout_similarities(tiny_store, "digits", index, 100))
    sets = attack_sets(tiny_store, ds, 8, 16, seed=0)
    attack = sample_only_attack(sets, {"first": set(sets.members.keys[:4])})
    result = run_sweep(
        tiny_store, "t", ds, [(0.5, 1.0), (0.5, 50.0)], num_samples=12, seed=3,
        evaluator=evaluator, target_rate=1.0, sampler=sampler, verbose=0,
        holdout_sims=holdout_sims, attack=attack, target_above_p99=1.0,
    )  # fmt: skip
    pct = holdout_percentiles(holdout_sims)
    assert result["holdout_percentiles"] == {**pct, "num_holdout": 100}
    assert result["mia"]["num_members"] == 8 and result["mia"]["groups"] == {"first": 4}
    for p in result["points"]:
        assert p["holdout_p95"] == pct["holdout_p95"] and p["holdout_p99"] == pct["holdout_p99"]
        assert 0.0 <= p["above_holdout_p99"] <= p["above_holdout_p95"] <= 1.0
        # shares of the point's 12 samples
        assert (p["above_holdout_p99"] * 12).is_integer() and (
            p["above_holdout_p95"] * 12
        ).is_integer()
        assert 0.0 <= p["mia_auc"] <= 1.0 and 0.0 <= p["mia_auc_first"] <= 1.0
    assert "rule" in result["recommended"] and result["target_above_p99"] == 1.0
    merge_report(tiny_store, "t", {"sweep": result})
    png = tiny_store.read_bytes("reports", "t", "pareto.png")
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    report = json.loads(tiny_store.read_bytes("reports", "t", "report.json"))
    pts = report["sweep"]["points"]
    assert [p["label"] for p in pts] == ["ddim", "a=0.5 s=1", "a=0.5 s=50"]
    assert report["sweep"]["quality_metric"] == "fd"
    for p in pts:
        assert p["num_samples"] == 12 and (p["replication_rate"] * 12).is_integer()
        assert p["quality"]["fd"] >= 0.0 and (p["quality"]["confident_fraction"] * 12).is_integer()
    assert pts[0]["guidance_fired_fraction"] == 0.0
    # alpha 0.5 opens the gate for every sample: guidance fires at every DDIM step below
    # guidance_t_max, 3 of the 4 steps (t = 750, 500, 250, 0 against 600)
    below = float((ddim_timesteps(4) < sampler.guidance_t_max).float().mean())
    assert below == 0.75
    assert pts[1]["guidance_fired_fraction"] == pts[2]["guidance_fired_fraction"] == below
    # a target of 1.0 admits every point: the recommendation is the best-fd protected point
    best = min(pts[1:], key=lambda p: p["quality"]["fd"])
    assert report["sweep"]["recommended"]["label"] == best["label"]
    # the plotted points (recorded in the PNG's text chunk) are exactly report.json's points
    from PIL import Image

    plotted = json.loads(Image.open(io.BytesIO(png)).text["Description"])
    assert plotted["quality_metric"] == "fd"
    assert plotted["colour"] == "mia_auc" and plotted["second_panel"] == "above_holdout_p99"
    assert plotted["points"] == [
        {
            "label": p["label"],
            "replication_rate": p["replication_rate"],
            "quality": p["quality"]["fd"],
            "above_holdout_p99": p["above_holdout_p99"],
            "mia_auc": p["mia_auc"],
        }
        for p in pts
    ]
    md = tiny_store.read_bytes("reports", "t", "report.md").decode()
    assert "(alpha, s) trade-off sweep" in md and "![pareto.png](pareto.png)" in md
    assert "| > held-out p95 | > held-out p99 | NN-attack AUC | AUC first |" in md
    # the same seeds at every point: the weak-guidance point stays close to DDIM, the strong one not
    assert pts[1]["mean_nn_similarity"] != pts[2]["mean_nn_similarity"]


def _job(*args):
    return subprocess.run(
        [sys.executable, str(ROOT / "jobs" / args[0]), *args[1:]],
        capture_output=True, text=True, timeout=300, cwd=ROOT,
    )  # fmt: skip


def test_evaluate_job_merges_attacks_into_report(tiny_store):
    proc = _job(
        "evaluate.py", "--store", tiny_store.uri, "--run", "t", "--num-members", "8",
        "--num-nonmembers", "8", "--draws", "1", "--threads", "1",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(tiny_store.read_bytes("reports", "t", "report.json"))
    mi = report["membership_inference"]
    for attack in ("reconstruction", "secmi", "pia"):
        for model in ("ddim", "cpsample"):
            r = mi[attack][model]
            assert 0.0 <= r["auc"] <= 1.0 and 0.0 < r["p_value"] <= 1.0
            assert r["num_members"] == 8 and r["num_nonmembers"] == 8
    assert report["fid"]["skipped"].startswith("no --inception-weights")
    assert tiny_store.exists("reports", "t", "roc_reconstruction.png")
    # which inputs made these numbers: the models, the data, the index (no samples in run t)
    from pipeline.data.provenance import manifest_digest
    from pipeline.data.shards import read_manifest

    inputs = report["inputs"]
    assert sorted(inputs) == ["classifier", "data", "denoiser", "package_version", "replica_index"]
    assert inputs["data"] == manifest_digest(read_manifest(tiny_store, "data/digits"))
    assert inputs["package_version"] == "0.1.0" and list(inputs["replica_index"]) == [
        "centred/flat"
    ]
    # the threshold-free reference: the held-out images (all 120, under --max-holdout) in the index
    tf = report["threshold_free"]
    assert tf["holdout"]["num_images"] == 120 and tf["samplers"] == {}  # run t has no samples
    assert 0.0 < tf["holdout"]["holdout_p95"] <= tf["holdout"]["holdout_p99"] < 1.0
    md = tiny_store.read_bytes("reports", "t", "report.md").decode()
    assert "## Membership inference" in md and "| reconstruction | cpsample |" in md
    assert "## Threshold-free replication" in md and "120 held-out real images" in md


def test_evaluate_job_missing_weights_is_a_user_error(tiny_store, tmp_path):
    missing = tmp_path / "pt_inception.pth"
    proc = _job("evaluate.py", "--store", tiny_store.uri, "--run", "t",
                "--inception-weights", str(missing))  # fmt: skip
    assert proc.returncode == 2
    assert "does not exist" in proc.stderr and "pt_inception-2015-12-05-6726825d.pth" in proc.stderr


def test_sweep_and_evaluate_jobs_refuse_a_dataset_the_denoiser_was_not_trained_on(
    tiny_store, tmp_path
):
    """models/t/denoiser records the manifest it was trained on (as train_denoiser writes it): a
    sweep or an evaluation against another dataset exits 2 before any work, naming both digests."""
    from pathlib import Path

    from pipeline.data.datasets import digits_source, split
    from pipeline.data.provenance import manifest_digest, write_provenance
    from pipeline.data.shards import read_manifest
    from pipeline.orchestration.stages import make_shards

    digest = manifest_digest(read_manifest(tiny_store, "data/digits"))
    write_provenance(Path(tiny_store.join("models", "t", "denoiser")), {"data": digest})
    if not tiny_store.exists("data", "other"):
        train, holdout = split(digits_source(8), 20, 1)
        make_shards(tiny_store, "other", train, holdout.subset(range(40)), shard_size=60)
    for job in ("sweep.py", "evaluate.py"):
        proc = _job(job, "--store", tiny_store.uri, "--run", "t", "--dataset", "other")
        assert proc.returncode == 2, proc.stderr[-3000:]
        lines = [x for x in proc.stderr.splitlines() if x.startswith("error:")]
        assert len(lines) == 1 and "Traceback" not in proc.stderr
        assert f"trained on data with manifest digest {digest[:19]}..." in lines[0]
        assert "data/other has sha256:" in lines[0] and "a wrong --dataset" in lines[0]
    assert not tiny_store.exists("indexes", "other")  # refused before the index was built
