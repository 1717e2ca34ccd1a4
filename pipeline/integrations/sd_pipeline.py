"""``CPSampleStableDiffusionPipeline``: Stable Diffusion with classifier-protected sampling.

It is diffusers' ``StableDiffusionPipeline`` (same prompt encoding, latents, classifier-free
guidance, guidance rescale, schedulers, VAE decoding and safety checker) with one change in the
loop: after classifier-free guidance combines the two noise predictions and before
``scheduler.step``, the latent classifier's CPSample correction is applied
(:func:`pipeline.integrations.schedulers.guided_model_output`), with its gradient taken in latent
space, as in the paper's Stable Diffusion experiment. A ``callback_on_step_end`` cannot do this: it
runs after the step, when the scheduler has used (and multistep solvers have stored) the
unguided prediction.

``CPSampleStableDiffusionPipeline.from_pipe(sd_pipe, classifier=clf)`` protects an already
loaded pipeline without reloading its weights. At ``cpsample_scale=0`` the images are the stock
pipeline's on the same generator.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

import numpy as np
import torch
from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import (
    rescale_noise_cfg,
    retrieve_timesteps,
)
from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
from diffusers.schedulers import KarrasDiffusionSchedulers
from diffusers.utils.torch_utils import randn_tensor
from transformers import (
    CLIPImageProcessor,
    CLIPTextModel,
    CLIPTokenizer,
    CLIPVisionModelWithProjection,
)

from pipeline.integrations.classifier import CPSampleClassifier
from pipeline.integrations.guard import ReplicaGuard
from pipeline.integrations.pixel_pipeline import CPSamplePipelineOutput, guard_fields, step_kwargs
from pipeline.integrations.protection import StepRecord, protection, sample_seeds
from pipeline.integrations.schedulers import guided_model_output


class CPSampleStableDiffusionPipeline(StableDiffusionPipeline):
    """Text-to-image Stable Diffusion protected by a latent random-label classifier.

    Components: those of ``StableDiffusionPipeline`` plus ``classifier`` (a
    :class:`CPSampleClassifier` trained on this model's latents and noise schedule, optionally
    text-conditioned; None samples unprotected).
    """

    _optional_components: ClassVar[list[str]] = [
        *StableDiffusionPipeline._optional_components,
        "classifier",
    ]

    def __init__(
        self,
        vae: AutoencoderKL,
        text_encoder: CLIPTextModel,
        tokenizer: CLIPTokenizer,
        unet: UNet2DConditionModel,
        scheduler: KarrasDiffusionSchedulers,
        safety_checker: StableDiffusionSafetyChecker | None = None,
        feature_extractor: CLIPImageProcessor | None = None,
        image_encoder: CLIPVisionModelWithProjection | None = None,
        requires_safety_checker: bool = True,
        classifier: CPSampleClassifier | None = None,
    ):
        super().__init__(
            vae, text_encoder, tokenizer, unet, scheduler, safety_checker, feature_extractor,
            image_encoder, requires_safety_checker,
        )  # fmt: skip
        self.register_modules(classifier=classifier)

    def pooled_prompt_embeds(self, prompts: list[str], device: torch.device) -> torch.Tensor:
        """(B, D) pooled text embeddings (the end-of-text token's state) that a text-conditioned
        classifier reads, from the prompts padded as ``encode_prompt`` pads them."""
        tokens = self.tokenizer(
            prompts,
            padding="max_length",
            max_length=self.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        )
        return self.text_encoder(tokens.input_ids.to(device)).pooler_output.float()

    def _denoise(
        self,
        latents: torch.Tensor,
        embeds: torch.Tensor,
        generator: Any,
        num_inference_steps: int,
        timesteps: list[int] | None,
        sigmas: list[float] | None,
        eta: float,
        guide: Callable | None,
        callback_on_step_end: Callable | None = None,
        progress: bool = True,
    ) -> tuple[torch.Tensor, StepRecord]:
        """From initial noise (B, c, h, w) to final latents; ``embeds`` is (2B, L, D) ``[uncond,
        cond]`` with classifier-free guidance, else (B, L, D)."""
        device = latents.device
        steps, _ = retrieve_timesteps(
            self.scheduler, num_inference_steps, device, timesteps, sigmas
        )
        latents = latents.to(device) * self.scheduler.init_noise_sigma
        record = StepRecord(latents.shape[0], device)
        extra = step_kwargs(self.scheduler, generator, eta)
        cfg = self.do_classifier_free_guidance
        for i, t in enumerate(self.progress_bar(steps) if progress else steps):
            model_input = torch.cat([latents] * 2) if cfg else latents
            model_input = self.scheduler.scale_model_input(model_input, t)
            noise_pred = self.unet(
                model_input, t, encoder_hidden_states=embeds,
                cross_attention_kwargs=self.cross_attention_kwargs, return_dict=False,
            )[0]  # fmt: skip
            if cfg:
                noise_uncond, noise_text = noise_pred.chunk(2)
                noise_pred = noise_uncond + self.guidance_scale * (noise_text - noise_uncond)
                if self.guidance_rescale > 0.0:
                    noise_pred = rescale_noise_cfg(noise_pred, noise_text, self.guidance_rescale)
            out = None
            if guide is not None:
                x_in = model_input.chunk(2)[1] if cfg else model_input
                noise_pred, out = guided_model_output(guide, self.scheduler, x_in, t, noise_pred)
            record.add(out)
            latents = self.scheduler.step(noise_pred, t, latents, **extra, return_dict=False)[0]
            if callback_on_step_end is not None:
                update = callback_on_step_end(self, i, t, {"latents": latents}) or {}
                latents = update.get("latents", latents)
        return latents, record

    def _decode(self, latents: torch.Tensor, generator: Any) -> torch.Tensor:
        scale = self.vae.config.scaling_factor
        return self.vae.decode(latents / scale, return_dict=False, generator=generator)[0]

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 50,
        timesteps: list[int] | None = None,
        sigmas: list[float] | None = None,
        guidance_scale: float = 7.5,
        negative_prompt: str | list[str] | None = None,
        num_images_per_prompt: int = 1,
        eta: float = 0.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        cross_attention_kwargs: dict[str, Any] | None = None,
        guidance_rescale: float = 0.0,
        clip_skip: int | None = None,
        callback_on_step_end: Callable | None = None,
        alpha: float = 0.5,
        cpsample_scale: float = 30.0,
        cpsample_t_max: int | None = None,
        input_mode: str = "x_t",
        guard: ReplicaGuard | None = None,
    ) -> CPSamplePipelineOutput | tuple:
        """Generate protected images from text prompts.

        The Stable Diffusion arguments are ``StableDiffusionPipeline``'s. CPSample's:
        ``alpha`` in (0, 0.5] (guide where p < alpha or p > 1 - alpha), ``cpsample_scale`` s >= 0
        (latent classifiers need larger scales than pixel ones; 0 gives the stock images),
        ``cpsample_t_max`` (default: the classifier's trained t_max), ``input_mode`` (``x_t`` or
        ``x0``), ``guard`` (a :class:`ReplicaGuard` over decoded images: copies are redrawn).
        """
        if prompt is None:
            raise ValueError("CPSampleStableDiffusionPipeline needs prompt (text, or a list)")
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        height = height or self.unet.config.sample_size * self.vae_scale_factor
        width = width or self.unet.config.sample_size * self.vae_scale_factor
        self.check_inputs(prompt, height, width, None, negative_prompt)
        self._guidance_scale, self._guidance_rescale = guidance_scale, guidance_rescale
        self._clip_skip, self._cross_attention_kwargs = clip_skip, cross_attention_kwargs
        self._interrupt = False
        device = self._execution_device
        batch = len(prompts) * num_images_per_prompt
        cond, uncond = self.encode_prompt(
            prompt, device, num_images_per_prompt, self.do_classifier_free_guidance,
            negative_prompt, clip_skip=clip_skip,
        )  # fmt: skip
        pooled = None
        if self.classifier is not None and self.classifier.config.cond_dim > 0:
            pooled = self.pooled_prompt_embeds(prompts, device)
            pooled = pooled.repeat_interleave(num_images_per_prompt, dim=0)
        guide = protection(
            self.classifier, self.scheduler, alpha, cpsample_scale, cpsample_t_max, input_mode,
            pooled,
        )  # fmt: skip
        embeds = torch.cat([uncond, cond]) if self.do_classifier_free_guidance else cond
        shape = (batch, self.unet.config.in_channels, height // self.vae_scale_factor,
                 width // self.vae_scale_factor)  # fmt: skip
        if isinstance(generator, list) and len(generator) != batch:
            raise ValueError(f"{len(generator)} generators for {batch} images")
        if latents is None:  # unscaled: _denoise multiplies by init_noise_sigma, as stock does
            latents = randn_tensor(shape, generator=generator, device=device, dtype=cond.dtype)
        args = (num_inference_steps, timesteps, sigmas, eta)
        latents, record = self._denoise(latents, embeds, generator, *args, guide,
                                        callback_on_step_end)  # fmt: skip
        fired, last_p = record.fired_fraction().numpy(), record.last_p.cpu().numpy()
        if output_type == "latent":
            return CPSamplePipelineOutput(images=latents, fired_fraction=fired, last_p=last_p)
        image = self._decode(latents, generator)
        extra: dict[str, Any] = {}
        if guard is not None:

            def redraw(positions: np.ndarray, gens: list[torch.Generator]) -> torch.Tensor:
                rows = torch.as_tensor(positions, device=device)
                sub_embeds = (
                    torch.cat([uncond[rows], cond[rows]]) if self.do_classifier_free_guidance
                    else cond[rows]
                )  # fmt: skip
                sub_guide = guide
                if pooled is not None:
                    sub_guide = protection(self.classifier, self.scheduler, alpha, cpsample_scale,
                                           cpsample_t_max, input_mode, pooled[rows])  # fmt: skip
                noise = randn_tensor((len(gens), *shape[1:]), generator=gens, device=device,
                                     dtype=cond.dtype)  # fmt: skip
                out, rec = self._denoise(noise, sub_embeds, gens, *args, sub_guide, progress=False)
                fired[positions], last_p[positions] = rec.fired_fraction().numpy(), rec.last_p.cpu()
                return self._decode(out, gens)

            checked = guard.apply(image.clamp(-1, 1), sample_seeds(generator, batch), redraw)
            image, extra = checked.images, guard_fields(checked)
        image, nsfw = self.run_safety_checker(image, device, cond.dtype)
        denormalize = [True] * image.shape[0] if nsfw is None else [not n for n in nsfw]
        image = self.image_processor.postprocess(image, output_type, do_denormalize=denormalize)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (image, nsfw)
        return CPSamplePipelineOutput(
            images=image, fired_fraction=fired, last_p=last_p, nsfw_content_detected=nsfw, **extra
        )
