"""The latent scenario's configuration: validation, seed offsets, YAML through jobs/demo.py."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from pipeline.core.config import ConfigError
from pipeline.orchestration.latent_config import (
    LatentDemoConfig,
    LatentUNetFitConfig,
    VAEFitConfig,
    latent_config,
)

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "jobs"))


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: LatentDemoConfig(cfg_scale=-1.0), "cfg_scale"),
        (lambda: LatentDemoConfig(num_train=1), "num_train"),
        (lambda: LatentDemoConfig(sample_concurrency=0), "sample_concurrency"),
        (lambda: VAEFitConfig(kl_weight=-0.1), "kl_weight"),
        (lambda: LatentUNetFitConfig(cond_dropout=1.5), "cond_dropout"),
        (lambda: LatentUNetFitConfig(lr_schedule="step"), "lr_schedule"),
    ],
)
def test_bad_latent_configs_name_the_field(make, match):
    with pytest.raises(ConfigError, match=match):
        make()


def test_seed_offsets_every_seed_and_quick_shrinks_every_stage():
    base, one = latent_config(0), latent_config(1)
    assert (one.seed, one.split_seed) == (base.seed + 1, base.split_seed + 1)
    assert one.vae.seed == base.vae.seed + 1 and one.unet.seed == base.unet.seed + 1
    assert one.classifier.label_seed == base.classifier.label_seed + 1
    assert one.classifier.seed == base.classifier.seed + 1
    quick = latent_config(0, quick=True)
    for part in ("vae", "unet", "classifier"):
        assert getattr(quick, part).steps < getattr(base, part).steps
    assert quick.sampler.num_samples < base.sampler.num_samples
    assert base.sampler.scale == 30.0 and base.cfg_scale == 3.0  # the calibrated defaults
    # the quick classifier may be too short to fit its bits: it is sampled with knowingly
    assert quick.sampler.allow_unfit is True and base.sampler.allow_unfit is False


def test_yaml_config_for_the_latent_scenario(tmp_path):
    from demo import build_config, parse_args

    path = tmp_path / "lat.yaml"
    path.write_text("cfg_scale: 5.0\nunet:\n  steps: 100\nsampler:\n  scale: 12.0\n")
    cfg = build_config(parse_args(["--out", "o", "--scenario", "latent", "--config", str(path),
                                   "--seed", "2", "--alpha", "0.3"]))  # fmt: skip
    assert isinstance(cfg, LatentDemoConfig)
    assert (cfg.cfg_scale, cfg.unet.steps, cfg.sampler.scale, cfg.sampler.alpha) == (
        5,
        100,
        12,
        0.3,
    )
    assert cfg.seed == 2 and cfg.unet.seed == 2
    path.write_text("unet:\n  stepz: 3\n")
    with pytest.raises(ConfigError, match="stepz"):
        build_config(parse_args(["--out", "o", "--scenario", "latent", "--config", str(path)]))
