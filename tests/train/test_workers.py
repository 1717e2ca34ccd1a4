"""Ray Train (V2) runs on a real local Ray: 2 CPU workers with gloo DDP, checkpoints with configs.

The 2-worker denoiser run (export, kept checkpoints, schedule) is checked by the worker-kill test in
test_fault_tolerance.py, which runs one anyway."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pipeline.core.config import (
    ClassifierArchConfig,
    ClassifierTrainConfig,
)
from pipeline.core.labels import holdout_roles, random_bits
from pipeline.core.models import (
    CheckpointError,
    load_classifier,
    load_classifier_config,
    load_schedule,
    schedule_record,
)
from pipeline.data.shards import read_image_shards
from pipeline.orchestration.stages import train_classifier

ROOT = Path(__file__).resolve().parents[2]


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
        "train_margin_by_t",
        "holdout_accuracy",
        "never_seen_confident_fraction",
        "lipschitz_proxy",
        "train_rows",
        "never_rows",
    }
    # t_max=100 concentrates training on small t: the 32 training bits must be fit there
    assert metrics["train_accuracy_by_t"]["0-100"] >= 0.9
    assert metrics["lipschitz_proxy"] > 0
    # rank 0 measured its own cached share (16 of the 32 rows) and the never-seen rows: the 300
    # held-out rows less the ~100 trained on with their bits (a keyed hash picks them)
    assert metrics["train_rows"] == 16
    never = 300 - out_bits(digits_store, train)
    assert metrics["never_rows"] == never
    hits = metrics["holdout_accuracy"] * 4 * never  # 4 noisings of each: a count (float32 mean)
    assert hits == pytest.approx(round(hits), abs=1e-3)
    # the model card: the same fit at t < 100, with how it was measured, in config.json
    card = {
        "accuracy": metrics["train_accuracy_by_t"]["0-100"],
        "mean_margin": metrics["train_margin_by_t"]["0-100"],
        "t_range": [0, 100], "rows": 16, "draws": 4, "seed": 0, "step": 150,
        "threshold": 0.9, "fits": True,
        "never_seen": {"rows": never, "t_range": [0, 50], "confident_p": 1e-3,
                       "confident_fraction": metrics["never_seen_confident_fraction"]},
    }  # fmt: skip
    assert out["fit"] == card
    assert load_classifier_config(out["uri"])["fit"] == card
    # 32 training images and ~100 held-out bit images are small: each rank cached its share
    # (equal shares from Ray's split) and both ranks ran every step
    run_dir = Path(digits_store.join("checkpoints", "rt2-classifier"))
    state = json.loads(max(run_dir.glob("checkpoint_*/state.json")).read_text())
    assert [r["step"] for r in state["data"]] == [150, 150]
    for rank in state["data"]:
        assert rank["train"]["input"] == rank["bits"]["input"] == "cache"
        assert rank["train"]["rows_read"] == 16 and rank["train"]["rows"] == 150 * 16
    clf = load_classifier(out["uri"], (1, 16, 16))
    train_set = read_image_shards(digits_store, "data/digits/train")
    with torch.no_grad():
        logits = clf(train_set.to_tensor(), torch.zeros(len(train_set), dtype=torch.long))
    acc = ((logits > 0).float() == random_bits(train_set.keys, train.label_seed)).float().mean()
    assert acc >= 0.9


def out_bits(store, train: ClassifierTrainConfig) -> int:
    """How many held-out rows the classifier trains on with their own bits (the keyed roles)."""
    holdout = read_image_shards(store, "data/digits/holdout")
    trained, _ = holdout_roles(holdout.keys, train.holdout_images, train.label_seed)
    return len(trained)


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


@pytest.mark.slow
def test_classifier_protects_foreign_unet_and_refuses_to_sample_unfit(
    ray_local, digits_store, tmp_path
):
    """A classifier trained for a UNet2DModel the project never trained, with too few steps to fit its
    bits: its record names the denoiser's full schedule, its card the fit, and sampling with it
    exits 2 saying how to train further, unless allow_unfit."""
    from pipeline.core.config import SamplerConfig
    from pipeline.fanout.resume import sampling_provenance
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
    # the record carries every beta (their digest) and how the denoiser is read
    assert schedule == schedule_record(load_schedule(den_dir))
    # 20 steps fit few of the 32 random bits: the model card says so, and sampling refuses it
    card = run_cfg["fit"]
    assert card == out["fit"] and card["rows"] == 32 and card["step"] == 20
    assert card["accuracy"] < 0.9 and card["fits"] is False and card["threshold"] == 0.9
    sampler = SamplerConfig(num_samples=4, steps=4, batch_size=4, samples_per_shard=4)
    proc = _sample_job(digits_store.uri, str(den_dir), "models/foreign/classifier")
    assert proc.returncode == 2, proc.stderr
    (line,) = proc.stderr.strip().splitlines()  # one line, no traceback
    # the classifier as the driver resolved it in the store
    clf_dir = digits_store.join("models", "foreign", "classifier")
    assert line.startswith(f"error: classifier {clf_dir} fits ")
    assert (
        f"fits {card['accuracy']:.1%} of its own training bits at 0 <= t < 100 (model card: 32 "
        f"training rows, seed 0, mean |p - 1/2| {card['mean_margin']:.3f}), below min_fit 90%"
    ) in line
    assert "more --steps, a wider classifier" in line and "--allow-unfit" in line
    assert not digits_store.exists("samples", "foreign")  # refused before anything was written
    # allow_unfit samples with it; the samples' fingerprint does not depend on it
    res = run_sampling(
        digits_store.uri, "foreign", dataclasses.replace(sampler, allow_unfit=True),
        denoiser=str(den_dir), classifier="models/foreign/classifier",
    )  # fmt: skip
    assert res["num_samples"] == 4 and res["num_shards"] == 1
    assert digits_store.listdir("samples", "foreign", "cpsample") == ["shard-000000.tar"]
    provenance = sampling_provenance(sampler, "d", "c")
    assert (
        sampling_provenance(dataclasses.replace(sampler, allow_unfit=True), "d", "c") == provenance
    )
    assert sampling_provenance(dataclasses.replace(sampler, min_fit=0.6), "d", "c") == provenance


def _sample_job(store: str, denoiser: str, classifier: str) -> subprocess.CompletedProcess:
    """``jobs/sample.py --sampler cpsample`` as a real process (it refuses before starting Ray)."""
    cmd = [
        sys.executable, str(ROOT / "jobs" / "sample.py"), "--store", store, "--run", "foreign",
        "--sampler", "cpsample", "--denoiser", denoiser, "--classifier", classifier,
        "--num-samples", "4", "--samples-per-shard", "4", "--steps", "4",
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("RAY_ADDRESS", None)
    return subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)


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


# ---------------------------------------------------------------------------- streamed input
def test_ranks_with_unequal_streamed_shards_run_the_same_steps(ray_local, digits_store):
    """The loops are step-driven on exact per-worker batches: ranks whose shards differ in size (here
    9 and 14 of the training images, streamed every epoch: cache_max_bytes=0) run the same steps over
    different numbers of epochs; DDP would hang otherwise. Each rank's consumption is in the report."""
    import ray.train
    from ray.train.torch import TorchTrainer

    from pipeline.core.config import DenoiserTrainConfig, UNetConfig, to_dict
    from pipeline.train.ingest import training_dataset
    from pipeline.train.workers import denoiser_worker

    class UnequalShards(ray.train.DataConfig):
        """Rank r reads the first sizes[r] rows of each dataset (no split: unequal shards)."""

        def __init__(self, sizes: list[int]):
            super().__init__()
            self.sizes = sizes

        def configure(self, datasets, world_size, worker_handles, worker_node_ids, **kwargs):
            return [
                {name: ds.limit(self.sizes[r]).iterator() for name, ds in datasets.items()}
                for r in range(world_size)
            ]

    unet = UNetConfig(sample_size=16, block_out_channels=(8, 16), norm_num_groups=8)
    cfg = DenoiserTrainConfig(
        steps=4, batch_size=8, checkpoint_every=2, num_workers=2, warmup_steps=0,
        cache_max_bytes=0, shuffle_buffer=4,
    )  # fmt: skip
    trainer = TorchTrainer(
        denoiser_worker,
        train_loop_config={"unet": to_dict(unet), "train": to_dict(cfg), "threads": 1},
        scaling_config=ray.train.ScalingConfig(num_workers=2, resources_per_worker={"CPU": 0.5}),
        run_config=ray.train.RunConfig(
            name="unequal", storage_path=digits_store.join("checkpoints")
        ),
        datasets={"train": training_dataset(digits_store, "data/digits/train")},
        dataset_config=UnequalShards([9, 14]),
    )
    data = trainer.fit().metrics["data"]
    assert [d["step"] for d in data] == [4, 4]
    train = [d["train"] for d in data]
    assert [t["input"] for t in train] == ["stream", "stream"]
    assert [t["rows"] for t in train] == [16, 16]  # 4 steps of 4 rows on each rank
    # 16 rows: a pass over 9 rows and 7 of the next; a pass over 14 and 2 of the next
    assert [(t["epoch"], t["offset"], t["epochs"]) for t in train] == [(1, 7, 2), (1, 2, 2)]
    assert [t["rows_read"] for t in train] == [18, 28]  # read from the stream, pass by pass
