"""Ray Train resume continues only a run made from the same config and data (real local Ray).

Before provenance, a rerun with another learning rate, label seed or dataset under the same ``--run``
continued from the old weights and then wrote the new config into ``state.json`` and the exported
model: the saved config described a model it did not make.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from pipeline.core.config import (
    ClassifierArchConfig,
    ClassifierTrainConfig,
    DenoiserTrainConfig,
    UNetConfig,
    to_dict,
)
from pipeline.data.datasets import digits_source, split
from pipeline.data.provenance import StaleArtifactError, dir_digest, read_provenance
from pipeline.data.storage import open_store
from pipeline.orchestration.stages import (
    make_shards,
    train_classifier,
    train_denoiser,
    training_provenance,
)
from pipeline.train.run_state import claim_checkpoints

TINY_UNET = UNetConfig(sample_size=16, block_out_channels=(8, 16), norm_num_groups=8)
TINY_ARCH = ClassifierArchConfig(base_channels=8, channel_mults=(1, 2), num_groups=4)
STALE = r"\); use a new --run, or pass --overwrite to discard the old results"


def _store(tmp_path: Path, split_seed: int = 0):
    store = open_store(str(tmp_path / "store"))
    train, holdout = split(digits_source(16), 32, split_seed)
    make_shards(store, "digits", train, holdout.subset(range(40)), shard_size=100)
    return store


def _run_config(store, run: str, kind: str) -> dict:
    return json.loads(Path(store.join("models", run, kind, "run_config.json")).read_text())


def _checkpoints(store, name: str) -> list[Path]:
    folder = Path(store.join("checkpoints", name))
    return sorted(p for p in folder.glob("checkpoint_*") if p.is_dir())


def _last_state(store, name: str) -> dict:
    return json.loads((_checkpoints(store, name)[-1] / "state.json").read_text())


def test_denoiser_resumes_only_from_the_same_config_and_data(ray_local, tmp_path, capsys):
    store = _store(tmp_path)
    train = DenoiserTrainConfig(steps=4, batch_size=8, checkpoint_every=4, warmup_steps=0)
    first = train_denoiser(store, "p", "digits", TINY_UNET, train)
    record = json.loads(
        Path(store.join("checkpoints", "p-denoiser", "provenance.json")).read_text()
    )
    inputs = record["provenance"]
    assert set(inputs) == {"config", "data"} and inputs["data"].startswith("sha256:")
    # the checkpoint and the exported model record the same inputs; the model its own digest too
    assert _last_state(store, "p-denoiser")["provenance"] == inputs
    model_dir = store.join("models", "p", "denoiser")
    exported = read_provenance(model_dir)
    assert exported["provenance"] == inputs and exported["digest"] == dir_digest(model_dir)

    # how the run executes may change on resume: tests/train/test_workers_fault_tolerance.py reruns
    # a killed driver with another num_to_keep and checks that it resumed
    # what it learns may not: another learning rate, then other data, each refused before any work
    model_before = dir_digest(model_dir)
    ckpts = _checkpoints(store, "p-denoiser")
    # the same run again: it is finished, so it trains nothing and starts no worker; the final
    # checkpoint is exported again (the same bytes) with the metrics Ray Train recorded
    capsys.readouterr()
    again = train_denoiser(store, "p", "digits", TINY_UNET, train)
    assert f"denoiser already trained: {store.uri_of('checkpoints', 'p-denoiser')}/checkpoint_" in (
        capsys.readouterr().out
    )
    assert again == first and first["metrics"]["step"] == 4 and "loss" in first["metrics"]
    assert dir_digest(model_dir) == model_before and _checkpoints(store, "p-denoiser") == ckpts
    with pytest.raises(StaleArtifactError, match="changed: config" + STALE):
        train_denoiser(store, "p", "digits", TINY_UNET, dataclasses.replace(train, lr=5e-4))
    other = _store(tmp_path, split_seed=1)  # the same store root, other training images
    with pytest.raises(StaleArtifactError, match="changed: data" + STALE):
        train_denoiser(other, "p", "digits", TINY_UNET, train)
    assert dir_digest(model_dir) == model_before and _checkpoints(store, "p-denoiser") == ckpts

    # --overwrite discards the old checkpoints (Ray Train then starts from step 0) and claims the
    # folder for the new inputs
    new_inputs = training_provenance(
        other, "digits", {"unet": to_dict(TINY_UNET), "train": to_dict(train)}
    )
    assert new_inputs["data"] != inputs["data"] and new_inputs["config"] == inputs["config"]
    claim_checkpoints(other, "p-denoiser", new_inputs, overwrite=True)
    folder = Path(store.join("checkpoints", "p-denoiser"))
    assert [p.name for p in folder.iterdir()] == ["provenance.json"]
    assert json.loads((folder / "provenance.json").read_text())["provenance"] == new_inputs


def test_classifier_refuses_another_label_seed_and_runs_without_a_record(ray_local, tmp_path):
    store = _store(tmp_path)
    # cache_max_bytes=0: the training and held-out bit images stream through the loop every epoch
    train = ClassifierTrainConfig(
        steps=4, batch_size=8, holdout_images=30, t_max=100, checkpoint_every=4, warmup_steps=0,
        cache_max_bytes=0,
    )  # fmt: skip
    first = train_classifier(store, "c", "digits", TINY_ARCH, train)
    model_dir = store.join("models", "c", "classifier")
    exported = dir_digest(model_dir)
    # rerun when finished: the same model (its held-out share from the manifest, as Ray Data's)
    again = train_classifier(store, "c", "digits", TINY_ARCH, train)
    assert again == first and dir_digest(model_dir) == exported
    config = json.loads(Path(model_dir, "config.json").read_text())
    assert config["metrics"]["holdout_fraction"] == 30 / 40
    (data,) = _last_state(store, "c-classifier")["data"]  # one rank
    assert data["step"] == 4
    assert data["train"]["input"] == data["bits"]["input"] == "stream"
    assert data["train"]["rows"] == data["bits"]["rows"] == 4 * 4  # train_fraction 0.5 of 8
    assert data["train"]["rows_read"] == 32  # half an epoch of one pass over the 32 images
    inputs = read_provenance(store.join("models", "c", "classifier"))["provenance"]
    assert set(inputs) == {"config", "data", "denoiser"} and inputs["denoiser"] is None
    # the random bits are the run's identity: a new label seed is a new classifier
    with pytest.raises(StaleArtifactError, match="changed: config" + STALE):
        train_classifier(store, "c", "digits", TINY_ARCH, dataclasses.replace(train, label_seed=7))
    assert _last_state(store, "c-classifier")["train"]["label_seed"] == train.label_seed

    # checkpoints from before provenance existed cannot be shown to match: refused
    legacy = Path(store.join("checkpoints", "old-classifier", "checkpoint_000000"))
    legacy.mkdir(parents=True)
    (legacy / "state.json").write_text(json.dumps({"step": 2}))
    with pytest.raises(StaleArtifactError, match="changed: config, data, denoiser" + STALE):
        train_classifier(store, "old", "digits", TINY_ARCH, train)
