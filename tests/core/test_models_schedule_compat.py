"""Saved diffusers schedules read as diffusers reads them: betas, prediction types, DDIM timesteps.

Every check is against diffusers' own ``DDIMScheduler`` built from the same saved config.
"""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from diffusers import DDIMScheduler, DDPMPipeline, DDPMScheduler, UNet2DModel

from pipeline.core.config import SamplerConfig
from pipeline.core.diffusion import ddim_timesteps, eps_from_model_output
from pipeline.core.guidance import GuidanceOutput, cpsample_guidance
from pipeline.core.models import (
    CheckpointError,
    betas_digest,
    build_unet,
    channels_last,
    load_denoiser,
    load_schedule,
    save_denoiser,
    schedule_record,
)
from pipeline.core.sampler import sample, unet_denoiser
from pipeline.data.checkpoints import load_models
from pipeline.data.storage import open_store

SEEDS = [3, 4]


def _save_config(directory, **kwargs) -> dict:
    """A diffusers DDPMScheduler config saved as a user's model directory would hold it."""
    DDPMScheduler(**kwargs).save_pretrained(directory)
    return json.loads((directory / "scheduler_config.json").read_text())


def _reference(cfg: dict, steps: int) -> DDIMScheduler:
    ref = DDIMScheduler.from_config(cfg)
    ref.set_timesteps(steps)
    return ref


# ------------------------------------------------------------------------------------------ betas
BETA_SCHEDULES = {
    "linear": {},
    "linear-T250": {"num_train_timesteps": 250, "beta_start": 1e-3, "beta_end": 0.04},
    "scaled_linear": {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012},
    "squaredcos_cap_v2": {"beta_schedule": "squaredcos_cap_v2"},
    "squaredcos_cap_v2-T4000": {"beta_schedule": "squaredcos_cap_v2", "num_train_timesteps": 4000},
    "trained_betas": {
        "num_train_timesteps": 64,
        "trained_betas": torch.linspace(1e-3, 0.2, 64).pow(1.5).tolist(),
    },
}


@pytest.mark.parametrize("name", list(BETA_SCHEDULES))
def test_every_beta_schedule_matches_diffusers_ddim(tmp_path, name):
    cfg = _save_config(tmp_path, **BETA_SCHEDULES[name])
    ours = load_schedule(tmp_path)
    ref = DDIMScheduler.from_config(cfg)
    assert ours.num_train_timesteps == ref.config.num_train_timesteps
    assert torch.equal(ours.betas.float(), ref.betas)
    assert torch.equal(ours.alphas_cumprod.float(), ref.alphas_cumprod)
    assert ours.prediction_type == "epsilon" and ours.timestep_spacing == "leading"


def test_the_betas_digest_tells_every_schedule_apart_and_survives_a_round_trip(tmp_path):
    """What a classifier records of its schedule (``schedule_record``): one digest per beta sequence,
    the same after ``save_denoiser`` rewrites the schedule as trained_betas, different for every
    other schedule (scaled_linear included, whose end betas can equal linear's)."""
    digests = {}
    for name, kwargs in BETA_SCHEDULES.items():
        cfg_dir, saved_dir = tmp_path / name, tmp_path / f"{name}-saved"
        _save_config(cfg_dir, **kwargs)
        schedule = load_schedule(cfg_dir)
        record = schedule_record(schedule)
        assert record["betas_digest"] == betas_digest(schedule)
        assert record["num_train_timesteps"] == schedule.num_train_timesteps
        assert record["beta_first"] == float(schedule.betas[0])
        assert record["beta_last"] == float(schedule.betas[-1])
        assert (record["prediction_type"], record["timestep_spacing"]) == ("epsilon", "leading")
        assert record["steps_offset"] == 0
        unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, layers_per_block=1,
                           block_out_channels=(8,), down_block_types=("DownBlock2D",),
                           up_block_types=("UpBlock2D",), norm_num_groups=8)  # fmt: skip
        save_denoiser(unet, saved_dir, {}, schedule)
        assert schedule_record(load_schedule(saved_dir)) == record
        digests[name] = record["betas_digest"]
    assert len(set(digests.values())) == len(BETA_SCHEDULES)
    same_ends = {"beta_schedule": "scaled_linear", "beta_start": 1e-4, "beta_end": 0.02}
    _save_config(tmp_path / "scaled-same-ends", **same_ends)
    assert betas_digest(load_schedule(tmp_path / "scaled-same-ends")) != digests["linear"]
    # the reading is recorded as the config gives it
    _save_config(tmp_path / "v", prediction_type="v_prediction", timestep_spacing="trailing",
                 steps_offset=1)  # fmt: skip
    record = schedule_record(load_schedule(tmp_path / "v"))
    assert record["betas_digest"] == digests["linear"]
    assert (record["prediction_type"], record["timestep_spacing"], record["steps_offset"]) == (
        "v_prediction", "trailing", 1,
    )  # fmt: skip


