"""The local CLIP tokenizer and the small latent model builder: real classes, real layout, no download."""

from __future__ import annotations

import json

import pytest

from pipeline.core.config_base import ConfigError
from pipeline.core.latent_build import LatentArchConfig, clip_tokenizer


def test_tokenizer_is_byte_level_and_round_trips():
    tok = clip_tokenizer(24)
    assert len(tok) == 514
    ids = tok("a handwritten 3").input_ids
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
    assert len(ids) == len("ahandwritten3") + 2  # one token per character, spaces dropped
    assert tok.decode(ids, skip_special_tokens=True) == "a handwritten 3"
    assert tok("a handwritten 3").input_ids != tok("a handwritten 8").input_ids
    padded = tok(["x"], padding="max_length", max_length=24, truncation=True).input_ids[0]
    assert len(padded) == 24


def test_saved_layout_is_a_stable_diffusion_directory(tiny_sd_dir):
    names = {p.name for p in tiny_sd_dir.iterdir()}
    assert {"model_index.json", "unet", "vae", "text_encoder", "tokenizer", "scheduler"} <= names
    index = json.loads((tiny_sd_dir / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline"
    sched = json.loads((tiny_sd_dir / "scheduler" / "scheduler_config.json").read_text())
    assert sched["_class_name"] == "DDIMScheduler" and sched["set_alpha_to_one"] is False
    assert json.loads((tiny_sd_dir / "unet" / "config.json").read_text())["in_channels"] == 4


def test_config_validation():
    assert LatentArchConfig(image_size=32, vae_channels=(8, 16, 16)).latent_size == 8
    with pytest.raises(ConfigError, match="divisible by 4"):
        LatentArchConfig(image_size=18, vae_channels=(8, 16, 16))
    with pytest.raises(ConfigError, match="image_channels"):
        LatentArchConfig(image_channels=2)
    with pytest.raises(ConfigError, match="not divisible"):
        LatentArchConfig(unet_channels=(30, 64))
