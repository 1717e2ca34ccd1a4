"""Device-side training helpers: seeded draws, Beta draws without the host, prefetch, loss windows.

This machine has no GPU: these run the same code on the CPU, where each helper must be exactly the
plain operation (the CUDA run is bench/p7_cuda.py's, which also checks for host syncs)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats

from pipeline.core.config import ClassifierTrainConfig, DenoiserTrainConfig
from pipeline.core.diffusion import linear_schedule, q_sample
from pipeline.core.models import NoiseClassifier, build_unet, channels_last
from pipeline.train.device import (
    LossWindows,
    Prefetch,
    beta_symmetric,
    johnk_proposals,
    step_generator,
)
from pipeline.train.ingest import MemoryRows, take
from pipeline.train.loops import EMA, classifier_loss, denoiser_loss, fit_classifier, fit_denoiser

CPU = torch.device("cpu")


def test_step_generator_is_the_loops_cpu_generator_and_the_denoiser_loss_draws_as_before(
    core_tiny_unet_cfg,
):
    gen = step_generator(3, 1, 40, CPU)
    ref = torch.Generator().manual_seed(3 * 1_000_003 + 1 * 7919 + 40)
    assert gen.device == CPU and torch.equal(
        torch.randn(5, generator=gen), torch.randn(5, generator=ref)
    )
    # denoiser_loss: t then eps from the generator, as the loop drew them with a CPU generator
    torch.manual_seed(0)
    unet, schedule = build_unet(core_tiny_unet_cfg), linear_schedule()
    x = torch.rand(4, 1, 8, 8) * 2 - 1
    with torch.no_grad():
        loss = denoiser_loss(unet, schedule, x, step_generator(0, 0, 0, CPU))
        g = torch.Generator().manual_seed(0)
        t = torch.randint(0, 1000, (4,), generator=g)
        noise = torch.randn(x.shape, generator=g)
        pred = unet(channels_last(q_sample(schedule, x, t, noise)), t).sample
    assert torch.equal(loss, torch.nn.functional.mse_loss(pred.float(), noise))


@pytest.mark.parametrize("a", [0.05, 0.4, 1.0])
def test_device_beta_draws_follow_beta_a_a(a):
    draws = beta_symmetric(a, 20_000, torch.Generator().manual_seed(0), CPU)
    assert draws.shape == (20_000,) and draws.dtype == torch.float32
    assert float(draws.min()) >= 0.0 and float(draws.max()) <= 1.0
    # Kolmogorov-Smirnov against scipy's Beta(a, a): a wrong sampler fails this by far (at a = 0.05
    # a fifth of the mass lies within float32's spacing of 0 or 1, where float32 draws tie)
    if a >= 0.4:
        assert stats.kstest(draws.double().numpy(), stats.beta(a, a).cdf).pvalue > 1e-3
    assert float((draws < 0.5).float().mean()) == pytest.approx(0.5, abs=0.02)  # symmetric
    assert float(draws.var()) == pytest.approx(1 / (4 * (2 * a + 1)), rel=0.05)
    again = beta_symmetric(a, 20_000, torch.Generator().manual_seed(0), CPU)
    assert torch.equal(draws, again)  # seeded


def test_beta_proposals_cover_rejection_and_bad_shapes_are_refused():
    # acceptance is 1/2 at a = 1 and grows as a shrinks: 40 proposals miss with p <= 2^-40
    assert johnk_proposals(1.0) == 40 and johnk_proposals(0.2) < johnk_proposals(1.0)
    for a in (0.0, 1.5):
        with pytest.raises(ValueError, match=r"mixup must be in \(0, 1\]"):
            beta_symmetric(a, 4, None, CPU)


def test_classifier_loss_with_mixup_draws_everything_from_the_generator(core_tiny_clf_cfg):
    torch.manual_seed(0)
    clf = NoiseClassifier(core_tiny_clf_cfg)
    x, y = torch.rand(8, 1, 8, 8) * 2 - 1, (torch.arange(8) % 2).float()
    schedule = linear_schedule()
    loss = classifier_loss(clf, schedule, x, y, 50, 0.5, torch.Generator().manual_seed(2))
    g = torch.Generator().manual_seed(2)  # the same draws by hand, in the same order
    lam = beta_symmetric(0.5, 8, g, CPU)
    perm = torch.randperm(8, generator=g)
    xm = lam[:, None, None, None] * x + (1 - lam[:, None, None, None]) * x[perm]
    ym = lam * y + (1 - lam) * y[perm]
    t = torch.randint(0, 50, (8,), generator=g)
    logits = clf(q_sample(schedule, xm, t, torch.randn(x.shape, generator=g)), t)
    assert torch.equal(loss, torch.nn.functional.binary_cross_entropy_with_logits(logits, ym))


def test_prefetch_stays_depth_ahead_and_never_makes_more_than_total():
    made = []

    def make():
        made.append(len(made))
        return made[-1]

    feed = Prefetch(make, total=5, depth=2)
    assert made == []  # nothing before the first step
    assert feed.next() == 0 and made == [0, 1, 2]  # the step's item and two ahead
    assert [feed.next() for _ in range(4)] == [1, 2, 3, 4] and made == [0, 1, 2, 3, 4]
    with pytest.raises(StopIteration):
        feed.next()
    with pytest.raises(ValueError, match="depth must be >= 1"):
        Prefetch(make, 3, depth=0)


def test_loss_windows_are_the_python_means_of_the_step_losses():
    losses = [torch.tensor(v, dtype=torch.float32) for v in (0.7, 0.31, 0.12345, 2.5, 1e-3)]
    w = LossWindows(CPU, "log", "checkpoint")
    for loss in losses[:2]:
        w.add(loss)
    assert w.count("log") == 2 and w.mean("log") == sum(float(v) for v in losses[:2]) / 2
    for loss in losses[2:]:
        w.add(loss)
    assert w.mean("log") == sum(float(v) for v in losses[2:]) / 3  # read: the window restarted
    assert w.mean("checkpoint") == sum(float(v) for v in losses) / 5  # its own window
    assert math.isnan(w.mean("checkpoint")) and w.count("checkpoint") == 0


def test_loops_report_the_position_of_the_last_batch_trained_on_not_the_prefetched_ones(
    core_tiny_unet_cfg, core_tiny_clf_cfg
):
    """Batches are made two steps ahead; a checkpoint still records where training stands, and a
    run of N steps reads exactly N batches."""
    rows = {"key": np.asarray([f"k{i:02d}" for i in range(12)], dtype=object),
            "image": np.arange(12 * 64, dtype=np.uint8).reshape(12, 8, 8, 1)}  # fmt: skip
    cfg = DenoiserTrainConfig(steps=5, batch_size=4, checkpoint_every=2, warmup_steps=0)
    torch.manual_seed(0)
    unet = build_unet(core_tiny_unet_cfg)
    seen = []
    end = fit_denoiser(
        unet, EMA(unet, 0.9), torch.optim.Adam(unet.parameters()), linear_schedule(),
        MemoryRows(rows), cfg, on_checkpoint=lambda s, m: seen.append((s, m["data"]["train"])),
    )  # fmt: skip
    # 12 rows in batches of 4: step 2 ends at epoch 0 row 8, step 4 at epoch 1 row 4
    assert [(s, d["epoch"], d["offset"], d["rows"]) for s, d in seen] == [
        (2, 0, 8, 8), (4, 1, 4, 16), (5, 1, 8, 20),
    ]  # fmt: skip
    assert end["train"] == seen[-1][1] and end["train"]["epochs"] == 2  # no third epoch opened

    ccfg = ClassifierTrainConfig(steps=3, batch_size=4, checkpoint_every=1, warmup_steps=0)
    clf = NoiseClassifier(core_tiny_clf_cfg)
    reports = []
    fit_classifier(
        clf, torch.optim.Adam(clf.parameters()), linear_schedule(), MemoryRows(rows), None, None,
        ccfg, on_checkpoint=lambda s, m: reports.append((m["data"]["train"]["rows"], m["loss"])),
    )  # fmt: skip
    assert [r for r, _ in reports] == [4, 8, 12] and all(loss > 0 for _, loss in reports)


def test_take_keeps_numpy_and_cpu_tensor_columns_as_they_index():
    rows = {"key": np.asarray(["a", "b", "c"], dtype=object), "image": torch.arange(3)}
    out = take(rows, np.asarray([2, 0]))
    assert list(out["key"]) == ["c", "a"] and out["image"].tolist() == [2, 0]
