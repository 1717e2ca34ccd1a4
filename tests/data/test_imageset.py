"""The in-memory image set: validation and the uint8 <-> [-1, 1] tensor round trip."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.data.imageset import DataError, ImageSet, images_from_tensor


def _random_set(n=20, size=8, channels=1, seed=0, labels=True) -> ImageSet:
    rng = np.random.default_rng(seed)
    return ImageSet(
        keys=[f"img-{i:03d}" for i in range(n)],
        images=rng.integers(0, 256, (n, size, size, channels), dtype=np.uint8),
        labels=[int(v) for v in rng.integers(0, 10, n)] if labels else None,
    )


def test_image_set_validation():
    with pytest.raises(DataError, match="2 keys for 3 images"):
        ImageSet(keys=["a", "b"], images=np.zeros((3, 4, 4, 1), np.uint8))
    with pytest.raises(DataError, match="duplicate keys"):
        ImageSet(keys=["a", "a"], images=np.zeros((2, 4, 4, 1), np.uint8))


def test_tensor_round_trip():
    ds = _random_set(channels=3)
    x = ds.to_tensor()
    assert x.shape == (20, 3, 8, 8)
    assert x.min() >= -1 and x.max() <= 1
    np.testing.assert_array_equal(images_from_tensor(x), ds.images)
    np.testing.assert_array_equal(
        images_from_tensor(torch.full((1, 1, 2, 2), 5.0)), np.full((1, 2, 2, 1), 255)
    )
