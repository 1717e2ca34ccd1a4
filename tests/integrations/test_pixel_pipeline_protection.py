"""CPSamplePipeline's protection on the headline's memorising denoiser, through diffusers objects.

The headline models (:mod:`tests.headline_models`: a ``UNet2DModel`` that copies its 8 training
digits, the random-label classifier fitted to their bits) are wrapped as a diffusers
``CPSamplePipeline(unet, scheduler, CPSampleClassifier)``. For each scheduler the headline's 128
seeds (one generator per seed) are drawn without protection (``cpsample_scale=0``) and with the
default knobs (alpha 0.5, scale 5), and every sample is scored by the project's replica rule
(centred-pixel cosine to the nearest training image, threshold of ``ReplicaConfig``):

- every scheduler copies without protection and replicates less with it; the headline's margin
  (at most half the rate and 0.4 below it) holds at the default scale for DDIM and at scale 10 for
  DDPM, DPMSolverMultistep and EulerDiscrete (see ``MEASURED``);
- guided DDIM gives the project's own sampler's images (the headline's CPSample draw);
- the replica guard, on the stored replica index of the same 8 images, never returns a copy: it
  redraws copies and blacks out what is still a copy; with CPSample it flags (nearly) nothing.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
)

from pipeline.core.config import to_dict
from pipeline.core.guidance import cpsample_guidance
from pipeline.core.models import schedule_record
from pipeline.core.sampler import sample, unet_denoiser
from pipeline.data.storage import open_store
from pipeline.fanout.replica_index import build_replica_index
from pipeline.integrations.classifier import CPSampleClassifier
from pipeline.integrations.guard import ReplicaGuard
from pipeline.integrations.pixel_pipeline import CPSamplePipeline, CPSamplePipelineOutput
from pipeline.orchestration.stages import make_shards
from tests.headline_models import (
    ALPHA,
    CLASSIFIER_ARCH,
    NUM_SAMPLES,
    SAMPLE_SEEDS,
    SAMPLE_STEPS,
    SCALE,
    T_MAX,
    HeadlineModels,
    ReplicaScorer,
)

# the shared headline training (~40 s on one thread) plus a few seconds of sampling: "slow"
pytestmark = pytest.mark.slow

LINEAR = {
    "num_train_timesteps": 1000,
    "beta_start": 1e-4,
    "beta_end": 0.02,
    "beta_schedule": "linear",
}
STRONG_SCALE = 10.0
# scheduler class, extra config, inference steps, the scale at which the full headline criterion
# (at most half of the unprotected rate and 0.4 below it) is asserted. More steps do not make DPM or
# Euler copy more (0.71 / 0.69 unprotected at 50 steps, 0.70 / 0.69 at 100) and make DDPM's
# protection at s 5 weaker (0.92 at 50 steps, 0.97 at 100), so all use the headline's 20.
SCHEDULERS = {
    "ddim": (DDIMScheduler, {"clip_sample": True}, SAMPLE_STEPS, SCALE),
    "ddpm": (DDPMScheduler, {"clip_sample": True}, SAMPLE_STEPS, STRONG_SCALE),
    "dpm_multistep": (DPMSolverMultistepScheduler, {}, SAMPLE_STEPS, STRONG_SCALE),
    "euler": (EulerDiscreteScheduler, {}, SAMPLE_STEPS, STRONG_SCALE),
}
# measured replication on the 128 seeds at scale 0 / 5 / 10 (mean nn similarity 0.99 / 0.86 / -
# for DDIM). At the default s 5 only clipped deterministic DDIM meets the full criterion: without
# x_0 clipping (DPM, Euler; DDIM with clip_sample=False gives the same 0.65 -> 0.30) or with fresh
# noise at every step (DDPM; DDIM with eta 1 gives 0.98 -> 0.41, the project's own sampler with
# eta 1 the same) the copies pull the sample back harder. The smallest integer scale that meets it
# for DDPM, DPM and Euler is 7 (0.41, 0.25, 0.21); 10 leaves a margin.
MEASURED = {
    "ddim": (0.953, 0.031, 0.0),
    "ddpm": (1.0, 0.680, 0.109),
    "dpm_multistep": (0.695, 0.375, 0.086),
    "euler": (0.641, 0.266, 0.078),
}


@pytest.fixture(scope="module")
def headline_pipeline(headline_models: HeadlineModels):
    """The headline classifier as a ``CPSampleClassifier`` with its training record, the replica
    rule over the 8 training images, and a cache of draws keyed by (scheduler, scale)."""
    m = headline_models
    arch = to_dict(CLASSIFIER_ARCH)
    arch = {k: arch[k] for k in ("sample_size", "channels", "base_channels", "time_embed_dim",
                                 "num_groups")} | {"channel_mults": tuple(arch["channel_mults"])}  # fmt: skip
    record = {"train": {"t_max": T_MAX}, "schedule": schedule_record(m.schedule)}
    clf = CPSampleClassifier(**arch, cpsample=record)
    clf.net.load_state_dict(m.classifier.state_dict())
    clf = clf.eval().requires_grad_(False)
    return {"models": m, "classifier": clf, "scorer": ReplicaScorer(m.train), "draws": {}}


def _generators() -> list[torch.Generator]:
    return [torch.Generator().manual_seed(s) for s in SAMPLE_SEEDS]


def _pipe(hp: dict, name: str) -> CPSamplePipeline:
    cls, extra, _, _ = SCHEDULERS[name]
    pipe = CPSamplePipeline(hp["models"].unet, cls(**LINEAR, **extra), hp["classifier"])
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _draw(hp: dict, name: str, scale: float, guard: ReplicaGuard | None = None):
    """The 128 seeds through the pipeline with ``name``'s scheduler (cached when unguarded)."""
    key = (name, scale)
    if guard is None and key in hp["draws"]:
        return hp["draws"][key]
    out = _pipe(hp, name)(
        batch_size=NUM_SAMPLES,
        generator=_generators(),
        num_inference_steps=SCHEDULERS[name][2],
        alpha=ALPHA,
        cpsample_scale=scale,
        guard=guard,
        output_type="pt",
    )
    if guard is None:
        hp["draws"][key] = out
    return out


