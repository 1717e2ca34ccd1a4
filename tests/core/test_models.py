"""Denoiser and classifier checkpoints: round trips, schedule, and clear errors."""

from __future__ import annotations

import collections
import dataclasses
import json
import pickle
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from pipeline.core.config import ClassifierArchConfig, to_dict
from pipeline.core.diffusion import linear_schedule, schedule_from_betas
from pipeline.core.models import (
    CLASSIFIER_WEIGHTS,
    RUN_CONFIG,
    CheckpointError,
    NoiseClassifier,
    build_unet,
    load_classifier,
    load_classifier_config,
    load_denoiser,
    load_schedule,
    num_parameters,
    save_classifier,
    save_denoiser,
    timestep_embedding,
    unet_config_shape,
    unet_image_shape,
)

# ------------------------------------------------------------------- pickle tripwire (audit events)
_PICKLE_EVENTS: list[str] | None = None


def _audit(event, args):
    if _PICKLE_EVENTS is not None and event == "pickle.find_class":
        _PICKLE_EVENTS.append(f"{args[0]}.{args[1]}")


sys.addaudithook(_audit)


class _RecordPickle:
    """Collects the globals any unpickler resolves while active."""

    def __enter__(self):
        global _PICKLE_EVENTS
        _PICKLE_EVENTS = []
        return _PICKLE_EVENTS

    def __exit__(self, *exc):
        global _PICKLE_EVENTS
        _PICKLE_EVENTS = None


def test_pickle_tripwire_sees_unpickling():
    with _RecordPickle() as events:
        pickle.loads(pickle.dumps(collections.OrderedDict(a=1)))
    assert events == ["collections.OrderedDict"]


# ----------------------------------------------------------------------------------------- denoiser
def _inputs(shape=(3, 1, 8, 8)):
    g = torch.Generator().manual_seed(0)
    return torch.randn(shape, generator=g), torch.tensor([0, 500, 999])


def test_denoiser_round_trip(tmp_path, core_tiny_unet_cfg):
    torch.manual_seed(0)
    unet = build_unet(core_tiny_unet_cfg).eval()
    assert unet_image_shape(unet) == (1, 8, 8)
    schedule = linear_schedule(1000, 1e-4, 0.02)
    run_config = {"unet": to_dict(core_tiny_unet_cfg), "note": "test"}
    target = tmp_path / "models" / "denoiser"
    save_denoiser(unet, target, run_config, schedule)

    names = sorted(p.name for p in target.iterdir())
    assert names == [
        "config.json",
        "diffusion_pytorch_model.safetensors",
        RUN_CONFIG,
        "scheduler_config.json",
    ]
    assert json.loads((target / RUN_CONFIG).read_text()) == run_config
    sched_cfg = json.loads((target / "scheduler_config.json").read_text())
    assert sched_cfg["num_train_timesteps"] == 1000
    assert len(sched_cfg["trained_betas"]) == 1000
    # atomic write: no staging folders left beside the target
    assert [p.name for p in target.parent.iterdir()] == ["denoiser"]

    with _RecordPickle() as events:
        loaded = load_denoiser(target)
    assert events == []
    assert not loaded.training
    x, t = _inputs()
    with torch.no_grad():
        assert torch.equal(loaded(x, t).sample, unet(x, t).sample)
    for (k1, v1), (k2, v2) in zip(unet.state_dict().items(), loaded.state_dict().items()):
        assert k1 == k2
        assert torch.equal(v1, v2)

    back = load_schedule(target)
    assert torch.equal(back.betas, schedule.betas)
    assert torch.equal(back.alphas_cumprod, schedule.alphas_cumprod)


def test_save_denoiser_replaces_existing(tmp_path, core_tiny_unet_cfg):
    target = tmp_path / "d"
    target.mkdir()
    (target / "stale.txt").write_text("old")
    torch.manual_seed(1)
    betas = torch.linspace(1e-3, 0.05, 100)
    save_denoiser(build_unet(core_tiny_unet_cfg), target, {}, schedule_from_betas(betas))
    assert not (target / "stale.txt").exists()
    back = load_schedule(target)
    assert back.num_train_timesteps == 100
    assert torch.equal(back.betas.float(), betas)


