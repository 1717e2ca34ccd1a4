"""Noise schedule, forward process and the DDIM update.

Pure tensor functions (no Ray, no models). Notation follows the papers: ``abar_t`` is the cumulative
product of ``1 - beta_t`` (Ho et al. 2020, eq. 4), ``x_start`` the clean image, ``pred_xstart`` its
estimate from the noise prediction.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")


@dataclass(frozen=True)
class Schedule:
    """A discrete variance schedule of ``T`` steps; ``alphas_cumprod[t]`` is ``abar_t``.

    It also says how to read the model trained on it and where DDIM steps, as diffusers' scheduler
    config does: ``prediction_type`` is what the network outputs (``epsilon``; ``v_prediction``,
    Salimans & Ho 2022; ``sample``, x_0), ``timestep_spacing`` and ``steps_offset`` place the DDIM
    timesteps (:func:`ddim_timesteps`).
    """

    betas: torch.Tensor  # (T,) float64
    alphas_cumprod: torch.Tensor  # (T,) float64
    prediction_type: str = "epsilon"
    timestep_spacing: str = "leading"
    steps_offset: int = 0
    # abar after the last DDIM step: 1 (DDPM's x_0), or abar_0 for a DDIMScheduler saved with
    # ``set_alpha_to_one=False`` (Stable Diffusion's), which the sampler must reproduce to match it
    final_alpha_cumprod: float = 1.0

    def __post_init__(self) -> None:
        if self.prediction_type not in PREDICTION_TYPES:
            raise ValueError(
                f"prediction_type must be one of {PREDICTION_TYPES}, got {self.prediction_type!r}"
            )
        if self.timestep_spacing not in TIMESTEP_SPACINGS:
            raise ValueError(
                f"timestep_spacing must be one of {TIMESTEP_SPACINGS}, got {self.timestep_spacing!r}"
            )
        if self.steps_offset < 0:
            raise ValueError(f"steps_offset must be >= 0, got {self.steps_offset}")
        if not 0.0 < self.final_alpha_cumprod <= 1.0:
            raise ValueError(
                f"final_alpha_cumprod must be in (0, 1], got {self.final_alpha_cumprod}"
            )

    @property
    def num_train_timesteps(self) -> int:
        return int(self.betas.shape[0])

    def abar(self, t: torch.Tensor) -> torch.Tensor:
        """``abar_t`` for integer timesteps ``t`` (any shape), as float32."""
        return self.alphas_cumprod.to(t.device)[t.long()].float()


def linear_schedule(
    num_train_timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02
) -> Schedule:
    """Linear beta schedule of DDPM (Ho et al. 2020, sec. 4): ``beta_t`` from 1e-4 to 0.02."""
    if num_train_timesteps < 2:
        raise ValueError(f"num_train_timesteps must be >= 2, got {num_train_timesteps}")
    if not 0.0 < beta_start < beta_end < 1.0:
        raise ValueError(f"need 0 < beta_start < beta_end < 1, got {beta_start}, {beta_end}")
    # float32 linspace and cumprod, exactly as diffusers' "linear" beta_schedule (stored as float64).
    betas = torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float32)
    return schedule_from_betas(betas)


def schedule_from_betas(betas: torch.Tensor, **reading: str | int | float) -> Schedule:
    """Build a schedule from any beta sequence (for example one read from a diffusers scheduler).

    ``abar_t = prod_{s <= t} (1 - beta_s)`` (Ho et al. 2020, eq. 4), a float32 cumprod as in diffusers.
    ``reading``: the :class:`Schedule` fields ``prediction_type``, ``timestep_spacing``, ``steps_offset``
    and ``final_alpha_cumprod``.
    """
    betas = torch.as_tensor(betas, dtype=torch.float32)
    alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
    return Schedule(betas=betas.double(), alphas_cumprod=alphas_cumprod.double(), **reading)


def _expand(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Reshape a per-sample vector (B,) to broadcast against images (B, C, H, W)."""
    return v.reshape(-1, *([1] * (x.dim() - 1)))


def q_sample(
    schedule: Schedule, x_start: torch.Tensor, t: torch.Tensor, noise: torch.Tensor
) -> torch.Tensor:
    """Forward process ``x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps`` (Ho et al. 2020, eq. 4)."""
    abar = _expand(schedule.abar(t), x_start)
    return abar.sqrt() * x_start + (1.0 - abar).sqrt() * noise


def pred_xstart_from_eps(
    x_t: torch.Tensor, eps: torch.Tensor, abar_t: torch.Tensor
) -> torch.Tensor:
    """``x_0 = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t)`` (Song et al. 2021, eq. 12, first term)."""
    abar = _expand(abar_t, x_t)
    return (x_t - (1.0 - abar).sqrt() * eps) / abar.sqrt()


def eps_from_model_output(
    output: torch.Tensor, x_t: torch.Tensor, abar_t: torch.Tensor, prediction_type: str
) -> torch.Tensor:
    """The noise estimate ``eps`` from a network output of any ``prediction_type``; abar_t (B,).

    - ``epsilon``: the output is ``eps``;
    - ``v_prediction``: ``v = sqrt(abar) eps - sqrt(1 - abar) x_0`` (Salimans & Ho 2022, sec. 4), so
      with ``x_t = sqrt(abar) x_0 + sqrt(1 - abar) eps`` it is ``eps = sqrt(abar) v + sqrt(1 - abar) x_t``;
    - ``sample``: the output is ``x_0``, and inverting ``q_sample`` (Ho et al. 2020, eq. 4) gives
      ``eps = (x_t - sqrt(abar) x_0) / sqrt(1 - abar)``.
    """
    if prediction_type == "epsilon":
        return output
    abar = _expand(abar_t, x_t).to(output.dtype)
    if prediction_type == "v_prediction":
        return abar.sqrt() * output + (1.0 - abar).sqrt() * x_t
    if prediction_type == "sample":
        return (x_t - abar.sqrt() * output) / (1.0 - abar).sqrt()
    raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")