def _rate_and_sim(hp: dict, out: CPSamplePipelineOutput) -> tuple[float, float]:
    sims, _ = hp["scorer"].nn_similarity(out.images * 2 - 1)
    return float((sims >= hp["scorer"].threshold).mean()), float(sims.mean())


@pytest.mark.parametrize("name", list(SCHEDULERS))
def test_protection_holds_for_every_scheduler(headline_pipeline, name):
    hp = headline_pipeline
    strong_scale = SCHEDULERS[name][3]
    plain, default, strong = (_draw(hp, name, s) for s in (0.0, SCALE, strong_scale))
    (plain_rate, plain_sim), (cps_rate, cps_sim), (strong_rate, strong_sim) = (
        _rate_and_sim(hp, out) for out in (plain, default, strong)
    )
    msg = (
        f"{name}: replication {plain_rate:.3f} unprotected, {cps_rate:.3f} at s {SCALE}, "
        f"{strong_rate:.3f} at s {strong_scale} (measured {MEASURED[name]}); mean nn similarity "
        f"{plain_sim:.3f}, {cps_sim:.3f}, {strong_sim:.3f}; guidance fired at "
        f"{float(default.fired_fraction.mean()):.3f} of the steps"
    )
    assert np.all(plain.fired_fraction == 0), msg
    # it acts below T_MAX only: 12 of 20 steps for every scheduler here
    assert np.allclose(default.fired_fraction, 0.6), msg
    assert plain_rate >= 0.5, msg
    # the default knobs protect with every scheduler (drops of 0.92, 0.32, 0.32 and 0.38 measured)
    assert cps_rate <= plain_rate - 0.25, msg
    assert cps_sim < plain_sim, msg
    # the headline criterion: at s 5 for DDIM, at s 10 for the others
    assert strong_rate <= 0.5 * plain_rate, msg
    assert strong_rate <= plain_rate - 0.4, msg


