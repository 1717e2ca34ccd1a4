"""jobs/train_classifier.py's default sizing: N from a real store's manifest, the steps and width of
the scaling fit where none were given, explicit flags and --config keys kept, N recorded."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from pipeline.core.classifier_sizing import size_classifier
from pipeline.core.config import ClassifierArchConfig, ClassifierTrainConfig

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def job():
    spec = importlib.util.spec_from_file_location(
        "train_classifier_job", ROOT / "jobs" / "train_classifier.py"
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_n_comes_from_the_manifest_with_the_held_out_bits(job, tmp_path):
    from pipeline.data.datasets import digits_source, split
    from pipeline.data.handle import open_dataset
    from pipeline.data.storage import open_store
    from pipeline.orchestration.stages import make_shards

    store = open_store(str(tmp_path))
    train, holdout = split(digits_source(8), 40, 0)
    make_shards(store, "digits", train, holdout.subset(range(30)), shard_size=16)
    ds = open_dataset(store, "digits")
    assert job.bits_in(ds, 1000) == 40 + 29  # all but one held-out image carry bits
    assert job.bits_in(ds, 10) == 50
    bare = type(ds)(ds.store, ds.dataset, ds.folder, None)  # hand-made shards: no manifest
    assert job.bits_in(bare, 10) is None


def test_unset_steps_and_width_follow_the_fit_and_n_is_recorded(job):
    arch, train = ClassifierArchConfig(), ClassifierTrainConfig()
    n = 1_000_000
    want = size_classifier(n, train.batch_size)
    a, t, line = job.sized_configs(arch, train, n, steps_given=False, width_given=False)
    assert (a.base_channels, t.steps, t.sized_for) == (want.base_channels, want.steps, n)
    assert t.steps > 1600 and f"{t.steps} steps" in line and "N=1000000" in line
    # explicit values win, one at a time or both
    a, t, line = job.sized_configs(arch, ClassifierTrainConfig(steps=77), n, True, False)
    assert (a.base_channels, t.steps, t.sized_for) == (want.base_channels, 77, n)
    assert "--steps given, kept" in line
    a, t, _ = job.sized_configs(ClassifierArchConfig(base_channels=8), train, n, False, True)
    assert (a.base_channels, t.steps) == (8, want.steps)
    a, t, line = job.sized_configs(arch, train, n, True, True)
    assert (a, t) == (arch, train) and t.sized_for == 0 and "kept" in line
    a, t, line = job.sized_configs(arch, train, None, False, False)
    assert (a, t) == (arch, train) and "no manifest" in line


def test_config_keys_count_as_given(job, tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("train:\n  steps: 300\narch:\n  channel_mults: [1, 2]\n")
    assert job.given_keys(str(cfg)) == {"train": {"steps"}, "arch": {"channel_mults"}}
    assert job.given_keys(None) == {"train": set(), "arch": set()}
