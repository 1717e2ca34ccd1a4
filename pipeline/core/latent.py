"""Latent text-to-image models (Stable Diffusion and its kin) as the sampler's pluggable parts.

Latent diffusion (Rombach et al. 2022) runs DDIM on ``z = f * E(x)``, the VAE encoder's posterior
mean scaled by the VAE's ``scaling_factor`` ``f``, and decodes with ``x = D(z / f)``. The UNet is
conditioned on the text encoder's last hidden states; classifier-free guidance (Ho & Salimans 2022,
eq. 6) combines the conditional and unconditional noise estimates:

    eps = eps(z_t, t, empty) + w * (eps(z_t, t, text) - eps(z_t, t, empty))

:class:`CFGDenoiser` is that ``(z_t, t) -> eps`` for :func:`pipeline.core.sampler.sample`, so plain
and CPSample latent sampling share the pixel path's loop, seeds and guidance. CPSample's gradient is
then taken in latent space, as in the paper's Stable Diffusion experiment.

A model directory is any diffusers Stable Diffusion layout (``unet/``, ``vae/``, ``text_encoder/``,
``tokenizer/``, ``scheduler/``), read with ``from_pretrained`` from local files only.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from pipeline.core.diffusion import Schedule, eps_from_model_output
from pipeline.core.models import CheckpointError, load_schedule

PARTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")


@dataclass
class TextGuidance:
    """What a latent text-to-image sampler is asked: the prompts (sample ``i`` of the run gets
    ``prompts[i % len(prompts)]``), the classifier-free guidance scale ``w`` and the negative
    (unconditional) prompt, ``""`` as in Stable Diffusion's pipeline."""

    prompts: tuple[str, ...] = field(default_factory=tuple)
    cfg_scale: float = 7.5
    negative_prompt: str = ""

    def __post_init__(self) -> None:
        from pipeline.core.config_base import ConfigError

        self.prompts = tuple(str(p) for p in self.prompts)
        if not self.prompts:
            raise ConfigError(
                "a latent sampler needs at least one prompt (--prompts or --prompts-from)"
            )
        if not self.cfg_scale >= 0:
            raise ConfigError(
                f"cfg_scale (classifier-free guidance) must be >= 0, got {self.cfg_scale}"
            )

    def prompt_of(self, position: int) -> str:
        """The prompt of the run's sample number ``position`` (round robin, actor-independent)."""
        return self.prompts[position % len(self.prompts)]


@dataclass
class LatentModel:
    """The parts of a latent text-to-image model that CPSample needs (all in eval mode)."""

    unet: Any  # diffusers UNet2DConditionModel
    vae: Any  # diffusers AutoencoderKL
    text_encoder: Any  # transformers CLIPTextModel
    tokenizer: Any  # transformers CLIPTokenizer
    schedule: Schedule

    @property
    def scaling_factor(self) -> float:
        return float(self.vae.config.scaling_factor)

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        """(C, h, w) of the latents the UNet denoises."""
        size = self.unet.config.sample_size
        size = size if isinstance(size, int) else size[0]
        return (int(self.unet.config.in_channels), int(size), int(size))

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of the decoded images: the VAE downsamples by 2 per block after the first."""
        factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        _, h, w = self.latent_shape
        return (int(self.vae.config.in_channels), h * factor, w * factor)

    def to(self, device: torch.device | str) -> LatentModel:
        for part in (self.unet, self.vae, self.text_encoder):
            part.to(device)
        return self


def load_parts(
    directory: str | Path, names: Sequence[str] = PARTS[:4], device: torch.device | str = "cpu"
) -> dict[str, Any]:
    """The named parts (``unet``, ``vae``, ``text_encoder``, ``tokenizer``) of a Stable Diffusion
    directory from local files only, the models in eval mode with gradients off. A missing or
    unreadable part raises :class:`CheckpointError` naming it."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    directory = Path(directory)
    missing = [p for p in names if not (directory / p).is_dir()]
    if missing:
        raise CheckpointError(
            f"{directory}: not a Stable Diffusion directory, missing {missing} (need {list(PARTS)})"
        )
    loaders = {
        "unet": lambda p: UNet2DConditionModel.from_pretrained(p, low_cpu_mem_usage=False),
        "vae": lambda p: AutoencoderKL.from_pretrained(p, low_cpu_mem_usage=False),
        "text_encoder": lambda p: CLIPTextModel.from_pretrained(p, local_files_only=True),
        "tokenizer": lambda p: CLIPTokenizer.from_pretrained(p, local_files_only=True),
    }
    parts: dict[str, Any] = {}
    for name in names:
        try:
            parts[name] = loaders[name](str(directory / name))
        except Exception as exc:  # diffusers/transformers raise many types for malformed dirs
            raise CheckpointError(f"{directory / name}: cannot load the {name}: {exc}") from exc
        if name != "tokenizer":
            parts[name] = parts[name].to(device).eval().requires_grad_(False)
    return parts


