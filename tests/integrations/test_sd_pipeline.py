"""CPSampleStableDiffusionPipeline on a tiny Stable Diffusion directory: from_pipe without
reloading, the stock pipeline's images at scale 0, the project's latent sampler's when guided,
text-conditioned classifiers and a sigma-space scheduler."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline

from pipeline.core.guidance import cpsample_guidance
from pipeline.core.latent import CFGDenoiser, TextConditioned, encode_prompts, load_latent_model
from pipeline.core.models import load_schedule, schedule_record
from pipeline.core.sampler import sample
from pipeline.integrations.classifier import CPSampleClassifier
from pipeline.integrations.sd_pipeline import CPSampleStableDiffusionPipeline

PROMPTS = ["a digit", "a seven", "a blurry zero"]
SEEDS = [21, 22, 23]
CFG = 3.0


def _gens(seeds=SEEDS):
    return [torch.Generator().manual_seed(s) for s in seeds]


@pytest.fixture(scope="module")
def sd(tiny_sd_dir):
    return StableDiffusionPipeline.from_pretrained(str(tiny_sd_dir), safety_checker=None,
                                                   requires_safety_checker=False)  # fmt: skip


def _classifier(tiny_sd_dir, cond_dim: int = 0) -> CPSampleClassifier:
    torch.manual_seed(1)
    record = {"train": {"t_max": 600}, "schedule": schedule_record(load_schedule(tiny_sd_dir))}
    clf = CPSampleClassifier(sample_size=8, channels=4, base_channels=8, channel_mults=(1, 2),
                             time_embed_dim=8, num_groups=4, cond_dim=cond_dim, cpsample=record)  # fmt: skip
    return clf.eval().requires_grad_(False)


def test_from_pipe_at_scale_zero_is_the_stock_pipeline(sd, tiny_sd_dir):
    want = sd(PROMPTS, num_inference_steps=6, guidance_scale=CFG, generator=_gens(),
              output_type="np").images  # fmt: skip
    pipe = CPSampleStableDiffusionPipeline.from_pipe(sd, classifier=_classifier(tiny_sd_dir))
    assert pipe.unet is sd.unet and pipe.vae is sd.vae and pipe.text_encoder is sd.text_encoder
    out = pipe(PROMPTS, num_inference_steps=6, guidance_scale=CFG, generator=_gens(),
               cpsample_scale=0, output_type="np")  # fmt: skip
    assert out.images.shape == want.shape == (3, 16, 16, 1)
    assert np.array_equal(out.images, want)


def test_guided_ddim_matches_the_project_latent_sampler(sd, tiny_sd_dir):
    clf = _classifier(tiny_sd_dir)
    pipe = CPSampleStableDiffusionPipeline.from_pipe(sd, classifier=clf)
    out = pipe(PROMPTS, num_inference_steps=8, guidance_scale=CFG, generator=_gens(),
               alpha=0.5, cpsample_scale=30.0, output_type="latent")  # fmt: skip
    model = load_latent_model(tiny_sd_dir)
    cond, _ = encode_prompts(model, PROMPTS)
    uncond, _ = encode_prompts(model, [""] * len(PROMPTS))
    denoiser = CFGDenoiser(model.unet, model.schedule, cond, uncond, CFG)
    ref = sample(denoiser, model.schedule, SEEDS, model.latent_shape, 8, clip_sample=False,
                 guidance=cpsample_guidance(clf.net, 0.5, 30.0, t_max=600),
                 final_clamp=False)  # fmt: skip
    assert torch.allclose(out.images, ref.images, atol=1e-5)
    assert np.allclose(out.fired_fraction, ref.fired_fraction.numpy())
    assert out.fired_fraction.min() > 0


def test_text_conditioned_classifier_reads_the_prompts(sd, tiny_sd_dir):
    hidden = sd.text_encoder.config.hidden_size
    clf = _classifier(tiny_sd_dir, cond_dim=hidden)
    pipe = CPSampleStableDiffusionPipeline.from_pipe(sd, classifier=clf)
    out = pipe(PROMPTS, num_inference_steps=4, guidance_scale=CFG, generator=_gens(),
               cpsample_scale=30.0, output_type="latent")  # fmt: skip
    model = load_latent_model(tiny_sd_dir)
    cond, pooled = encode_prompts(model, PROMPTS)
    uncond, _ = encode_prompts(model, [""] * len(PROMPTS))
    guide = cpsample_guidance(TextConditioned(clf.net, pooled), 0.5, 30.0, t_max=600)
    ref = sample(CFGDenoiser(model.unet, model.schedule, cond, uncond, CFG), model.schedule,
                 SEEDS, model.latent_shape, 4, clip_sample=False, guidance=guide,
                 final_clamp=False)  # fmt: skip
    assert torch.allclose(out.images, ref.images, atol=1e-5)


def test_euler_runs_guided_in_sigma_space(sd, tiny_sd_dir):
    euler = EulerDiscreteScheduler.from_config(sd.scheduler.config)
    pipe = CPSampleStableDiffusionPipeline.from_pipe(sd, classifier=_classifier(tiny_sd_dir))
    pipe.scheduler = euler
    plain = pipe(PROMPTS, num_inference_steps=6, generator=_gens(), cpsample_scale=0,
                 output_type="np").images  # fmt: skip
    guided = pipe(PROMPTS, num_inference_steps=6, generator=_gens(), cpsample_scale=30.0,
                  output_type="np")  # fmt: skip
    assert np.isfinite(guided.images).all() and guided.fired_fraction.min() > 0
    assert np.abs(guided.images - plain).max() > 1e-3
    stock = StableDiffusionPipeline.from_pipe(sd)
    stock.scheduler = euler
    want = stock(PROMPTS, num_inference_steps=6, generator=_gens(), output_type="np").images
    assert np.array_equal(plain, want)
