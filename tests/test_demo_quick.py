"""The `--quick` demo end to end: real local Ray, Ray Train, Ray Data, FAISS, the whole store layout."""

from __future__ import annotations

import json
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SAMPLER_KEYS = {"num_samples", "replication_rate", "mean_nn_similarity", "quality"}


@pytest.fixture(scope="module")
def quick_demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "out"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "jobs" / "demo.py"), "--out", str(out), "--quick", "--no-progress"],
        capture_output=True, text=True, timeout=600, cwd=ROOT,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, proc


def test_quick_demo_writes_the_layout(quick_demo):
    out, _ = quick_demo
    for rel in [
        "data/digits/train/shard-000000.tar",
        "data/digits/holdout/shard-000000.tar",
        "data/digits/manifest.json",
        "models/demo/denoiser/config.json",
        "models/demo/denoiser/diffusion_pytorch_model.safetensors",
        "models/demo/denoiser/run_config.json",
        "models/demo/denoiser/scheduler_config.json",
        "models/demo/classifier/model.safetensors",
        "models/demo/classifier/config.json",
        "samples/demo/ddim/shard-000000.tar",
        "samples/demo/cpsample/shard-000000.tar",
        "reports/demo/report.json",
        "reports/demo/report.md",
        "report.json",
    ]:
        assert (out / rel).is_file(), rel
    for fig in ["pairs_ddim.png", "pairs_cpsample.png", "nn_similarity_hist.png"]:
        assert (out / "reports/demo" / fig).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # no temporary files were left behind by the atomic writes
    assert not [p for p in out.rglob("*.tmp") if "checkpoints" not in p.parts]


def test_quick_demo_report_has_every_key(quick_demo):
    out, _ = quick_demo
    report = json.loads((out / "report.json").read_text())
    assert {
        "dataset",
        "num_train",
        "threshold",
        "samplers",
        "holdout_baseline",
        "timings_s",
    } <= set(report)
    assert report["dataset"] == "digits" and report["threshold"] == 0.97
    assert report["num_train"] == 64
    for name in ("ddim", "cpsample"):
        s = report["samplers"][name]
        assert set(s) >= SAMPLER_KEYS
        assert s["num_samples"] == 64
        assert 0.0 <= s["replication_rate"] <= 1.0 and -1.0 <= s["mean_nn_similarity"] <= 1.0
        assert {"fd", "confident_fraction"} <= set(s["quality"])
        assert s["quality"]["fd"] >= 0 and 0 <= s["quality"]["confident_fraction"] <= 1
    cps = report["samplers"]["cpsample"]
    assert {"alpha", "scale", "guidance_fired_fraction"} <= set(cps)
    assert 0.0 <= cps["guidance_fired_fraction"] <= 1.0
    assert {"replication_rate", "mean_nn_similarity"} <= set(report["holdout_baseline"])
    assert report["timings_s"]["total"] > 0
    assert {"train_accuracy_by_t", "holdout_accuracy", "lipschitz_proxy"} <= set(
        report["classifier"]
    )


def test_quick_demo_train_shards_hold_exactly_the_training_images(quick_demo):
    out, _ = quick_demo
    import numpy as np

    from pipeline.datasets import read_tar

    train = read_tar((out / "data/digits/train/shard-000000.tar").read_bytes(), "train")
    assert len(train) == 64 and train.images.shape[1:] == (16, 16, 1)
    manifest = json.loads((out / "data/digits/manifest.json").read_text())
    assert manifest["splits"]["train"]["count"] == 64
    assert train.images.dtype == np.uint8


def _metas(path: Path) -> dict[str, dict]:
    with tarfile.open(path) as tar:
        return {
            m.name.split(".")[0]: json.loads(tar.extractfile(m).read())
            for m in tar.getmembers()
            if m.name.endswith(".json")
        }


def test_quick_demo_sample_metadata(quick_demo):
    out, _ = quick_demo
    cps = _metas(out / "samples/demo/cpsample/shard-000000.tar")
    ddim = _metas(out / "samples/demo/ddim/shard-000000.tar")
    assert len(cps) == len(ddim) == 32
    for meta in cps.values():
        assert {
            "seed",
            "guidance_steps_fired",
            "final_p",
            "nn_key",
            "nn_similarity",
            "alpha",
            "scale",
        } <= set(meta)
        assert 0 <= meta["guidance_steps_fired"] <= meta["steps"]
        assert meta["nn_key"].startswith("digits-")
    # both samplers use the same seed for the same index: the comparison is paired
    assert sorted(m["seed"] for m in cps.values()) == sorted(m["seed"] for m in ddim.values())
    assert all(m["guidance_steps_fired"] == 0 and m["final_p"] is None for m in ddim.values())


def test_quick_demo_shards_are_readable_by_webdataset(quick_demo):
    import webdataset as wds

    out, _ = quick_demo
    url = str(out / "samples/demo/cpsample/shard-000000.tar")
    rows = list(wds.WebDataset(url, shardshuffle=False).decode("l"))
    assert len(rows) == 32
    assert rows[0]["png"].shape == (16, 16)
