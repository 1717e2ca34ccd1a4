"""The CPSample correction in each scheduler's parametrisation: abar from alphas_cumprod (VP) or
from sigma (Euler), the gradient at the model's input, the output handed back in the scheduler's
prediction type."""

from __future__ import annotations

import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    ScoreSdeVeScheduler,
)

from pipeline.core.guidance import GuidanceOutput, cpsample_guidance
from pipeline.integrations.schedulers import guided_model_output, noise_level, sigma_space

LINEAR = {
    "num_train_timesteps": 1000,
    "beta_start": 1e-4,
    "beta_end": 0.02,
    "beta_schedule": "linear",
}


@pytest.mark.parametrize("cls", [DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler])
def test_vp_schedulers_read_alphas_cumprod(cls):
    sched = cls(**LINEAR)
    sched.set_timesteps(10)
    assert not sigma_space(sched)
    for t in sched.timesteps[:3]:
        assert noise_level(sched, t) == pytest.approx(float(sched.alphas_cumprod[int(t)]))


def test_euler_reads_abar_from_its_current_sigma():
    sched = EulerDiscreteScheduler(**LINEAR)
    sched.set_timesteps(10)
    assert sigma_space(sched)
    state = torch.ones(1, 1, 2, 2)
    for i, t in enumerate(sched.timesteps[:4]):
        x_in = sched.scale_model_input(state, t)  # sets the step index, as a pipeline does
        sigma = float(sched.sigmas[i])
        assert noise_level(sched, t) == pytest.approx(1.0 / (1.0 + sigma**2), rel=1e-6)
        # the model's input is the VP state: x_sigma / sqrt(1 + sigma^2)
        assert torch.allclose(x_in, state / (1 + sigma**2) ** 0.5)
        # at Euler's (integer-valued, leading-spaced here) timesteps it is alphas_cumprod[t]
        assert noise_level(sched, t) == pytest.approx(float(sched.alphas_cumprod[int(t)]), rel=1e-4)
        sched._step_index += 1  # what step() would do


def test_a_scheduler_without_betas_is_refused():
    with pytest.raises(ValueError, match="DDPM-type"):
        noise_level(ScoreSdeVeScheduler(), 10)


class _Linear(torch.nn.Module):
    """logit = <w, x>: its input gradient is w, so the correction is known in closed form."""

    def __init__(self, w: torch.Tensor):
        super().__init__()
        self.w = w

    def forward(self, x, t):
        return (x * self.w).flatten(1).sum(1)


@pytest.mark.parametrize("kind", ["epsilon", "v_prediction", "sample"])
def test_correction_is_the_eps_formula_in_every_prediction_type(kind):
    sched = DDIMScheduler(**LINEAR, prediction_type=kind)
    sched.set_timesteps(10)
    t = sched.timesteps[5]
    gen = torch.Generator().manual_seed(1)
    x, out = torch.randn(2, 1, 4, 4, generator=gen), torch.randn(2, 1, 4, 4, generator=gen)
    w = torch.randn(1, 1, 4, 4, generator=gen)
    guide = cpsample_guidance(_Linear(w), alpha=0.5, scale=3.0)
    guided, rec = guided_model_output(guide, sched, x, t, out)
    assert rec.fired.all()
    from pipeline.core.diffusion import eps_from_model_output

    abar = torch.full((2,), float(sched.alphas_cumprod[int(t)]))
    eps, eps_hat = (eps_from_model_output(o, x, abar, kind) for o in (out, guided))
    # eps_hat = eps - s sqrt(1 - abar) (target - p) w, target the less likely label
    p = torch.sigmoid((x * w).flatten(1).sum(1))
    target = (p < 0.5).float()
    expected = eps - 3.0 * (1 - abar[0]).sqrt() * (target - p).reshape(-1, 1, 1, 1) * w
    assert torch.allclose(eps_hat, expected, atol=1e-4)


def test_unfired_samples_keep_the_output_bit_for_bit():
    sched = DDIMScheduler(**LINEAR)
    sched.set_timesteps(10)
    out = torch.randn(2, 1, 4, 4)

    def never(x, t, eps, abar):
        return GuidanceOutput(eps=eps + 1, fired=torch.zeros(2, dtype=torch.bool), p=abar)

    guided, _ = guided_model_output(never, sched, torch.randn(2, 1, 4, 4), sched.timesteps[0], out)
    assert guided is out
