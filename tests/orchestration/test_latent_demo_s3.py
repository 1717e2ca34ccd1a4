"""Every latent (Stable Diffusion style) stage in sequence on the tiny random SD model: image shards,
VAE latents and text embeddings, the random-label classifier on the latents, plain and CPSample
text-to-image sampling decoded to PNG, and the replica check of those samples against the pixel
training images; on loopback S3 with the model read from the store and a text-conditioned
classifier. The same stages in a local folder, on a latent model fitted to the digits, are the quick
latent demo (tests/orchestration/test_latent_demo_quick.py)."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.core.config import (
    ClassifierArchConfig,
    ClassifierTrainConfig,
    ReplicaConfig,
    SamplerConfig,
)
from pipeline.core.latent import TextGuidance, load_latent_model
from pipeline.core.models import load_classifier
from pipeline.data.datasets import digits_source, split
from pipeline.data.shards import read_manifest
from pipeline.data.storage import Store, open_store
from pipeline.data.tars import read_tar
from pipeline.fanout.index import make_embedding
from pipeline.fanout.latent_sampling import latent_family, read_captions
from pipeline.fanout.latents import encode_dataset
from pipeline.fanout.sampling import run_sampling
from pipeline.orchestration.replica_report import iter_per_sample
from pipeline.orchestration.stages import check_replicas, make_shards, train_classifier

pytestmark = pytest.mark.slow

TEMPLATE = "a handwritten {label}"
DS = "dg"
ARCH = ClassifierArchConfig(base_channels=8, channel_mults=(1, 2), time_embed_dim=8, num_groups=4)
TRAIN = ClassifierTrainConfig(
    steps=4, batch_size=8, lr=3e-3, holdout_images=4, t_max=1000, warmup_steps=1,
    checkpoint_every=4, metrics_samples=8, metrics_batch=8, labels="key",
)  # fmt: skip


def _sampler(sampler: str) -> SamplerConfig:
    # the 4-step classifier is below min_fit: sampled with knowingly (the stages are under test)
    return SamplerConfig(
        sampler=sampler, num_samples=4, samples_per_shard=2, batch_size=2, steps=4, alpha=0.5,
        scale=20.0, guidance_t_max=1000, allow_unfit=True,
    )  # fmt: skip


def _keys_of(store: Store, folder: str) -> dict[str, set[str]]:
    """{shard name: the keys of its members} of every tar under ``folder``."""
    out = {}
    for name in sorted(n for n in store.listdir(folder) if n.endswith(".tar")):
        with tarfile.open(fileobj=io.BytesIO(store.read_bytes(folder, name))) as tar:
            out[name] = {m.name.split(".", 1)[0] for m in tar if m.isfile()}
    return out


def _run_pipeline(store: Store, sd_dir, model: str, workdir: Path) -> None:
    """All latent stages on ``store``; ``model`` is how every stage names the SD directory; the
    classifier is text-conditioned. ``workdir``: a local folder for copies out of the store."""
    # 1. pixel shards: 16 training digits (2 shards of 8), 8 held out (1 shard)
    train, holdout = split(digits_source(16).subset(range(24)), 16, 0)
    assert (len(train), len(holdout)) == (16, 8)
    made = make_shards(store, DS, train, holdout, shard_size=8, source={"name": "digits-test"})
    assert {s: e["count"] for s, e in made["splits"].items()} == {"train": 16, "holdout": 8}

    # 2. latents and text embeddings, captions filled from each key's json label
    enc = encode_dataset(store, DS, model, caption_template=TEMPLATE, num_actors=1, batch_size=8)
    lat_ds = f"{DS}-latents"
    assert enc["out_dataset"] == lat_ds
    assert enc["images"] == enc["images_encoded"] == 24 and enc["shards"] == 3
    assert enc["splits"] == {
        "train": {"images": 16, "shards": 2},
        "holdout": {"images": 8, "shards": 1},
    }
    sd = load_latent_model(sd_dir)
    manifest = read_manifest(store, f"data/{lat_ds}")
    assert manifest["latent"]["latent_shape"] == list(sd.latent_shape) == [4, 8, 8]
    assert manifest["latent"]["scaling_factor"] == pytest.approx(sd.scaling_factor)
    assert manifest["latent"]["caption_template"] == TEMPLATE
    assert manifest["latent"]["source_dataset"] == DS
    assert {s: e["count"] for s, e in manifest["splits"].items()} == {"train": 16, "holdout": 8}
    for part, images in (("train", train), ("holdout", holdout)):
        pixel, latent = (
            _keys_of(store, f"data/{DS}/{part}"),
            _keys_of(store, f"data/{lat_ds}/{part}"),
        )
        assert latent == pixel  # the same keys in the same shards
        assert set().union(*latent.values()) == set(images.keys)
    train_keys = set(train.keys)

    # 3. the random-label classifier on the latents, with the model's schedule
    out = train_classifier(store, "lp", lat_ds, ARCH, TRAIN, threads=1, model=model, text_cond=True)
    assert out["uri"] == store.uri_of("models", "lp", "classifier")
    record = json.loads(store.read_bytes("models", "lp", "classifier", "config.json"))
    assert record["dataset"] == lat_ds and record["step"] == TRAIN.steps
    assert (record["arch"]["channels"], record["arch"]["sample_size"]) == (4, 8)
    cond_dim = 32
    assert record["arch"]["cond_dim"] == cond_dim
    assert record["latent"] == {
        "scaling_factor": pytest.approx(sd.scaling_factor),
        "model": model,
        "cond_dim": cond_dim,
    }
    assert record["schedule"]["beta_first"] == pytest.approx(float(sd.schedule.betas[0]), rel=1e-6)
    assert record["schedule"]["num_train_timesteps"] == sd.schedule.num_train_timesteps
    assert set(record["metrics"]["train_accuracy_by_t"]) == {
        "0-100",
        "100-300",
        "300-600",
        "600-1000",
    }
    # the exported classifier loads from the store with its shape check; a text-conditioned one needs
    # the prompt embedding (folded in from test_stages_latent.py: the same train_classifier path)
    clf = load_classifier(
        store.get_dir(workdir / "lp-clf", "models", "lp", "classifier"), (4, 8, 8)
    )
    assert clf.config.cond_dim == cond_dim
    logits = clf(torch.zeros(2, 4, 8, 8), torch.tensor([0, 5]), torch.randn(2, cond_dim))
    assert logits.shape == (2,)
    with pytest.raises(ValueError, match="text-conditioned"):
        clf(torch.zeros(2, 4, 8, 8), torch.tensor([0, 5]))

    # 4. plain and CPSample sampling with prompts from the latent dataset's captions
    prompts = read_captions(store, lat_ds, "train", 3)
    assert len(prompts) == 3
    assert all(p.startswith("a handwritten ") for p in prompts)
    family = latent_family(TextGuidance(tuple(prompts), cfg_scale=3.0))
    runs = {
        "ddim": run_sampling(store, "lp", _sampler("ddim"), model, None, family=family),
        "cpsample": run_sampling(
            store, "lp", _sampler("cpsample"), model, "models/lp/classifier", family=family
        ),
    }
    assert runs["ddim"]["guidance_fired_fraction"] == 0.0
    assert runs["cpsample"]["guidance_fired_fraction"] > 0.0
    decoded = {}
    for sampler, run in runs.items():
        assert run["folder"] == f"samples/lp/{sampler}"
        assert run["num_samples"] == 4 and run["num_shards"] == 2 and run["skipped_shards"] == 0
        names = sorted(n for n in store.listdir(run["folder"]) if n.endswith(".tar"))
        assert names == ["shard-000000.tar", "shard-000001.tar"]
        for name in names:
            shard = read_tar(store.read_bytes(run["folder"], name), name)
            assert shard.images.shape == (2, 16, 16, 1) and shard.images.dtype == np.uint8
            assert all(m["prompt"] in prompts and m["cfg_scale"] == 3.0 for m in shard.meta)
            if sampler == "cpsample":
                assert all(m["guidance_steps_fired"] > 0 for m in shard.meta)
            decoded.update({(sampler, k): im for k, im in zip(shard.keys, shard.images)})
    assert len(decoded) == 8

    # 5. the replica check of the decoded samples against the pixel training images
    embed = make_embedding("centred", train.images)  # the index's own embedding, recomputed here
    train_emb, row_of = embed(train.images), {k: i for i, k in enumerate(train.keys)}
    for sampler, run in runs.items():
        stats, rows = check_replicas(store, "lp", run["folder"], DS, ReplicaConfig())
        keys = sorted(k for s, k in decoded if s == sampler)
        assert [r["key"] for r in rows] == keys
        assert all(r["nn_key"] in train_keys for r in rows)
        sims = embed(np.stack([decoded[sampler, r["key"]] for r in rows])) @ train_emb.T
        for r, row in zip(rows, sims):  # the nearest pixel training image, at its similarity
            assert float(r["nn_similarity"]) == pytest.approx(float(row.max()), abs=1e-4)
            assert float(row[row_of[r["nn_key"]]]) == pytest.approx(float(row.max()), abs=1e-4)
        assert stats.num_samples == 4
        assert stats.mean_nn_similarity == pytest.approx(
            float(np.mean([r["nn_similarity"] for r in rows])), abs=1e-6
        )
        lines = sorted(iter_per_sample(store, "lp", sampler), key=lambda x: x["key"])
        assert [(x["key"], x["nn_key"]) for x in lines] == [(r["key"], r["nn_key"]) for r in rows]
        annotated = {}  # the sample shards now carry each key's neighbour; the pixels are unchanged
        for name in sorted(n for n in store.listdir(run["folder"]) if n.endswith(".tar")):
            shard = read_tar(store.read_bytes(run["folder"], name), name)
            for key, image, meta in zip(shard.keys, shard.images, shard.meta):
                np.testing.assert_array_equal(image, decoded[sampler, key])
                annotated[key] = meta["nn_key"]
        assert annotated == {r["key"]: r["nn_key"] for r in rows}


def test_latent_pipeline_loopback_s3(ray_local, s3_bucket, tiny_sd_dir, tmp_path):
    store = open_store(f"s3://{s3_bucket}/lp")
    store.put_dir(tiny_sd_dir, "models", "ft", "sd")  # every stage reads the model from the store
    _run_pipeline(store, tiny_sd_dir, "models/ft/sd", tmp_path)
