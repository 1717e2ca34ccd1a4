"""Latent text-to-image sampling on a real Ray Data actor pool: a tiny random Stable Diffusion directory,
plain CFG and CPSample in latent space, decoded PNG shards, resume, and a loopback S3 store."""

from __future__ import annotations

import pytest
import torch

from pipeline.core.config import ClassifierArchConfig, SamplerConfig
from pipeline.core.latent import TextGuidance
from pipeline.core.models import CheckpointError, NoiseClassifier, save_classifier
from pipeline.data.provenance import StaleArtifactError
from pipeline.data.shards import put_shard
from pipeline.data.storage import open_store
from pipeline.data.tars import build_tar, encode_png, read_tar
from pipeline.fanout.latent_sampling import latent_family, read_captions
from pipeline.fanout.sampling import run_sampling, sample_seed

PROMPTS = ("a handwritten 3", "a handwritten 7", "a handwritten 1")


def _clf_record(sd_dir) -> dict:
    """What train_classifier records: the schedule it trained on (the model's) and its t range."""
    from pipeline.core.latent import load_latent_model

    sched = load_latent_model(sd_dir).schedule
    return {
        "schedule": {
            "num_train_timesteps": sched.num_train_timesteps,
            "beta_first": float(sched.betas[0]),
            "beta_last": float(sched.betas[-1]),
        },
        "train": {"t_max": 1000},
    }


@pytest.fixture(scope="module")
def latent_classifier(tmp_path_factory, tiny_sd_dir) -> str:
    """A random-weight classifier on 4x8x8 latents, saved as train_classifier saves one."""
    torch.manual_seed(3)
    arch = ClassifierArchConfig(
        sample_size=8, channels=4, base_channels=8, channel_mults=(1, 2), time_embed_dim=8,
        num_groups=4,
    )  # fmt: skip
    path = tmp_path_factory.mktemp("latent-clf") / "classifier"
    save_classifier(NoiseClassifier(arch), path, _clf_record(tiny_sd_dir))
    return str(path)


def _cfg(sampler: str, **kw) -> SamplerConfig:
    base = dict(
        sampler=sampler, num_samples=4, samples_per_shard=2, batch_size=2, steps=4, alpha=0.5,
        scale=20.0, guidance_t_max=1000,
    )  # fmt: skip
    return SamplerConfig(**{**base, **kw})


def _read(store, folder):
    names = sorted(n for n in store.listdir(folder) if n.endswith(".tar"))
    return {n: read_tar(store.read_bytes(folder, n), n) for n in names}


def test_plain_and_cpsample_latent_shards(ray_local, tmp_path, tiny_sd_dir, latent_classifier):
    store = open_store(str(tmp_path / "store"))
    text = TextGuidance(PROMPTS, cfg_scale=3.0)
    outs = {}
    for sampler in ("ddim", "cpsample"):
        outs[sampler] = run_sampling(
            store.uri,
            "lat",
            _cfg(sampler),
            str(tiny_sd_dir),
            latent_classifier,
            family=latent_family(text),
        )
    assert outs["ddim"]["num_samples"] == outs["cpsample"]["num_samples"] == 4
    assert outs["ddim"]["guidance_fired_fraction"] == 0.0
    assert outs["cpsample"]["guidance_fired_fraction"] > 0.0
    plain, guided = _read(store, "samples/lat/ddim"), _read(store, "samples/lat/cpsample")
    assert sorted(plain) == sorted(guided) == ["shard-000000.tar", "shard-000001.tar"]
    moved = 0.0
    for name in plain:
        s = int(name[6:12])
        a, b = plain[name], guided[name]
        assert a.images.shape == (2, 16, 16, 1)  # decoded by the VAE: 16x16 grayscale PNGs
        assert [m["seed"] for m in a.meta] == [m["seed"] for m in b.meta]
        assert [m["seed"] for m in a.meta] == [sample_seed(0, s, i) for i in range(2)]
        assert [m["prompt"] for m in a.meta] == [PROMPTS[(2 * s + i) % 3] for i in range(2)]
        assert all(m["cfg_scale"] == 3.0 for m in b.meta)
        # the plain sampler settings beside the digests, as the pixel sampler records them
        assert {m["sampler_settings"]["sampler"] for m in a.meta} == {"ddim"}
        assert all(m["sampler_settings"] == outs["cpsample"]["sampler_settings"] for m in b.meta)
        assert b.meta[0]["sampler_settings"]["alpha"] == _cfg("cpsample").alpha
        assert all(m["guidance_steps_fired"] > 0 and m["final_p"] is not None for m in b.meta)
        moved = max(moved, float(abs(a.images.astype(int) - b.images.astype(int)).max()))
    assert moved > 0  # latent-space guidance changed the decoded images

    # rerun: every shard complete, nothing redrawn; new prompts make the samples stale
    again = run_sampling(
        store.uri, "lat", _cfg("ddim"), str(tiny_sd_dir), None, family=latent_family(text)
    )
    assert again["skipped_shards"] == 2
    with pytest.raises(StaleArtifactError, match="text"):
        run_sampling(
            store.uri, "lat", _cfg("ddim"), str(tiny_sd_dir), None,
            family=latent_family(TextGuidance(("another prompt",), 3.0)),
        )  # fmt: skip


