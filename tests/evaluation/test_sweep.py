"""The (alpha, s) sweep: Ray-free choice logic, and Ray Tune end to end on a tiny store; the evaluate job."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

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
    }
    summary = summarise(list(reversed(pts)), 0.02)
    assert [p["label"] for p in summary["points"]] == ["ddim", "a", "b", "c", "d"]
    assert summary["quality_metric"] == "fd" and summary["recommended"]["label"] == "c"


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
    from pipeline.core.config import SamplerConfig
    from pipeline.data.shards import read_image_shards
    from pipeline.evaluation.domain import train_domain_evaluator
    from pipeline.evaluation.report import merge_report
    from pipeline.evaluation.sweep import run_sweep

    holdout = read_image_shards(tiny_store, "data/digits/holdout")
    evaluator = train_domain_evaluator(holdout.to_tensor(), torch.tensor(holdout.labels), 2)
    sampler = SamplerConfig(steps=4, batch_size=16)
    result = run_sweep(
        tiny_store, "t", "digits", [(0.5, 1.0), (0.5, 50.0)], num_samples=12, seed=3,
        evaluator=evaluator, target_rate=1.0, sampler=sampler, verbose=0,
    )  # fmt: skip
    merge_report(tiny_store, "t", {"sweep": result})
    png = tiny_store.read_bytes("reports", "t", "pareto.png")
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    report = json.loads(tiny_store.read_bytes("reports", "t", "report.json"))
    pts = report["sweep"]["points"]
    assert [p["label"] for p in pts] == ["ddim", "a=0.5 s=1", "a=0.5 s=50"]
    assert report["sweep"]["quality_metric"] == "fd"
    for p in pts:
        assert p["num_samples"] == 12 and 0.0 <= p["replication_rate"] <= 1.0
        assert p["quality"]["fd"] >= 0.0 and 0.0 <= p["quality"]["confident_fraction"] <= 1.0
    assert pts[0]["guidance_fired_fraction"] == 0.0
    assert pts[2]["guidance_fired_fraction"] > 0.0  # alpha 0.5: guidance acts
    # a target of 1.0 admits every point: the recommendation is the best-fd protected point
    best = min(pts[1:], key=lambda p: p["quality"]["fd"])
    assert report["sweep"]["recommended"]["label"] == best["label"]
    # the plotted points (recorded in the PNG's text chunk) are exactly report.json's points
    from PIL import Image

    plotted = json.loads(Image.open(io.BytesIO(png)).text["Description"])
    assert plotted["quality_metric"] == "fd"
    assert plotted["points"] == [
        {
            "label": p["label"],
            "replication_rate": p["replication_rate"],
            "quality": p["quality"]["fd"],
        }
        for p in pts
    ]
    md = tiny_store.read_bytes("reports", "t", "report.md").decode()
    assert "(alpha, s) trade-off sweep" in md and "![pareto.png](pareto.png)" in md
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
    for attack in ("reconstruction", "secmi"):
        for model in ("ddim", "cpsample"):
            r = mi[attack][model]
            assert 0.0 <= r["auc"] <= 1.0 and 0.0 < r["p_value"] <= 1.0
            assert r["num_members"] == 8 and r["num_nonmembers"] == 8
    assert report["fid"]["skipped"].startswith("no --inception-weights")
    assert tiny_store.exists("reports", "t", "roc_reconstruction.png")
    md = tiny_store.read_bytes("reports", "t", "report.md").decode()
    assert "## Membership inference" in md and "| reconstruction | cpsample |" in md


def test_evaluate_job_missing_weights_is_a_user_error(tiny_store, tmp_path):
    missing = tmp_path / "pt_inception.pth"
    proc = _job("evaluate.py", "--store", tiny_store.uri, "--run", "t",
                "--inception-weights", str(missing))  # fmt: skip
    assert proc.returncode == 2
    assert "does not exist" in proc.stderr and "pt_inception-2015-12-05-6726825d.pth" in proc.stderr
