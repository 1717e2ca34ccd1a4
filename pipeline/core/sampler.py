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

from pipeline.core.diffusion import Schedule, ddim_step, ddim_timesteps
from pipeline.core.guidance import GuidanceFn
from pipeline.core.models import channels_last

# (x_t, t) -> eps; t is a (B,) long tensor.
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
) -> SampleResult:
    """DDIM sampling (Song et al. 2021, eq. 12) with optional guidance on the noise estimate.

    ``guidance=None`` is plain DDIM; :func:`pipeline.core.guidance.cpsample_guidance` makes it CPSample. Both
    share seeds, steps and batches, so their outputs are directly comparable.
    """
    device = torch.device(device)
    noise = _PerSampleNoise(seeds, shape, device)
    x = noise.draw()  # (B, C, H, W) = x_T
    batch = x.shape[0]
    fired_steps = torch.zeros(batch, dtype=torch.long)
    last_p = torch.full((batch,), float("nan"))
    timesteps = ddim_timesteps(num_steps, schedule.num_train_timesteps)
    ratio = schedule.num_train_timesteps // num_steps
    for t in tqdm(timesteps.tolist(), desc="ddim", disable=not progress, leave=False):
        t_batch = torch.full((batch,), t, dtype=torch.long, device=device)
        with torch.no_grad():
            eps = denoiser(x, t_batch).float()
        if guidance is not None:
            out = guidance(x, t_batch, eps, schedule.abar(t_batch))
            eps = out.eps
            fired_steps += out.fired.long().cpu()
            last_p = out.p.float().cpu()
        step_noise = noise.draw() if eta > 0 else None
        x, _ = ddim_step(schedule, x, eps, t, t - ratio, eta, step_noise, clip_sample)
    return SampleResult(
        images=x.clamp(-1.0, 1.0).cpu(),
        seeds=[int(s) for s in seeds],
        fired_steps=fired_steps,
        num_steps=num_steps,
        last_p=last_p,
    )


def unet_denoiser(unet: torch.nn.Module) -> DenoiserFn:
    """Adapt a diffusers ``UNet2DModel`` (eps-prediction) to the sampler's ``(x_t, t) -> eps``."""

    def call(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return unet(channels_last(x), t).sample

    return call
