"""pipeline.fanout.latents: stored latents and text embeddings equal the model's own, keys and meta
carry over, the manifest describes them, a rerun writes nothing, stale output is refused, bad input
is named; locally and on loopback S3."""

from __future__ import annotations

import io
import json
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.core.latent import encode_images, encode_prompts, load_latent_model
from pipeline.core.models import CheckpointError
from pipeline.data.datasets import digits_source, split
from pipeline.data.imageset import DataError
from pipeline.data.provenance import StaleArtifactError, dir_digest, manifest_digest
from pipeline.data.shards import read_manifest, verify_dataset
from pipeline.data.storage import open_store
from pipeline.data.tars import build_tar, encode_png
from pipeline.fanout.latents import (
    SIDECAR,
    caption_of,
    encode_dataset,
    encode_shard,
    encoder_spec,
    load_encoders,
)
from pipeline.orchestration.stages import make_shards

TEMPLATE = "a handwritten {label}"


def _members(data: bytes) -> dict[str, bytes]:
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar if m.isfile()}


def _npy(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)


def _small_store(root, n_images: int = 24, shard_size: int = 8):
    """Digits at 16x16: 2/3 train, the rest held out, in shards of ``shard_size``."""
    train, holdout = split(digits_source(16).subset(range(n_images)), n_images * 2 // 3, 0)
    store = open_store(str(root))
    make_shards(store, "dg", train, holdout, shard_size=shard_size)
    return store


@pytest.fixture(scope="module")
def model(tiny_sd_dir):
    return load_latent_model(tiny_sd_dir)


@pytest.fixture(scope="module")
def encoded(tmp_path_factory, tiny_sd_dir, ray_local):
    """A 24-image store (train: 2 shards, holdout: 1) encoded once, in batches of 5."""
    store = _small_store(tmp_path_factory.mktemp("latents"))
    out = encode_dataset(store, "dg", str(tiny_sd_dir), caption_template=TEMPLATE, batch_size=5)
    return store, out


# ----------------------------------------------------------------------------------- Ray-free
def test_encoder_spec_matches_the_loaded_model(tiny_sd_dir, model):
    spec = encoder_spec(tiny_sd_dir)
    assert spec["latent_shape"] == list(model.latent_shape) == [4, 8, 8]
    assert spec["image_shape"] == list(model.image_shape) == [1, 16, 16]
    assert spec["text_shape"] == [model.tokenizer.model_max_length, 32]
    assert spec["pooled_dim"] == 32 and spec["scaling_factor"] == model.scaling_factor


def test_encoder_spec_refuses_a_folder_that_is_no_model(tmp_path):
    with pytest.raises(CheckpointError, match=r"vae/config\.json"):
        encoder_spec(tmp_path)


def test_caption_sources_in_order():
    meta = {"label": 3, "caption": "from json"}
    assert caption_of({"txt": b" from txt\n"}, meta, "k", "s", TEMPLATE) == "from txt"
    assert caption_of({}, meta, "k", "s", TEMPLATE) == "from json"
    assert caption_of({}, {"label": 3}, "k", "s", TEMPLATE) == "a handwritten 3"
    with pytest.raises(DataError, match=r"shard-x\.tar: sample 'k7' has no caption"):
        caption_of({}, {"label": 3}, "k7", "shard-x.tar", None)
    with pytest.raises(DataError, match=r"'k7'.*KeyError.*\['label'\]"):
        caption_of({}, {"label": 3}, "k7", "s", "a {colour} digit")


def test_encode_shard_refuses_another_image_size(tiny_sd_dir):
    enc, spec = load_encoders(tiny_sd_dir), encoder_spec(tiny_sd_dir)
    image = np.zeros((8, 8, 1), np.uint8)
    tar = build_tar([("a", encode_png(image), {"caption": "x"})])
    with pytest.raises(DataError, match=r"in\.tar: image 'a' is 8x8 .* takes 16x16"):
        encode_shard(enc, spec, tar, "in.tar")
    rgb = build_tar([("b", encode_png(np.zeros((16, 16, 3), np.uint8)), {"caption": "x"})])
    with pytest.raises(DataError, match="'b' is RGB, but the model takes grayscale"):
        encode_shard(enc, spec, rgb, "in.tar")


# --------------------------------------------------------------------------------- with Ray
def test_encode_stores_the_models_latents_and_embeddings(encoded, model):
    store, out = encoded
    assert out["images"] == out["images_encoded"] == 24 and out["shards"] == 3
    assert out["shards_written"] == 3 and out["shards_skipped"] == 0
    assert out["splits"] == {
        "train": {"images": 16, "shards": 2},
        "holdout": {"images": 8, "shards": 1},
    }
    src = store.read_bytes("data/dg/train", "shard-000001.tar")
    got = _members(store.read_bytes("data/dg-latents/train", "shard-000001.tar"))
    keys = sorted({n.split(".")[0] for n in _members(src)})
    assert sorted({n.split(".")[0] for n in got}) == keys  # same keys, same shard
    for key in keys:
        assert {n for n in got if n.startswith(key + ".")} == {
            f"{key}.{m}" for m in ("latent.npy", "pooled.npy", "hidden.npy", "txt", "json")
        }
    png, meta = _members(src)[f"{keys[0]}.png"], json.loads(_members(src)[f"{keys[0]}.json"])
    x = torch.from_numpy(np.asarray(Image.open(io.BytesIO(png)), np.float32) / 127.5 - 1.0)
    want_z = encode_images(model.vae, x[None, None], model.scaling_factor)[0].numpy()
    caption = f"a handwritten {meta['label']}"
    want_h, want_p = encode_prompts(model, [caption])
    z, h, p = (_npy(got[f"{keys[0]}.{m}.npy"]) for m in ("latent", "hidden", "pooled"))
    assert z.dtype == np.float32 and z.shape == (4, 8, 8)
    assert h.dtype == np.float16 and h.shape == (24, 32)
    assert p.dtype == np.float32 and p.shape == (32,)
    np.testing.assert_allclose(z, want_z, atol=1e-5, rtol=1e-4)
    np.testing.assert_allclose(h, want_h[0].numpy(), atol=2e-3, rtol=2e-3)
    np.testing.assert_allclose(p, want_p[0].numpy(), atol=1e-5, rtol=1e-4)
    assert got[f"{keys[0]}.txt"].decode() == caption
    assert json.loads(got[f"{keys[0]}.json"]) == {**meta, "caption": caption}


def test_manifest_describes_the_latents(encoded, tiny_sd_dir):
    store, _ = encoded
    manifest = verify_dataset(store, "data/dg-latents")  # names and sha256 of every shard
    assert manifest["dataset"] == "dg-latents" and manifest["format"] == "webdataset"
    assert manifest["members"] == ["latent.npy", "pooled.npy", "hidden.npy", "txt", "json"]
    assert manifest["image_size"] == [8, 8] and manifest["channels"] == 4
    latent = manifest["latent"]
    assert latent["settings_digest"].startswith("sha256:")
    assert latent == {
        **encoder_spec(tiny_sd_dir), "dtype": "float32", "hidden_dtype": "float16",
        "pooled_dtype": "float32", "caption_template": TEMPLATE,
        "model_digest": dir_digest(tiny_sd_dir), "settings_digest": latent["settings_digest"],
        "source_dataset": "dg",
        "source_manifest_digest": manifest_digest(read_manifest(store, "data/dg")),
    }  # fmt: skip
    assert {s: e["count"] for s, e in manifest["splits"].items()} == {"train": 16, "holdout": 8}
    assert [sh["name"] for sh in manifest["splits"]["train"]["shards"]] == [
        "shard-000000.tar", "shard-000001.tar"
    ]  # fmt: skip
    record = json.loads(store.read_bytes("data/dg-latents/train", "shard-000000.tar" + SIDECAR))
    assert record["sha256"] == manifest["splits"]["train"]["shards"][0]["sha256"]
    assert set(record["provenance"]) == {"model", "settings", "source"}


def _stamps(store) -> dict[str, tuple[int, bytes]]:
    files = sorted(Path(store.path, "data/dg-latents").rglob("*"))
    return {str(p): (p.stat().st_mtime_ns, p.read_bytes()) for p in files if p.is_file()}


def test_rerun_writes_nothing(encoded, tiny_sd_dir):
    from tests.data.test_handle import CountingStore

    store, _ = encoded
    before = _stamps(store)
    counting = CountingStore(store.uri, store.fs, store.path)
    out = encode_dataset(counting, "dg", str(tiny_sd_dir), caption_template=TEMPLATE, batch_size=7)
    assert out["shards_skipped"] == 3 and out["shards_written"] == 0 and out["images_encoded"] == 0
    assert _stamps(store) == before
    assert counting.reads.count("data/dg/manifest.json") == 1  # the source opened once


def test_output_of_another_model_or_settings_is_refused(encoded, tiny_sd_dir, tmp_path):
    store, _ = encoded
    before = _stamps(store)
    other = shutil.copytree(tiny_sd_dir, tmp_path / "sd")
    (other / "vae" / "config.json").write_text(
        (other / "vae" / "config.json").read_text().replace("0.18215", "0.2")
    )
    with pytest.raises(StaleArtifactError, match=r"dg-latents was encoded .*changed: model"):
        encode_dataset(store, "dg", str(other), caption_template=TEMPLATE)
    with pytest.raises(StaleArtifactError, match=r"changed: settings.*--overwrite"):
        encode_dataset(store, "dg", str(tiny_sd_dir), caption_template=TEMPLATE, dtype="float16")
    with pytest.raises(StaleArtifactError, match="encode_latents did not make"):
        encode_dataset(store, "dg-latents", str(tiny_sd_dir), out_dataset="dg", splits=["train"])
    assert _stamps(store) == before


def test_corrupt_input_shard_is_named(tmp_path, tiny_sd_dir, ray_local):
    store = _small_store(tmp_path, n_images=12, shard_size=4)
    path = tmp_path / "data/dg/train/shard-000001.tar"
    data = bytearray(path.read_bytes())
    data[600] ^= 0xFF  # same size, another sha256
    path.write_bytes(bytes(data))
    with pytest.raises(DataError, match=r"checksum mismatch for .*dg/train/shard-000001\.tar"):
        encode_dataset(store, "dg", str(tiny_sd_dir), caption_template=TEMPLATE, splits=["train"])
    assert not (tmp_path / "data/dg-latents/manifest.json").exists()


def test_encode_shard_needs_a_caption_for_every_key(tiny_sd_dir):
    enc, spec = load_encoders(tiny_sd_dir), encoder_spec(tiny_sd_dir)
    image = encode_png(np.zeros((16, 16, 1), np.uint8))
    tar = build_tar([("a", image, {"caption": "x"}), ("b", image, {"label": 1})])
    with pytest.raises(DataError, match=r"in\.tar: sample 'b' has no caption"):
        encode_shard(enc, spec, tar, "in.tar")
    data, count = encode_shard(enc, spec, tar, "in.tar", template="digit {label}", batch_size=1)
    assert count == 2 and _members(data)["b.txt"] == b"digit 1"
    again = encode_shard(enc, spec, tar, "in.tar", template="digit {label}", batch_size=1)[0]
    assert again == data  # byte-for-byte
    other = _members(encode_shard(enc, spec, tar, "in.tar", template="digit {label}")[0])
    for name, value in _members(data).items():  # another batch size: the same up to rounding
        if name.endswith(".npy"):
            np.testing.assert_allclose(_npy(other[name]), _npy(value), rtol=1e-3, atol=1e-4)


def test_encode_on_loopback_s3_with_the_model_in_the_store(s3_bucket, tiny_sd_dir, ray_local):
    train, holdout = split(digits_source(16).subset(range(9)), 6, 0)
    store = open_store(f"s3://{s3_bucket}/p")
    make_shards(store, "dg", train, holdout, shard_size=6)
    store.put_dir(tiny_sd_dir, "models", "tiny", "sd")
    out = encode_dataset(
        store, "dg", "models/tiny/sd", caption_template=TEMPLATE, dtype="float16", batch_size=4
    )
    assert (
        out["images"] == 9
        and out["manifest"] == f"s3://{s3_bucket}/p/data/dg-latents/manifest.json"
    )
    manifest = verify_dataset(store, "data/dg-latents")
    assert manifest["latent"]["dtype"] == "float16"
    assert manifest["latent"]["model_digest"] == dir_digest(tiny_sd_dir)
    got = _members(store.read_bytes("data/dg-latents/holdout", "shard-000000.tar"))
    latents = [_npy(v) for k, v in got.items() if k.endswith(".latent.npy")]
    assert len(latents) == 3
    assert all(z.dtype == np.float16 and z.shape == (4, 8, 8) for z in latents)
    # new held-out images: only that split's shard is encoded again
    make_shards(store, "dg", train, digits_source(16).subset(range(20, 24)), shard_size=6)
    again = encode_dataset(
        store, "dg", "models/tiny/sd", caption_template=TEMPLATE, dtype="float16"
    )
    assert again["shards_encoded"] == 1 and again["shards_skipped"] == 1 and again["images"] == 10
    latent = verify_dataset(store, "data/dg-latents")["latent"]
    assert latent["source_manifest_digest"] == manifest_digest(read_manifest(store, "data/dg"))
    got = _members(store.read_bytes("data/dg-latents/holdout", "shard-000000.tar"))
    txts = sorted(k for k in got if k.endswith(".txt"))
    assert txts == [f"digits-{i:04d}.txt" for i in range(20, 24)]