@pytest.mark.parametrize("class_name", ["DDIMScheduler", "PNDMScheduler", "NoSuchScheduler"])
def test_the_config_class_is_used_and_an_unknown_one_reads_as_ddpm(tmp_path, class_name):
    cfg = _save_config(tmp_path, beta_schedule="scaled_linear", steps_offset=1)
    cfg["_class_name"] = class_name
    (tmp_path / "scheduler_config.json").write_text(json.dumps(cfg))
    ours = load_schedule(tmp_path)
    assert torch.equal(ours.alphas_cumprod.float(), DDIMScheduler.from_config(cfg).alphas_cumprod)
    assert ours.steps_offset == 1


@pytest.mark.parametrize(
    ("change", "words"),
    [
        ({"prediction_type": "flow"}, "prediction_type 'flow' is not supported"),
        ({"timestep_spacing": "karras"}, "timestep_spacing 'karras' is not supported"),
        ({"beta_schedule": "quartic"}, "quartic"),
        ({"steps_offset": -1}, "steps_offset"),
        ({"rescale_betas_zero_snr": True}, "zero terminal SNR"),
        ({"_class_name": "ScoreSdeVeScheduler"}, "no discrete betas"),
    ],
)
def test_what_the_sampler_cannot_read_is_refused_naming_it(tmp_path, change, words):
    cfg = {**_save_config(tmp_path), **change}
    path = tmp_path / "scheduler_config.json"
    path.write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=words) as err:
        load_schedule(tmp_path)
    assert str(path) in str(err.value) and "\n" not in str(err.value)


def test_a_malformed_scheduler_config_is_refused(tmp_path):
    (tmp_path / "scheduler_config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not a readable scheduler config"):
        load_schedule(tmp_path)


# ------------------------------------------------------------------------------- DDIM timesteps
@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize(("steps", "offset"), [(1, 0), (7, 0), (50, 1), (333, 0), (1000, 0)])
def test_ddim_timesteps_match_diffusers_for_each_spacing(spacing, steps, offset):
    if steps == 1000 and offset:
        pytest.skip("an offset at T steps leaves the schedule")
    ref = DDIMScheduler(timestep_spacing=spacing, steps_offset=offset)
    ref.set_timesteps(steps)
    ours = ddim_timesteps(steps, 1000, spacing, offset if spacing == "leading" else 0)
    assert torch.equal(ours, ref.timesteps)


def test_ddim_timesteps_refuse_an_offset_past_the_schedule():
    with pytest.raises(ValueError, match="steps_offset 1 puts a DDIM timestep at 1000"):
        ddim_timesteps(1000, 1000, "leading", 1)


# ------------------------------------------------------------------------------ prediction types
def test_eps_from_model_output_inverts_each_parameterization():
    """v = sqrt(abar) eps - sqrt(1 - abar) x_0 (Salimans & Ho 2022); x_t = sqrt(abar) x_0 + ... eps."""
    gen = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(2, 4, 3, 8, 8, generator=gen, dtype=torch.float64)
    abar = torch.tensor([0.9, 0.3, 0.05, 1e-3], dtype=torch.float64)
    a = abar.reshape(-1, 1, 1, 1)
    x_t = a.sqrt() * x0 + (1 - a).sqrt() * eps
    outputs = {"epsilon": eps, "v_prediction": a.sqrt() * eps - (1 - a).sqrt() * x0, "sample": x0}
    for kind, out in outputs.items():
        torch.testing.assert_close(eps_from_model_output(out, x_t, abar, kind), eps)
    with pytest.raises(ValueError, match="prediction_type"):
        eps_from_model_output(eps, x_t, abar, "flow")


