"""CPSampleClassifier: loads what train_classifier writes (local, S3) with its record, round-trips
through save_pretrained, and refuses a scheduler with other noise levels."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import DDIMScheduler, EulerDiscreteScheduler

from pipeline.core.diffusion import linear_schedule
from pipeline.core.models import CheckpointError, NoiseClassifier, save_classifier, schedule_record
from pipeline.data.provenance import write_provenance
from pipeline.data.storage import open_store
from pipeline.integrations.classifier import CPSampleClassifier

LINEAR = {
    "num_train_timesteps": 1000,
    "beta_start": 1e-4,
    "beta_end": 0.02,
    "beta_schedule": "linear",
}


@pytest.fixture
def trained_dir(tmp_path, core_tiny_clf_cfg):
    """A classifier folder as train_classifier writes it: weights, config.json, provenance.json."""
    torch.manual_seed(0)
    net = NoiseClassifier(core_tiny_clf_cfg)
    record = {
        "train": {"t_max": 600, "steps": 7},
        "schedule": schedule_record(linear_schedule()),
        "fit": {"accuracy": 0.97, "rows": 40},
    }
    directory = tmp_path / "models" / "r" / "classifier"
    save_classifier(net, directory, record)
    write_provenance(directory, {"dataset": "digits", "manifest": "sha256:abc"})
    return directory, net


def _probe(model) -> torch.Tensor:
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(4, 1, 8, 8, generator=gen)
    return model(x, torch.tensor([0, 10, 300, 599]))


def test_loads_train_classifier_output_with_its_record(trained_dir):
    directory, net = trained_dir
    clf = CPSampleClassifier.from_pretrained(directory)
    assert torch.equal(_probe(clf), _probe(net.eval()))
    assert clf.t_max == 600 and not clf.training
    assert not any(p.requires_grad for p in clf.parameters())
    assert clf.record["fit"]["accuracy"] == 0.97
    assert clf.record["schedule"]["betas_digest"].startswith("sha256:")
    assert clf.record["provenance"]["provenance"]["dataset"] == "digits"


def test_save_pretrained_round_trip_keeps_weights_and_record(trained_dir, tmp_path):
    clf = CPSampleClassifier.from_pretrained(trained_dir[0])
    out = tmp_path / "saved"
    clf.save_pretrained(out)
    assert (out / "diffusion_pytorch_model.safetensors").exists()
    config = json.loads((out / "config.json").read_text())
    assert config["_class_name"] == "CPSampleClassifier" and config["channel_mults"] == [1, 2]
    again = CPSampleClassifier.from_pretrained(out)
    assert torch.allclose(_probe(again), _probe(clf), atol=1e-6)
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(),
                                                   clf.state_dict().values(), strict=True))  # fmt: skip
    assert again.record == clf.record and again.t_max == 600


def test_loads_from_s3(trained_dir, tmp_path, s3_bucket, s3_env):
    store = open_store(f"s3://{s3_bucket}/root")
    store.put_dir(trained_dir[0], "models", "r", "classifier")
    clf = CPSampleClassifier.from_pretrained(f"s3://{s3_bucket}/root/models/r/classifier")
    assert torch.equal(_probe(clf), _probe(trained_dir[1].eval()))
    assert clf.record["provenance"]["provenance"]["manifest"] == "sha256:abc"
    with pytest.raises(CheckpointError, match="no classifier there"):
        CPSampleClassifier.from_pretrained(f"s3://{s3_bucket}/root/models/r/nothing")


def test_missing_or_broken_folders_are_refused(trained_dir, tmp_path):
    with pytest.raises(CheckpointError, match="no such classifier folder"):
        CPSampleClassifier.from_pretrained(str(tmp_path / "absent" / "classifier"))
    directory = trained_dir[0]
    (directory / "model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(CheckpointError, match="not a readable safetensors"):
        CPSampleClassifier.from_pretrained(directory)


def test_scheduler_with_other_noise_levels_is_refused(trained_dir):
    clf = CPSampleClassifier.from_pretrained(trained_dir[0])
    clf.check_scheduler(DDIMScheduler(**LINEAR))  # the same betas: any scheduler class reads them
    clf.check_scheduler(EulerDiscreteScheduler(**LINEAR))
    scaled = {**LINEAR, "beta_schedule": "scaled_linear"}  # same end betas, other abar
    with pytest.raises(CheckpointError, match="trained on a schedule"):
        clf.check_scheduler(DDIMScheduler(**scaled))
    with pytest.raises(CheckpointError, match="T=500"):
        clf.check_scheduler(DDIMScheduler(**{**LINEAR, "num_train_timesteps": 500}))
