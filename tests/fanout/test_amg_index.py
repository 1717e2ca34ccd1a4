"""AMG bound to the stored replica index (pipeline.fanout.amg_index) and sampled through the Ray fan-out
(sampler "amg"): real FAISS, a real local Ray, the digits store."""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from pipeline.core.amg import centred_cosine
from pipeline.core.config import ConfigError, ReplicaConfig, SamplerConfig
from pipeline.core.diffusion import linear_schedule
from pipeline.core.models import build_unet, save_denoiser
from pipeline.data.imageset import images_from_tensor, images_to_tensor
from pipeline.data.shards import read_image_shards
from pipeline.fanout.amg_index import IndexNearest
from pipeline.fanout.replica_index import ensure_replica_index
from pipeline.fanout.replica_store import open_replica_index
from pipeline.fanout.resume import sampler_settings
from pipeline.fanout.sampling import run_sampling, sample_key, sample_seed
from tests.fanout.test_sampling import TINY_UNET, _shards


@pytest.fixture(scope="module")
def denoiser16(tmp_path_factory) -> str:
    """A random-weight 16x16 denoiser (the digits store's image size), in the checkpoint format."""
    root = tmp_path_factory.mktemp("den16")
    torch.manual_seed(0)
    unet = build_unet(dataclasses.replace(TINY_UNET, sample_size=16))
    save_denoiser(unet, root / "denoiser", {"unet": {}}, linear_schedule())
    return str(root / "denoiser")


def _index(store, embedding: str = "centred"):
    cfg = ReplicaConfig(embedding=embedding)
    return open_replica_index(store, ensure_replica_index(store, "digits", cfg), cfg)


def test_nearest_is_the_replica_checks_search_and_its_similarity(digits_store, ray_local):
    index = _index(digits_store)
    nearest = IndexNearest(index, cache_rows=8)
    train = index.rows(np.arange(index.ntotal))  # (32, 16, 16, 1) uint8
    centre = nearest.centre()
    want_centre = train.reshape(len(train), -1).astype(np.float64).mean(0) / 255.0 * 2 - 1
    np.testing.assert_allclose(centre.numpy().reshape(-1), want_centre, atol=1e-5)
    x = images_to_tensor(train[[3, 7, 3]])
    gen = torch.Generator().manual_seed(0)
    noisy = (x + 0.3 * torch.randn(x.shape, generator=gen)).clamp(-1, 1)
    queries = torch.cat([x, noisy])
    sims, neighbours = nearest(queries)
    assert sims.shape == (6,) and neighbours.shape == (6, 1, 16, 16)
    # the training images find themselves
    np.testing.assert_allclose(sims[:3].numpy(), 1.0, atol=1e-5)
    assert torch.equal(neighbours[:3], x)
    # the same similarities and rows as the replica check's search, and as the guidance's torch maths
    want_s, want_rows = index.search(images_from_tensor(queries), k=1)
    np.testing.assert_allclose(sims.numpy(), want_s, atol=1e-6)
    assert np.array_equal(images_from_tensor(neighbours), train[want_rows])
    quantised = images_to_tensor(images_from_tensor(queries))
    torch_sims = centred_cosine(quantised, neighbours, centre)
    np.testing.assert_allclose(torch_sims.numpy(), want_s, atol=1e-4)
    # the row cache: bounded, and a repeated query reads no rows
    assert len(nearest._rows) <= 8
    reads = []
    real_rows = index.rows
    index.rows = lambda idx: reads.append(list(idx)) or real_rows(idx)
    nearest(queries[:3])
    assert reads == []


def test_raw_embedding_centre_and_feature_modules_refused(digits_store, ray_local):
    index = _index(digits_store, "raw")
    nearest = IndexNearest(index)
    assert float(nearest.centre()) == -1.0
    x = images_to_tensor(index.rows(np.array([1, 2])))
    q = (x.flip(-1) + x) / 2
    sims, neighbours = nearest(q)
    quantised = images_to_tensor(images_from_tensor(q))
    np.testing.assert_allclose(
        centred_cosine(quantised, neighbours, nearest.centre()).numpy(), sims.numpy(), atol=1e-4
    )
    fake = SimpleNamespace(sidecar={"module": {"path": "sscd.pt"}})
    with pytest.raises(ConfigError, match="needs a pixel embedding"):
        IndexNearest(fake)


def _amg(**kw) -> SamplerConfig:
    base = dict(sampler="amg", num_samples=4, samples_per_shard=2, batch_size=2, steps=4)
    return SamplerConfig(**{**base, **kw})


@pytest.mark.slow  # four Ray Data runs: about 100 s on two shared cores
def test_run_sampling_amg_writes_amg_shards_on_ddims_seeds(digits_store, ray_local, denoiser16):
    """Sampler "amg" through the Ray fan-out: shards under samples/<run>/amg with DDIM's seeds, the
    settings and the guarded data in every record; a threshold nothing reaches is DDIM byte for
    byte, and a threshold everything reaches fires at every step and changes every image."""
    store = digits_store
    ddim = run_sampling(store.uri, "amg-ddim", _amg(sampler="ddim"), denoiser16, None)
    always = _amg(amg_threshold=-1.0, amg_scale=300.0)
    out = run_sampling(store.uri, "amg-always", always, denoiser16, None, guard_dataset="digits")
    assert out["num_samples"] == 4 and out["guidance_fired_fraction"] == 1.0
    assert out["sampler_settings"] == sampler_settings(always)
    assert out["sampler_settings"]["amg_threshold"] == -1.0
    assert out["sampler_settings"]["amg_scale"] == 300.0
    assert out["sampler_settings"]["guard_embedding"] == "centred"
    assert "alpha" not in out["sampler_settings"] and "guard_data" in out["provenance"]
    got = read_image_shards(store, "samples/amg-always/amg")
    plain = read_image_shards(store, "samples/amg-ddim/ddim")
    assert got.keys == [sample_key("amg", s, i) for s in (0, 1) for i in (0, 1)]
    for m in got.meta:
        assert m["sampler"] == "amg" and m["seed"] == sample_seed(0, m["shard"], m["index"])
        assert m["sampler_settings"] == sampler_settings(always)
        assert m["guidance_steps_fired"] == 4 and m["final_p"] is None
    assert [m["seed"] for m in got.meta] == [m["seed"] for m in plain.meta]
    assert all(not np.array_equal(a, b) for a, b in zip(got.images, plain.images, strict=True))
    # nothing reaches a similarity above 1: the very same bytes as plain DDIM
    never = _amg(amg_threshold=1.0)
    out = run_sampling(store.uri, "amg-never", never, denoiser16, None, guard_dataset="digits")
    assert out["guidance_fired_fraction"] == 0.0
    same = read_image_shards(store, "samples/amg-never/amg")
    assert np.array_equal(same.images, plain.images)
    # a rerun resumes into the complete shards and leaves their bytes alone
    before = _shards(store, "samples/amg-never/amg")
    again = run_sampling(store.uri, "amg-never", never, denoiser16, None, guard_dataset="digits")
    assert again["skipped_shards"] == 2
    assert _shards(store, "samples/amg-never/amg") == before
    with pytest.raises(ConfigError, match="sampler 'amg' needs the training dataset"):
        run_sampling(store.uri, "amg-none", never, denoiser16, None)
    assert ddim["num_samples"] == 4
