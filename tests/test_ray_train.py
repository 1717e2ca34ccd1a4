"""Ray Train (V2) runs on a real local Ray: 2 CPU workers with gloo DDP, checkpoints with configs."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from pipeline.config import (
    ClassifierArchConfig,
    ClassifierTrainConfig,
    DenoiserTrainConfig,
    UNetConfig,
)
from pipeline.datasets import read_image_shards
from pipeline.labels import random_bits
from pipeline.models import load_classifier, load_denoiser, load_schedule
from pipeline.stages import train_classifier, train_denoiser

TINY_UNET = UNetConfig(block_out_channels=(16, 32), attention_levels=(), norm_num_groups=8)


def test_two_worker_denoiser_run_exports_loadable_model(ray_local, digits_store):
    train = DenoiserTrainConfig(
        steps=12, batch_size=16, num_workers=2, checkpoint_every=6, num_to_keep=1
    )
    out = train_denoiser(digits_store, "rt2", "digits", TINY_UNET, train, threads=1)
    assert out["metrics"]["step"] == 12
    assert out["metrics"]["loss"] > 0
    unet = load_denoiser(out["uri"])
    assert unet.config.block_out_channels == [16, 32] or tuple(unet.config.block_out_channels) == (
        16,
        32,
    )
    run_cfg = json.loads(
        Path(digits_store.join("models", "rt2", "denoiser", "run_config.json")).read_text()
    )
    assert run_cfg["step"] == 12 and run_cfg["train"]["num_workers"] == 2
    # Ray Train kept only the newest checkpoint (num_to_keep=1) under the store's checkpoints/
    ckpts = [
        p
        for p in Path(digits_store.join("checkpoints", "rt2-denoiser")).glob("checkpoint_*")
        if p.is_dir()
    ]
    assert len(ckpts) == 1
    assert load_schedule(out["uri"]).num_train_timesteps == 1000
    with torch.no_grad():
        eps = unet(torch.zeros(2, 1, 16, 16), torch.tensor([10, 500])).sample
    assert eps.shape == (2, 1, 16, 16) and torch.isfinite(eps).all()


def test_two_worker_classifier_overfits_training_bits(ray_local, digits_store):
    arch = ClassifierArchConfig(base_channels=16, channel_mults=(1, 2))
    train = ClassifierTrainConfig(
        steps=300, batch_size=64, lr=3e-3, holdout_images=100, t_max=100, train_fraction=0.5,
        num_workers=2, checkpoint_every=150,
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
