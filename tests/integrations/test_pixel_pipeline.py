"""CPSamplePipeline: the stock pipelines' images at scale 0, the project's sampler's when guided,
from_pipe without reloading, and clear errors for bad knobs or a mismatched classifier."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import DDIMPipeline, DDIMScheduler, DDPMPipeline, DDPMScheduler

from pipeline.core.diffusion import linear_schedule
from pipeline.core.guidance import cpsample_guidance
from pipeline.core.models import CheckpointError, build_unet, schedule_record
from pipeline.core.sampler import sample, unet_denoiser
from pipeline.integrations.classifier import CPSampleClassifier
from pipeline.integrations.pixel_pipeline import CPSamplePipeline

LINEAR = {
    "num_train_timesteps": 1000,
    "beta_start": 1e-4,
    "beta_end": 0.02,
    "beta_schedule": "linear",
}
SEEDS = [11, 12, 13, 14]


@pytest.fixture
def parts(core_tiny_unet_cfg, core_tiny_clf_cfg):
    torch.manual_seed(0)
    unet = build_unet(core_tiny_unet_cfg).eval()
    arch = {k: getattr(core_tiny_clf_cfg, k) for k in ("sample_size", "channels", "base_channels",
            "channel_mults", "time_embed_dim", "num_groups")}  # fmt: skip
    record = {"train": {"t_max": 600}, "schedule": schedule_record(linear_schedule())}
    clf = CPSampleClassifier(**arch, cpsample=record).eval().requires_grad_(False)
    return unet, clf


def _gens(seeds=SEEDS):
    return [torch.Generator().manual_seed(s) for s in seeds]


@pytest.mark.parametrize(
    ("stock_cls", "sched_cls"), [(DDIMPipeline, DDIMScheduler), (DDPMPipeline, DDPMScheduler)]
)
def test_scale_zero_is_the_stock_pipeline(parts, stock_cls, sched_cls):
    unet, clf = parts
    stock = stock_cls(unet=unet, scheduler=sched_cls(**LINEAR))
    want = stock(batch_size=4, generator=_gens(), num_inference_steps=8, output_type="np").images
    pipe = CPSamplePipeline.from_pipe(stock, classifier=clf)
    assert pipe.unet is stock.unet and pipe.scheduler is stock.scheduler  # no reload
    got = pipe(batch_size=4, generator=_gens(), num_inference_steps=8, cpsample_scale=0,
               output_type="np")  # fmt: skip
    assert np.array_equal(got.images, want)
    assert np.all(got.fired_fraction == 0) and np.all(np.isnan(got.last_p))


def test_guided_ddim_matches_the_project_sampler(parts):
    unet, clf = parts
    pipe = CPSamplePipeline(unet, DDIMScheduler(**LINEAR), clf)
    out = pipe(batch_size=4, generator=_gens(), num_inference_steps=10, alpha=0.5,
               cpsample_scale=40.0, output_type="pt")  # fmt: skip
    guide = cpsample_guidance(clf.net, 0.5, 40.0, t_max=600)
    ref = sample(unet_denoiser(unet), linear_schedule(), SEEDS, (1, 8, 8), 10, guidance=guide)
    assert torch.allclose(out.images * 2 - 1, ref.images, atol=1e-5)
    assert np.allclose(out.fired_fraction, ref.fired_fraction.numpy())
    assert np.allclose(out.last_p, ref.last_p.numpy(), atol=1e-6)
    plain = pipe(batch_size=4, generator=_gens(), num_inference_steps=10, cpsample_scale=0,
                 output_type="pt").images  # fmt: skip
    assert (out.images - plain).abs().max() > 1e-2  # the guidance acted
    assert np.allclose(out.fired_fraction, 0.6)  # at t = 500, 400, ..., 0: 6 of 10 steps < 600


def test_list_of_generators_gives_per_sample_results(parts):
    unet, clf = parts
    pipe = CPSamplePipeline(unet, DDIMScheduler(**LINEAR), clf)
    both = pipe(batch_size=2, generator=_gens([5, 6]), num_inference_steps=4, output_type="pt")
    one = pipe(batch_size=1, generator=_gens([6]), num_inference_steps=4, output_type="pt")
    # batched convolutions round differently: ~1e-5 after 4 steps
    assert torch.allclose(both.images[1], one.images[0], atol=1e-4)
    assert not torch.allclose(both.images[0], one.images[0], atol=1e-2)


def test_callback_sees_each_guided_step(parts):
    unet, clf = parts
    pipe = CPSamplePipeline(unet, DDIMScheduler(**LINEAR), clf)
    seen = []

    def cb(p, i, t, kwargs):
        seen.append((i, int(t), tuple(kwargs["image"].shape)))
        return {"image": kwargs["image"]}

    pipe(batch_size=2, generator=_gens([1, 2]), num_inference_steps=5, callback_on_step_end=cb,
         output_type="np")  # fmt: skip
    assert [s[0] for s in seen] == list(range(5)) and seen[0][2] == (2, 1, 8, 8)


def test_bad_knobs_and_a_mismatched_classifier_are_refused(parts):
    unet, clf = parts
    pipe = CPSamplePipeline(unet, DDIMScheduler(**LINEAR), clf)
    with pytest.raises(ValueError, match="alpha must be in"):
        pipe(batch_size=1, alpha=0.7)
    with pytest.raises(ValueError, match="scale must be >= 0"):
        pipe(batch_size=1, cpsample_scale=-1)
    with pytest.raises(ValueError, match="exceeds the t_max 600"):
        pipe(batch_size=1, cpsample_t_max=900)
    with pytest.raises(ValueError, match="3 generators for a batch of 2"):
        pipe(batch_size=2, generator=_gens([1, 2, 3]))
    scaled = CPSamplePipeline(
        unet, DDIMScheduler(**{**LINEAR, "beta_schedule": "scaled_linear"}), clf
    )
    with pytest.raises(CheckpointError, match="trained on a schedule"):
        scaled(batch_size=1, num_inference_steps=2)
    # without a classifier the pipeline samples unprotected
    bare = CPSamplePipeline(unet, DDIMScheduler(**LINEAR))
    out = bare(batch_size=1, generator=_gens([1]), num_inference_steps=2, output_type="np")
    assert out.images.shape == (1, 8, 8, 1) and out.fired_fraction[0] == 0
