"""The evaluation configs: EvalConfig, SweepConfig and CompareConfig (re-exported by core.config)."""

from __future__ import annotations

import pytest

from pipeline.core import config, config_eval
from pipeline.core.config import CompareConfig, ConfigError, DemoConfig, from_dict


def test_reexported_from_core_config():
    for name in ("EvalConfig", "SweepConfig", "CompareConfig"):
        assert getattr(config, name) is getattr(config_eval, name)
    assert DemoConfig().compare == CompareConfig()
    assert CompareConfig().contenders == config_eval.CONTENDER_NAMES


def test_compare_config_validation_and_yaml():
    cfg = from_dict(DemoConfig, {"compare": {"contenders": ["ddim", "amg"], "num_samples": 8}})
    assert cfg.compare == CompareConfig(contenders=("ddim", "amg"), num_samples=8)
    assert CompareConfig(contenders=()).contenders == ()  # off
    for bad, match in (
        ({"contenders": ("amg",)}, "must include 'ddim'"),
        ({"contenders": ("ddim", "dpm")}, r"unknown \['dpm'\]"),
        ({"contenders": ("ddim", "ddim")}, "repeats a name"),
        ({"num_samples": 0}, "num_samples"),
    ):
        with pytest.raises(ConfigError, match=match):
            CompareConfig(**bad)
    with pytest.raises(ConfigError, match=r"unknown config key\(s\) \['compare.seeds'\]"):
        from_dict(DemoConfig, {"compare": {"seeds": [0, 1]}})


def test_eval_and_sweep_configs_still_validate():
    with pytest.raises(ConfigError, match="pia_t"):
        config.EvalConfig(pia_t=1000)
    with pytest.raises(ConfigError, match="alphas entries"):
        config.SweepConfig(alphas=(0.7,))
