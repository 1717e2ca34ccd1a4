"""The latent scenario (jobs/demo.py --scenario latent) end to end in its quick configuration."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pipeline.data.provenance import StaleArtifactError
from pipeline.data.shards import read_image_shards, read_manifest
from pipeline.data.storage import open_store
from pipeline.orchestration.latent_demo import (
    DATASET,
    LATENTS,
    latent_config,
    run_latent_demo,
)
from pipeline.orchestration.replica_report import iter_per_sample

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def quick_report(tmp_path_factory, ray_local):
    out = tmp_path_factory.mktemp("latent-demo") / "out"
    return out, run_latent_demo(latent_config(quick=True), str(out), progress=False)


def test_quick_latent_demo_writes_every_stage(quick_report):
    out, report = quick_report
    cfg = latent_config(quick=True)
    store = open_store(str(out))
    # the latents: every private and held-out image, keys kept, the model's latent shape
    manifest = read_manifest(store, f"data/{LATENTS}")
    pixels = read_manifest(store, f"data/{DATASET}")
    assert manifest["latent"]["latent_shape"] == [4, 8, 8]
    for split in ("train", "holdout"):
        assert manifest["splits"][split]["count"] == pixels["splits"][split]["count"]
    assert report["latents"]["images"] == cfg.num_train + cfg.num_holdout
    # the fine-tuned model shares the base's VAE and text encoder byte for byte, not its UNet
    base, sd = out / "models/latent/base", out / "models/latent/sd"
    for part in ("vae", "text_encoder"):
        a = sorted((base / part).glob("*.safetensors"))
        assert a and [p.read_bytes() for p in a] == [(sd / part / p.name).read_bytes() for p in a]
    unet = "unet/diffusion_pytorch_model.safetensors"
    assert (base / unet).read_bytes() != (sd / unet).read_bytes()
    clf_cfg = json.loads((out / "models/latent/classifier/config.json").read_text())
    assert clf_cfg["arch"]["channels"] == 4 and clf_cfg["arch"]["sample_size"] == 8
    # the 20-step classifier's model card (on seed 0 it fits the 16 latents' bits at t < 100; other
    # seeds may not): the quick config samples with it either way (allow_unfit), the report says so
    card = clf_cfg["fit"]
    assert card["threshold"] == 0.9 and card["fits"] is (card["accuracy"] >= 0.9)
    assert (card["t_range"], card["step"], card["rows"]) == ([0, 100], 20, cfg.num_train)
    assert report["classifier_fit"] == {"card": card, "allow_unfit": True}
    assert report["config"]["sampler"]["allow_unfit"] is True
    # both samplers: decoded 16x16 digits, a training caption as each prompt, checked in pixels
    captions = {f"a handwritten {d}" for d in range(10)}
    for name in ("ddim", "cpsample"):
        drawn = read_image_shards(store, f"samples/latent/{name}")
        assert drawn.images.shape == (cfg.sampler.num_samples, 16, 16, 1)
        assert {m["prompt"] for m in drawn.meta} <= captions
        rows = list(iter_per_sample(store, "latent", name))  # the parts, one per sample shard
        n = cfg.sampler.num_samples
        assert len(rows) == n
        entry = report["samplers"][name]
        copies = sum(r["nn_similarity"] >= cfg.replicas.threshold for r in rows)
        assert entry["replication_rate"] == pytest.approx(copies / n)
        assert entry["prompt_agreement"] * n == pytest.approx(round(entry["prompt_agreement"] * n))
        assert np.isfinite(entry["quality"]["fd"])
    assert report["samplers"]["cpsample"]["guidance_fired_fraction"] > 0
    assert report["samplers"]["ddim"]["guidance_fired_fraction"] == 0
    ceiling = report["vae_ceiling"]
    assert -1.0 <= ceiling["min_cosine"] <= ceiling["mean_cosine"] <= 1.0
    md = (out / "reports/latent/report.md").read_text()
    assert "| cpsample |" in md and "VAE ceiling" in md
    for fig in ("pairs_ddim.png", "samples_cpsample.png", "nn_similarity_hist.png"):
        assert (out / "reports/latent" / fig).read_bytes()[:4] == b"\x89PNG"
    assert json.loads((out / "report.json").read_text())["scenario"] == "latent"


def test_other_settings_are_refused_before_any_work(quick_report):
    out, _ = quick_report
    cfg = latent_config(quick=True)
    cfg = dataclasses.replace(cfg, cfg_scale=cfg.cfg_scale + 1)
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    with pytest.raises(StaleArtifactError, match="cfg_scale"):
        run_latent_demo(cfg, str(out), progress=False)
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before


def test_cli_refuses_data_for_the_latent_scenario(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(ROOT / "jobs/demo.py"), "--scenario", "latent", "--out",
         str(tmp_path / "o"), "--data", str(tmp_path)],
        capture_output=True, text=True, cwd=ROOT,
    )  # fmt: skip
    assert proc.returncode == 2
    assert "runs on the digits" in proc.stderr
    assert not (tmp_path / "o").exists()
