"""FD feature moments from a Ray Data actor pool: partial moments per batch, folded on the driver,
equal to the in-memory computation on the same images."""

from __future__ import annotations

import functools

import numpy as np
import pytest

from pipeline.data.imageset import ImageSet
from pipeline.data.shards import read_image_shards, write_image_shards
from pipeline.data.storage import open_store
from pipeline.evaluation.fid import frechet_distance_features
from pipeline.evaluation.moments import Moments, fold, frechet_distance_moments
from pipeline.fanout.features import (
    GpuUnavailableError,
    array_moments,
    block_moments,
    shard_moments,
    stack_decoded,
)


def toy_embedder(device: str, dim: int = 24):
    """A fixed nonlinear random projection of the pixels: (N, H, W, C) uint8 -> (N, dim)."""
    rng = np.random.default_rng(0)
    weights = {}

    def embed(images: np.ndarray) -> np.ndarray:
        flat = images.reshape(len(images), -1).astype(np.float64) / 255.0
        if flat.shape[1] not in weights:
            weights[flat.shape[1]] = rng.normal(size=(flat.shape[1], dim))
        return np.tanh(flat @ weights[flat.shape[1]])

    return embed


@pytest.fixture
def sample_store(tmp_path):
    store = open_store(str(tmp_path / "s"))
    rng = np.random.default_rng(3)
    images = rng.integers(0, 256, (23, 8, 8, 1), dtype=np.uint8)
    keys = [f"s-{i:04d}" for i in range(len(images))]
    write_image_shards(store, "samples/r/ddim", ImageSet(keys, images), shard_size=5)
    return store


def test_block_moments_are_one_partial_row_of_count_mean_and_m2():
    x = np.random.default_rng(0).normal(size=(7, 3))
    p = block_moments(x)
    assert p["count"].shape == (1,) and p["mean"].shape == (1, 3) and p["m2"].shape == (1, 3, 3)
    np.testing.assert_allclose(p["m2"][0] / 6, np.cov(x, rowvar=False), rtol=1e-12)
    with pytest.raises(ValueError, match=r"\(N, D\) rows with N > 0"):
        block_moments(np.zeros((0, 3)))
    grey = np.zeros((4, 4), np.uint8)
    rgb = np.ones((4, 4, 3), np.uint8)
    assert stack_decoded([grey, grey]).shape == (2, 4, 4, 1)
    assert stack_decoded([grey, rgb]).shape == (2, 4, 4, 3)


def test_streamed_fd_equals_in_memory_fd_and_the_driver_gets_only_partials(ray_local, sample_store):
    make = functools.partial(toy_embedder, dim=24)
    partials = list(shard_moments(sample_store, "samples/r/ddim", make, batch_size=4))
    # one moment object per batch of at most 4 images: never a feature row per image
    assert all(set(p) == {"count", "mean", "m2"} for p in partials)
    counts = [int(np.asarray(p["count"]).reshape(())) for p in partials]
    assert sum(counts) == 23 and max(counts) <= 4 and 6 <= len(partials) <= 23 // 4 + 5
    assert all(np.asarray(p["m2"]).shape == (24, 24) for p in partials)
    streamed = fold(Moments.from_partial(p) for p in partials)

    images = read_image_shards(sample_store, "samples/r/ddim").images
    feats = toy_embedder("cpu")(images)
    np.testing.assert_allclose(streamed.mean, feats.mean(0), rtol=1e-10)
    np.testing.assert_allclose(streamed.covariance(), np.cov(feats, rowvar=False), atol=1e-12)

    reference = np.random.default_rng(9).integers(0, 256, (11, 8, 8, 1), dtype=np.uint8)
    ref = fold(Moments.from_partial(p) for p in array_moments(reference, make, batch_size=3))
    assert ref.count == 11
    expected = frechet_distance_features(feats, toy_embedder("cpu")(reference))
    assert frechet_distance_moments(streamed, ref) == pytest.approx(expected, rel=1e-6)


def test_gpu_request_on_a_cluster_without_gpus_is_refused(ray_local, sample_store):
    with pytest.raises(GpuUnavailableError, match="the Ray cluster has no GPU"):
        next(shard_moments(sample_store, "samples/r/ddim", toy_embedder, use_gpu=True))
    with pytest.raises(ValueError, match=r"batch_size must be in \[1, 4096\]"):
        next(array_moments(np.zeros((2, 4, 4, 1), np.uint8), toy_embedder, batch_size=0))
