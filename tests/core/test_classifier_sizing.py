"""Sizing the classifier from N (pipeline/core/classifier_sizing.py): the rule's arithmetic, its floor
at the calibrated defaults, and that its fit constants are the ones the bench recorded."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from pipeline.core.classifier_sizing import (
    MARGIN,
    SCALING_FITS,
    WidthFit,
    images_with_bits,
    size_classifier,
)
from pipeline.core.config import ConfigError
from pipeline.core.labels import holdout_fraction

RESULTS = Path(__file__).resolve().parents[2] / "bench" / "results.json"

# narrow is cheap per image but its steps grow faster: wide wins above N = (100 / 1) ** (1 / 0.5)
FITS = (
    WidthFit(base_channels=16, a=1.0, k=1.5, n_max=4096, train_flops=1.0),
    WidthFit(base_channels=32, a=1.0, k=1.0, n_max=4096, train_flops=100.0),
)


def test_the_cheapest_width_wins_and_steps_are_the_margin_times_the_fit():
    small = size_classifier(100, fits=FITS, min_steps=1, margin=2.0)
    assert small.base_channels == 16  # 100^1.5 x 1 = 1,000 < 100 x 100 = 10,000
    assert small.predicted_steps_to_95 == 1000 and small.steps == 2000
    large = size_classifier(1_000_000, fits=FITS, min_steps=1, margin=2.0)
    assert large.base_channels == 32  # 1e9 x 1 > 1e6 x 100
    assert large.predicted_steps_to_95 == 1_000_000 and large.steps == 2_000_000
    assert "extrapolated beyond N=4096" in large.reason and "base_channels 32" in large.reason


def test_a_fit_is_not_extrapolated_past_a_wider_measurement():
    short = (WidthFit(16, a=1.0, k=1.0, n_max=1024, train_flops=1.0), FITS[1])
    assert size_classifier(1000, fits=short, min_steps=1).base_channels == 16
    # past N=1,024 only width 32 was measured: it is chosen although 16's fit predicts less
    assert size_classifier(2000, fits=short, min_steps=1).base_channels == 32
    assert size_classifier(10**6, fits=short, min_steps=1).base_channels == 32


def test_steps_round_up_to_100_and_scale_with_the_batch():
    s = size_classifier(101, fits=FITS[1:], min_steps=1, margin=1.0)
    assert s.steps == 200  # 101 steps -> 200
    half = size_classifier(1000, batch_size=64, fits=FITS[1:], min_steps=1, margin=1.0)
    assert half.predicted_steps_to_95 == 2000  # the same images seen at half the batch


def test_sizing_never_goes_below_the_calibrated_defaults():
    s = size_classifier(10, fits=FITS, min_steps=1600, min_width=32)
    assert (s.base_channels, s.steps) == (32, 1600)
    # the job's defaults at the demo's scale (64 training + 1,000 held-out bits): the calibrated
    # classifier, base_channels 16 and 1,600 steps
    demo = size_classifier(images_with_bits(64, 1797 - 64, 1000))
    assert (demo.base_channels, demo.steps) == (16, 1600)


def test_bad_inputs_name_the_problem():
    with pytest.raises(ConfigError, match=r"n \(images with random bits\) must be >= 1"):
        size_classifier(0)
    with pytest.raises(ConfigError, match="batch_size must be > 0"):
        size_classifier(10, batch_size=0)
    with pytest.raises(
        ConfigError, match=r"no measured width >= min_width 64 \(measured: \[16, 32\]"
    ):
        size_classifier(10, fits=FITS, min_width=64)
    with pytest.raises(ConfigError, match="image counts must be >= 0"):
        images_with_bits(-1, 0, 0)


def test_images_with_bits_counts_the_held_out_bits_as_the_stage_does():
    assert images_with_bits(500, 0, 1000) == 500
    assert images_with_bits(64, 1733, 1000) == 64 + round(1733 * holdout_fraction(1000, 1733))
    assert images_with_bits(64, 1733, 1000) == 1064
    assert images_with_bits(10, 5, 1000) == 14  # at most all but one held-out image


def test_the_fits_are_the_ones_the_bench_recorded():
    entry = json.loads(RESULTS.read_text())["classifier_scaling"]
    for f in SCALING_FITS:
        rec = entry["fits"][str(f.base_channels)]
        assert (f.a, f.k, f.n_max) == (rec["a"], rec["k"], rec["n_max"])
        assert f.train_flops == entry["train_flops_by_width"][str(f.base_channels)]
        # the recorded points lie near the fitted line (within a factor of 2)
        for n, steps in rec["points"]:
            assert 0.5 < f.steps_to_95(n) / steps < 2.0
    assert MARGIN >= 1.0 and math.isfinite(MARGIN)
