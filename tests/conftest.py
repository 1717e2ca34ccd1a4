"""Shared fixtures for the Ray-free core tests (Ray fixtures live in conftest_ray.py)."""

from __future__ import annotations

import pytest
import torch

from pipeline.config import ClassifierArchConfig, UNetConfig


@pytest.fixture(autouse=True, scope="session")
def _core_single_thread():
    """The test machine is shared: keep torch on one thread."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture
def core_tiny_unet_cfg() -> UNetConfig:
    """A diffusers UNet2DModel small enough to run in milliseconds on 8x8 images."""
    return UNetConfig(
        sample_size=8,
        channels=1,
        block_out_channels=(8, 16),
        layers_per_block=1,
        attention_levels=(),
        norm_num_groups=8,
    )


@pytest.fixture
def core_tiny_clf_cfg() -> ClassifierArchConfig:
    """A NoiseClassifier for 8x8 grayscale images."""
    return ClassifierArchConfig(
        sample_size=8,
        channels=1,
        base_channels=8,
        channel_mults=(1, 2),
        time_embed_dim=8,
        num_groups=4,
    )
