"""Model directories in a store: resolving local or store-relative locations, loading, preflight."""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import pytest
import torch

from pipeline.core.config import ClassifierTrainConfig, SamplerConfig, to_dict
from pipeline.core.diffusion import linear_schedule
from pipeline.core.models import (
    CheckpointError,
    NoiseClassifier,
    betas_digest,
    build_unet,
    load_schedule,
    save_classifier,
    save_denoiser,
    schedule_record,
)
from pipeline.data import checkpoints
from pipeline.data.checkpoints import load_models, preflight_models, resolve_model_dir
from pipeline.data.storage import open_store

DDIM = SamplerConfig(sampler="ddim")
CPS = SamplerConfig(sampler="cpsample", alpha=0.5, scale=5.0, guidance_t_max=60)


@pytest.fixture
def tiny_models(tmp_path, core_tiny_unet_cfg, core_tiny_clf_cfg):
    """Random-weight 8x8 denoiser (schedule T=100), its classifier and a 3-channel classifier."""
    root = tmp_path / "models"
    torch.manual_seed(0)
    unet = build_unet(core_tiny_unet_cfg)
    save_denoiser(unet, root / "denoiser", {"unet": {}}, linear_schedule(100, 1e-4, 0.05))
    torch.manual_seed(1)
    clf = NoiseClassifier(core_tiny_clf_cfg)
    save_classifier(clf, root / "classifier", {})
    rgb = dataclasses.replace(core_tiny_clf_cfg, channels=3)
    save_classifier(NoiseClassifier(rgb), root / "rgb-classifier", {})
    return {"root": root, "unet": unet, "clf": clf.eval()}


def _guidance_probe(guidance, clf, t: int):
    """Run the guidance at timestep ``t`` on a fixed batch; also the classifier's own p."""
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(3, 1, 8, 8, generator=gen)
    eps = torch.randn(3, 1, 8, 8, generator=gen)
    tb = torch.full((3,), t, dtype=torch.long)
    abar = linear_schedule(100, 1e-4, 0.05).abar(tb)
    with torch.no_grad():
        p_ref = torch.sigmoid(clf(x, tb).float())
    return guidance(x, tb, eps, abar), eps, p_ref


# ------------------------------------------------------------------------------ resolve_model_dir
def test_a_local_folder_is_used_in_place(tiny_models, tmp_path):
    store = open_store(str(tmp_path / "store"))
    den = tiny_models["root"] / "denoiser"
    assert resolve_model_dir(store, str(den), tmp_path / "scratch") == den
    assert not (tmp_path / "scratch").exists()  # nothing was copied


def test_a_store_relative_path_resolves_under_the_store(tiny_models, tmp_path):
    store = open_store(str(tmp_path / "store"))
    store.put_dir(tiny_models["root"] / "denoiser", "models", "r", "denoiser")
    for location in ("models/r/denoiser", "/models//r/denoiser/"):
        got = resolve_model_dir(store, location, tmp_path / "scratch")
        assert got == Path(store.join("models", "r", "denoiser"))
        assert (got / "config.json").is_file() and (got / "scheduler_config.json").is_file()


def test_a_missing_model_names_the_location_and_the_store(tmp_path):
    store = open_store(str(tmp_path / "store"))
    with pytest.raises(CheckpointError) as err:
        resolve_model_dir(store, "models/nope/denoiser", tmp_path / "scratch")
    msg = str(err.value)
    assert "'models/nope/denoiser'" in msg and store.uri in msg
    assert "neither a local folder" in msg


# ----------------------------------------------------------------------------------- load_models
def test_ddim_loads_the_denoiser_and_its_schedule_without_a_classifier(tiny_models, tmp_path):
    store = open_store(str(tmp_path / "store"))
    den = str(tiny_models["root"] / "denoiser")
    unet, schedule, shape, guidance = load_models(store, den, None, DDIM, "cpu", str(tmp_path))
    assert shape == (1, 8, 8) and guidance is None and not unet.training
    # the saved schedule (T = 100, beta_end 0.05), not the default linear T = 1000
    expected = linear_schedule(100, 1e-4, 0.05)
    assert schedule.num_train_timesteps == 100
    assert torch.allclose(schedule.betas, expected.betas, atol=1e-7)
    assert torch.allclose(schedule.alphas_cumprod, expected.alphas_cumprod, atol=1e-6)
    saved = tiny_models["unet"].state_dict()
    loaded = unet.state_dict()
    assert saved.keys() == loaded.keys()
    assert all(torch.equal(saved[k], loaded[k]) for k in saved)
    # a ddim run ignores a classifier that does not even fit the denoiser
    rgb = str(tiny_models["root"] / "rgb-classifier")
    assert load_models(store, den, rgb, DDIM, "cpu", str(tmp_path))[3] is None


