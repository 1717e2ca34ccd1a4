"""The DDIM update, schedule and forward process against diffusers' reference implementation."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDIMScheduler

from pipeline.core.diffusion import (
    ddim_step,
    ddim_timesteps,
    linear_schedule,
    pred_xstart_from_eps,
    q_sample,
    schedule_from_betas,
)


def _reference(clip_sample: bool, steps: int = 50) -> DDIMScheduler:
    sched = DDIMScheduler(
        num_train_timesteps=1000,
        beta_schedule="linear",
        beta_start=1e-4,
        beta_end=0.02,
        clip_sample=clip_sample,
        set_alpha_to_one=True,
    )
    sched.set_timesteps(steps)
    return sched


def test_linear_schedule_alphas_cumprod_match_diffusers():
    ours = linear_schedule()
    ref = _reference(clip_sample=False)
    assert ours.num_train_timesteps == 1000
    assert ours.alphas_cumprod.dtype == torch.float64
    assert torch.equal(ours.alphas_cumprod.float(), ref.alphas_cumprod)
    assert torch.equal(ours.betas.float(), ref.betas)
    # abar is decreasing from ~1 - 1e-4 to ~4e-5
    assert ours.alphas_cumprod[0].item() == pytest.approx(1 - 1e-4, abs=1e-7)
    assert bool((ours.alphas_cumprod[1:] < ours.alphas_cumprod[:-1]).all())


def test_schedule_from_betas_cumprod():
    betas = torch.tensor([0.1, 0.2, 0.5])
    s = schedule_from_betas(betas)
    expected = torch.tensor([0.9, 0.9 * 0.8, 0.9 * 0.8 * 0.5], dtype=torch.float64)
    assert torch.allclose(s.alphas_cumprod, expected, atol=1e-7)
    assert s.abar(torch.tensor([[2, 0]])).shape == (1, 2)
    assert s.abar(torch.tensor([2])).dtype == torch.float32


@pytest.mark.parametrize(
    ("steps", "start", "end"), [(0, 1e-4, 0.02), (1, 1e-4, 0.02), (10, 0.02, 1e-4), (10, 0.0, 0.02)]
)
def test_linear_schedule_rejects_bad_arguments(steps, start, end):
    with pytest.raises(ValueError, match=r"num_train_timesteps|beta_start"):
        linear_schedule(steps, start, end)


@pytest.mark.parametrize("num_steps", [1, 7, 50, 1000])
def test_ddim_timesteps_equal_diffusers(num_steps):
    ref = _reference(clip_sample=False, steps=num_steps)
    ours = ddim_timesteps(num_steps, 1000)
    assert ours.dtype == torch.long
    assert torch.equal(ours, ref.timesteps.long())


@pytest.mark.parametrize("num_steps", [0, 1001, -3])
def test_ddim_timesteps_rejects_out_of_range(num_steps):
    with pytest.raises(ValueError, match="num_steps must be in"):
        ddim_timesteps(num_steps, 1000)


def test_q_sample_formula():
    sched = linear_schedule()
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(3, 2, 4, 4, generator=g) * 2 - 1
    noise = torch.randn(3, 2, 4, 4, generator=g)
    t = torch.tensor([0, 499, 999])
    out = q_sample(sched, x0, t, noise)
    for i, ti in enumerate(t.tolist()):
        abar = sched.alphas_cumprod[ti].item()
        expected = abar**0.5 * x0[i] + (1 - abar) ** 0.5 * noise[i]
        assert torch.allclose(out[i], expected, atol=1e-6)
    # at t=999 the image is almost pure noise, at t=0 almost clean
    assert (out[2] - noise[2]).abs().max() < 0.02
    assert (out[0] - x0[0]).abs().max() < 0.03


def test_pred_xstart_inverts_q_sample():
    sched = linear_schedule()
    g = torch.Generator().manual_seed(1)
    x0 = torch.rand(4, 1, 4, 4, generator=g) * 2 - 1
    noise = torch.randn(4, 1, 4, 4, generator=g)
    t = torch.tensor([0, 10, 300, 900])
    x_t = q_sample(sched, x0, t, noise)
    rec = pred_xstart_from_eps(x_t, noise, sched.abar(t))
    assert torch.allclose(rec, x0, atol=2e-3)


# (index into the 50 timesteps of the reference); 49 is the last step with t_prev = -20 < 0
@pytest.mark.parametrize("index", [0, 1, 25, 48, 49])
@pytest.mark.parametrize("eta", [0.0, 1.0])
@pytest.mark.parametrize("clip_sample", [True, False])
def test_ddim_step_matches_diffusers(index, eta, clip_sample):
    ref = _reference(clip_sample)
    ours = linear_schedule()
    t = int(ref.timesteps[index])
    t_prev = t - 1000 // 50
    if index == 49:
        assert t_prev < 0
    g = torch.Generator().manual_seed(100 + index)
    x_t = torch.randn(2, 3, 4, 4, generator=g) * 1.5
    eps = torch.randn(2, 3, 4, 4, generator=g)
    noise = torch.randn(2, 3, 4, 4, generator=g)

    expected = ref.step(eps, t, x_t, eta=eta, variance_noise=noise)
    x_prev, pred_x0 = ddim_step(
        ours, x_t, eps, t, t_prev, eta=eta, noise=noise, clip_sample=clip_sample
    )

    assert x_prev.shape == x_t.shape
    assert torch.allclose(pred_x0, expected.pred_original_sample, rtol=1e-4, atol=1e-4)
    assert torch.allclose(x_prev, expected.prev_sample, rtol=1e-4, atol=1e-4)
    if clip_sample:
        assert pred_x0.abs().max() <= 1.0
    else:
        # without clipping the prediction leaves [-1, 1] at high noise levels
        assert pred_x0.abs().max() > 1.0 or index >= 48


def test_ddim_step_last_step_returns_pred_xstart():
    sched = linear_schedule()
    g = torch.Generator().manual_seed(3)
    x_t = torch.randn(1, 1, 4, 4, generator=g) * 0.5
    eps = torch.randn(1, 1, 4, 4, generator=g)
    x_prev, pred = ddim_step(sched, x_t, eps, 0, -1, eta=1.0, noise=torch.ones_like(x_t) * 100)
    # abar_prev = 1 -> sigma = 0 and no direction term: x_prev is exactly the clipped x0 estimate
    assert torch.allclose(x_prev, pred, atol=1e-7)


def test_ddim_step_eta_validation():
    sched = linear_schedule()
    x = torch.zeros(1, 1, 2, 2)
    with pytest.raises(ValueError, match="eta must be >= 0"):
        ddim_step(sched, x, x, 500, 480, eta=-0.1)
    with pytest.raises(ValueError, match="needs `noise`"):
        ddim_step(sched, x, x, 500, 480, eta=0.5, noise=None)


@pytest.mark.parametrize("kind", ["epsilon", "v_prediction", "sample"])
def test_model_output_from_eps_inverts_eps_from_model_output(kind):
    from pipeline.core.diffusion import eps_from_model_output, model_output_from_eps

    gen = torch.Generator().manual_seed(0)
    x_t, out = torch.randn(3, 1, 4, 4, generator=gen), torch.randn(3, 1, 4, 4, generator=gen)
    abar = torch.tensor([0.99, 0.5, 0.02])
    eps = eps_from_model_output(out, x_t, abar, kind)
    assert torch.allclose(model_output_from_eps(eps, x_t, abar, kind), out, atol=1e-5)
    if kind == "v_prediction":  # v = sqrt(abar) eps - sqrt(1 - abar) x_0, by the definition
        x0 = pred_xstart_from_eps(x_t, eps, abar)
        a = abar.reshape(-1, 1, 1, 1)
        assert torch.allclose(out, a.sqrt() * eps - (1 - a).sqrt() * x0, atol=1e-5)
    with pytest.raises(ValueError, match="prediction_type"):
        model_output_from_eps(eps, x_t, abar, "flow")