def test_save_denoiser_keeps_how_the_model_is_read(tmp_path, core_tiny_unet_cfg):
    """The prediction type and DDIM timestep placement survive a save/load round trip."""
    schedule = dataclasses.replace(
        linear_schedule(200), prediction_type="v_prediction", timestep_spacing="trailing"
    )
    save_denoiser(build_unet(core_tiny_unet_cfg), tmp_path / "d", {}, schedule)
    back = load_schedule(tmp_path / "d")
    assert (back.prediction_type, back.timestep_spacing, back.steps_offset) == (
        "v_prediction",
        "trailing",
        0,
    )
    assert torch.equal(back.alphas_cumprod, schedule.alphas_cumprod)


def test_load_classifier_config(tmp_path, core_tiny_clf_cfg):
    assert load_classifier_config(tmp_path) == {}
    save_classifier(NoiseClassifier(core_tiny_clf_cfg), tmp_path / "c", {"train": {"t_max": 7}})
    assert load_classifier_config(tmp_path / "c")["train"] == {"t_max": 7}
    (tmp_path / "c" / "config.json").write_text("[1, 2")
    with pytest.raises(CheckpointError, match="not a readable classifier config"):
        load_classifier_config(tmp_path / "c")


def test_load_denoiser_from_unet_subfolder(tmp_path, core_tiny_unet_cfg):
    torch.manual_seed(2)
    unet = build_unet(core_tiny_unet_cfg).eval()
    unet.save_pretrained(tmp_path / "pipe" / "unet")
    loaded = load_denoiser(tmp_path / "pipe")
    x, t = _inputs()
    with torch.no_grad():
        assert torch.equal(loaded(x, t).sample, unet(x, t).sample)


def test_load_denoiser_without_config_raises(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match=r"no config\.json"):
        load_denoiser(tmp_path / "empty")


def test_load_denoiser_without_weights_raises(tmp_path, core_tiny_unet_cfg):
    build_unet(core_tiny_unet_cfg).save_pretrained(tmp_path / "u")
    (tmp_path / "u" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="cannot load UNet2DModel"):
        load_denoiser(tmp_path / "u")


def test_load_schedule_variants(tmp_path):
    default = load_schedule(tmp_path)  # no scheduler config at all
    assert torch.equal(default.alphas_cumprod, linear_schedule().alphas_cumprod)

    (tmp_path / "scheduler").mkdir()
    cfg = {
        "num_train_timesteps": 200,
        "beta_start": 0.001,
        "beta_end": 0.03,
        "beta_schedule": "linear",
    }
    (tmp_path / "scheduler" / "scheduler_config.json").write_text(json.dumps(cfg))
    s = load_schedule(tmp_path)
    assert torch.equal(s.alphas_cumprod, linear_schedule(200, 0.001, 0.03).alphas_cumprod)

    # a top-level config wins over scheduler/; a beta_schedule diffusers does not know is refused
    (tmp_path / "scheduler_config.json").write_text(json.dumps({"beta_schedule": "quartic"}))
    with pytest.raises(CheckpointError, match="quartic"):
        load_schedule(tmp_path)


# --------------------------------------------------------------------------------------- classifier
def test_timestep_embedding():
    emb = timestep_embedding(torch.tensor([0, 10, 999]), 16)
    assert emb.shape == (3, 16)
    assert torch.equal(emb[0], torch.cat([torch.ones(8), torch.zeros(8)]))
    assert not torch.equal(emb[1], emb[2])


def test_noise_classifier_shapes_and_per_sample(core_tiny_clf_cfg):
    torch.manual_seed(0)
    clf = NoiseClassifier(core_tiny_clf_cfg).eval()
    x, t = _inputs()
    with torch.no_grad():
        out = clf(x, t)
        single = clf(x[1:2], t[1:2])
    assert out.shape == (3,)
    assert torch.allclose(out[1:2], single, atol=1e-6)
    assert num_parameters(clf) == sum(p.numel() for p in clf.parameters()) > 0


