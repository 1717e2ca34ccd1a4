"""Same-seed displacement: untouched pairs measure 0, swapped pictures measure like unrelated samples."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.data.imageset import DataError, ImageSet
from pipeline.evaluation.displacement import displacement, pair_by_seed, pixel_change


def _set(sampler: str, images: np.ndarray, order: list[int]) -> ImageSet:
    keys = [f"{sampler}-000000-{i:05d}" for i in order]
    return ImageSet(keys, images[order])


def test_pairs_follow_the_seed_suffix_not_the_order():
    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 256, (5, 4, 4, 1), dtype=np.uint8)
    a, b, common = pair_by_seed(
        _set("ddim", imgs, [0, 1, 2, 3, 4]), _set("cpsample", imgs, [4, 2, 0, 3, 1])
    )
    assert common == [f"000000-{i:05d}" for i in range(5)]
    assert np.array_equal(a, b)
    with pytest.raises(DataError, match="share no seeds"):
        pair_by_seed(_set("ddim", imgs[:1], [0]), ImageSet(["cpsample-000009-00000"], imgs[:1]))


def test_pixel_change_is_the_mean_absolute_difference_in_unit_range():
    x = np.zeros((2, 2, 2, 1), np.uint8)
    y = x.copy()
    y[1, 0, 0, 0] = 255
    assert pixel_change(x, y).tolist() == [0.0, 0.25]


def test_far_pairs_untouched_and_near_pairs_replaced_are_told_apart():
    rng = np.random.default_rng(1)
    ddim = rng.integers(0, 256, (40, 8, 8, 1), dtype=np.uint8)
    guided = ddim.copy()
    sims = np.full(40, 0.5)
    sims[:10] = 0.99  # the first ten DDIM samples are copies: CPSample draws other pictures there
    guided[:10] = rng.integers(0, 256, (10, 8, 8, 1), dtype=np.uint8)
    out = displacement(ddim, guided, sims, threshold=0.97, far_below=0.8)
    assert out["near"]["count"] == 10 and out["far"]["count"] == 30
    assert out["far"]["mean"] == 0.0 and out["far"]["relative"] == 0.0
    assert 0.8 < out["near"]["relative"] < 1.2  # as different as an unrelated sample
    assert out["all"]["count"] == 40 and out["all"]["mean"] == pytest.approx(
        out["near"]["mean"] / 4
    )
    with pytest.raises(DataError, match="aligned pairs"):
        displacement(ddim, guided[:5], sims, 0.97, 0.8)
