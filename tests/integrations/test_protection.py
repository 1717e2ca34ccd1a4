"""protection(): the knobs and the classifier's record are checked once per call; StepRecord counts
fired steps per sample; a float16 pipeline may hold a float32 classifier."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import DDIMScheduler

from pipeline.core.diffusion import linear_schedule
from pipeline.core.guidance import GuidanceOutput
from pipeline.core.models import schedule_record
from pipeline.integrations.classifier import CPSampleClassifier
from pipeline.integrations.protection import StepRecord, protection

LINEAR = {
    "num_train_timesteps": 1000,
    "beta_start": 1e-4,
    "beta_end": 0.02,
    "beta_schedule": "linear",
}


def _clf(cond_dim: int = 0, t_max: int | None = 600) -> CPSampleClassifier:
    record = {"schedule": schedule_record(linear_schedule())}
    if t_max is not None:
        record["train"] = {"t_max": t_max}
    return CPSampleClassifier(sample_size=8, channels=1, base_channels=8, channel_mults=(1, 2),
                              time_embed_dim=8, num_groups=4, cond_dim=cond_dim,
                              cpsample=record).eval()  # fmt: skip


def test_none_without_classifier_or_at_scale_zero():
    sched = DDIMScheduler(**LINEAR)
    assert protection(None, sched, 0.5, 5.0) is None
    assert protection(_clf(), sched, 0.5, 0.0) is None
    with pytest.raises(ValueError, match="alpha"):
        protection(None, sched, 0.0, 5.0)  # the knobs are checked even without a classifier


def test_t_max_defaults_to_the_trained_one():
    sched = DDIMScheduler(**LINEAR)
    guide = protection(_clf(t_max=300), sched, 0.5, 5.0)
    x, eps = torch.zeros(2, 1, 8, 8), torch.zeros(2, 1, 8, 8)
    above = guide(x, torch.tensor([300, 300]), eps, torch.full((2,), 0.5))
    assert not above.fired.any() and math.isnan(float(above.p[0]))  # t >= 300: not asked
    below = guide(x, torch.tensor([299, 299]), eps, torch.full((2,), 0.5))
    assert not math.isnan(float(below.p[0]))
    # a classifier without a record: guided up to t = 1000
    free = protection(_clf(t_max=None), sched, 0.5, 5.0)
    assert not math.isnan(float(free(x, torch.tensor([999, 999]), eps, torch.full((2,), 0.5)).p[0]))


def test_text_conditioned_classifier_needs_pooled_embeddings():
    sched = DDIMScheduler(**LINEAR)
    with pytest.raises(ValueError, match="text-conditioned"):
        protection(_clf(cond_dim=6), sched, 0.5, 5.0)
    guide = protection(_clf(cond_dim=6), sched, 0.5, 5.0, pooled=torch.randn(2, 6))
    out = guide(torch.zeros(2, 1, 8, 8), torch.tensor([10, 10]), torch.zeros(2, 1, 8, 8),
                torch.full((2,), 0.9))  # fmt: skip
    assert out.p.shape == (2,)


def test_a_float32_classifier_guides_float16_inputs():
    guide = protection(_clf(), DDIMScheduler(**LINEAR), 0.5, 5.0)
    x = torch.randn(2, 1, 8, 8).half()
    out = guide(x, torch.tensor([10, 10]), torch.zeros(2, 1, 8, 8), torch.full((2,), 0.9))
    assert out.p.dtype == torch.float32 and torch.isfinite(out.p).all()


def test_step_record_counts_fired_steps_and_keeps_the_last_p():
    rec = StepRecord(2, torch.device("cpu"))
    rec.add(GuidanceOutput(eps=None, fired=torch.tensor([True, False]), p=torch.tensor([0.9, 0.4])))
    rec.add(None)  # a step without guidance
    rec.add(GuidanceOutput(eps=None, fired=torch.tensor([True, True]),
                           p=torch.tensor([float("nan"), 0.2])))  # fmt: skip
    assert rec.fired.tolist() == [2, 1]
    assert rec.fired_fraction().tolist() == pytest.approx([2 / 3, 1 / 3])
    assert rec.last_p.tolist() == pytest.approx([0.9, 0.2])
