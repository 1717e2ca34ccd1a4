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
