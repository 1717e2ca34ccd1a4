"""Latent text-to-image sampling matches diffusers' StableDiffusionPipeline, loads real layouts, refuses
broken ones."""

from __future__ import annotations

import shutil

import pytest
import torch

from pipeline.core.config_base import ConfigError
from pipeline.core.guidance import cpsample_guidance
from pipeline.core.latent import (
    CFGDenoiser,
    TextConditioned,
    TextGuidance,
    decode_latents,
    encode_images,
    encode_prompts,
    load_latent_model,
)
from pipeline.core.models import CheckpointError
from pipeline.core.sampler import _PerSampleNoise, sample

PROMPTS = ["a handwritten 3", "a handwritten 7", "a handwritten 0"]
SEEDS = [11, 12, 13]


@pytest.fixture(scope="module")
def sd(tiny_sd_dir):
    return load_latent_model(tiny_sd_dir)


class _Probe(torch.nn.Module):
    """A classifier that is confident everywhere, so CPSample guidance fires at every step."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(1))

    def forward(self, x, t, cond=None):
        out = 50.0 * self.w * x.flatten(1).mean(1) + 10.0
        return out if cond is None else out + cond.sum(1)


def _ours(sd, w, guidance=None, steps=10):
    cond, _ = encode_prompts(sd, PROMPTS)
    uncond, _ = encode_prompts(sd, [""] * len(PROMPTS))
    den = CFGDenoiser(sd.unet, sd.schedule, cond, uncond, w)
    res = sample(
        den, sd.schedule, SEEDS, sd.latent_shape, steps, guidance=guidance, clip_sample=False,
        final_clamp=False,
    )  # fmt: skip
    return res, cond, uncond


@pytest.mark.parametrize("w", [1.0, 4.0])
def test_scale_zero_matches_stable_diffusion_pipeline(tiny_sd_dir, sd, w):
    """CPSample at s = 0 is plain CFG sampling, and both equal StableDiffusionPipeline given the same
    scheduler, initial latents and prompt embeddings (to float rounding)."""
    from diffusers import StableDiffusionPipeline

    plain, cond, uncond = _ours(sd, w)
    guided, _, _ = _ours(sd, w, cpsample_guidance(_Probe(), alpha=0.5, scale=0.0))
    assert torch.equal(plain.images, guided.images)  # s = 0: bit for bit
    assert int(guided.fired_steps.min()) == 10  # the gate fired at every step, and did nothing

    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_sd_dir))
    pipe.set_progress_bar_config(disable=True)
    latents = _PerSampleNoise(SEEDS, sd.latent_shape, torch.device("cpu")).draw()
    ref = pipe(
        prompt_embeds=cond, negative_prompt_embeds=uncond, latents=latents,
        num_inference_steps=10, guidance_scale=w, output_type="latent", eta=0.0,
    ).images  # fmt: skip
    assert ref.shape == plain.images.shape == (3, 4, 8, 8)
    scale = float(ref.abs().max())
    assert float((ref - plain.images).abs().max()) < 1e-5 * max(scale, 1.0)
    ours = decode_latents(sd.vae, plain.images, sd.scaling_factor)
    with torch.no_grad():
        theirs = pipe.vae.decode(ref / pipe.vae.config.scaling_factor).sample.clamp(-1, 1)
    assert ours.shape == (3, 1, 16, 16)
    assert float((ours - theirs).abs().max()) < 1e-4


def test_guidance_moves_latents_and_text_conditioned_classifier(sd):
    plain, _, _ = _ours(sd, 2.0, steps=5)
    guided, _, _ = _ours(sd, 2.0, cpsample_guidance(_Probe(), 0.5, 3.0, t_max=1000), steps=5)
    assert int(guided.fired_steps.min()) == 5
    assert float((guided.images - plain.images).abs().max()) > 1e-2
    pooled = encode_prompts(sd, PROMPTS)[1]
    bound = TextConditioned(_Probe(), pooled)
    x = torch.zeros(3, 4, 8, 8)
    assert torch.allclose(bound(x, torch.zeros(3)), 10.0 + pooled.sum(1))


def test_set_alpha_to_one_false_is_honoured(sd):
    """Stable Diffusion's DDIMScheduler ends at abar_0, not 1; the schedule reads it."""
    assert sd.schedule.final_alpha_cumprod == pytest.approx(float(sd.schedule.alphas_cumprod[0]))
    assert sd.schedule.final_alpha_cumprod < 1.0
    assert sd.schedule.steps_offset == 1
    assert float(sd.schedule.betas[0]) == pytest.approx(0.00085)


def test_shapes_prompts_and_vae_round_trip(sd):
    assert sd.latent_shape == (4, 8, 8) and sd.image_shape == (1, 16, 16)
    hidden, pooled = encode_prompts(sd, ["a handwritten 3", "a handwritten 8"])
    assert hidden.shape == (2, sd.tokenizer.model_max_length, 32) and pooled.shape == (2, 32)
    assert float((pooled[0] - pooled[1]).abs().max()) > 1e-4  # distinguishable captions
    images = torch.rand(2, 1, 16, 16) * 2 - 1
    z = encode_images(sd.vae, images, sd.scaling_factor)
    assert z.shape == (2, 4, 8, 8)
    z2 = encode_images(sd.vae, images, sd.scaling_factor)
    assert torch.equal(z, z2)  # the posterior mean: reproducible
    assert decode_latents(sd.vae, z, sd.scaling_factor).abs().max() <= 1.0


def test_cfg_denoiser_combines_branches(sd):
    cond, _ = encode_prompts(sd, PROMPTS)
    uncond, _ = encode_prompts(sd, [""] * 3)
    z, t = torch.randn(3, 4, 8, 8), torch.full((3,), 500)
    e_c = CFGDenoiser(sd.unet, sd.schedule, cond)(z, t)
    e_u = CFGDenoiser(sd.unet, sd.schedule, uncond)(z, t)
    e_w = CFGDenoiser(sd.unet, sd.schedule, cond, uncond, 3.0)(z, t)
    assert torch.allclose(e_w, e_u + 3.0 * (e_c - e_u), atol=1e-5)
    assert torch.equal(CFGDenoiser(sd.unet, sd.schedule, cond, uncond, 1.0)(z, t), e_c)
    with pytest.raises(ValueError, match="guidance_scale"):
        CFGDenoiser(sd.unet, sd.schedule, cond, uncond, -1.0)
    with pytest.raises(ValueError, match="text embeddings"):
        CFGDenoiser(sd.unet, sd.schedule, cond[:2])(z, t)


def test_missing_part_is_refused(tiny_sd_dir, tmp_path):
    broken = tmp_path / "sd"
    shutil.copytree(tiny_sd_dir, broken)
    shutil.rmtree(broken / "vae")
    with pytest.raises(CheckpointError, match=r"missing \['vae'\]"):
        load_latent_model(broken)
    shutil.copytree(tiny_sd_dir / "vae", broken / "vae")
    (broken / "unet" / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="cannot load the unet"):
        load_latent_model(broken)


def test_text_guidance_config():
    text = TextGuidance(("a", "b"), 3.0)
    assert [text.prompt_of(i) for i in range(5)] == ["a", "b", "a", "b", "a"]
    with pytest.raises(ConfigError, match="at least one prompt"):
        TextGuidance(())
    with pytest.raises(ConfigError, match="cfg_scale"):
        TextGuidance(("a",), -1.0)
