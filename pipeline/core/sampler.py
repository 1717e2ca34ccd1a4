"""One sampler loop for plain DDIM and CPSample; guidance is a pluggable function.

Determinism: every sample owns a seed. Its initial noise and its per-step DDIM noise come from a
generator seeded with that seed alone, so a sample's trajectory does not depend on which batch, shard
or worker it was drawn in, up to the float rounding of batched convolutions (about 1e-7 per step).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from pipeline.core.diffusion import Schedule, ddim_step, ddim_timesteps, eps_from_model_output
from pipeline.core.guidance import GuidanceFn
from pipeline.core.models import channels_last

# (x_t, t) -> eps; t is a (B,) long tensor. Whatever the network predicts, the sampler, the guidance
# and the attacks work in eps: the adapter (:class:`UNetDenoiser`) converts.
DenoiserFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class SampleResult:
    """Images in [-1, 1] and per-sample guidance statistics (B = number of samples)."""

    images: torch.Tensor  # (B, C, H, W) float32
    seeds: list[int]
    fired_steps: torch.Tensor  # (B,) int, steps at which guidance acted
    num_steps: int
    last_p: torch.Tensor  # (B,) classifier p at the last guided step (NaN without guidance)

    @property
    def fired_fraction(self) -> torch.Tensor:
        return self.fired_steps.float() / self.num_steps


def derive_seed(*parts: int | str) -> int:
    """A 63-bit seed from a tuple, stable across processes and machines (BLAKE2b, not ``hash``)."""
    digest = hashlib.blake2b("/".join(str(p) for p in parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


class _PerSampleNoise:
    """Gaussian noise drawn from one CPU generator per sample, then moved to the device."""

    def __init__(self, seeds: Sequence[int], shape: tuple[int, ...], device: torch.device):
        self.generators = [torch.Generator().manual_seed(int(s)) for s in seeds]
        self.shape = shape
        self.device = device

    def draw(self) -> torch.Tensor:
        noise = [torch.randn(self.shape, generator=g) for g in self.generators]
        return torch.stack(noise).to(self.device)


def sample(
    denoiser: DenoiserFn,
    schedule: Schedule,
    seeds: Sequence[int],
    shape: tuple[int, int, int],
    num_steps: int = 50,
    eta: float = 0.0,
    guidance: GuidanceFn | None = None,
    clip_sample: bool = True,
    device: torch.device | str = "cpu",
    progress: bool = False,
    final_clamp: bool = True,
) -> SampleResult:
    """DDIM sampling (Song et al. 2021, eq. 12) with optional guidance on the noise estimate.

    ``denoiser`` returns eps; for a model that predicts v or x_0 build it with
    ``unet_denoiser(unet, schedule)`` (a denoiser adapted for another prediction type is refused).

    ``guidance=None`` is plain DDIM; :func:`pipeline.core.guidance.cpsample_guidance` makes it CPSample. Both
    share seeds, steps and batches, so their outputs are directly comparable.

    Latent models (:mod:`pipeline.core.latent`) sample latents with ``clip_sample=False`` and
    ``final_clamp=False``: latents are not bounded to [-1, 1].
    """
    check_denoiser(denoiser, schedule)
    device = torch.device(device)
    noise = _PerSampleNoise(seeds, shape, device)
    x = noise.draw()  # (B, C, H, W) = x_T
    batch = x.shape[0]
    # per-step bookkeeping stays on the device (no host sync per step); read back once at the end
    fired_steps = torch.zeros(batch, dtype=torch.long, device=device)
    last_p = torch.full((batch,), float("nan"), device=device)
    abar_table = schedule.alphas_cumprod.to(device).float()  # copied once, indexed on the device
    timesteps = ddim_timesteps(
        num_steps, schedule.num_train_timesteps, schedule.timestep_spacing, schedule.steps_offset
    )
    ratio = schedule.num_train_timesteps // num_steps  # t_prev = t - T // S, as diffusers' DDIM
    for t in tqdm(timesteps.tolist(), desc="ddim", disable=not progress, leave=False):
        t_batch = torch.full((batch,), t, dtype=torch.long, device=device)
        with torch.no_grad():
            eps = denoiser(x, t_batch).float()
        if guidance is not None:
            out = guidance(x, t_batch, eps, abar_table[t_batch])
            eps = out.eps
            fired_steps += out.fired.long().to(device)
            last_p = out.p.float().to(device)
        step_noise = noise.draw() if eta > 0 else None
        x, _ = ddim_step(schedule, x, eps, t, t - ratio, eta, step_noise, clip_sample)
    return SampleResult(
        images=(x.clamp(-1.0, 1.0) if final_clamp else x).cpu(),
        seeds=[int(s) for s in seeds],
        fired_steps=fired_steps.cpu(),
        num_steps=num_steps,
        last_p=last_p.cpu(),
    )


class UNetDenoiser:
    """A diffusers ``UNet2DModel`` as the sampler's ``(x_t, t) -> eps``, for any prediction type.

    The network's output is read as ``prediction_type`` (the schedule's, or ``epsilon`` without one)
    and converted to eps with :func:`pipeline.core.diffusion.eps_from_model_output`
    (v: ``eps = sqrt(abar) v + sqrt(1 - abar) x_t``, Salimans & Ho 2022; x_0:
    ``eps = (x_t - sqrt(abar) x_0) / sqrt(1 - abar)``).
    """

    def __init__(self, unet: torch.nn.Module, schedule: Schedule | None = None):
        self.unet = unet
        self.schedule = schedule
        self.prediction_type = "epsilon" if schedule is None else schedule.prediction_type

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        out = self.unet(channels_last(x), t).sample  # (B, C, H, W) in the model's parameterization
        if self.schedule is None or self.prediction_type == "epsilon":
            return out
        return eps_from_model_output(out, x, self.schedule.abar(t), self.prediction_type)


def unet_denoiser(unet: torch.nn.Module, schedule: Schedule | None = None) -> UNetDenoiser:
    """Adapt a diffusers ``UNet2DModel`` to the sampler's ``(x_t, t) -> eps``.

    Pass the model's ``schedule`` (from :func:`pipeline.core.models.load_schedule`) so that a
    ``v_prediction`` or ``sample`` model is converted to eps; without it the UNet must predict eps.
    """
    return UNetDenoiser(unet, schedule)


def check_denoiser(denoiser: DenoiserFn, schedule: Schedule) -> None:
    """Refuse a denoiser adapted for another prediction type than the schedule's model has.

    A plain callable is trusted to return eps; a :class:`UNetDenoiser` records what it converts from,
    so ``unet_denoiser(unet)`` for a v-prediction model fails here instead of being misread as eps.
    """
    made_for = getattr(denoiser, "prediction_type", None)
    if made_for is not None and made_for != schedule.prediction_type:
        raise ValueError(
            f"the denoiser reads the network output as {made_for!r} but the schedule's model predicts "
            f"{schedule.prediction_type!r}: build it with unet_denoiser(unet, schedule)"
        )