def test_guided_ddim_pipeline_is_the_project_sampler(headline_pipeline):
    """Scale 5 through the diffusers DDIM pipeline is the headline's CPSample draw.

    Not to 1e-5 on every sample: diffusers' DDIM step computes its coefficients in float32 tensors,
    the project's ``ddim_step`` in Python floats, a difference of at most 4.8e-7 per step that this
    memorising denoiser amplifies on a few trajectories (even unguided: 2 of 128 samples above 1e-5,
    at most 4.6e-5). Measured guided: median 1.0e-6, 9 of 128 above 1e-5, at most 1.9e-4; the
    replica decisions, the fired steps and the replication rate (0.031) are identical.
    """
    hp = headline_pipeline
    m = hp["models"]
    out = _draw(hp, "ddim", SCALE)
    guide = cpsample_guidance(m.classifier, ALPHA, SCALE, t_max=T_MAX)
    seeds, denoiser = list(SAMPLE_SEEDS), unet_denoiser(m.unet)
    ref = sample(denoiser, m.schedule, seeds, (1, 8, 8), SAMPLE_STEPS, guidance=guide)
    diff = (out.images * 2 - 1 - ref.images).flatten(1).abs().amax(dim=1)
    msg = (
        f"per-sample max |diff|: median {float(diff.median()):.1e}, max {float(diff.max()):.1e}, "
        f"{int((diff > 1e-5).sum())} of {NUM_SAMPLES} above 1e-5"
    )
    assert int((diff <= 1e-5).sum()) >= 0.9 * NUM_SAMPLES, msg
    assert float(diff.max()) <= 1e-3, msg
    assert np.allclose(out.fired_fraction, ref.fired_fraction.numpy())
    scorer = hp["scorer"]
    ours, theirs = scorer.nn_similarity(out.images * 2 - 1)[0], scorer.nn_similarity(ref.images)[0]
    assert np.array_equal(ours >= scorer.threshold, theirs >= scorer.threshold), msg


@pytest.fixture(scope="module")
def headline_guard(headline_models: HeadlineModels, tmp_path_factory, ray_local) -> ReplicaGuard:
    """The 8 training images and the 64 never-seen ones in a local store, its replica index built
    (Ray tasks), and the guard over it (2 redraws at most)."""
    m = headline_models
    root = tmp_path_factory.mktemp("digits8-store")
    store = open_store(str(root))
    make_shards(store, "digits8", m.train, m.never, shard_size=32)
    build_replica_index(store, "digits8")
    return ReplicaGuard.from_store(str(root), "digits8", max_redraws=2)


def test_guard_never_returns_a_copy(headline_pipeline, headline_guard):
    hp, guard = headline_pipeline, headline_guard
    assert guard.threshold == hp["scorer"].threshold
    plain = _draw(hp, "ddim", 0.0)
    out = _draw(hp, "ddim", 0.0, guard=guard)
    flags = np.asarray(out.replica_flags)
    sims = np.asarray(out.replica_similarity)
    msg = (
        f"{int(flags.sum())} of {NUM_SAMPLES} flagged, {int(out.redraws.sum())} redraws, "
        f"{int((out.redraws > 0).sum())} samples redrawn"
    )
    # the stored index applies the headline's rule: where nothing was redrawn, the guard's
    # similarity is the one the in-memory scorer gives the unguarded image
    kept = out.redraws == 0
    ref_sims, _ = hp["scorer"].nn_similarity(plain.images * 2 - 1)
    assert np.allclose(sims[kept], ref_sims[kept], atol=1e-4), msg
    assert torch.equal(out.images[torch.from_numpy(kept)], plain.images[torch.from_numpy(kept)])
    # every returned image is below the threshold, or flagged and black
    assert np.all((sims < guard.threshold) | flags), msg
    black = out.images.flatten(1).amax(dim=1) == 0
    assert torch.equal(black, torch.from_numpy(flags)), msg
    assert np.all(flags == (sims >= guard.threshold)), msg
    # measured: 122 of 128 samples redrawn (238 redraws: 6 once, 116 twice), 114 still copies after
    # both redraws (flagged, black), 14 returned below the threshold
    assert int(out.redraws.sum()) > 0, msg
    assert int(out.redraws.max()) <= 2, msg
    assert int(flags.sum()) >= NUM_SAMPLES // 2, msg  # this denoiser copies whatever the noise


def test_cpsample_with_guard_flags_nearly_nothing(headline_pipeline, headline_guard):
    hp, guard = headline_pipeline, headline_guard
    out = _draw(hp, "ddim", SCALE, guard=guard)
    flags = np.asarray(out.replica_flags)
    msg = f"{int(flags.sum())} of {NUM_SAMPLES} flagged, {int(out.redraws.sum())} redraws"
    # measured: 4 of 128 samples redrawn once (the 4 copies CPSample let through), none flagged
    assert int(flags.sum()) <= 1, msg
    assert int(out.redraws.sum()) <= 0.1 * NUM_SAMPLES, msg
    assert np.all((np.asarray(out.replica_similarity) < guard.threshold) | flags), msg
