"""Distributed sampling and replica checks on a real local Ray (Ray Data actor pools, real FAISS).

Every sampling actor runs torch with 1 thread (``cpus_per_actor=1``), so outputs are compared
byte for byte: with equal thread counts the convolutions round identically.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.core.config import (
    ClassifierArchConfig,
    ConfigError,
    ReplicaConfig,
    SamplerConfig,
    UNetConfig,
)
from pipeline.core.diffusion import linear_schedule
from pipeline.core.models import NoiseClassifier, build_unet, save_classifier, save_denoiser
from pipeline.data.handle import open_dataset
from pipeline.data.imageset import ImageSet
from pipeline.data.provenance import StaleArtifactError
from pipeline.data.shards import read_image_shards, write_dataset, write_image_shards
from pipeline.data.storage import open_store
from pipeline.data.tars import read_tar
from pipeline.fanout.resume import sampler_settings
from pipeline.fanout.sampling import run_sampling, sample_key, sample_seed
from pipeline.orchestration.replica_report import iter_per_sample, replica_check_report
from tests.ray_actors import actors_started

TINY_UNET = UNetConfig(sample_size=8, channels=1, block_out_channels=(8, 16), norm_num_groups=8)
TINY_CLF = ClassifierArchConfig(
    sample_size=8, channels=1, base_channels=8, channel_mults=(1, 2), time_embed_dim=8, num_groups=4
)


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory) -> tuple[str, str]:
    """A random-weight 8x8 denoiser and classifier saved in the checkpoint formats sampling reads."""
    root = tmp_path_factory.mktemp("models")
    torch.manual_seed(0)
    save_denoiser(build_unet(TINY_UNET), root / "denoiser", {"unet": {}}, linear_schedule())
    torch.manual_seed(1)
    save_classifier(NoiseClassifier(TINY_CLF), root / "classifier", {})
    return str(root / "denoiser"), str(root / "classifier")


def _cfg(**kw) -> SamplerConfig:
    base = dict(num_samples=6, samples_per_shard=2, batch_size=2, steps=4, alpha=0.5, scale=5.0)
    return SamplerConfig(**{**base, **kw})


def _shards(store, folder: str) -> dict[str, bytes]:
    return {n: store.read_bytes(folder, n) for n in store.listdir(folder) if n.endswith(".tar")}


def _drawn(shards: dict[str, bytes]) -> dict[str, tuple]:
    """What a shard holds but the time it took to draw (``shard_seconds``): keys, the images' bytes
    and every other record field. Shards drawn again must match their first drawing in this."""
    out = {}
    for name, data in shards.items():
        t = read_tar(data, name)
        assert all(m["shard_seconds"] > 0 for m in t.meta)
        metas = [{k: v for k, v in m.items() if k != "shard_seconds"} for m in t.meta]
        out[name] = (t.keys, t.images.tobytes(), metas)
    return out


def test_one_and_two_actors_write_identical_shards(ray_local, tmp_path, tiny_models):
    den, clf = tiny_models
    cfg = _cfg()
    scratch = set(Path(tempfile.gettempdir()).glob("cpsample-models-*"))
    outs, shards = [], []
    for n_actors in (1, 2):
        store = open_store(str(tmp_path / f"a{n_actors}"))
        outs.append(run_sampling(store.uri, "r", cfg, den, clf, concurrency=n_actors))
        shards.append(_shards(store, "samples/r/cpsample"))
    assert outs[0]["num_samples"] == outs[1]["num_samples"] == 6
    assert outs[0]["num_shards"] == 3 and outs[0]["skipped_shards"] == 0
    assert sorted(shards[0]) == ["shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]
    # same thread count (1) in every actor: the same keys, seeds, byte-identical images and records
    # but for each shard's own drawing time
    assert _drawn(shards[0]) == _drawn(shards[1])
    for name, data in shards[0].items():
        s = int(name[6:12])
        got = read_tar(data, name)
        assert got.keys == [sample_key("cpsample", s, i) for i in range(2)]
        assert [m["seed"] for m in got.meta] == [sample_seed(0, s, i) for i in range(2)]
        for m in got.meta:
            assert m["attempt"] == 0 and m["shard_members"] == 2 and m["alpha"] == 0.5
            assert m["shard_planned"] == 2
            # the plain settings, read back by the evaluation (next to the digest "provenance")
            assert m["sampler_settings"] == sampler_settings(cfg) == outs[0]["sampler_settings"]
            assert m["sampler_settings"]["alpha"] == 0.5 and m["sampler_settings"]["steps"] == 4
    metas = [m for name in sorted(shards[0]) for m in read_tar(shards[0][name], name).meta]
    # the run's fired fraction is the mean of the records' fired steps over the 4 steps
    fired = sum(m["guidance_steps_fired"] for m in metas) / (4 * 6)
    assert outs[0]["guidance_fired_fraction"] == outs[1]["guidance_fired_fraction"] == fired
    assert all(isinstance(m["final_p"], float) for m in metas)  # CPSample records its last p
    # a rerun skips every complete shard and leaves the bytes alone
    store = open_store(str(tmp_path / "a1"))
    again = run_sampling(store.uri, "r", cfg, den, clf, concurrency=2)
    assert again["skipped_shards"] == 3 and again["num_samples"] == 6
    assert _shards(store, "samples/r/cpsample") == shards[0]
    # ... and reports the drawing time the shards recorded, not the rerun's (which drew nothing)
    assert outs[0]["sampling_seconds"] > 0
    assert again["sampling_seconds"] == outs[0]["sampling_seconds"]
    # the actors copied the models into scratch folders only while loading them (an actor the pool
    # started late may still be loading: give it a moment)
    deadline = time.monotonic() + 60
    while set(Path(tempfile.gettempdir()).glob("cpsample-models-*")) != scratch:
        assert time.monotonic() < deadline, "sampling actors left model scratch folders in /tmp"
        time.sleep(1)


def test_resume_rewrites_damaged_shards_and_refuses_other_settings(
    ray_local, tmp_path, tiny_models
):
    den, _ = tiny_models
    cfg = _cfg(sampler="ddim")
    store = open_store(str(tmp_path / "s"))
    run_sampling(store.uri, "r", cfg, den, None)
    folder = "samples/r/ddim"
    ref = _shards(store, folder)
    # a truncated tar and a tar with a member missing (count no longer matches its record)
    store.write_bytes(ref["shard-000001.tar"][:700], folder, "shard-000001.tar")
    two = read_tar(ref["shard-000002.tar"], "x")
    from pipeline.data.tars import build_tar, encode_png

    store.write_bytes(
        build_tar([(two.keys[0], encode_png(two.images[0]), two.meta[0])]),
        folder,
        "shard-000002.tar",
    )
    out = run_sampling(store.uri, "r", cfg, den, None)
    assert out["skipped_shards"] == 1 and out["num_samples"] == 6
    assert _drawn(_shards(store, folder)) == _drawn(ref)  # redrawn as they were (but their time)
    assert _shards(store, folder)["shard-000000.tar"] == ref["shard-000000.tar"]  # kept as it was
    # once every shard is complete, a rerun summarises them in the driver: no actor starts, and
    # the summary is the run's (its drawing seconds as recorded)
    actors = actors_started("ShardSampler")
    assert actors > 0
    again = run_sampling(store.uri, "r", cfg, den, None)
    assert actors_started("ShardSampler") == actors
    assert again["skipped_shards"] == 3 and again["num_samples"] == 6
    keep = ("num_samples", "num_shards", "guidance_fired_fraction", "sampling_seconds")
    assert {k: again[k] for k in keep} == {k: out[k] for k in keep}
    with pytest.raises(StaleArtifactError, match=r"other inputs \(changed: sampler\)"):
        run_sampling(store.uri, "r", _cfg(sampler="ddim", seed=9), den, None)
    with pytest.raises(StaleArtifactError, match="beyond this run's 2 shards"):
        run_sampling(store.uri, "r", _cfg(sampler="ddim", num_samples=4), den, None)
    with pytest.raises(ConfigError, match="has no GPUs"):
        run_sampling(store.uri, "g", cfg, den, None, gpus_per_actor=0.5)
    # --use-gpu asks for a GPU even where the cluster has none yet (an autoscaler would add one);
    # a private local Ray never gets one, so it is refused before any actor waits forever
    with pytest.raises(
        ConfigError, match=r"num_gpus_per_actor=1\.0 but the Ray cluster has no GPUs"
    ):
        run_sampling(store.uri, "g", cfg, den, None, gpus_per_actor=None, use_gpu=True)
    assert not store.exists("samples", "g")


def _retrained(path: Path, seed: int) -> str:
    torch.manual_seed(seed)
    save_denoiser(build_unet(TINY_UNET), path, {"unet": {}}, linear_schedule())
    return str(path)


def test_resume_refuses_samples_of_other_models_in_any_shard(ray_local, tmp_path, tiny_models):
    """Retraining either model under the same run makes a rerun refuse (naming the model) instead of
    reporting the old shards as complete; --overwrite resamples; every shard is checked, not only
    the first; each sample records the digests of the models that drew it."""
    den, clf = tiny_models
    store = open_store(str(tmp_path / "s"))
    cfg = _cfg()
    first = run_sampling(store.uri, "r", cfg, den, clf)
    folder = "samples/r/cpsample"
    ref = _shards(store, folder)
    prov = first["provenance"]
    assert set(prov) == {"sampler", "denoiser", "classifier"}
    assert all(v.startswith("sha256:") for v in prov.values())
    meta = read_tar(ref["shard-000000.tar"], "x").meta[0]
    assert meta["provenance"] == prov
    # the same models and settings resume: everything skipped
    assert run_sampling(store.uri, "r", cfg, den, clf)["skipped_shards"] == 3

    other_den = _retrained(tmp_path / "den2", seed=5)
    with pytest.raises(StaleArtifactError, match=r"changed: denoiser\); use a new --run"):
        run_sampling(store.uri, "r", cfg, other_den, clf)
    torch.manual_seed(6)
    save_classifier(NoiseClassifier(TINY_CLF), tmp_path / "clf2", {})
    with pytest.raises(StaleArtifactError, match=r"changed: classifier\)"):
        run_sampling(store.uri, "r", cfg, den, str(tmp_path / "clf2"))
    assert _shards(store, folder) == ref  # refusals write nothing

    # a foreign shard in the middle of the folder (the old check read only the first one)
    run_sampling(store.uri, "o", cfg, other_den, clf)
    store.write_bytes(store.read_bytes("samples/o/cpsample", "shard-000002.tar"), folder,
                      "shard-000002.tar")  # fmt: skip
    with pytest.raises(StaleArtifactError, match=r"shard-000002.tar was sampled from other inputs"):
        run_sampling(store.uri, "r", cfg, den, clf)

    # --overwrite discards the old samples and draws every shard with the new denoiser
    out = run_sampling(store.uri, "r", cfg, other_den, clf, overwrite=True)
    assert out["skipped_shards"] == 0 and out["provenance"]["denoiser"] != prov["denoiser"]
    assert _drawn(_shards(store, folder)) == _drawn(_shards(store, "samples/o/cpsample"))


def _copy_store(tmp_path, den, n_copies: int = 3):
    """An unguarded ddim run, then a training set that contains some of its samples verbatim."""
    store = open_store(str(tmp_path / "g"))
    cfg = _cfg(sampler="ddim", num_samples=8, samples_per_shard=4, batch_size=4)
    run_sampling(store.uri, "plain", cfg, den, None)
    plain = read_image_shards(store, "samples/plain/ddim")
    copied = [0, 5, 6][:n_copies]  # shard 0 slot 0, shard 1 slots 1 and 2
    rng = np.random.default_rng(0)
    others = rng.integers(0, 256, (20, 8, 8, 1), dtype=np.uint8)
    images = np.concatenate([plain.images[copied], others])
    keys = [f"train-{i:03d}" for i in range(len(images))]
    write_image_shards(store, "data/copies/train", ImageSet(keys=keys, images=images), 10)
    return store, cfg, plain, copied


def test_guard_never_ships_a_copy(ray_local, tmp_path, tiny_models):
    den, _ = tiny_models
    store, _, plain, copied = _copy_store(tmp_path, den)
    guarded = _cfg(sampler="ddim", num_samples=8, samples_per_shard=4, batch_size=4, guard=0.99)
    out = run_sampling(store.uri, "guarded", guarded, den, None, guard_dataset="copies")
    g = out["guard"]
    assert g["rejected"] >= len(copied) and g["unfilled"] == 0 and out["num_samples"] == 8
    assert g["max_shipped_similarity"] < 0.99
    shipped = read_image_shards(store, "samples/guarded/ddim")
    assert shipped.keys == [k.replace("plain", "guarded") for k in plain.keys]
    for i, (image, meta) in enumerate(zip(shipped.images, shipped.meta)):
        assert meta["guard_nn_similarity"] < 0.99 and meta["guard_threshold"] == 0.99
        if i in copied:  # redrawn with a fresh derived seed
            assert meta["attempt"] >= 1
            assert meta["seed"] == sample_seed(0, meta["shard"], meta["index"], meta["attempt"])
            assert not np.array_equal(image, plain.images[i])
        else:  # attempt 0 is the unguarded seed: the very same image
            assert meta["attempt"] == 0 and np.array_equal(image, plain.images[i])
    # the independent check (Ray Data scoring) agrees: nothing shipped at or above the threshold
    rcfg = ReplicaConfig(threshold=0.99, pairs_k=4)
    summary = replica_check_report(store, "guarded", "copies", "ddim", rcfg)
    assert summary["replication_rate"] == 0.0 and summary["num_samples"] == 8
    base = replica_check_report(store, "plain", "copies", "ddim", rcfg)
    assert base["replication_rate"] == pytest.approx(len(copied) / 8)
    report = json.loads(store.read_bytes("reports", "plain", "report.json"))
    assert report["samplers"]["ddim"]["replication_rate"] == pytest.approx(len(copied) / 8)
    assert report["replica_check"]["ddim"]["figures"] == [
        "replicas_ddim_closest.png",
        "replicas_ddim_hist.png",
    ]
    for name in report["replica_check"]["ddim"]["figures"]:
        assert store.read_bytes("reports", "plain", name)[:4] == b"\x89PNG"
    # report.md is rebuilt with the merge: the check's section and its figures
    md = store.read_bytes("reports", "plain", "report.md").decode()
    assert "## Replica check: ddim" in md and "![replicas_ddim_hist.png]" in md
    assert f"- replication_rate: {len(copied) / 8}" in md
    rows = list(iter_per_sample(store, "plain", "ddim"))
    assert sorted(r["key"] for r in rows if r["nn_similarity"] >= 0.99) == [
        plain.keys[i] for i in copied
    ]


def test_guard_budget_zero_leaves_slots_empty_and_resumes(ray_local, tmp_path, tiny_models):
    den, _ = tiny_models
    store, _, _, copied = _copy_store(tmp_path, den)
    train = read_image_shards(store, "data/copies/train")
    write_dataset(store, "kept", {"train": train}, 10)  # the same images, with a manifest
    cfg = _cfg(
        sampler="ddim", num_samples=8, samples_per_shard=4, batch_size=4, guard=0.99, guard_budget=0
    )
    out = run_sampling(store.uri, "b0", cfg, den, None, guard_dataset="kept")
    assert out["guard"]["rejected"] == len(copied) == out["guard"]["unfilled"]
    assert out["num_samples"] == 8 - len(copied)
    kept = open_dataset(store, "kept")
    assert out["provenance"]["guard_data"] == kept.digest is not None
    # the job's opened dataset instead of its name: the same guard data, so the run resumes
    again = run_sampling(store.uri, "b0", cfg, den, None, guard_dataset=kept)
    assert again["skipped_shards"] == 2 and again["guard"] == out["guard"]
    assert again["provenance"] == out["provenance"]
    with pytest.raises(ConfigError, match="guard mode needs the training dataset"):
        run_sampling(store.uri, "b1", cfg, den, None)


def test_guard_resume_regrows_a_short_last_shard_to_its_new_plan(ray_local, tmp_path, tiny_models):
    """Growing a guarded run from 100 to 120 samples at 32 per shard: the last shard was planned at
    4 and is now planned at 24. Guard shards may be short (rejected slots stay empty), so before,
    the 4-sample shard counted as complete: 100 samples shipped, and the guard report called the 20
    never-drawn slots unfilled. Each member records its shard's planned count, checked on resume."""
    den, _ = tiny_models
    store = open_store(str(tmp_path / "grow"))
    rng = np.random.default_rng(1)
    train = rng.integers(0, 256, (40, 8, 8, 1), dtype=np.uint8)  # noise: nothing is a copy
    write_image_shards(store, "data/noise/train",
                       ImageSet(keys=[f"t-{i:03d}" for i in range(40)], images=train), 20)  # fmt: skip
    base = dict(sampler="ddim", samples_per_shard=32, batch_size=32, steps=2, guard=0.999)
    first = run_sampling(store.uri, "g", _cfg(num_samples=100, **base), den, None,
                         guard_dataset="noise")  # fmt: skip
    assert (first["num_samples"], first["guard"]["rejected"], first["guard"]["unfilled"]) == (
        100, 0, 0)  # fmt: skip
    folder = "samples/g/ddim"
    old = _shards(store, folder)
    grown = run_sampling(store.uri, "g", _cfg(num_samples=120, **base), den, None,
                         guard_dataset="noise")  # fmt: skip
    assert grown["skipped_shards"] == 3 and grown["num_shards"] == 4
    assert grown["num_samples"] == 120 and grown["num_planned"] == 120
    assert grown["guard"]["unfilled"] == 0 and grown["guard"]["rejected"] == 0
    assert [m["shard_planned"] for m in read_tar(old["shard-000003.tar"], "x").meta] == [4] * 4
    new = _shards(store, folder)
    assert {n: new[n] for n in list(new)[:3]} == {n: old[n] for n in list(old)[:3]}
    last = read_tar(new["shard-000003.tar"], "x")
    assert last.keys == [sample_key("ddim", 3, i) for i in range(24)]
    assert {(m["shard_planned"], m["shard_members"]) for m in last.meta} == {(24, 24)}
    # the first 4 samples of the regrown shard are the old ones (same seeds, attempt 0)
    np.testing.assert_array_equal(last.images[:4], read_tar(old["shard-000003.tar"], "x").images)