def test_cpsample_builds_guidance_from_the_saved_classifier_and_knobs(tiny_models, tmp_path):
    store = open_store(str(tmp_path / "store"))
    root = tiny_models["root"]
    *_, guidance = load_models(
        store, str(root / "denoiser"), str(root / "classifier"), CPS, "cpu", str(tmp_path)
    )
    assert callable(guidance)
    # below guidance_t_max, alpha = 0.5: every sample fires and eps moves; p is the saved classifier's
    out, eps, p_ref = _guidance_probe(guidance, tiny_models["clf"], t=50)
    assert torch.allclose(out.p, p_ref, atol=1e-6)
    assert out.fired.all() and not torch.allclose(out.eps, eps)
    # at or above guidance_t_max = 60 nothing fires and eps is returned untouched
    out, eps, _ = _guidance_probe(guidance, tiny_models["clf"], t=60)
    assert not out.fired.any() and torch.equal(out.eps, eps)
    # scale 0: the gate fires but eps is left exactly as it was
    zero = dataclasses.replace(CPS, scale=0.0)
    *_, g0 = load_models(
        store, str(root / "denoiser"), str(root / "classifier"), zero, "cpu", str(tmp_path)
    )
    out, eps, _ = _guidance_probe(g0, tiny_models["clf"], t=50)
    assert out.fired.all() and torch.equal(out.eps, eps)


def test_cpsample_without_a_classifier_is_refused(tiny_models, tmp_path):
    store = open_store(str(tmp_path / "store"))
    den = str(tiny_models["root"] / "denoiser")
    with pytest.raises(CheckpointError, match="sampler 'cpsample' needs a classifier checkpoint"):
        load_models(store, den, None, CPS, "cpu", str(tmp_path))


def test_a_classifier_for_other_images_is_refused(tiny_models, tmp_path):
    store = open_store(str(tmp_path / "store"))
    root = tiny_models["root"]
    with pytest.raises(CheckpointError) as err:
        load_models(
            store, str(root / "denoiser"), str(root / "rgb-classifier"), CPS, "cpu", str(tmp_path)
        )
    msg = str(err.value)
    assert "(3, 8, 8)" in msg and "(1, 8, 8)" in msg and "rgb-classifier" in msg


# ------------------------------------------------------------------ classifier vs denoiser records
def _record(schedule, t_max: int, fit: float | None = None) -> dict:
    """What ``train_classifier`` writes beside a classifier: its schedule, its training config and
    (``fit``: its accuracy on its own bits at t < 100) its model card."""
    record = {
        "schedule": schedule_record(schedule),
        "train": to_dict(ClassifierTrainConfig(t_max=t_max)),
    }
    if fit is not None:
        record["fit"] = {"accuracy": fit, "mean_margin": 0.125, "t_range": [0, 100], "rows": 64,
                         "seed": 3, "threshold": 0.9, "fits": fit >= 0.9}  # fmt: skip
    return record


def _legacy_record(schedule, t_max: int) -> dict:
    """A record from before the betas digest: T and the first and last beta only."""
    return {
        "schedule": {
            "num_train_timesteps": schedule.num_train_timesteps,
            "beta_first": float(schedule.betas[0]),
            "beta_last": float(schedule.betas[-1]),
        },
        "train": to_dict(ClassifierTrainConfig(t_max=t_max)),
    }


def _classifier_with(tiny_models, name: str, record: dict) -> str:
    save_classifier(tiny_models["clf"], tiny_models["root"] / name, record)
    return str(tiny_models["root"] / name)


def _denoiser_with(tiny_models, name: str, scheduler: dict) -> str:
    """The tiny denoiser under ``name`` with a diffusers scheduler config of ``scheduler``'s keys."""
    path = tiny_models["root"] / name
    save_denoiser(tiny_models["unet"], path, {"unet": {}}, linear_schedule())
    config = {"_class_name": "DDPMScheduler", "num_train_timesteps": 1000, "beta_start": 1e-4,
              "beta_end": 0.02, "beta_schedule": "linear", "trained_betas": None, **scheduler}  # fmt: skip
    (path / "scheduler_config.json").write_text(json.dumps(config))
    return str(path)


