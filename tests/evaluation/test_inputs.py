"""What made a report's numbers (pipeline/evaluation/inputs.py): the sample-shard checks, the dataset
check, the knobs taken from the samples, and the conflicts that make merge_report refuse a fragment."""

from __future__ import annotations

import json

import numpy as np
import pytest

from pipeline.core.config import ConfigError
from pipeline.core.models import CheckpointError
from pipeline.data.provenance import StaleArtifactError, manifest_digest, value_digest
from pipeline.data.shards import read_manifest, write_dataset
from pipeline.data.storage import open_store
from pipeline.data.tars import build_tar, encode_png
from pipeline.evaluation.inputs import (
    check_dataset,
    check_samples,
    classifier_bits,
    conflicts,
    run_inputs,
    sampler_folders,
    sampler_knobs,
)
from tests.data.test_tars import random_set

MODELS = {"denoiser": "sha256:den", "classifier": "sha256:clf"}
SETTINGS = {"sampler": "cpsample", "steps": 10, "alpha": 0.25, "scale": 4.0}


def _shard(store, folder: str, index: int, provenance: dict | None, members: int = 2) -> None:
    image = np.zeros((4, 4, 1), np.uint8)
    meta = {"run_fingerprint": f"fp{index}", "shard_members": members}
    if provenance is not None:
        meta.update(provenance=provenance, sampler_settings=SETTINGS)
    records = [(f"cpsample-{index:06d}-{i:05d}", encode_png(image), meta) for i in range(members)]
    store.write_bytes(build_tar(records), folder, f"shard-{index:06d}.tar")


def test_check_samples_reads_every_shard_head_and_fingerprints_the_folder(tmp_path):
    store = open_store(str(tmp_path))
    for i in range(3):
        _shard(store, "samples/r/cpsample", i, dict(MODELS))
    out = check_samples(store, "samples/r/cpsample", dict(MODELS))
    rows = [[f"shard-{i:06d}.tar", f"fp{i}", 2] for i in range(3)]
    assert out == {
        "fingerprint": value_digest(rows), "num_shards": 3, "settings": SETTINGS,
        "provenance": MODELS,
    }  # fmt: skip
    assert sampler_folders(store, "r") == {"cpsample": "samples/r/cpsample"}


def test_check_samples_refuses_stale_mixed_and_unrecorded_shards(tmp_path):
    store = open_store(str(tmp_path))
    _shard(store, "s/a", 0, dict(MODELS))
    with pytest.raises(StaleArtifactError, match=r"are stale: .*\(changed: classifier\)"):
        check_samples(store, "s/a", {**MODELS, "classifier": "sha256:retrained"})
    with pytest.raises(StaleArtifactError, match=r"\(changed: denoiser\)"):
        check_samples(store, "s/a", {"denoiser": "sha256:other"})
    _shard(store, "s/a", 1, {**MODELS, "denoiser": "sha256:den2"})
    with pytest.raises(StaleArtifactError, match=r"shard-000001\.tar was drawn from other inputs "):
        check_samples(store, "s/a", None)
    _shard(store, "s/b", 0, None)
    with pytest.raises(StaleArtifactError, match=r"shard-000000\.tar records no provenance"):
        check_samples(store, "s/b", None)


def test_check_dataset_refuses_data_the_model_was_not_trained_on(tmp_path):
    store = open_store(str(tmp_path))
    write_dataset(store, "d", {"train": random_set(4), "holdout": random_set(2, seed=1)})
    digest = manifest_digest(read_manifest(store, "data/d"))
    assert check_dataset(store, "d", digest, "models/r/denoiser") == digest
    assert check_dataset(store, "d", None, "models/r/denoiser") == digest  # not recorded
    with pytest.raises(StaleArtifactError, match="models/r/denoiser was trained on data with"):
        check_dataset(store, "d", "sha256:" + "0" * 64, "models/r/denoiser")
    # an opened dataset: its digest, no read of the manifest
    from pipeline.data.handle import open_dataset
    from tests.data.test_handle import CountingStore

    counting = CountingStore(store.uri, store.fs, store.path)
    ds = open_dataset(counting, "d")
    assert check_dataset(counting, ds, digest, "models/r/denoiser") == digest
    with pytest.raises(StaleArtifactError, match=rf"but {tmp_path}/data/d has sha256:"):
        check_dataset(counting, ds, "sha256:" + "0" * 64, "models/r/denoiser")
    assert counting.reads == ["data/d/manifest.json"]


def test_sampler_knobs_come_from_the_samples_and_given_ones_must_agree():
    samples = {"cpsample": {"settings": SETTINGS}}
    knobs = sampler_knobs(samples)
    assert (knobs.sampler, knobs.alpha, knobs.scale, knobs.steps) == ("cpsample", 0.25, 4.0, 10)
    assert sampler_knobs(samples, alpha=0.25).alpha == 0.25
    with pytest.raises(ConfigError, match=r"--alpha 0\.1: the cpsample samples were drawn with"):
        sampler_knobs(samples, alpha=0.1)
    assert sampler_knobs({}, scale=7.0).scale == 7.0  # no CPSample samples: the given knob


def test_conflicts_name_only_inputs_both_sides_record_differently():
    report = run_inputs(dict(MODELS), "sha256:data", {"ddim": {"fingerprint": "f1"}})
    assert report["samples"] == {"ddim": "f1"} and report["data"] == "sha256:data"
    assert conflicts(report, report) == []
    later = run_inputs(dict(MODELS), "sha256:data", {"cpsample": {"fingerprint": "f2"}})
    assert conflicts(report, later) == []  # another sampler's samples: added, not a conflict
    retrained = run_inputs({**MODELS, "denoiser": "sha256:new"}, "sha256:data")
    assert conflicts(report, retrained) == ["denoiser"]
    assert conflicts(None, retrained) == []


def test_classifier_bits_take_the_share_the_classifier_recorded(tmp_path):
    store = open_store(str(tmp_path))
    assert classifier_bits(store, "r") == (0, 0, 0.0)  # no classifier
    record = {"train": {"holdout_images": 200, "label_seed": 7}, "metrics": {}}
    store.write_bytes(json.dumps(record).encode(), "models", "r", "classifier", "config.json")
    with pytest.raises(CheckpointError, match="does not record which share"):
        classifier_bits(store, "r")
    record["metrics"]["holdout_fraction"] = 0.4
    store.write_bytes(json.dumps(record).encode(), "models", "r", "classifier", "config.json")
    assert classifier_bits(store, "r") == (200, 7, 0.4)