def model_output_from_eps(
    eps: torch.Tensor, x_t: torch.Tensor, abar_t: torch.Tensor, prediction_type: str
) -> torch.Tensor:
    """The inverse of :func:`eps_from_model_output`: a network output of ``prediction_type`` that
    carries the noise estimate ``eps`` at ``x_t``; abar_t (B,).

    With ``x_0 = (x_t - sqrt(1 - abar) eps) / sqrt(abar)`` (Song et al. 2021, eq. 12), ``sample`` is
    ``x_0`` and ``v_prediction`` is ``v = sqrt(abar) eps - sqrt(1 - abar) x_0`` (Salimans & Ho 2022,
    sec. 4). A guided eps is handed to a scheduler that reads another parametrisation this way.
    """
    if prediction_type == "epsilon":
        return eps
    abar = _expand(abar_t, x_t).to(eps.dtype)
    x0 = (x_t - (1.0 - abar).sqrt() * eps) / abar.sqrt()
    if prediction_type == "v_prediction":
        return abar.sqrt() * eps - (1.0 - abar).sqrt() * x0
    if prediction_type == "sample":
        return x0
    raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")


def ddim_timesteps(
    num_steps: int,
    num_train_timesteps: int = 1000,
    spacing: str = "leading",
    steps_offset: int = 0,
) -> torch.Tensor:
    """Descending DDIM timesteps, as diffusers' ``DDIMScheduler.set_timesteps`` places them.

    ``leading`` (the default): ``[..., 2k, k, 0] + steps_offset``, k = T // S; ``trailing``:
    ``round(T - i T / S) - 1``, ending the first step at ``T - 1``; ``linspace``: ``round`` of S
    points from ``T - 1`` to 0 (Lin et al. 2024, table 2). The sampler steps from each ``t`` to
    ``t - T // S``, as diffusers does.
    """
    if not 1 <= num_steps <= num_train_timesteps:
        raise ValueError(f"num_steps must be in [1, {num_train_timesteps}], got {num_steps}")
    if spacing == "leading":
        ratio = num_train_timesteps // num_steps
        steps = (torch.arange(num_steps) * ratio).flip(0) + steps_offset
    elif spacing == "trailing":
        ratio = num_train_timesteps / num_steps
        steps = (
            num_train_timesteps - torch.arange(num_steps, dtype=torch.float64) * ratio
        ).round() - 1
    elif spacing == "linspace":
        steps = (
            torch.linspace(0, num_train_timesteps - 1, num_steps, dtype=torch.float64)
            .round()
            .flip(0)
        )
    else:
        raise ValueError(f"timestep_spacing must be one of {TIMESTEP_SPACINGS}, got {spacing!r}")
    if int(steps.max()) >= num_train_timesteps:
        raise ValueError(
            f"steps_offset {steps_offset} puts a DDIM timestep at {int(steps.max())} >= T = "
            f"{num_train_timesteps}; use fewer steps"
        )
    return steps.long()


def ddim_step(
    schedule: Schedule,
    x_t: torch.Tensor,
    eps: torch.Tensor,
    t: int,
    t_prev: int,
    eta: float = 0.0,
    noise: torch.Tensor | None = None,
    clip_sample: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One DDIM update from ``t`` to ``t_prev`` (Song et al. 2021, eq. 12); returns (x_prev, pred_xstart).

    ``t_prev < 0`` means the final step, with ``abar_prev = schedule.final_alpha_cumprod`` (1, or
    ``abar_0`` for a scheduler with ``set_alpha_to_one=False``, as diffusers' DDIMScheduler). ``eta`` interpolates between DDIM (0)
    and DDPM-like ancestral sampling (1); ``noise`` (same shape as ``x_t``) is required when eta > 0.
    """
    if eta < 0:
        raise ValueError(f"eta must be >= 0, got {eta}")
    abar_t = float(schedule.alphas_cumprod[t])
    abar_prev = (
        float(schedule.alphas_cumprod[t_prev]) if t_prev >= 0 else schedule.final_alpha_cumprod
    )
    # 1. predicted x_0 from the noise prediction ("predicted x_0" term of eq. 12)
    pred_xstart = (x_t - (1.0 - abar_t) ** 0.5 * eps) / abar_t**0.5
    if clip_sample:
        pred_xstart = pred_xstart.clamp(-1.0, 1.0)
    # 2. sigma_t(eta), eq. 16
    variance = (1.0 - abar_prev) / (1.0 - abar_t) * (1.0 - abar_t / abar_prev)
    sigma = eta * variance**0.5
    # 3. "direction pointing to x_t" term of eq. 12
    direction = max(1.0 - abar_prev - sigma**2, 0.0) ** 0.5 * eps
    x_prev = abar_prev**0.5 * pred_xstart + direction
    # 4. random noise term of eq. 12
    if eta > 0:
        if noise is None:
            raise ValueError("ddim_step with eta > 0 needs `noise`")
        x_prev = x_prev + sigma * noise
    return x_prev, pred_xstart