def _recorder(trajectory: list):
    """A guidance function that only records the sampler state (B, C, H, W) at each step."""

    def guide(x_t, t, eps, abar_t):
        trajectory.append((x_t.clone(), int(t[0])))
        nan = torch.full((x_t.shape[0],), float("nan"))
        return GuidanceOutput(eps=eps, fired=torch.zeros(x_t.shape[0], dtype=torch.bool), p=nan)

    return guide


def _x_T(shape) -> torch.Tensor:
    """The sampler's initial noise: one CPU generator per seed."""
    return torch.stack(
        [torch.randn(shape, generator=torch.Generator().manual_seed(s)) for s in SEEDS]
    )


def _compare_with_diffusers(unet, directory, shape, steps, atol):
    """Our DDIM trajectory (eta = 0) against diffusers' DDIMScheduler.step on the same model."""
    schedule = load_schedule(directory)
    ours: list = []
    result = sample(
        unet_denoiser(unet, schedule), schedule, SEEDS, shape, steps, guidance=_recorder(ours)
    )
    ref = _reference(json.loads((directory / "scheduler_config.json").read_text()), steps)
    x, theirs = _x_T(shape), []
    for t in ref.timesteps:
        theirs.append((x, int(t)))
        with torch.no_grad():
            out = unet(channels_last(x), t).sample
        x = ref.step(out, t, x, eta=0.0).prev_sample
    assert [t for _, t in ours] == [t for _, t in theirs]
    for (a, t), (b, _) in zip(ours, theirs):
        torch.testing.assert_close(a, b, atol=atol, rtol=0, msg=lambda m, t=t: f"t={t}: {m}")
    torch.testing.assert_close(result.images, x.clamp(-1, 1), atol=atol, rtol=0)
    return schedule


TRAJECTORIES = [
    ("epsilon", "linear", "leading"),
    ("epsilon", "squaredcos_cap_v2", "trailing"),
    ("epsilon", "scaled_linear", "linspace"),
    ("v_prediction", "linear", "leading"),
    ("v_prediction", "squaredcos_cap_v2", "leading"),
    ("v_prediction", "scaled_linear", "trailing"),
    ("v_prediction", "squaredcos_cap_v2", "trailing"),
    ("sample", "linear", "leading"),
    ("sample", "scaled_linear", "trailing"),
    ("sample", "squaredcos_cap_v2", "linspace"),
]


def _tolerance(prediction: str, schedule, steps: int) -> float:
    """3e-4 (0.04 of a uint8 level): float32 roundoff (Python-float vs float32 abar), amplified by
    an untrained UNet over the steps (measured up to 1.04e-4 with diffusers 0.42.1 and numpy 2.4.6;
    below 5e-5 with the versions of November 2026). A v or x_0 model read through eps also loses about ``6e-8 / sqrt(abar_t)`` of x_0 at a
    step (float32 eps), which diffusers, reading x_0 directly, does not: 1e-3 at the cosine
    schedule's t = 999 (abar = 2.4e-9), so 1e-3 (0.13 of a uint8 level) where abar_t < 1e-6."""
    t = ddim_timesteps(steps, schedule.num_train_timesteps, schedule.timestep_spacing)
    low_snr = float(schedule.alphas_cumprod[t].min()) < 1e-6
    return 1e-3 if prediction != "epsilon" and low_snr else 3e-4


@pytest.mark.parametrize(("prediction", "betas", "spacing"), TRAJECTORIES)
def test_ddim_trajectory_matches_diffusers_for_each_prediction_type(
    tmp_path, core_tiny_unet_cfg, prediction, betas, spacing
):
    torch.manual_seed(0)
    unet = build_unet(core_tiny_unet_cfg).eval()
    _save_config(
        tmp_path,
        beta_schedule=betas,
        prediction_type=prediction,
        timestep_spacing=spacing,
        clip_sample=True,
    )
    atol = _tolerance(prediction, load_schedule(tmp_path), 10)
    schedule = _compare_with_diffusers(unet, tmp_path, (1, 8, 8), steps=10, atol=atol)
    assert schedule.prediction_type == prediction
    # the same network misread as eps walks elsewhere: the prediction type is not a no-op here
    if prediction != "epsilon":
        misread = dataclasses.replace(schedule, prediction_type="epsilon")
        wrong = sample(unet_denoiser(unet, misread), misread, SEEDS, (1, 8, 8), 10)
        right = sample(unet_denoiser(unet, schedule), schedule, SEEDS, (1, 8, 8), 10)
        assert (wrong.images - right.images).abs().max() > 1e-2


