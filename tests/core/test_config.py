"""Typed configs: unknown keys, types, ranges, dict/YAML round trips."""

from __future__ import annotations

import json

import pytest

from pipeline.core.config import (
    MIN_FIT,
    ClassifierArchConfig,
    ClassifierTrainConfig,
    ConfigError,
    DemoConfig,
    DenoiserTrainConfig,
    ReplicaConfig,
    SamplerConfig,
    UNetConfig,
    from_dict,
    load_yaml,
    to_dict,
)
from pipeline.core.models import NoiseClassifier


def test_unknown_key_lists_bad_key_and_allowed():
    with pytest.raises(ConfigError, match="unknown config key") as info:
        from_dict(SamplerConfig, {"alpah": 0.1, "steps": 10})
    msg = str(info.value)
    assert "'alpah'" in msg
    assert "allowed" in msg
    assert "'alpha'" in msg


def test_nested_unknown_key_is_qualified():
    with pytest.raises(ConfigError, match=r"unet\.depth"):
        from_dict(DemoConfig, {"unet": {"depth": 3}})


@pytest.mark.parametrize(
    ("cls", "data", "fragment"),
    [
        (SamplerConfig, {"steps": "10"}, "steps must be of type int"),
        (SamplerConfig, {"steps": 10.0}, "steps must be of type int"),
        (SamplerConfig, {"steps": True}, "steps must be of type int"),
        (SamplerConfig, {"alpha": "0.1"}, "alpha must be of type float"),
        (SamplerConfig, {"clip_sample": 1}, "clip_sample must be of type bool"),
        (SamplerConfig, {"allow_unfit": "yes"}, "allow_unfit must be of type bool"),
        (SamplerConfig, {"sampler": 3}, "sampler must be of type str"),
        (UNetConfig, {"block_out_channels": 8}, "block_out_channels must be a list"),
        (UNetConfig, {"block_out_channels": [8, "16"]}, "block_out_channels must be of type int"),
        (DemoConfig, {"denoiser": {"lr": "fast"}}, r"denoiser\.lr must be of type float"),
    ],
)
def test_wrong_types_rejected(cls, data, fragment):
    with pytest.raises(ConfigError, match=fragment):
        from_dict(cls, data)


