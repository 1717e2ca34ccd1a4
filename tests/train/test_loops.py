"""Training losses, loops, EMA and classifier metrics on tiny models."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pipeline.core.config import (
    MIN_FIT,
    ClassifierArchConfig,
    ClassifierTrainConfig,
    DenoiserTrainConfig,
)
from pipeline.core.diffusion import linear_schedule, q_sample
from pipeline.core.labels import random_bits
from pipeline.core.models import NoiseClassifier, build_unet
from pipeline.data.datasets import digits_source
from pipeline.data.imageset import DataError
from pipeline.train.loops import (
    EMA,
    FIT_T_RANGE,
    T_RANGES,
    _noisy_logits,
    classifier_loss,
    classifier_metrics,
    denoiser_loss,
    fit_card,
    fit_classifier,
    fit_denoiser,
    lr_at,
    mix_sizes,
)


@pytest.fixture(scope="module")
def core_digits8():
    ds = digits_source(8)
    return ds.subset(range(64)), ds.subset(range(64, 128))


@pytest.fixture(scope="module")
def core_schedule():
    return linear_schedule()


@pytest.fixture(scope="module")
def core_fitted_classifier(core_digits8, core_schedule):
    """A classifier trained to memorise the random bits of 64 digits (8x8, t < 50)."""
    train, _ = core_digits8
    x, y = train.to_tensor(), random_bits(train.keys, 7)
    torch.manual_seed(0)
    clf = NoiseClassifier(
        ClassifierArchConfig(
            sample_size=8, base_channels=16, channel_mults=(1, 2), time_embed_dim=16, num_groups=4
        )
    )
    cfg = ClassifierTrainConfig(
        steps=200, batch_size=64, lr=5e-3, t_max=50, seed=0, checkpoint_every=50
    )
    opt = torch.optim.Adam(clf.parameters(), lr=cfg.lr)
    reports: list[tuple[int, dict]] = []
    fit_classifier(
        clf, opt, core_schedule, x, y, 64, cfg, on_checkpoint=lambda s, m: reports.append((s, m))
    )
    return clf.eval(), x, y, reports


def test_classifier_overfits_random_bits(core_fitted_classifier, core_schedule):
    clf, x, y, reports = core_fitted_classifier
    assert 0.3 < float(y.mean()) < 0.7  # the bits are not all one class
    g = torch.Generator().manual_seed(123)
    t = torch.randint(0, 20, (64,), generator=g)
    with torch.no_grad():
        logits = clf(q_sample(core_schedule, x, t, torch.randn(x.shape, generator=g)), t)
    accuracy = float(((logits > 0).float() == y).float().mean())
    assert accuracy >= 0.95
    assert [s for s, _ in reports] == [50, 100, 150, 200]
    assert all(set(m) == {"step", "loss", "data"} for _, m in reports)
    # 64 training images, no held-out bits, batch 64: one epoch a step, from memory
    assert reports[-1][1]["data"] == {
        "train": {"input": "memory", "epoch": 199, "offset": 64, "epochs": 200, "rows": 12800,
                  "rows_read": 64},
    }  # fmt: skip
    assert reports[-1][1]["loss"] < reports[0][1]["loss"] * 0.5


def test_classifier_metrics(core_fitted_classifier, core_digits8, core_schedule):
    clf, x, y, _ = core_fitted_classifier
    _, never = core_digits8
    never_x, never_y = never.to_tensor(), random_bits(never.keys, 7)
    m = classifier_metrics(clf, core_schedule, x, y, never_x, never_y, seed=0)
    d = m.to_dict()
    assert set(d) == {
        "train_accuracy_by_t",
        "train_margin_by_t",
        "holdout_accuracy",
        "never_seen_confident_fraction",
        "lipschitz_proxy",
        "train_rows",
        "never_rows",
    }
    assert (m.train_rows, m.never_rows) == (64, 64)
    ranges = [f"{lo}-{hi}" for lo, hi in T_RANGES]
    assert list(m.train_accuracy_by_t) == list(m.train_margin_by_t) == ranges
    # 4 noisings of each of the 64 images per range: every accuracy is a count out of 256
    assert all(float(v * 256).is_integer() for v in m.train_accuracy_by_t.values())
    assert float(m.holdout_accuracy * 256).is_integer()
    assert float(m.never_seen_confident_fraction * 64).is_integer()  # one noising each, t < 50
    # the first range's draws come first from the seeded generator: the same logits by hand
    logits, t = _noisy_logits(clf, core_schedule, x, 0, 100, torch.Generator().manual_seed(0))
    assert t.min() >= 0 and t.max() < 100 and len(logits) == 256
    assert m.train_accuracy_by_t["0-100"] == float(
        ((logits > 0).float() == y.repeat(4)).float().mean()
    )
    assert m.train_margin_by_t["0-100"] == float((torch.sigmoid(logits) - 0.5).abs().mean())
    assert m.train_accuracy_by_t["0-100"] > 0.75  # trained on t < 50
    assert m.train_margin_by_t["0-100"] > m.train_margin_by_t["600-1000"]  # sure where it fit
    assert abs(m.holdout_accuracy - 0.5) < 0.2  # random bits of unseen images: near chance
    assert m.lipschitz_proxy > 0 and math.isfinite(m.lipschitz_proxy)
    again = classifier_metrics(clf, core_schedule, x, y, never_x, never_y, seed=0)
    assert again.to_dict() == d  # seeded

    empty = classifier_metrics(clf, core_schedule, x, y, never_x[:0], never_y[:0])
    assert math.isnan(empty.holdout_accuracy)
    assert math.isnan(empty.never_seen_confident_fraction)
    assert empty.never_rows == 0


def test_fit_card_is_the_metrics_at_small_t_with_how_they_were_measured(
    core_fitted_classifier, core_digits8, core_schedule
):
    clf, x, y, _ = core_fitted_classifier
    _, never = core_digits8
    m = classifier_metrics(clf, core_schedule, x, y, never.to_tensor()[:40], random_bits(never.keys[:40], 7), seed=5)  # fmt: skip
    card = fit_card(m, seed=5, step=200)
    assert card == {
        "accuracy": m.train_accuracy_by_t["0-100"],
        "mean_margin": m.train_margin_by_t["0-100"],
        "t_range": [0, 100],
        "rows": 64,
        "draws": 4,
        "seed": 5,
        "step": 200,
        "threshold": MIN_FIT,
        "fits": m.train_accuracy_by_t["0-100"] >= MIN_FIT,
        "never_seen": {
            "rows": 40,
            "t_range": [0, 50],
            "confident_fraction": m.never_seen_confident_fraction,
            "confident_p": 1e-3,
        },
    }
    assert FIT_T_RANGE == (0, 100)
    # judged against the threshold it names
    assert fit_card(m, 5, 200, threshold=1.0)["fits"] is (card["accuracy"] == 1.0)
    assert fit_card(m, 5, 200, threshold=0.51)["fits"] is (card["accuracy"] >= 0.51)


def test_classifier_loss_deterministic_with_generator(
    core_digits8, core_schedule, core_tiny_clf_cfg
):
    train, _ = core_digits8
    x, y = train.to_tensor()[:16], random_bits(train.keys[:16], 1)
    torch.manual_seed(0)
    clf = NoiseClassifier(core_tiny_clf_cfg)
    a = classifier_loss(
        clf, core_schedule, x, y, t_max=10, generator=torch.Generator().manual_seed(5)
    )
    b = classifier_loss(
        clf, core_schedule, x, y, t_max=10, generator=torch.Generator().manual_seed(5)
    )
    assert a.shape == ()
    assert torch.equal(a, b)
    # BCE of an untrained model is near log 2
    assert 0.3 < float(a.detach()) < 1.5


def test_classifier_loss_with_mixup_is_reproducible_from_generator(
    core_digits8, core_schedule, core_tiny_clf_cfg
):
    train, _ = core_digits8
    x, y = train.to_tensor()[:16], random_bits(train.keys[:16], 1)
    torch.manual_seed(0)
    clf = NoiseClassifier(core_tiny_clf_cfg)
    a = classifier_loss(
        clf, core_schedule, x, y, mixup=0.5, generator=torch.Generator().manual_seed(5)
    )
    b = classifier_loss(
        clf, core_schedule, x, y, mixup=0.5, generator=torch.Generator().manual_seed(5)
    )
    assert torch.isfinite(a)
    assert torch.equal(a, b)


def test_classifier_batch_composition():
    assert mix_sizes(40, 0.25, 10, 90) == (10, 30)
    assert mix_sizes(500, 0.0, 10, 90) == (50, 450)  # by the splits' counts: a tenth
    assert mix_sizes(20, 0.5, 10, 0) == (20, 0)  # no held-out bits
    assert mix_sizes(8, 0.01, 10, 90) == (1, 7)  # at least one training row


def test_lr_at_warmup():
    assert lr_at(0, 1.0, 10) == pytest.approx(0.1)
    assert lr_at(4, 1.0, 10) == pytest.approx(0.5)
    assert lr_at(9, 1.0, 10) == 1.0
    assert lr_at(500, 2e-3, 10) == 2e-3
    assert lr_at(0, 2e-3, 0) == 2e-3


def test_ema_moves_toward_parameters():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4))
    ema = EMA(model, decay=0.9)
    assert not ema.shadow.training
    assert all(not p.requires_grad for p in ema.shadow.parameters())
    start = [p.detach().clone() for p in ema.shadow.parameters()]
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
        model[1].running_mean.fill_(3.0)

    ema.update(model, step=100)  # warm-up over: d = decay
    for s0, pe, p in zip(start, ema.shadow.parameters(), model.parameters()):
        assert torch.allclose(pe, 0.9 * s0 + 0.1 * p, atol=1e-6)
    assert torch.equal(ema.shadow[1].running_mean, torch.full((4,), 3.0))  # buffers are copied

    def dist():
        return sum(
            float((pe - p.detach()).norm())
            for pe, p in zip(ema.shadow.parameters(), model.parameters())
        )

    before = dist()
    ema.update(model, step=101)
    assert dist() == pytest.approx(0.9 * before, rel=1e-4)

    # early steps use the smaller warm-up decay (1 + step) / (10 + step)
    fresh = EMA(model, decay=0.999)
    s0 = [p.detach().clone() for p in fresh.shadow.parameters()]
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    fresh.update(model, step=0)
    for a, pe, p in zip(s0, fresh.shadow.parameters(), model.parameters()):
        assert torch.allclose(pe, 0.1 * a + 0.9 * p, atol=1e-6)


def test_denoiser_loss_decreases(core_digits8, core_schedule, core_tiny_unet_cfg):
    train, _ = core_digits8
    x = train.to_tensor()
    torch.manual_seed(0)
    unet = build_unet(core_tiny_unet_cfg)

    def eval_loss():
        with torch.no_grad():
            return float(denoiser_loss(unet, core_schedule, x, torch.Generator().manual_seed(99)))

    first = eval_loss()
    assert first == eval_loss()  # seeded
    cfg = DenoiserTrainConfig(
        steps=40, batch_size=32, lr=3e-3, warmup_steps=5, ema_decay=0.9, checkpoint_every=20
    )
    ema = EMA(unet, cfg.ema_decay)
    ema_start = [p.detach().clone() for p in ema.shadow.parameters()]
    opt = torch.optim.Adam(unet.parameters(), lr=cfg.lr)
    reports = []
    fit_denoiser(
        unet, ema, opt, core_schedule, x, cfg, on_checkpoint=lambda s, m: reports.append((s, m))
    )
    last = eval_loss()
    assert last < 0.7 * first
    assert [s for s, _ in reports] == [20, 40]
    assert set(reports[0][1]) == {"step", "loss", "images_per_s", "data"}
    assert reports[1][1]["data"]["train"]["rows"] == 40 * 32
    assert reports[1][1]["loss"] < reports[0][1]["loss"]
    assert reports[0][1]["images_per_s"] > 0
    assert opt.param_groups[0]["lr"] == cfg.lr  # warm-up finished
    # the EMA left its start and tracks the trained weights
    moved = sum(float((a - b).norm()) for a, b in zip(ema_start, ema.shadow.parameters()))
    gap = sum(
        float((a - b.detach()).norm()) for a, b in zip(ema.shadow.parameters(), unet.parameters())
    )
    start_gap = sum(float((a - b.detach()).norm()) for a, b in zip(ema_start, unet.parameters()))
    assert moved > 0
    assert gap < start_gap


def test_lr_schedules():
    from pipeline.train.loops import lr_at

    assert lr_at(0, 1.0, 10) == pytest.approx(0.1)
    assert lr_at(50, 1.0, 10, "constant", 100) == 1.0
    assert lr_at(50, 1.0, 10, "cosine", 100) == pytest.approx(0.5)
    assert lr_at(99, 1.0, 10, "cosine", 100) < 0.01
    with pytest.raises(Exception, match="lr_schedule"):
        ClassifierTrainConfig(lr_schedule="linear")
    assert ClassifierTrainConfig().lr_schedule == "cosine"  # the calibrated demo default
    assert DenoiserTrainConfig().lr_schedule == "constant"


# ---------------------------------------------------------------------- latents, text-conditioned
def test_unconditioned_classifier_loss_is_the_plain_bce(core_schedule, core_tiny_clf_cfg):
    """Without cond the loss draws t and the noise as before and calls ``c_phi(x_t, t)``."""
    torch.manual_seed(0)
    clf = NoiseClassifier(core_tiny_clf_cfg)
    x, y = torch.randn(8, 1, 8, 8), (torch.rand(8) > 0.5).float()
    loss = classifier_loss(clf, core_schedule, x, y, 50, 0.0, torch.Generator().manual_seed(3))
    g = torch.Generator().manual_seed(3)
    t = torch.randint(0, 50, (8,), generator=g)
    x_t = q_sample(core_schedule, x, t, torch.randn(x.shape, generator=g))
    ref = torch.nn.functional.binary_cross_entropy_with_logits(clf(x_t, t), y)
    assert torch.equal(loss, ref)


def _latent_rows(n: int, dim: int = 6, seed: int = 0) -> dict:
    """Rows as decoded from a latent dataset: float32 latents outside [-1, 1], pooled embeddings."""
    rng = np.random.default_rng(seed)
    return {
        "key": np.asarray([f"z{i:03d}" for i in range(n)], dtype=object),
        "latent": (3.0 * rng.standard_normal((n, 4, 8, 8))).astype(np.float32),
        "pooled": rng.standard_normal((n, dim)).astype(np.float32),
    }


def test_text_conditioned_classifier_fits_latent_rows(core_schedule):
    """The loop feeds a cond_dim > 0 classifier the rows' pooled embeddings; the metrics too."""
    arch = ClassifierArchConfig(
        sample_size=8, channels=4, base_channels=8, channel_mults=(1, 2), time_embed_dim=8,
        num_groups=4, cond_dim=6,
    )  # fmt: skip
    rows = _latent_rows(32)
    torch.manual_seed(0)
    clf = NoiseClassifier(arch)
    seen = []
    clf.register_forward_pre_hook(lambda m, args: seen.append(len(args)))
    cfg = ClassifierTrainConfig(
        steps=60, batch_size=32, lr=5e-3, t_max=50, warmup_steps=0, checkpoint_every=30
    )
    reports = []
    fit_classifier(
        clf, torch.optim.Adam(clf.parameters(), lr=cfg.lr), core_schedule, rows, None, None, cfg,
        on_checkpoint=lambda s, m: reports.append(m["loss"]),
    )  # fmt: skip
    assert set(seen) == {3} and reports[-1] < reports[0]  # c_phi(x_t, t, pooled) every step
    x, y = torch.from_numpy(rows["latent"]), random_bits(list(rows["key"]), cfg.label_seed)
    c = torch.from_numpy(rows["pooled"])
    m = classifier_metrics(clf, core_schedule, x, y, x[:8], y[:8], train_cond=c, never_cond=c[:8])
    assert m.train_accuracy_by_t["0-100"] > 0.75 and m.lipschitz_proxy > 0
    with pytest.raises(ValueError, match="text-conditioned"):
        classifier_metrics(clf, core_schedule, x, y, x[:0], y[:0])  # no cond: a clear error
    no_text = {k: v for k, v in rows.items() if k != "pooled"}
    with pytest.raises(DataError, match=r"pooled\.npy"):
        fit_classifier(
            clf, torch.optim.Adam(clf.parameters()), core_schedule, no_text, None, None, cfg
        )