def test_a_classifier_with_a_matching_record_is_accepted(tiny_models, tmp_path):
    store = open_store(str(tmp_path / "store"))
    den = str(tiny_models["root"] / "denoiser")
    # t_max = guidance_t_max (60): guidance queries t < 60, the classifier was trained on t < 60
    clf = _classifier_with(tiny_models, "fits", _record(load_schedule(den), 60, fit=0.9))
    assert callable(load_models(store, den, clf, CPS, "cpu", str(tmp_path))[3])


def test_a_classifier_trained_on_another_schedule_is_refused_before_loading(
    tiny_models, tmp_path, monkeypatch
):
    store = open_store(str(tmp_path / "store"))
    den = str(tiny_models["root"] / "denoiser")  # T = 100, betas 1e-4 .. 0.05
    ours = schedule_record(load_schedule(den))
    for other in (linear_schedule(), linear_schedule(100, 1e-4, 0.02)):
        clf = _classifier_with(tiny_models, "other-schedule", _record(other, 60))
        # nothing is loaded before the refusal
        monkeypatch.setattr(checkpoints, "load_denoiser", _must_not_run)
        with pytest.raises(CheckpointError) as err:
            load_models(store, den, clf, CPS, "cpu", str(tmp_path))
        msg = str(err.value)
        assert "\n" not in msg and "other-schedule" in msg and den in msg
        theirs = (
            f"T={other.num_train_timesteps}, betas 0.0001..{float(other.betas[-1]):.6g} (all betas "
            f"sha256:{betas_digest(other).removeprefix('sha256:')[:12]}, epsilon, leading, 0)"
        )
        mine = (
            f"T=100, betas 0.0001..0.05 (all betas sha256:"
            f"{ours['betas_digest'].removeprefix('sha256:')[:12]}, epsilon, leading, 0)"
        )
        assert f"trained on the schedule {theirs} but the denoiser {den} has {mine}" in msg
        assert f"--denoiser {den}" in msg


def test_scaled_linear_with_the_same_end_betas_is_refused(tiny_models, tmp_path):
    """The check the end betas alone could not make: linear and scaled_linear 1e-4..0.02 share T and
    both ends, yet noise x_t differently (abar differs by up to 0.357)."""
    store = open_store(str(tmp_path / "store"))
    den = _denoiser_with(tiny_models, "scaled", {"beta_schedule": "scaled_linear"})
    theirs, linear = load_schedule(den), linear_schedule()
    assert theirs.num_train_timesteps == 1000
    assert float(theirs.betas[0]) == pytest.approx(1e-4, rel=1e-6)
    assert float(theirs.betas[-1]) == pytest.approx(0.02, rel=1e-6)
    gap = float((theirs.alphas_cumprod - linear.alphas_cumprod).abs().max())
    assert gap == pytest.approx(0.357, abs=1e-3)
    clf = _classifier_with(tiny_models, "linear-clf", _record(linear, 60, fit=1.0))
    with pytest.raises(CheckpointError) as err:
        load_models(store, den, clf, CPS, "cpu", str(tmp_path))
    msg = str(err.value)
    ends = "T=1000, betas 0.0001..0.02 (all betas sha256:"
    assert msg.count(ends) == 2  # both schedules named, with their own digests
    assert betas_digest(linear).removeprefix("sha256:")[:12] in msg
    assert betas_digest(theirs).removeprefix("sha256:")[:12] in msg
    assert betas_digest(linear) != betas_digest(theirs)
    # the same record is accepted by the linear denoiser it was trained for
    lin = _denoiser_with(tiny_models, "linear", {})
    assert callable(load_models(store, lin, clf, CPS, "cpu", str(tmp_path))[3])


@pytest.mark.parametrize(
    ("scheduler", "theirs", "ours"),
    [
        ({"prediction_type": "v_prediction"}, "epsilon, leading, 0", "v_prediction, leading, 0"),
        ({"timestep_spacing": "trailing"}, "epsilon, leading, 0", "epsilon, trailing, 0"),
    ],
)
def test_another_prediction_type_or_spacing_is_refused(
    tiny_models, tmp_path, scheduler, theirs, ours
):
    store = open_store(str(tmp_path / "store"))
    den = _denoiser_with(tiny_models, "reads-otherwise", scheduler)
    clf = _classifier_with(tiny_models, "eps-clf", _record(linear_schedule(), 60, fit=1.0))
    with pytest.raises(CheckpointError) as err:
        load_models(store, den, clf, CPS, "cpu", str(tmp_path))
    msg = str(err.value)
    digest = betas_digest(linear_schedule()).removeprefix("sha256:")[:12]  # the same betas
    assert f"(all betas sha256:{digest}, {theirs}) but the denoiser {den}" in msg
    assert msg.endswith(f"(all betas sha256:{digest}, {ours}): retrain the classifier with "
                        f"--denoiser {den}")  # fmt: skip