@pytest.fixture
def core_saved_clf(tmp_path, core_tiny_clf_cfg):
    torch.manual_seed(3)
    clf = NoiseClassifier(core_tiny_clf_cfg).eval()
    save_classifier(clf, tmp_path / "clf", {"label_seed": 99})
    return clf, tmp_path / "clf"


def test_classifier_round_trip(core_saved_clf, core_tiny_clf_cfg):
    clf, directory = core_saved_clf
    assert sorted(p.name for p in directory.iterdir()) == sorted(
        [CLASSIFIER_WEIGHTS, "config.json"]
    )
    assert [p.name for p in directory.parent.iterdir()] == ["clf"]
    cfg = json.loads((directory / "config.json").read_text())
    assert cfg == {"arch": to_dict(core_tiny_clf_cfg), "label_seed": 99}

    with _RecordPickle() as events:
        loaded = load_classifier(directory, expect_shape=(1, 8, 8))
    assert events == []
    assert loaded.config == core_tiny_clf_cfg
    assert not loaded.training
    assert not any(p.requires_grad for p in loaded.parameters())  # frozen for sampling
    x, t = _inputs()
    with torch.no_grad():
        assert torch.equal(loaded(x, t), clf(x, t))
    # the guidance's input gradient is unchanged by the frozen weights
    xs = x.clone().requires_grad_(True)
    (g_loaded,) = torch.autograd.grad(loaded(xs, t).sum(), xs)
    xr = x.clone().requires_grad_(True)
    (g_ref,) = torch.autograd.grad(clf.eval()(xr, t).sum(), xr)
    assert torch.allclose(g_loaded, g_ref, atol=1e-6) and g_loaded.abs().sum() > 0


def test_classifier_expect_shape_mismatch(core_saved_clf):
    _, directory = core_saved_clf
    with pytest.raises(CheckpointError, match=r"\(1, 8, 8\).*\(3, 16, 16\)"):
        load_classifier(directory, expect_shape=(3, 16, 16))


def test_classifier_weights_of_other_arch_raise(core_saved_clf):
    _, directory = core_saved_clf
    other = NoiseClassifier(
        ClassifierArchConfig(
            sample_size=8, base_channels=4, channel_mults=(1,), time_embed_dim=8, num_groups=4
        )
    )
    path = directory / CLASSIFIER_WEIGHTS
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as fh:
        meta = fh.metadata()
    save_file({k: v.contiguous() for k, v in other.state_dict().items()}, str(path), metadata=meta)
    with pytest.raises(CheckpointError, match="weights do not match the saved architecture"):
        load_classifier(directory)


def test_classifier_missing_tensor_raises(core_saved_clf):
    _, directory = core_saved_clf
    path = directory / CLASSIFIER_WEIGHTS
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as fh:
        meta = fh.metadata()
    state = load_file(str(path))
    del state["head.weight"]
    save_file(state, str(path), metadata=meta)
    with pytest.raises(CheckpointError, match=r"head\.weight"):
        load_classifier(directory)


def test_classifier_metadata_errors(core_saved_clf):
    clf, directory = core_saved_clf
    path = directory / CLASSIFIER_WEIGHTS
    state = {k: v.contiguous() for k, v in clf.state_dict().items()}
    save_file(state, str(path))
    with pytest.raises(CheckpointError, match="no 'arch'"):
        load_classifier(directory)
    bad = {**to_dict(clf.config), "channels": 17}
    save_file(state, str(path), metadata={"arch": json.dumps(bad)})
    with pytest.raises(CheckpointError, match=r"invalid architecture config.*channels"):
        load_classifier(directory)
    unknown = {**to_dict(clf.config), "depth": 3}
    save_file(state, str(path), metadata={"arch": json.dumps(unknown)})
    with pytest.raises(CheckpointError, match="depth"):
        load_classifier(directory)


