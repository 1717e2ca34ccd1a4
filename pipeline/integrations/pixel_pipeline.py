"""``CPSamplePipeline``: a protected pipeline for pixel diffusion models (``UNet2DModel``).

The loop is diffusers' ``DDIMPipeline``/``DDPMPipeline`` loop with one change: between the UNet and
``scheduler.step`` the noise prediction gets the CPSample correction
(:func:`pipeline.integrations.schedulers.guided_model_output`). That is why this is a pipeline and
not a ``callback_on_step_end``: the callback runs after the step, when the scheduler has already
used the unguided prediction (and, for multistep solvers, stored it in its history), so a callback
could only nudge the next state, which is not the guided update of Algorithm 2.

Any scheduler that reads an eps (or v, or x_0) prediction works: DDIM, DDPM, DPMSolverMultistep,
EulerDiscrete, ... At ``cpsample_scale=0`` (or without a classifier) the images are the stock
``DDIMPipeline``'s on the same generator, bit for bit.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
from diffusers import DiffusionPipeline, UNet2DModel
from diffusers.schedulers import SchedulerMixin
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor

from pipeline.integrations.classifier import CPSampleClassifier
from pipeline.integrations.guard import GuardResult, ReplicaGuard
from pipeline.integrations.protection import StepRecord, protection, sample_seeds
from pipeline.integrations.schedulers import guided_model_output


@dataclass
class CPSamplePipelineOutput(BaseOutput):
    """``images`` as asked (PIL list, numpy (B, H, W, C) or torch (B, C, H, W) in [0, 1]);
    ``fired_fraction`` (B,): the share of steps at which guidance acted on each sample;
    ``last_p`` (B,): the classifier's p at its last guided step (NaN if never asked). With a guard:
    ``replica_similarity`` (B,) to the nearest training image, ``redraws`` (B,), and
    ``replica_flags`` (B,) True where a sample was still a copy after every redraw (blacked out),
    ``nearest_keys`` (B,) the nearest training image's key. Stable Diffusion adds its safety
    checker's ``nsfw_content_detected``."""

    images: Any
    fired_fraction: np.ndarray
    last_p: np.ndarray
    replica_similarity: np.ndarray | None = None
    redraws: np.ndarray | None = None
    replica_flags: list[bool] | None = None
    nearest_keys: list[str] | None = None
    nsfw_content_detected: list[bool] | None = None


def step_kwargs(scheduler: Any, generator: Any, eta: float, **more: Any) -> dict[str, Any]:
    """The keyword arguments ``scheduler.step`` accepts among ``eta``, ``generator`` and ``more``
    (as diffusers' ``prepare_extra_step_kwargs``: only DDIM takes ``eta``)."""
    accepted = set(inspect.signature(scheduler.step).parameters)
    wanted = {"eta": eta, "generator": generator, **more}
    return {k: v for k, v in wanted.items() if k in accepted and v is not None}


def guard_fields(checked: GuardResult) -> dict[str, Any]:
    """The output fields a guard adds (:class:`CPSamplePipelineOutput`)."""
    return {
        "replica_similarity": checked.similarity,
        "redraws": checked.redraws,
        "replica_flags": [bool(f) for f in checked.flagged],
        "nearest_keys": checked.keys,
    }