def test_a_record_without_the_digest_falls_back_to_the_end_betas(tiny_models, tmp_path, caplog):
    store = open_store(str(tmp_path / "store"))
    den = _denoiser_with(tiny_models, "scaled", {"beta_schedule": "scaled_linear"})
    # an old record of a linear classifier: T and the ends are all it has, so it passes, and says so
    clf = _classifier_with(tiny_models, "old", _legacy_record(linear_schedule(), 60))
    with caplog.at_level(logging.WARNING, logger="pipeline.data.checkpoints"):
        assert callable(load_models(store, den, clf, CPS, "cpu", str(tmp_path))[3])
    assert "without a betas digest" in caplog.text
    assert "only T and the first and last beta are compared" in caplog.text
    # other end betas are still refused
    old = _classifier_with(
        tiny_models, "old2", _legacy_record(linear_schedule(1000, 1e-4, 0.03), 60)
    )
    with pytest.raises(CheckpointError, match=r"trained on the schedule T=1000, betas 0.0001..0.03 "
                       r"but the denoiser"):  # fmt: skip
        load_models(store, den, old, CPS, "cpu", str(tmp_path))


def test_guidance_beyond_the_classifier_t_max_is_refused(tiny_models, tmp_path, monkeypatch):
    store = open_store(str(tmp_path / "store"))
    den = str(tiny_models["root"] / "denoiser")
    clf = _classifier_with(tiny_models, "short", _record(load_schedule(den), 40))
    monkeypatch.setattr(checkpoints, "load_denoiser", _must_not_run)
    with pytest.raises(CheckpointError) as err:
        load_models(store, den, clf, CPS, "cpu", str(tmp_path))  # guidance_t_max 60
    msg = str(err.value)
    assert "guidance_t_max 60 exceeds the t_max 40" in msg and "short" in msg and "\n" not in msg
    # the same refusal reaches the driver's preflight
    with pytest.raises(CheckpointError, match="guidance_t_max 60 exceeds the t_max 40"):
        preflight_models(str(tmp_path / "no-store"), den, clf, CPS)
    # plain DDIM uses no classifier and checks none
    monkeypatch.undo()
    assert load_models(store, den, clf, DDIM, "cpu", str(tmp_path))[3] is None


# ------------------------------------------------------------------------ the classifier's fit card
def test_a_classifier_below_min_fit_is_refused_unless_allowed(
    tiny_models, tmp_path, monkeypatch, caplog
):
    store = open_store(str(tmp_path / "store"))
    den = str(tiny_models["root"] / "denoiser")
    clf = _classifier_with(tiny_models, "unfit", _record(load_schedule(den), 60, fit=0.75))
    monkeypatch.setattr(checkpoints, "load_denoiser", _must_not_run)
    with pytest.raises(CheckpointError) as err:
        preflight_models(str(tmp_path / "no-store"), den, clf, CPS)
    msg = str(err.value)
    assert "\n" not in msg
    assert (
        f"classifier {clf} fits 75.0% of its own training bits at 0 <= t < 100 (model card: 64 "
        "training rows, seed 3, mean |p - 1/2| 0.125), below min_fit 90%: " in msg
    )
    assert "more --steps, a wider classifier: --base-channels" in msg and "--allow-unfit" in msg
    # a lower stated fit takes it; so does allow_unfit, with a warning naming the fit
    monkeypatch.undo()
    lenient = dataclasses.replace(CPS, min_fit=0.75)
    assert callable(load_models(store, den, clf, lenient, "cpu", str(tmp_path))[3])
    allowed = dataclasses.replace(CPS, allow_unfit=True)
    with caplog.at_level(logging.WARNING, logger="pipeline.data.checkpoints"):
        assert callable(load_models(store, den, clf, allowed, "cpu", str(tmp_path))[3])
    assert "fits 75.0% of its own training bits" in caplog.text
    assert "sampling with it anyway (allow_unfit)" in caplog.text
    # plain DDIM checks no classifier
    assert load_models(store, den, clf, DDIM, "cpu", str(tmp_path))[3] is None


