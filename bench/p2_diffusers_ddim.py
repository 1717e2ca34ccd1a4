"""P2: our plain DDIM sampler ÷ diffusers' ``DDIMPipeline`` wall time on the same UNet.

Same UNet2DModel (the demo architecture, or the trained demo model), same schedule (linear, T = 1000),
batch, number of steps and eta = 0; the two are run interleaved and the ratio of the medians is reported.
Ours draws each sample's noise from its own generator (the price of worker-count-independent images);
diffusers draws one batch tensor.
"""

from __future__ import annotations

import statistics
import time

import torch

from pipeline.core.models import unet_image_shape
from pipeline.core.sampler import sample, unet_denoiser


def _pipeline(unet):
    from diffusers import DDIMPipeline, DDIMScheduler

    scheduler = DDIMScheduler(
        num_train_timesteps=1000,
        beta_start=1e-4,
        beta_end=0.02,
        beta_schedule="linear",
        clip_sample=True,
        set_alpha_to_one=False,
        timestep_spacing="leading",
    )
    pipe = DDIMPipeline(unet=unet, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run(model_dir: str | None = None, batch: int = 128, steps: int = 20, repeats: int = 5) -> dict:
    from p1_guidance_overhead import _models

    unet, _, schedule, source = _models(model_dir)
    shape = unet_image_shape(unet)
    pipe = _pipeline(unet)
    seeds = list(range(batch))
    times: dict[str, list[float]] = {"ours": [], "diffusers": []}
    sample(unet_denoiser(unet), schedule, seeds[:8], shape, 2)  # warm-up
    pipe(batch_size=8, num_inference_steps=2, output_type="np")
    for _ in range(repeats):
        t0 = time.perf_counter()
        sample(unet_denoiser(unet), schedule, seeds, shape, steps)
        times["ours"].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        with torch.no_grad():
            pipe(
                batch_size=batch,
                num_inference_steps=steps,
                eta=0.0,
                generator=torch.Generator().manual_seed(0),
                output_type="np",
            )
        times["diffusers"].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {
        "ratio": med["ours"] / med["diffusers"],
        "goal": "<= 1.0",
        "ours_s": med["ours"],
        "diffusers_s": med["diffusers"],
        "batch": batch,
        "steps": steps,
        "repeats": repeats,
        "model": source,
        "torch_threads": torch.get_num_threads(),
    }