@pytest.mark.parametrize(
    ("cls", "data", "fragment"),
    [
        (SamplerConfig, {"alpha": 0.0}, r"alpha must be in \(0, 0.5\]"),
        (SamplerConfig, {"alpha": 0.6}, r"alpha must be in \(0, 0.5\]"),
        (SamplerConfig, {"alpha": float("nan")}, "alpha must be in"),
        (SamplerConfig, {"scale": -1.0}, "scale must be >= 0"),
        (SamplerConfig, {"eta": -0.5}, "eta must be >= 0"),
        (SamplerConfig, {"steps": 0}, r"steps must be in \[1, 1000\]"),
        (SamplerConfig, {"steps": 1001}, r"steps must be in \[1, 1000\]"),
        (SamplerConfig, {"sampler": "ddpm"}, "sampler must be 'ddim' or 'cpsample'"),
        (SamplerConfig, {"input_mode": "x"}, "input_mode must be"),
        (SamplerConfig, {"batch_size": 0}, "batch_size must be > 0"),
        (SamplerConfig, {"min_fit": 0.5}, r"min_fit must be in \(0.5, 1\] \(an accuracy on random"),
        (SamplerConfig, {"min_fit": 1.01}, r"min_fit must be in \(0.5, 1\]"),
        (SamplerConfig, {"min_fit": float("nan")}, r"min_fit must be in \(0.5, 1\]"),
        (DenoiserTrainConfig, {"steps": 0}, "steps must be > 0"),
        (DenoiserTrainConfig, {"lr": -1e-3}, "lr must be > 0"),
        (DenoiserTrainConfig, {"ema_decay": 1.0}, r"ema_decay must be in \[0, 1\)"),
        (DenoiserTrainConfig, {"max_failures": -2}, "max_failures must be >= -1"),
        (ClassifierTrainConfig, {"t_max": 0}, r"t_max must be in \[1, 1000\]"),
        (ClassifierTrainConfig, {"mixup": 1.5}, r"mixup must be in \[0, 1\]"),
        (ClassifierTrainConfig, {"train_fraction": 1.0}, r"train_fraction must be in \[0, 1\)"),
        (DenoiserTrainConfig, {"cache_max_bytes": -1}, r"cache_max_bytes must be >= 0 \(0: always"),
        (ClassifierTrainConfig, {"cache_max_bytes": -1}, "cache_max_bytes must be >= 0"),
        (DenoiserTrainConfig, {"shuffle_buffer": 0}, "shuffle_buffer must be > 0"),
        (ClassifierTrainConfig, {"metrics_samples": 0}, "metrics_samples must be > 0"),
        (ClassifierTrainConfig, {"metrics_batch": 0}, "metrics_batch must be > 0"),
        (ClassifierTrainConfig, {"sized_for": -1}, r"sized_for must be >= 0 \(0: not sized\)"),
        (
            UNetConfig,
            {"block_out_channels": [12, 16], "norm_num_groups": 8},
            "divisible by norm_num_groups",
        ),
        (UNetConfig, {"block_out_channels": []}, "block_out_channels must not be empty"),
        (UNetConfig, {"channels": 2}, "channels must be 1 or 3"),
        (UNetConfig, {"attention_levels": [3]}, r"attention_levels entries must be in \[0, 3\)"),
        (
            UNetConfig,
            {"sample_size": 18},
            "sample_size 18 must be divisible by 2\\*\\*\\(levels-1\\) = 4",
        ),
        (UNetConfig, {"sample_size": 2}, "sample_size must be >= 4"),
        (ClassifierArchConfig, {"base_channels": 12}, "divisible by num_groups 8"),
        (ClassifierArchConfig, {"channels": 17}, r"channels must be in \[1, 16\], got 17"),
        (ClassifierArchConfig, {"channels": 0}, r"channels must be in \[1, 16\]"),
        (ClassifierArchConfig, {"cond_dim": -1}, "cond_dim must be >= 0"),
        (ClassifierArchConfig, {"sample_size": 10}, "sample_size 10 must be divisible by 4"),
        (ReplicaConfig, {"threshold": 1.5}, r"threshold must be in \[-1, 1\]"),
        (ReplicaConfig, {"index": "hnsw"}, "index must be 'flat' or 'ivf'"),
        (DemoConfig, {"num_train": 1}, "num_train must be >= 2"),
        (DemoConfig, {"sampler": {"alpha": 0.9}}, "alpha must be in"),
    ],
)
def test_out_of_range_rejected(cls, data, fragment):
    with pytest.raises(ConfigError, match=fragment):
        from_dict(cls, data)


def test_min_fit_and_allow_unfit_defaults_and_bounds():
    cfg = SamplerConfig()
    assert cfg.min_fit == MIN_FIT == 0.9 and cfg.allow_unfit is False
    assert SamplerConfig(min_fit=1.0).min_fit == 1.0  # the upper bound is allowed
    assert from_dict(SamplerConfig, {"min_fit": 0.51, "allow_unfit": True}).allow_unfit is True


def test_training_restarts_after_worker_failures_by_default():
    """A lost worker restarts the group from the last checkpoint (twice) unless a run says otherwise;
    -1 is no limit, below it is refused."""
    for cls in (DenoiserTrainConfig, ClassifierTrainConfig):
        assert cls().max_failures == 2
        assert from_dict(cls, {"max_failures": -1}).max_failures == -1
        assert from_dict(cls, {"max_failures": 0}).max_failures == 0
        with pytest.raises(ConfigError, match="max_failures must be >= -1"):
            from_dict(cls, {"max_failures": -3})