def load_latent_model(directory: str | Path, device: torch.device | str = "cpu") -> LatentModel:
    """Load a diffusers Stable Diffusion directory from local files; nothing is downloaded.

    Every part of :data:`PARTS` must be there; a missing or unreadable one raises
    :class:`CheckpointError` naming it. The noise schedule is the ``scheduler/`` config's
    (:func:`pipeline.core.models.load_schedule`, with ``set_alpha_to_one`` honoured).
    """
    directory = Path(directory)
    missing = [p for p in PARTS if not (directory / p).is_dir()]
    if missing:
        raise CheckpointError(
            f"{directory}: not a Stable Diffusion directory, missing {missing} (need {list(PARTS)})"
        )
    parts = load_parts(directory, device=device)
    model = LatentModel(schedule=load_schedule(directory), **parts)
    if model.unet.config.in_channels != model.vae.config.latent_channels:
        raise CheckpointError(
            f"{directory}: the UNet denoises {model.unet.config.in_channels} channels but the VAE "
            f"makes {model.vae.config.latent_channels}-channel latents"
        )
    return model


@torch.no_grad()
def encode_prompts(
    model: LatentModel, prompts: Sequence[str], device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Text embeddings as Stable Diffusion's pipeline makes them: ``(hidden (B, L, D), pooled (B, D))``.

    Prompts are padded and truncated to the tokenizer's ``model_max_length``; ``hidden`` is the text
    encoder's last hidden state (the UNet's ``encoder_hidden_states``), ``pooled`` its pooled output
    (the end-of-text token's state), which a text-conditioned classifier reads.
    """
    tokens = model.tokenizer(
        list(prompts),
        padding="max_length",
        max_length=model.tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    )
    out = model.text_encoder(tokens.input_ids.to(device))
    return out.last_hidden_state.float(), out.pooler_output.float()


@torch.no_grad()
def encode_images(vae: Any, images: torch.Tensor, scaling_factor: float) -> torch.Tensor:
    """``z = f * mean(q(z | x))`` for images in [-1, 1] (Rombach et al. 2022, sec. 3).

    The posterior mean, not a draw from it, so precomputed latents are reproducible.
    """
    return vae.encode(images).latent_dist.mean * scaling_factor


@torch.no_grad()
def decode_latents(vae: Any, latents: torch.Tensor, scaling_factor: float) -> torch.Tensor:
    """``x = D(z / f)`` clamped to [-1, 1]."""
    return vae.decode(latents / scaling_factor).sample.clamp(-1.0, 1.0)


class CFGDenoiser:
    """A conditional UNet with classifier-free guidance as the sampler's ``(z_t, t) -> eps``.

    ``cond`` and ``uncond`` are (B, L, D) text hidden states, one row per sample. With
    ``guidance_scale == 1`` or no ``uncond`` only the conditional branch runs; otherwise both run in
    one batch of 2B, as diffusers' ``StableDiffusionPipeline`` does, and
    ``eps = eps_u + w (eps_c - eps_u)`` (Ho & Salimans 2022, eq. 6). A v-prediction or x_0 model's
    output is converted to eps with :func:`pipeline.core.diffusion.eps_from_model_output`.
    """

    def __init__(
        self,
        unet: Any,
        schedule: Schedule,
        cond: torch.Tensor,
        uncond: torch.Tensor | None = None,
        guidance_scale: float = 1.0,
    ):
        if guidance_scale < 0:
            raise ValueError(f"guidance_scale (classifier-free) must be >= 0, got {guidance_scale}")
        if uncond is not None and uncond.shape != cond.shape:
            raise ValueError(f"uncond {tuple(uncond.shape)} must match cond {tuple(cond.shape)}")
        self.unet, self.schedule = unet, schedule
        self.cond, self.uncond, self.guidance_scale = cond, uncond, float(guidance_scale)
        self.prediction_type = schedule.prediction_type

    def _eps(self, z: torch.Tensor, t: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        dtype = next(self.unet.parameters()).dtype
        out = self.unet(z.to(dtype), t, encoder_hidden_states=text.to(dtype)).sample.float()
        if self.prediction_type == "epsilon":
            return out
        return eps_from_model_output(out, z, self.schedule.abar(t), self.prediction_type)

    def __call__(self, z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if z.shape[0] != self.cond.shape[0]:
            raise ValueError(f"{z.shape[0]} latents but {self.cond.shape[0]} text embeddings")
        if self.uncond is None or self.guidance_scale == 1.0:
            return self._eps(z, t, self.cond)
        both = self._eps(torch.cat([z, z]), torch.cat([t, t]), torch.cat([self.uncond, self.cond]))
        eps_u, eps_c = both.chunk(2)
        return eps_u + self.guidance_scale * (eps_c - eps_u)


class TextConditioned(torch.nn.Module):
    """A text-conditioned classifier ``c_phi(z_t, t, pooled)`` with the batch's pooled text
    embeddings bound, so CPSample guidance can call it as ``c_phi(z_t, t)``."""

    def __init__(self, classifier: torch.nn.Module, pooled: torch.Tensor):
        super().__init__()
        self.classifier, self.pooled = classifier, pooled

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.classifier(x, t, self.pooled)