class CPSamplePipeline(DiffusionPipeline):
    """Classifier-protected sampling from an unconditional pixel ``UNet2DModel``.

    Components: ``unet``, ``scheduler`` (any eps-reading diffusers scheduler) and ``classifier``
    (a :class:`CPSampleClassifier` trained on this model's noise schedule; None samples
    unprotected). ``CPSamplePipeline.from_pipe(ddim_pipe, classifier=clf)`` reuses a loaded
    ``DDIMPipeline``'s or ``DDPMPipeline``'s weights.
    """

    model_cpu_offload_seq = "unet"
    _optional_components: ClassVar[list[str]] = ["classifier"]

    def __init__(
        self,
        unet: UNet2DModel,
        scheduler: SchedulerMixin,
        classifier: CPSampleClassifier | None = None,
    ):
        super().__init__()
        self.register_modules(unet=unet, scheduler=scheduler, classifier=classifier)

    def _denoise(
        self,
        image: torch.Tensor,
        generator: Any,
        num_inference_steps: int,
        eta: float,
        guide: Callable | None,
        callback_on_step_end: Callable | None = None,
        progress: bool = True,
    ) -> tuple[torch.Tensor, StepRecord]:
        """From initial noise ``image`` (B, C, H, W) to samples in [-1, 1]."""
        self.scheduler.set_timesteps(num_inference_steps, device=image.device)
        image = image * self.scheduler.init_noise_sigma
        record = StepRecord(image.shape[0], image.device)
        extra = step_kwargs(self.scheduler, generator, eta)
        timesteps = self.scheduler.timesteps
        for i, t in enumerate(self.progress_bar(timesteps) if progress else timesteps):
            x_in = self.scheduler.scale_model_input(image, t)
            model_output = self.unet(x_in, t).sample
            out = None
            if guide is not None:
                model_output, out = guided_model_output(
                    guide, self.scheduler, x_in, t, model_output
                )
            record.add(out)
            image = self.scheduler.step(model_output, t, image, **extra).prev_sample
            if callback_on_step_end is not None:
                update = callback_on_step_end(self, i, t, {"image": image}) or {}
                image = update.get("image", image)
        return image, record

    @torch.no_grad()
    def __call__(
        self,
        batch_size: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        num_inference_steps: int = 50,
        eta: float = 0.0,
        alpha: float = 0.5,
        cpsample_scale: float = 5.0,
        cpsample_t_max: int | None = None,
        input_mode: str = "x_t",
        guard: ReplicaGuard | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        callback_on_step_end: Callable | None = None,
    ) -> CPSamplePipelineOutput | tuple:
        """Draw ``batch_size`` protected samples.

        Args:
            generator: one generator, or one per sample (the project's jobs seed one per sample).
            alpha: the confidence threshold in (0, 0.5]: guidance acts where p < alpha or
                p > 1 - alpha (0.5: whenever p != 1/2).
            cpsample_scale: the guidance strength s >= 0 (0: the stock pipeline's images).
            cpsample_t_max: guide at t < this (default: the t_max the classifier was trained at).
            input_mode: ``x_t`` (the classifier sees the noisy state) or ``x0`` (the predicted x_0).
            guard: a :class:`ReplicaGuard`; samples at or above its threshold are redrawn.
            callback_on_step_end: ``f(pipe, i, t, {"image": state}) -> {"image": ...}`` after each
                step (the guidance has acted by then).
        """
        if isinstance(generator, list) and len(generator) != batch_size:
            raise ValueError(f"{len(generator)} generators for a batch of {batch_size}")
        size = self.unet.config.sample_size
        size = (size, size) if isinstance(size, int) else tuple(size)
        shape = (batch_size, self.unet.config.in_channels, *size)
        device = self._execution_device
        guide = protection(
            self.classifier, self.scheduler, alpha, cpsample_scale, cpsample_t_max, input_mode
        )
        noise = randn_tensor(shape, generator=generator, device=device, dtype=self.unet.dtype)
        image, record = self._denoise(
            noise, generator, num_inference_steps, eta, guide, callback_on_step_end
        )
        fired, last_p = record.fired_fraction().numpy(), record.last_p.cpu().numpy()
        extra: dict[str, Any] = {}
        if guard is not None:

            def redraw(positions: np.ndarray, gens: list[torch.Generator]) -> torch.Tensor:
                sub = randn_tensor((len(gens), *shape[1:]), generator=gens, device=device,
                                   dtype=self.unet.dtype)  # fmt: skip
                out, rec = self._denoise(sub, gens, num_inference_steps, eta, guide, progress=False)
                fired[positions], last_p[positions] = rec.fired_fraction().numpy(), rec.last_p.cpu()
                return out

            checked = guard.apply(image.clamp(-1, 1), sample_seeds(generator, batch_size), redraw)
            image = checked.images
            extra = guard_fields(checked)
        image = (image / 2 + 0.5).clamp(0, 1)
        if output_type != "pt":
            image = image.cpu().permute(0, 2, 3, 1).float().numpy()
            if output_type == "pil":
                image = self.numpy_to_pil(image)
        self.maybe_free_model_hooks()
        result = CPSamplePipelineOutput(
            images=image,
            fired_fraction=fired,
            last_p=last_p,
            **extra,
        )
        return result if return_dict else (image,)
