"""The stages: progress bars on unsplit Train datasets, and the replica-check report (IVF recall)."""

from __future__ import annotations

from pipeline.data.storage import open_store


def test_unsplit_datasets_lose_progress_bars_and_split_ones_keep_them(ray_local, monkeypatch):
    import ray

    from pipeline.orchestration.stages import quiet_unsplit

    ctx = ray.data.DataContext.get_current()
    monkeypatch.setattr(ctx, "enable_progress_bars", True)  # as in a job run from a terminal
    datasets = {"train": ray.data.range(8), "holdout": ray.data.range(4)}
    assert quiet_unsplit(datasets, ["train"]) is datasets
    assert datasets["train"].context.enable_progress_bars
    assert not datasets["holdout"].context.enable_progress_bars
    assert ctx.enable_progress_bars  # the driver's own context is untouched
    assert sorted(row["id"] for row in datasets["holdout"].take_all()) == [0, 1, 2, 3]
    every = {"train": ray.data.range(8), "holdout": ray.data.range(4)}
    quiet_unsplit(every, None)  # DataConfig's default: every dataset is split
    assert all(ds.context.enable_progress_bars for ds in every.values())


def test_shards_without_a_manifest_are_read_unchecked_with_a_warning(ray_local, tmp_path, caplog):
    """Shards put under data/<dataset>/<split> by hand (no make_shards, no manifest) are user data:
    the training reader takes them all, without a check, and says so."""
    import logging

    from pipeline.data.datasets import digits_source, split
    from pipeline.orchestration.stages import make_shards, webdataset

    store = open_store(str(tmp_path / "store"))
    train, holdout = split(digits_source(8), 24, 0)
    make_shards(store, "hand", train, holdout.subset(range(10)), shard_size=10)
    (tmp_path / "store" / "data" / "hand" / "manifest.json").unlink()
    with caplog.at_level(logging.WARNING, logger="pipeline.data.shards"):
        ds = webdataset(store, "data/hand/train")
    assert "its shards are read without checking them" in caplog.text
    assert sorted(r["__key__"] for r in ds.take_all()) == sorted(train.keys)


def test_a_training_stage_opens_its_dataset_once(tmp_path, core_tiny_unet_cfg, core_tiny_clf_cfg):
    """What train_denoiser and train_classifier decide before any Ray work (shape checks, split
    sizes, schedule, bit source, provenance) comes from one read of manifest.json."""
    from pipeline.core.config import ClassifierTrainConfig, DenoiserTrainConfig
    from pipeline.data.datasets import digits_source, split
    from pipeline.data.handle import open_dataset
    from pipeline.data.provenance import manifest_digest
    from pipeline.data.shards import read_manifest
    from pipeline.orchestration.stages import classifier_plan, denoiser_plan, make_shards
    from tests.data.test_handle import counting_store

    store = counting_store(tmp_path / "store")
    train, holdout = split(digits_source(8), 24, 0)
    make_shards(store, "dg", train, holdout.subset(range(10)), shard_size=10)
    digest = manifest_digest(read_manifest(store, "data/dg"))
    store.reads.clear()
    ds = open_dataset(store, "dg")
    config, inputs, provenance = denoiser_plan(ds, core_tiny_unet_cfg, DenoiserTrainConfig())
    plan = classifier_plan(ds, core_tiny_clf_cfg, ClassifierTrainConfig(labels="auto"))
    assert [r for r in store.reads if r.startswith("data/")] == ["data/dg/manifest.json"]
    assert store.manifest_reads() == 1  # "auto" bits looked for clusters: none are stored
    assert inputs == {"train": {"rows": 24, "row_bytes": 64}}
    assert provenance["data"] == plan.provenance["data"] == digest
    assert config["unet"]["sample_size"] == 8 and plan.labels == "key"
    assert plan.target.arch == core_tiny_clf_cfg and plan.provenance["denoiser"] is None