def test_classifier_missing_weights_file(tmp_path):
    (tmp_path / "c").mkdir()
    with pytest.raises(CheckpointError, match=r"no model\.safetensors"):
        load_classifier(tmp_path / "c")


@pytest.mark.parametrize("corruption", ["truncated", "pickle"])
def test_classifier_corrupted_file_raises_checkpoint_error(core_saved_clf, corruption):
    clf, directory = core_saved_clf
    path = directory / CLASSIFIER_WEIGHTS
    if corruption == "truncated":
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    else:  # a torch.save pickle under the safetensors name must never be unpickled
        torch.save(clf.state_dict(), path)
    with _RecordPickle() as events, pytest.raises(CheckpointError):
        load_classifier(directory)
    assert events == []


# ------------------------------------------------------------------------- latents, text-conditioned
LATENT_ARCH = ClassifierArchConfig(
    sample_size=8, channels=4, base_channels=8, channel_mults=(1, 2), time_embed_dim=8,
    num_groups=4, cond_dim=6,
)  # fmt: skip


def test_text_conditioned_classifier_uses_cond_and_round_trips(tmp_path):
    torch.manual_seed(0)
    clf = NoiseClassifier(LATENT_ARCH).eval()
    z, t = torch.randn(3, 4, 8, 8), torch.tensor([0, 500, 999])
    cond = torch.randn(3, 6)
    with torch.no_grad():
        out = clf(z, t, cond)
        assert out.shape == (3,)
        assert not torch.allclose(out, clf(z, t, torch.zeros(3, 6)))  # the text moves the logit
        assert torch.allclose(out[1:2], clf(z[1:2], t[1:2], cond[1:2]), atol=1e-6)  # per sample
    with pytest.raises(ValueError, match=r"text-conditioned \(cond_dim 6\): pass cond"):
        clf(z, t)
    plain = NoiseClassifier(dataclasses.replace(LATENT_ARCH, cond_dim=0))
    with pytest.raises(ValueError, match="not text-conditioned"):
        plain(z, t, cond)
    assert not any(k.startswith("cond_embed") for k in plain.state_dict())  # old checkpoints load
    # the existing safetensors + arch-metadata path, unchanged
    save_classifier(clf, tmp_path / "clf", {"latent": {"cond_dim": 6}})
    loaded = load_classifier(tmp_path / "clf", expect_shape=(4, 8, 8))
    assert loaded.config == LATENT_ARCH
    with torch.no_grad():
        assert torch.equal(loaded(z, t, cond), out)


def test_an_arch_saved_before_cond_dim_loads_unconditioned(core_saved_clf):
    """Checkpoints written before cond_dim existed have no such key in their arch metadata."""
    clf, directory = core_saved_clf
    path = directory / CLASSIFIER_WEIGHTS
    old = {k: v for k, v in to_dict(clf.config).items() if k != "cond_dim"}
    state = {k: v.contiguous() for k, v in clf.state_dict().items()}
    save_file(state, str(path), metadata={"arch": json.dumps(old)})
    assert load_classifier(directory).config.cond_dim == 0


def test_unet_config_shape_reads_only_the_config(tmp_path, core_tiny_unet_cfg):
    save_denoiser(build_unet(core_tiny_unet_cfg), tmp_path / "d", {}, linear_schedule())
    assert unet_config_shape(tmp_path / "d") == (1, 8, 8)
    sd = tmp_path / "sd" / "unet"
    sd.mkdir(parents=True)  # a pipeline directory's unet/: no weights needed
    (sd / "config.json").write_text(json.dumps({"in_channels": 4, "sample_size": [8, 8]}))
    assert unet_config_shape(tmp_path / "sd") == (4, 8, 8)
    (sd / "config.json").write_text(json.dumps({"in_channels": 4}))
    with pytest.raises(CheckpointError, match="in_channels and sample_size"):
        unet_config_shape(tmp_path / "sd")
    with pytest.raises(CheckpointError, match=r"no unet/config\.json"):
        unet_config_shape(tmp_path / "missing")
