"""Shared fixtures: tiny model configs, a real in-process Ray, the digits store, loopback S3."""

from __future__ import annotations

import pytest
import torch

from pipeline.core.config import ClassifierArchConfig, UNetConfig


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


@pytest.fixture(scope="session")
def ray_local():
    """A real in-process local Ray with 2 CPUs, shared by the Ray tests of the session."""
    import ray

    from pipeline.fanout.ray_init import init_ray

    init_ray(num_cpus=2)  # a private instance: never a head another test or session started
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def digits_store(tmp_path_factory):
    """A local store with 16x16 digit shards: 32 training images, the rest held out."""
    from pipeline.data.datasets import digits_source, split
    from pipeline.data.storage import open_store
    from pipeline.orchestration.stages import make_shards

    store = open_store(str(tmp_path_factory.mktemp("store")))
    train, holdout = split(digits_source(16), 32, 0)
    make_shards(store, "digits", train, holdout.subset(range(300)), shard_size=100)
    return store


# ------------------------------------------------------------------------------ S3 on loopback (moto)
def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_server():
    """A real S3 HTTP API (moto in server mode) on 127.0.0.1; yields its endpoint URL.

    moto checks no credentials by default; tests that need "wrong credentials" refused start their own
    server with ``INITIAL_NO_AUTH_ACTION_COUNT=0`` in its environment.
    """
    from moto.server import ThreadedMotoServer

    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


S3_TEST_ENV = {
    "AWS_ACCESS_KEY_ID": "cpsample-test-key",
    "AWS_SECRET_ACCESS_KEY": "cpsample-test-secret",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_REGION": "us-east-1",
}


@pytest.fixture
def s3_env(s3_server, monkeypatch) -> dict[str, str]:
    """Fake credentials, a region and ``AWS_ENDPOINT_URL`` in this process's environment (and hence in
    subprocesses). Note: Ray workers started before this fixture ran do not see these variables."""
    env = {**S3_TEST_ENV, "AWS_ENDPOINT_URL": s3_server}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return env


@pytest.fixture
def s3_bucket(s3_env) -> str:
    """A fresh, empty bucket on the loopback endpoint; yields its name."""
    import uuid

    import boto3

    name = f"cps-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_env["AWS_ENDPOINT_URL"]).create_bucket(Bucket=name)
    return name


@pytest.fixture(scope="session")
def tiny_sd_dir(tmp_path_factory):
    """A tiny randomly initialised Stable Diffusion directory (the real diffusers/transformers classes,
    a locally built byte-level CLIP tokenizer) saved with ``save_pretrained``: 16x16 grayscale images,
    4x8x8 latents, a 32-dim text encoder. Nothing is downloaded."""
    from pipeline.core.latent_build import LatentArchConfig, build_latent_model, save_latent_model

    model = build_latent_model(LatentArchConfig(image_size=16, image_channels=1), seed=0)
    return save_latent_model(model, tmp_path_factory.mktemp("tiny-sd") / "sd")


@pytest.fixture(scope="session")
def headline_models():
    """The headline's 8x8-digits denoiser (it memorises its 8 training images) and random-label
    classifier, trained once per session (about 40 s on one thread): :mod:`tests.headline_models`."""
    from tests.headline_models import train_headline_models

    return train_headline_models()