def test_int_coerced_to_float():
    cfg = from_dict(SamplerConfig, {"scale": 2, "alpha": 0.25})
    assert cfg.scale == 2.0
    assert isinstance(cfg.scale, float)


def test_round_trip_through_dict_and_json():
    cfg = DemoConfig(
        num_train=32,
        unet=UNetConfig(sample_size=8, block_out_channels=(8, 16), attention_levels=(1,)),
        sampler=SamplerConfig(sampler="ddim", alpha=0.1, scale=0.0, steps=20),
        classifier=ClassifierTrainConfig(mixup=0.2),
    )
    d = to_dict(cfg)
    assert d["unet"]["block_out_channels"] == [8, 16]  # tuples become lists
    assert d["sampler"]["alpha"] == 0.1
    back = from_dict(DemoConfig, json.loads(json.dumps(d)))
    assert back == cfg
    assert isinstance(back.unet, UNetConfig)
    assert back.unet.block_out_channels == (8, 16)
    assert from_dict(DemoConfig, None) == DemoConfig()


def test_load_yaml(tmp_path):
    p = tmp_path / "demo.yaml"
    p.write_text(
        "num_train: 40\nunet:\n  sample_size: 8\n  block_out_channels: [8, 16]\n  attention_levels: []\n"
    )
    cfg = load_yaml(DemoConfig, p)
    assert cfg.num_train == 40
    assert cfg.unet == UNetConfig(sample_size=8, block_out_channels=(8, 16), attention_levels=())
    assert cfg.sampler == SamplerConfig()

    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    assert load_yaml(SamplerConfig, empty) == SamplerConfig()

    lst = tmp_path / "list.yaml"
    lst.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="top level must be a mapping, got list"):
        load_yaml(SamplerConfig, lst)

    bad = tmp_path / "bad.yaml"
    bad.write_text("sampler:\n  alpha: 0.7\n")
    with pytest.raises(ConfigError, match="alpha"):
        load_yaml(DemoConfig, bad)


# ----------------------------------------------------------------------- known validation gaps (bugs)
def test_unet_zero_groups_is_config_error():
    with pytest.raises(ConfigError, match="norm_num_groups"):
        from_dict(UNetConfig, {"norm_num_groups": 0})


def test_nested_config_must_be_mapping():
    with pytest.raises(ConfigError, match="unet"):
        from_dict(DemoConfig, {"unet": 5})


def test_classifier_arch_takes_latent_channels_and_a_text_embedding_size():
    """Stable Diffusion latents have 4 channels; cond_dim > 0 adds the pooled text embedding."""
    cfg = from_dict(ClassifierArchConfig, {"channels": 4, "sample_size": 8, "cond_dim": 32})
    assert (cfg.channels, cfg.cond_dim) == (4, 32)
    assert ClassifierArchConfig().cond_dim == 0  # unconditioned unless asked
    assert from_dict(ClassifierArchConfig, to_dict(cfg)) == cfg


def test_classifier_arch_validation_covers_first_block():
    try:
        cfg = ClassifierArchConfig(
            sample_size=8, base_channels=12, channel_mults=(2, 4), num_groups=8
        )
    except ConfigError:
        return
    NoiseClassifier(cfg)  # a config that validates must build


def test_the_shipped_demo_configs_load_and_validate():
    from pathlib import Path

    from pipeline.core.config import DemoConfig, load_yaml

    root = Path(__file__).resolve().parents[2] / "configs"
    paths = sorted(root.glob("*.yaml"))
    assert paths, "configs/*.yaml missing"
    loaded = {p.name: load_yaml(DemoConfig, p) for p in paths}
    strong = loaded["demo-strong.yaml"]
    assert strong.denoiser.steps == 2 * DemoConfig().denoiser.steps
    assert strong.sweep.scales == (3.0, 7.0, 10.0, 15.0)
