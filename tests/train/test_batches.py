"""Rows as model inputs: images mapped to [-1, 1], latents as they are, pooled text embeddings."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.core.labels import random_bits
from pipeline.data.imageset import DataError
from pipeline.train.batches import batch_bits, batch_images, batch_pooled

CPU = torch.device("cpu")


def test_images_are_mapped_to_unit_range_and_latents_kept_as_they_are():
    image = np.zeros((2, 4, 4, 1), np.uint8)
    image[1] = 255
    x = batch_images({"key": np.asarray(["a", "b"]), "image": image}, CPU)
    assert x.shape == (2, 1, 4, 4) and float(x[0].max()) == -1.0 and float(x[1].min()) == 1.0
    latent = np.linspace(-6, 6, 2 * 4 * 8 * 8, dtype=np.float32).reshape(2, 4, 8, 8)
    z = batch_images({"key": np.asarray(["a", "b"]), "latent": latent}, CPU)
    assert z.dtype == torch.float32 and torch.equal(z, torch.from_numpy(latent))  # no [-1, 1] map
    z[0, 0, 0, 0] = 99.0
    assert latent[0, 0, 0, 0] == -6.0  # a copy: the rows stay as Ray Data delivered them


def test_pooled_embeddings_and_bits_of_a_batch():
    keys = np.asarray(["a", "b", "c"], dtype=object)
    pooled = np.arange(6, dtype=np.float16).reshape(3, 2)
    c = batch_pooled({"key": keys, "pooled": pooled}, CPU)
    assert c.dtype == torch.float32 and c.tolist() == [[0, 1], [2, 3], [4, 5]]
    assert torch.equal(batch_pooled({"pooled": torch.ones(3, 2, dtype=torch.float64)}, CPU),
                       torch.ones(3, 2))  # fmt: skip
    with pytest.raises(DataError, match=r"no pooled text embedding.*<key>\.pooled\.npy"):
        batch_pooled({"key": keys, "latent": np.zeros((3, 4, 8, 8), np.float32)}, CPU)
    assert torch.equal(batch_bits({"key": keys}, 7, CPU), random_bits(list(keys), 7))
    assert torch.equal(batch_bits({"y": torch.ones(3)}, 7, CPU), torch.ones(3))