def test_a_classifier_without_a_card_is_taken_with_a_warning(tiny_models, tmp_path, caplog):
    store = open_store(str(tmp_path / "store"))
    den = str(tiny_models["root"] / "denoiser")
    clf = str(tiny_models["root"] / "classifier")  # saved by hand: config.json has no "fit"
    with caplog.at_level(logging.WARNING, logger="pipeline.data.checkpoints"):
        assert callable(load_models(store, den, clf, CPS, "cpu", str(tmp_path))[3])
    assert f"classifier {clf} has no fit card" in caplog.text


def _must_not_run(*args, **kwargs):
    raise AssertionError("a model was loaded before the configs were checked")


# ------------------------------------------------------------------------------ preflight_models
def test_preflight_passes_good_models_and_fails_fast_on_bad_ones(tiny_models, tmp_path):
    root = tiny_models["root"]
    den, clf, rgb = (str(root / n) for n in ("denoiser", "classifier", "rgb-classifier"))
    absent = tmp_path / "no-store"  # preflight opens the store without creating it
    assert preflight_models(str(absent), den, clf, CPS) is None
    assert preflight_models(str(absent), den, None, DDIM) is None
    assert not absent.exists()
    with pytest.raises(CheckpointError, match="needs a classifier"):
        preflight_models(str(absent), den, None, CPS)
    with pytest.raises(CheckpointError, match="classifier was trained on images of shape"):
        preflight_models(str(absent), den, rgb, CPS)
    with pytest.raises(CheckpointError, match="models/x/denoiser"):
        preflight_models(str(absent), "models/x/denoiser", None, DDIM)
    # a folder that is no model at all: the loader's error, not a crash later in the actors
    with pytest.raises(CheckpointError, match="not a diffusers UNet2DModel directory"):
        preflight_models(str(absent), str(tmp_path), None, DDIM)


def test_preflight_reads_models_from_a_local_store(tiny_models, tmp_path):
    store = open_store(str(tmp_path / "store"))
    store.put_dir(tiny_models["root"] / "denoiser", "models", "r", "denoiser")
    store.put_dir(tiny_models["root"] / "classifier", "models", "r", "classifier")
    preflight_models(store.uri, "models/r/denoiser", "models/r/classifier", CPS)
    preflight_models(store, "models/r/denoiser", None, DDIM)  # a Store is accepted as is
    with pytest.raises(CheckpointError, match="models/r/classifier-v2"):
        preflight_models(store.uri, "models/r/denoiser", "models/r/classifier-v2", CPS)


# ----------------------------------------------------------------------------- S3 (loopback moto)
def test_models_in_an_s3_store_are_fetched_into_the_scratch_folder(
    tiny_models, tmp_path, s3_bucket, s3_env
):
    store = open_store(f"s3://{s3_bucket}/root")
    store.put_dir(tiny_models["root"] / "denoiser", "models", "r", "denoiser")
    store.put_dir(tiny_models["root"] / "classifier", "models", "r", "classifier")
    scratch = tmp_path / "scratch"
    got = resolve_model_dir(store, "models/r/denoiser", scratch)
    assert got == scratch / "models" / "r" / "denoiser"
    local = tiny_models["root"] / "denoiser"
    assert sorted(p.relative_to(got) for p in got.rglob("*") if p.is_file()) == sorted(
        p.relative_to(local) for p in local.rglob("*") if p.is_file()
    )
    unet, schedule, shape, guidance = load_models(
        store, "models/r/denoiser", "models/r/classifier", CPS, "cpu", str(tmp_path / "t2")
    )
    assert shape == (1, 8, 8) and schedule.num_train_timesteps == 100 and callable(guidance)
    saved = tiny_models["unet"].state_dict()
    assert all(torch.equal(saved[k], v) for k, v in unet.state_dict().items())
    out, _, p_ref = _guidance_probe(guidance, tiny_models["clf"], t=50)
    assert torch.allclose(out.p, p_ref, atol=1e-6)
    # preflight by URI (the driver's check before the actors start), and a miss names the bucket
    preflight_models(store.uri, "models/r/denoiser", "models/r/classifier", CPS)
    with pytest.raises(CheckpointError) as err:
        preflight_models(store.uri, "models/other/denoiser", None, DDIM)
    assert f"s3://{s3_bucket}/root" in str(err.value)
