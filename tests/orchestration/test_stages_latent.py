"""train_classifier on a latent dataset: the same Ray Train job fits random bits of scaled VAE
latents, with the noise schedule and latent shape of a Stable Diffusion directory. The text-conditioned
classifier (cond_dim, loading, the refusal without a prompt embedding) is trained and checked in
tests/orchestration/test_latent_demo_s3.py, whose pipeline trains one anyway."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.core.config import ClassifierArchConfig, ClassifierTrainConfig, ConfigError
from pipeline.core.models import (
    load_classifier,
    load_classifier_config,
    load_schedule,
    schedule_record,
)
from pipeline.data.provenance import dir_digest, read_provenance
from pipeline.data.shards import put_shard, shard_name, split_entry, write_manifest
from pipeline.data.storage import Store, open_store
from pipeline.orchestration.stages import train_classifier


def _npy(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a)
    return buf.getvalue()


def latent_tar(keys: list[str], shape, pooled_dim: int, seed: int) -> bytes:
    """A WebDataset tar in the latent precompute stage's layout, byte-for-byte reproducible: per key
    ``.latent.npy`` (float16 (C, h, w), scaled), ``.pooled.npy`` (D,), ``.hidden.npy`` (L, D)
    float16, ``.txt`` and ``.json``."""
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for key in keys:
            members = {
                "latent.npy": _npy(rng.standard_normal(shape).astype(np.float16)),
                "pooled.npy": _npy(rng.standard_normal(pooled_dim).astype(np.float32)),
                "hidden.npy": _npy(rng.standard_normal((6, pooled_dim)).astype(np.float16)),
                "txt": f"a picture called {key}".encode(),
                "json": json.dumps({"key": key}).encode(),
            }
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size, info.mtime, info.mode = len(data), 0, 0o644
                tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def write_latent_dataset(
    store: Store, name: str, shape=(4, 8, 8), pooled_dim: int = 32, n: int = 48, per_shard: int = 24
) -> dict:
    """``data/<name>/{train,holdout}/shard-*.tar`` of ``n`` keys each, and the manifest with its
    ``latent`` section, as the latent precompute stage writes them."""
    splits = {}
    for s, split in enumerate(("train", "holdout")):
        keys = [f"{split[0]}{i:04d}" for i in range(n)]
        shards = [
            put_shard(
                store, f"data/{name}/{split}", shard_name(j // per_shard),
                latent_tar(keys[j : j + per_shard], shape, pooled_dim, 100 * s + j),
                len(keys[j : j + per_shard]),
            )
            for j in range(0, n, per_shard)
        ]  # fmt: skip
        splits[split] = split_entry(shards)
    manifest = {
        "dataset": name, "format": "webdataset", "image_size": list(shape[1:]),
        "channels": shape[0], "members": ["latent.npy", "pooled.npy", "hidden.npy", "txt", "json"],
        "latent": {"scaling_factor": 0.18215, "latent_shape": list(shape),
                   "pooled_dim": pooled_dim, "dtype": "float16"},
        "splits": splits,
    }  # fmt: skip
    write_manifest(store, name, manifest)
    return manifest


ARCH = ClassifierArchConfig(base_channels=16, channel_mults=(1, 2), time_embed_dim=32)


def _train_cfg(steps: int) -> ClassifierTrainConfig:
    return ClassifierTrainConfig(
        steps=steps, batch_size=32, lr=3e-3, holdout_images=16, t_max=100, warmup_steps=20,
        checkpoint_every=steps, metrics_samples=48, labels="key",
    )  # fmt: skip


def test_classifier_trains_on_latents_with_the_models_schedule(ray_local, tiny_sd_dir, tmp_path):
    store = open_store(str(tmp_path / "store"))
    write_latent_dataset(store, "lat")
    # the arch's shape is left at its (pixel) defaults on purpose: the latents' shape wins
    out = train_classifier(
        store, "lat", "lat", ARCH, _train_cfg(100), model=str(tiny_sd_dir), threads=1
    )
    record = load_classifier_config(out["uri"])
    assert (record["arch"]["channels"], record["arch"]["sample_size"]) == (4, 8)
    assert record["arch"]["cond_dim"] == 0
    assert record["latent"] == {"scaling_factor": 0.18215, "model": str(tiny_sd_dir), "cond_dim": 0}
    # the schedule is the model's scaled_linear one, not DDPM's linear 1e-4..0.02
    schedule = load_schedule(tiny_sd_dir)
    assert record["schedule"]["beta_first"] == pytest.approx(0.00085, rel=1e-6)
    assert record["schedule"]["beta_last"] == pytest.approx(float(schedule.betas[-1]), rel=1e-6)
    assert record["schedule"]["num_train_timesteps"] == 1000
    # every beta (their digest) and how the model reads them: what sampling compares
    assert record["schedule"] == schedule_record(schedule)
    # 48 training latents' random bits are fitted at low t (chance: 0.5), by its own saved metrics
    metrics = record["metrics"]
    assert metrics["train_accuracy_by_t"]["0-100"] >= 0.9
    assert metrics["train_rows"] == 48
    hits = metrics["holdout_accuracy"] * 4 * metrics["never_rows"]  # a count of 4 noisings each
    assert hits == pytest.approx(round(hits), abs=1e-3)
    # its model card: the same fit, which meets min_fit, so CPSample sampling takes it
    card = record["fit"]
    assert card == out["fit"]
    assert (card["accuracy"], card["mean_margin"]) == (
        metrics["train_accuracy_by_t"]["0-100"], metrics["train_margin_by_t"]["0-100"],
    )  # fmt: skip
    assert (card["rows"], card["seed"], card["t_range"], card["step"]) == (48, 0, [0, 100], 100)
    assert card["threshold"] == 0.9 and card["fits"] is True
    provenance = read_provenance(Path(out["uri"]))["provenance"]
    assert provenance["model"] == dir_digest(tiny_sd_dir) and "denoiser" not in provenance
    clf = load_classifier(out["uri"], expect_shape=(4, 8, 8))
    assert clf(torch.zeros(2, 4, 8, 8), torch.tensor([0, 5])).shape == (2,)


def test_latents_of_another_shape_than_the_models_unet_are_refused(tiny_sd_dir, tmp_path):
    store = open_store(str(tmp_path / "store"))
    write_latent_dataset(store, "big", shape=(4, 16, 16), n=4, per_shard=4)
    with pytest.raises(ConfigError, match=r"latents \(C, h, w\) = \(4, 16, 16\) but the unet of "
                       r"model '.*sd' denoises \(4, 8, 8\)"):  # fmt: skip
        train_classifier(store, "big", "big", ARCH, _train_cfg(10), model=str(tiny_sd_dir))
    assert not store.exists("checkpoints", "big-classifier")
    assert not store.exists("models", "big")
