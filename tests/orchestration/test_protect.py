"""What the classifier is trained for (Ray-free): image or latent inputs, the protected model's
schedule and shape, text conditioning, and the clear errors when they do not fit together."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from pipeline.core.config import ClassifierArchConfig, ConfigError
from pipeline.data.provenance import dir_digest
from pipeline.data.shards import write_manifest
from pipeline.data.storage import open_store
from pipeline.orchestration.protect import classifier_target, latent_shape

LATENT = {"scaling_factor": 0.18215, "latent_shape": [4, 8, 8], "pooled_dim": 32}


def _store(tmp_path: Path):
    """A store with two manifests (no shards are needed here): ``img`` 1x16x16 images and ``lat``
    4x8x8 latents with 32-dim pooled text embeddings."""
    store = open_store(str(tmp_path / "store"))
    splits = {"train": {"count": 4, "shards": []}}
    write_manifest(store, "img", {"image_size": [16, 16], "channels": 1, "splits": splits})
    latent = {"image_size": [8, 8], "channels": 4, "latent": LATENT, "splits": splits}
    write_manifest(store, "lat", latent)
    return store


def _sd_configs(path: Path, in_channels: int = 4, sample_size: int = 8) -> Path:
    """The two configs of a Stable Diffusion directory that the classifier reads: no weights."""
    (path / "unet").mkdir(parents=True)
    (path / "scheduler").mkdir()
    unet = {"in_channels": in_channels, "sample_size": sample_size}
    (path / "unet" / "config.json").write_text(json.dumps(unet))
    scheduler = {"_class_name": "DDIMScheduler", "beta_schedule": "scaled_linear",
                 "beta_start": 0.00085, "beta_end": 0.012, "num_train_timesteps": 1000,
                 "steps_offset": 1}  # fmt: skip
    (path / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler))
    return path


def test_latent_target_takes_the_shape_from_the_data_and_the_schedule_from_the_model(tmp_path):
    store, sd = _store(tmp_path), _sd_configs(tmp_path / "sd")
    target = classifier_target(store, "lat", ClassifierArchConfig(), model=str(sd))
    assert (target.arch.channels, target.arch.sample_size, target.arch.cond_dim) == (4, 8, 0)
    assert target.betas[0] == pytest.approx(0.00085) and target.betas[-1] == pytest.approx(0.012)
    assert target.inputs == {"model": dir_digest(sd)}
    assert target.latent == {"scaling_factor": 0.18215, "model": str(sd), "cond_dim": 0}
    # how the model reads its schedule, recorded beside the betas' digest
    assert target.reading == {
        "prediction_type": "epsilon",
        "timestep_spacing": "leading",
        "steps_offset": 1,
    }
    text = classifier_target(store, "lat", ClassifierArchConfig(), model=str(sd), text_cond=True)
    assert text.arch.cond_dim == 32 and text.latent["cond_dim"] == 32
    explicit = classifier_target(store, "lat", ClassifierArchConfig(cond_dim=32), model=str(sd))
    assert explicit.arch == text.arch


def test_latents_without_a_model_train_on_the_linear_schedule_with_a_warning(tmp_path, caplog):
    store = _store(tmp_path)
    with caplog.at_level(logging.WARNING, logger="pipeline.orchestration.protect"):
        target = classifier_target(store, "lat", ClassifierArchConfig())
    assert "no model was given" in caplog.text
    assert target.betas is None and target.inputs == {"model": None}
    assert target.reading is None  # DDPM's: epsilon, leading
    assert (target.arch.channels, target.arch.sample_size) == (4, 8)


def test_pixel_datasets_are_unchanged(tmp_path):
    store = _store(tmp_path)
    target = classifier_target(store, "img", ClassifierArchConfig(), betas=[0.1] * 10)
    assert target.arch == ClassifierArchConfig() and target.betas == [0.1] * 10
    assert target.inputs == {"denoiser": None} and target.latent is None
    assert target.reading is None


@pytest.mark.parametrize(
    ("dataset", "kwargs", "message"),
    [
        ("img", {"model": "sd"}, "holds images, not latents"),
        ("img", {"text_cond": True}, "holds images, not latents"),
        ("lat", {"denoiser": "den"}, r"holds latents: give the Stable Diffusion directory"),
        ("lat", {"denoiser": "den", "model": "sd"}, "not both"),
        (
            "lat",
            {"arch": ClassifierArchConfig(cond_dim=16)},
            r"cond_dim 16 needs pooled text embeddings.*= 32",
        ),
        ("lat", {"model": "channels8"}, r"\(4, 8, 8\) but the unet of model .* \(8, 8, 8\)"),
        ("lat", {"model": "size16"}, r"\(4, 8, 8\) but the unet of model .* \(4, 16, 16\)"),
    ],
)
def test_mismatches_are_config_errors(tmp_path, dataset, kwargs, message):
    store = _store(tmp_path)
    models = {"channels8": (8, 8), "size16": (4, 16)}
    if kwargs.get("model") in models:
        path = _sd_configs(tmp_path / kwargs["model"], *models[kwargs["model"]])
        kwargs = {**kwargs, "model": str(path)}
    arch = kwargs.pop("arch", ClassifierArchConfig())
    with pytest.raises(ConfigError, match=message):
        classifier_target(store, dataset, arch, **kwargs)


def test_text_conditioning_needs_pooled_embeddings_in_the_data(tmp_path):
    store = open_store(str(tmp_path / "store"))
    no_text = {**LATENT, "pooled_dim": 0}
    splits = {"train": {"count": 1, "shards": []}}
    write_manifest(store, "bare", {"channels": 4, "latent": no_text, "splits": splits})
    with pytest.raises(ConfigError, match=r"text conditioning needs .*latent\.pooled_dim = none"):
        classifier_target(store, "bare", ClassifierArchConfig(), text_cond=True)


def test_latent_shape_falls_back_to_channels_and_image_size():
    assert latent_shape({"latent": LATENT}) == (4, 8, 8)
    assert latent_shape({"channels": 16, "image_size": [4, 4], "latent": {}}) == (16, 4, 4)


def test_an_opened_dataset_is_not_read_again(tmp_path):
    from pipeline.data.handle import open_dataset
    from pipeline.orchestration.protect import check_image_shape
    from tests.data.test_handle import counting_store

    _store(tmp_path)
    store = counting_store(tmp_path / "store")
    lat, img = open_dataset(store, "lat"), open_dataset(store, "img")
    target = classifier_target(store, lat, ClassifierArchConfig())
    assert (target.arch.channels, target.arch.sample_size) == (4, 8)
    assert classifier_target(store, img, ClassifierArchConfig()).latent is None
    with pytest.raises(ConfigError, match=r"dataset 'img' has images \(C, H, W\) = \(1, 16, 16\)"):
        check_image_shape(store, img, 3, 16, "denoiser (unet)")
    assert store.manifest_reads() == 2  # the two opens
    classifier_target(store, "lat", ClassifierArchConfig())  # a name: opened here
    assert store.manifest_reads() == 3
