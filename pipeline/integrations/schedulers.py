"""The CPSample correction for any diffusers scheduler that reads a noise prediction.

CPSample guides the noise estimate before the scheduler steps (Kazdan et al. 2024, Algorithm 2, in
the ``condition_score`` form of Dhariwal & Nichol 2021, eq. 14):

    eps_hat = eps - s * sqrt(1 - abar_t) * grad_{x_t} log p(target | x_t)

where ``x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps`` is the variance-preserving (VP) state the
UNet and the classifier were trained on. Schedulers keep their state in one of two spaces:

- **VP** (DDIM, DDPM, DPMSolverMultistep, UniPC, PNDM, ...): the state is ``x_t`` itself and
  ``abar_t = alphas_cumprod[t]``;
- **sigma** (EulerDiscrete, EulerAncestral, Heun, LMS, ...; ``init_noise_sigma > 1``): the state is
  ``x_sigma = x_0 + sigma eps`` with ``sigma = sqrt((1 - abar) / abar)``. The model (and the
  classifier) see ``scale_model_input(x_sigma) = x_sigma / sqrt(1 + sigma^2)``, which is the VP
  ``x_t``, and ``abar = 1 / (1 + sigma^2)`` at the scheduler's current sigma. The chain rule through
  that scaling gives the same eps correction: ``grad_{x_sigma} log p = grad_{x_t} log p /
  sqrt(1 + sigma^2)`` and ``sigma / sqrt(1 + sigma^2) = sqrt(1 - abar)``.

So one rule serves both: take the gradient at the model's input ``x_in`` (the VP state), read
``abar`` from the scheduler's parametrisation (:func:`noise_level`), correct eps with
:func:`pipeline.core.guidance.cpsample_guidance` (the same function the Ray samplers call), and hand
the scheduler the corrected output in its own ``prediction_type`` (:func:`guided_model_output`).
"""

from __future__ import annotations

from typing import Any

import torch

from pipeline.core.diffusion import PREDICTION_TYPES, eps_from_model_output, model_output_from_eps
from pipeline.core.guidance import GuidanceFn, GuidanceOutput


def sigma_space(scheduler: Any) -> bool:
    """True for a DDPM-type scheduler whose state is ``x_0 + sigma eps`` (Euler and kin), False for
    VP ones (and for VE/SDE schedulers, which have sigmas but no discrete betas)."""
    return (
        isinstance(getattr(scheduler, "alphas_cumprod", None), torch.Tensor)
        and hasattr(scheduler, "sigmas")
        and float(getattr(scheduler, "init_noise_sigma", 1.0)) > 1.0
    )


def noise_level(scheduler: Any, t: torch.Tensor | float | int) -> float:
    """``abar`` at the scheduler's current step: ``1 / (1 + sigma^2)`` in sigma space (the sigma of
    the step ``scale_model_input`` was last called for), ``alphas_cumprod[t]`` otherwise.

    A scheduler with neither (a VE/SDE one) cannot be guided this way and raises ``ValueError``.
    """
    if sigma_space(scheduler):
        index = getattr(scheduler, "step_index", None)
        if index is None:
            index = scheduler.index_for_timestep(torch.as_tensor(t))
        sigma = float(scheduler.sigmas[int(index)])
        return 1.0 / (1.0 + sigma * sigma)
    abar = getattr(scheduler, "alphas_cumprod", None)
    if not isinstance(abar, torch.Tensor):
        raise ValueError(
            f"{type(scheduler).__name__} has neither alphas_cumprod nor sigmas: CPSample needs a "
            "DDPM-type (discrete-beta) scheduler"
        )
    step = round(float(torch.as_tensor(t).reshape(-1)[0]))
    return float(abar[min(max(step, 0), len(abar) - 1)])


def prediction_type(scheduler: Any) -> str:
    """What the scheduler reads the model output as (``epsilon`` when its config does not say)."""
    kind = getattr(scheduler, "config", {}).get("prediction_type", "epsilon") or "epsilon"
    if kind not in PREDICTION_TYPES:
        raise ValueError(
            f"{type(scheduler).__name__} reads the model output as {kind!r}; CPSample supports "
            f"{PREDICTION_TYPES}"
        )
    return kind


def guided_model_output(
    guidance: GuidanceFn,
    scheduler: Any,
    x_in: torch.Tensor,
    t: torch.Tensor | float | int,
    model_output: torch.Tensor,
) -> tuple[torch.Tensor, GuidanceOutput]:
    """The model output with the CPSample correction applied, in the scheduler's parametrisation.

    ``x_in`` (B, C, H, W) is what the UNet saw (``scheduler.scale_model_input(state, t)``, the VP
    state), ``model_output`` its (classifier-free guided) prediction. Returns the output to pass to
    ``scheduler.step`` and the guidance's per-sample record (fired, p). Where guidance does not
    fire the output is returned bit for bit.
    """
    batch = x_in.shape[0]
    kind = prediction_type(scheduler)
    abar = torch.full((batch,), noise_level(scheduler, t), device=x_in.device)
    t_batch = torch.as_tensor(t, device=x_in.device).reshape(-1).expand(batch)
    if not torch.is_floating_point(t_batch) or float(t_batch[0]) == round(float(t_batch[0])):
        t_batch = t_batch.round().long()
    x = x_in.float()
    eps = eps_from_model_output(model_output.float(), x, abar, kind)
    out = guidance(x, t_batch, eps, abar)
    if not bool(out.fired.any()):
        return model_output, out
    guided = model_output_from_eps(out.eps, x, abar, kind).to(model_output.dtype)
    return guided, out
