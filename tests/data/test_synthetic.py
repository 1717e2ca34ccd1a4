"""Procedural images and the PNG encoder (pipeline.data.synthetic): deterministic, varied, lossless."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from pipeline.data.synthetic import png_bytes, synthetic_image


def _centred_cosines(images: np.ndarray) -> np.ndarray:
    x = images.reshape(len(images), -1).astype(np.float64)
    x -= x.mean(1, keepdims=True)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    sims = x @ x.T
    np.fill_diagonal(sims, -1)
    return sims


def test_synthetic_images_are_deterministic_varied_and_encode_losslessly():
    a = synthetic_image(7, 12, 32)
    assert a.shape == (32, 32, 3) and a.dtype == np.uint8
    np.testing.assert_array_equal(a, synthetic_image(7, 12, 32))
    assert png_bytes(a) == png_bytes(synthetic_image(7, 12, 32))  # same bytes
    assert not np.array_equal(a, synthetic_image(7, 13, 32))
    assert not np.array_equal(a, synthetic_image(8, 12, 32))
    images = np.stack([synthetic_image(0, i, 32) for i in range(400)])
    assert _centred_cosines(images).max() < 0.97  # nearest neighbours are meaningful
    assert synthetic_image(0, 5, 7).shape == (7, 7, 3)
    for img in (a, images[3][:5, :9], np.arange(35, dtype=np.uint8).reshape(5, 7, 1)):
        back = np.asarray(Image.open(io.BytesIO(png_bytes(img))))
        np.testing.assert_array_equal(back.reshape(img.shape), img)