def test_latent_sampling_to_loopback_s3(ray_local, s3_bucket, tiny_sd_dir, latent_classifier):
    store = open_store(f"s3://{s3_bucket}/ft")
    store.put_dir(tiny_sd_dir, "models", "ft", "sd")  # the model itself read from the store
    out = run_sampling(
        store, "ft", _cfg("cpsample", num_samples=2), "models/ft/sd", latent_classifier,
        family=latent_family(TextGuidance(PROMPTS[:1], 2.0)),
    )  # fmt: skip
    assert out["num_samples"] == 2
    (shard,) = _read(store, "samples/ft/cpsample").values()
    assert shard.images.shape == (2, 16, 16, 1)
    assert {m["prompt"] for m in shard.meta} == {PROMPTS[0]}


def test_wrong_classifier_shape_and_missing_classifier(ray_local, tmp_path, tiny_sd_dir):
    torch.manual_seed(0)
    pixel = ClassifierArchConfig(
        sample_size=16, channels=1, base_channels=8, channel_mults=(1, 2), time_embed_dim=8,
        num_groups=4,
    )  # fmt: skip
    save_classifier(NoiseClassifier(pixel), tmp_path / "pix", _clf_record(tiny_sd_dir))
    text = TextGuidance(PROMPTS)
    with pytest.raises(CheckpointError, match=r"\(1, 16, 16\).*\(4, 8, 8\)"):
        run_sampling(
            str(tmp_path), "w", _cfg("cpsample"), str(tiny_sd_dir), str(tmp_path / "pix"),
            family=latent_family(text),
        )  # fmt: skip
    with pytest.raises(CheckpointError, match="needs a classifier"):
        run_sampling(
            str(tmp_path), "w", _cfg("cpsample"), str(tiny_sd_dir), None, family=latent_family(text)
        )
    assert not (tmp_path / "samples").exists()


def test_read_captions_from_txt_and_json(tmp_path):
    import io
    import json
    import tarfile

    store = open_store(str(tmp_path))
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in (("k1.txt", b"a red chair\n"), ("k1.json", b"{}")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    put_shard(store, "data/cap/train", "shard-000000.tar", buf.getvalue(), 1)
    png = encode_png(torch.zeros(4, 4, 1, dtype=torch.uint8).numpy())
    records = [("k2", png, {"caption": "a blue lamp"}), ("k3", png, {"label": 1})]
    put_shard(store, "data/cap/train", "shard-000001.tar", build_tar(records), 2)
    assert read_captions(store, "cap") == ["a red chair", "a blue lamp"]
    assert read_captions(store, "cap", limit=1) == ["a red chair"]
    put_shard(store, "data/none/train", "shard-000000.tar", build_tar(records[1:]), 1)
    with pytest.raises(Exception, match="no captions"):
        read_captions(store, "none")
    assert json.dumps(read_captions(store, "cap"))