def test_a_denoiser_adapted_for_eps_is_refused_for_a_v_model(tmp_path, core_tiny_unet_cfg):
    _save_config(tmp_path, prediction_type="v_prediction")
    schedule = load_schedule(tmp_path)
    unet = build_unet(core_tiny_unet_cfg).eval()
    with pytest.raises(
        ValueError, match=r"'epsilon'.*'v_prediction'.*unet_denoiser\(unet, schedule"
    ):
        sample(unet_denoiser(unet), schedule, SEEDS, (1, 8, 8), 2)


class _X0Probe(torch.nn.Module):
    """A classifier that records the images it is shown (B, C, H, W) and returns a fixed logit."""

    def __init__(self):
        super().__init__()
        self.seen: list[torch.Tensor] = []
        self.w = torch.nn.Parameter(torch.zeros(()))

    def forward(self, x, t):
        self.seen.append(x.detach().clone())
        return x.flatten(1).sum(1) * 0.0 + self.w + 3.0


def test_guidance_on_an_x0_model_sees_the_model_x0(tmp_path, core_tiny_unet_cfg):
    """With input_mode="x0" the classifier sees pred_xstart from eps: for a "sample" model, its x_0."""
    _save_config(tmp_path, prediction_type="sample")
    schedule = load_schedule(tmp_path)
    torch.manual_seed(0)
    unet = build_unet(core_tiny_unet_cfg).eval()
    probe, states = _X0Probe(), []
    guide = cpsample_guidance(probe, alpha=0.5, scale=0.0, input_mode="x0")

    def recording(x_t, t, eps, abar_t):
        states.append((x_t.clone(), t.clone()))
        return guide(x_t, t, eps, abar_t)

    sample(unet_denoiser(unet, schedule), schedule, SEEDS, (1, 8, 8), 5, guidance=recording)
    for (x_t, t), seen in zip(states, probe.seen):
        with torch.no_grad():
            x0 = unet(channels_last(x_t), t).sample
        torch.testing.assert_close(seen, x0, atol=2e-5, rtol=1e-5)


# --------------------------------------------------------- a published-style pixel DDPM (cosine)
def test_a_saved_rgb_attention_unet_with_a_cosine_ddpm_scheduler_samples_as_diffusers(tmp_path):
    """The case that was refused: a 3-channel 32x32 UNet2DModel with attention blocks and a
    ``squaredcos_cap_v2`` DDPMScheduler, saved as a DDPMPipeline (unet/ and scheduler/)."""
    torch.manual_seed(0)
    unet = UNet2DModel(
        sample_size=32,
        in_channels=3,
        out_channels=3,
        layers_per_block=1,
        block_out_channels=(16, 32),
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=8,
        attention_head_dim=8,
    )
    scheduler = DDPMScheduler(beta_schedule="squaredcos_cap_v2")
    DDPMPipeline(unet=unet, scheduler=scheduler).save_pretrained(tmp_path / "ddpm")
    store = open_store(str(tmp_path / "store"))
    _, schedule, shape, guidance = load_models(
        store, str(tmp_path / "ddpm"), None, SamplerConfig(sampler="ddim"), "cpu", str(tmp_path)
    )
    assert shape == (3, 32, 32) and guidance is None
    assert torch.equal(
        schedule.alphas_cumprod.float(), DDIMScheduler.from_config(scheduler.config).alphas_cumprod
    )
    assert torch.equal(schedule.betas.float(), scheduler.betas)
    _compare_with_diffusers(
        load_denoiser(tmp_path / "ddpm"), tmp_path / "ddpm" / "scheduler", shape, steps=4, atol=5e-5
    )
