"""Ray Train (V2) runs on a real local Ray: 2 CPU workers with gloo DDP, checkpoints with configs.

The 2-worker denoiser run (export, kept checkpoints, schedule) is checked by the worker-kill test in
test_fault_tolerance.py, which runs one anyway."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from pipeline.core.config import (
    ClassifierArchConfig,
    ClassifierTrainConfig,
)
from pipeline.core.labels import random_bits
from pipeline.core.models import CheckpointError, load_classifier
from pipeline.data.shards import read_image_shards
from pipeline.orchestration.stages import train_classifier


def test_two_worker_classifier_overfits_training_bits(ray_local, digits_store):
    arch = ClassifierArchConfig(base_channels=16, channel_mults=(1, 2))
    train = ClassifierTrainConfig(
        steps=150, batch_size=64, lr=3e-3, holdout_images=100, t_max=100, train_fraction=0.5,
        num_workers=2, checkpoint_every=75,
    )  # fmt: skip
    out = train_classifier(digits_store, "rt2", "digits", arch, train, threads=1)
    metrics = out["metrics"]
    assert set(metrics) == {
        "train_accuracy_by_t",
        "holdout_accuracy",
        "never_seen_confident_fraction",
        "lipschitz_proxy",
    }
    # t_max=100 concentrates training on small t: the 32 training bits must be fit there
    assert metrics["train_accuracy_by_t"]["0-100"] >= 0.9
    assert 0.0 <= metrics["holdout_accuracy"] <= 1.0 and metrics["lipschitz_proxy"] > 0
    clf = load_classifier(out["uri"], (1, 16, 16))
    train_set = read_image_shards(digits_store, "data/digits/train")
    with torch.no_grad():
        logits = clf(train_set.to_tensor(), torch.zeros(len(train_set), dtype=torch.long))
    acc = ((logits > 0).float() == random_bits(train_set.keys, train.label_seed)).float().mean()
    assert acc >= 0.9


# ------------------------------------------------------------------- protect an existing model
def _foreign_unet_dir(path: Path, channels: int = 1) -> tuple[Path, torch.Tensor]:
    """A diffusers UNet2DModel the project never trained, saved with ``save_pretrained``, plus a
    DDPMScheduler with non-default (trained) betas, like a downloaded google/ddpm-cifar10-32."""
    from diffusers import DDPMScheduler, UNet2DModel

    torch.manual_seed(0)
    unet = UNet2DModel(
        sample_size=16, in_channels=channels, out_channels=channels, layers_per_block=1,
        block_out_channels=(8, 16), down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=8,
    )  # fmt: skip
    unet.save_pretrained(path)
    betas = torch.linspace(0.05**0.5, 0.03**0.5, 1000) ** 2  # not DDPM's linear 1e-4..0.02
    DDPMScheduler(num_train_timesteps=1000, trained_betas=betas.tolist()).save_pretrained(path)
    return path, betas


def test_classifier_protects_foreign_unet_and_samples_with_it(ray_local, digits_store, tmp_path):
    from pipeline.core.config import SamplerConfig
    from pipeline.fanout.sampling import run_sampling

    den_dir, betas = _foreign_unet_dir(tmp_path / "foreign")
    # the arch's sample_size is wrong on purpose: the denoiser's image shape wins
    arch = ClassifierArchConfig(sample_size=8, base_channels=8, channel_mults=(1, 2))
    train = ClassifierTrainConfig(
        steps=20, batch_size=16, holdout_images=20, num_workers=1, checkpoint_every=10
    )
    out = train_classifier(
        digits_store, "foreign", "digits", arch, train, threads=1, denoiser=str(den_dir)
    )
    cfg = json.loads(
        Path(digits_store.join("models", "foreign", "classifier", "config.json")).read_text()
    )
    assert cfg["arch"]["sample_size"] == 16
    run_cfg = cfg  # config.json: the arch plus the run config
    schedule = run_cfg["schedule"]
    assert schedule["num_train_timesteps"] == 1000
    assert abs(schedule["beta_first"] - float(betas[0])) < 1e-6
    assert abs(schedule["beta_last"] - float(betas[-1])) < 1e-6
    assert run_cfg["denoiser"] == str(den_dir)
    clf = load_classifier(out["uri"], (1, 16, 16))
    assert clf(torch.zeros(2, 1, 16, 16), torch.tensor([0, 5])).shape == (2,)
    # the sampling job uses the foreign directory as the denoiser, guided by the new classifier
    res = run_sampling(
        digits_store.uri, "foreign",
        SamplerConfig(num_samples=4, steps=4, batch_size=4, samples_per_shard=4),
        denoiser=str(den_dir), classifier="models/foreign/classifier",
    )  # fmt: skip
    assert res["num_samples"] == 4 and res["num_shards"] == 1
    assert digits_store.listdir("samples", "foreign", "cpsample")


def test_classifier_rejects_denoiser_of_other_image_shape(digits_store, tmp_path):
    from pipeline.core.config import ConfigError

    den_dir, _ = _foreign_unet_dir(tmp_path / "rgb", channels=3)
    with pytest.raises(ConfigError, match=r"denoiser '.*rgb' is configured for \(3, 16, 16\)"):
        train_classifier(
            digits_store, "rgb", "digits", ClassifierArchConfig(), ClassifierTrainConfig(),
            denoiser=str(den_dir),
        )  # fmt: skip
    assert not digits_store.exists("models", "rgb")
    with pytest.raises(CheckpointError, match="neither a local folder"):
        train_classifier(
            digits_store, "rgb", "digits", ClassifierArchConfig(), ClassifierTrainConfig(),
            denoiser=str(tmp_path / "missing"),
        )  # fmt: skip


def test_training_refuses_a_model_shape_that_is_not_the_data(digits_store):
    """A UNet runs on any size its downsampling divides: without the check, a 32x32 denoiser would
    train on the 16x16 digits without a word."""
    from pipeline.core.config import ConfigError, DenoiserTrainConfig, UNetConfig
    from pipeline.orchestration.stages import train_denoiser

    with pytest.raises(ConfigError, match=r"\(C, H, W\) = \(1, 16, 16\) but the denoiser \(unet\) "
                       r"is configured for \(1, 32, 32\)"):  # fmt: skip
        train_denoiser(
            digits_store, "wide", "digits", UNetConfig(sample_size=32), DenoiserTrainConfig()
        )
    with pytest.raises(ConfigError, match=r"classifier \(arch\) is configured for \(3, 16, 16\)"):
        train_classifier(
            digits_store,
            "wide",
            "digits",
            ClassifierArchConfig(channels=3),
            ClassifierTrainConfig(),
        )
    assert not digits_store.exists("checkpoints", "wide-denoiser")
    assert not digits_store.exists("models", "wide")


def test_split_holdout_by_sorted_key_across_ranks():
    from pipeline.train.workers import split_holdout

    keys = [f"h{i:03d}" for i in (5, 1, 4, 0, 3, 2, 6)]  # read order is not key order
    x = torch.tensor([float(k[1:]) for k in keys]).reshape(-1, 1, 1, 1)
    parts = [split_holdout(x, keys, 4, rank, 2) for rank in (0, 1)]
    (bits0, k0), never0 = parts[0]
    (bits1, k1), never1 = parts[1]
    assert k0 == ["h000", "h002"] and k1 == ["h001", "h003"]  # the 4 smallest keys, dealt out
    assert bits0.flatten().tolist() == [0.0, 2.0] and bits1.flatten().tolist() == [1.0, 3.0]
    assert never0[1] == never1[1] == ["h004", "h005", "h006"]  # every rank sees all never-seen
    assert never0[0].flatten().tolist() == [4.0, 5.0, 6.0]
    # at most all but one image is trained on, so the calibration set is never empty
    (_, k_all), (_, k_left) = split_holdout(x, keys, 100, 0, 1)
    assert len(k_all) == 6 and k_left == ["h006"]
    (x_none, k_none), (_, k_rest) = split_holdout(x, keys, 0, 0, 1)
    assert x_none.shape == (0, 1, 1, 1) and k_none == [] and len(k_rest) == 7
