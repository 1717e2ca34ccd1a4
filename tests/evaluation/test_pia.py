"""PIA (Kong et al. 2024): its arithmetic, members of a memorising denoiser, and the guided model."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.core.config import ClassifierArchConfig, UNetConfig
from pipeline.core.diffusion import linear_schedule
from pipeline.core.guidance import cpsample_guidance
from pipeline.core.models import NoiseClassifier, build_unet
from pipeline.data.datasets import digits_source, split
from pipeline.evaluation.mia import roc_auc, tpr_at_fpr
from pipeline.evaluation.pia import pia_attack, pia_errors

SCHEDULE = linear_schedule()
ABAR = SCHEDULE.alphas_cumprod.double()


def test_pia_error_is_the_formula_on_a_linear_denoiser():
    """eps(x, t) = c_t x: eps_0 = c_0 x_0, x_t = (sqrt(a_t) + c_0 sqrt(1 - a_t)) x_0, so the
    error is |c_t (sqrt(a_t) + c_0 sqrt(1 - a_t)) - c_0| (mean |x_0|^p)^(1/p)."""

    def c(t):
        return 0.5 + t.double() / 1000

    def linear(x, t):
        return (c(t).reshape(-1, 1, 1, 1) * x.double()).float()

    x0 = torch.rand(6, 1, 4, 4, generator=torch.Generator().manual_seed(0)) * 2 - 1
    for t, p in ((200, 4.0), (50, 2.0), (700, 1.0)):
        a, c0, ct = ABAR[t], 0.5, 0.5 + t / 1000
        k = abs(ct * (a.sqrt() + c0 * (1 - a).sqrt()) - c0)
        want = k * x0.double().abs().pow(p).flatten(1).mean(1).pow(1 / p)
        got = pia_errors(linear, SCHEDULE, x0, t, p, batch_size=4)
        np.testing.assert_allclose(got, want.numpy(), rtol=1e-5)
    with pytest.raises(ValueError, match=r"t must be in \(0, 1000\)"):
        pia_errors(linear, SCHEDULE, x0, t=0)
    with pytest.raises(ValueError, match="p \\(the l_p norm\\) must be > 0"):
        pia_errors(linear, SCHEDULE, x0, p=0.0)


def _ideal_denoiser(train: torch.Tensor):
    """The optimal eps of the empirical distribution of ``train`` (N, C, H, W): a model that has
    memorised its training images exactly. ``E[x_0 | x_t]`` is the softmax-weighted training image
    (weights ``exp(-||x_t - sqrt(a) x_i||^2 / 2(1 - a))``), ``eps = (x_t - sqrt(a) E[x_0]) / sqrt(1 - a)``."""
    flat = train.double().flatten(1)  # (N, D)

    def eps(x, t):
        a = ABAR[int(t[0])]  # one t per batch
        xf = x.double().flatten(1)  # (B, D)
        d2 = torch.cdist(xf, a.sqrt() * flat) ** 2  # (B, N)
        w = torch.softmax(-d2 / (2 * (1 - a)), dim=1)
        out = (xf - a.sqrt() * (w @ flat)) / (1 - a).sqrt()
        return out.reshape(x.shape).float()

    return eps


def test_pia_separates_the_members_of_a_memorising_denoiser():
    """On the ideal denoiser of 8 digits, a member's proximal noise reproduces itself at t (error
    about 0) and a held-out digit's does not (error sqrt(abar_t / (1 - abar_t)) times its distance
    to the digit the model pulls it to): AUC 1, every member caught at 1% FPR."""
    train, holdout = split(digits_source(8), 8, 0)
    members, nonmembers = train.to_tensor(), holdout.subset(range(64)).to_tensor()
    den = _ideal_denoiser(members)
    em = pia_errors(den, SCHEDULE, members, t=200)
    en = pia_errors(den, SCHEDULE, nonmembers, t=200)
    assert em.shape == (8,) and en.shape == (64,)
    # members: 0 up to the softmax's leak to neighbouring digits; held-out: about 1 and above
    assert em.max() < 0.05 and en.min() > 1.0
    assert roc_auc(-em, -en) == 1.0 and tpr_at_fpr(-em, -en, 0.01) == 1.0


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    unet = build_unet(UNetConfig(sample_size=8, block_out_channels=(8, 16))).eval()
    clf = NoiseClassifier(ClassifierArchConfig(8, 1, 8, (1, 2), time_embed_dim=8, num_groups=4))
    return unet, clf.eval()


def test_pia_attack_reports_metrics_and_the_guided_model_differs(tiny):
    unet, clf = tiny
    x = torch.rand(10, 1, 8, 8, generator=torch.Generator().manual_seed(1)) * 2 - 1
    out = pia_attack(unet, SCHEDULE, x[:4], x[4:], None, t=100, p=4.0, num_permutations=99)
    assert out["t"] == 100 and out["p"] == 4.0
    assert out["num_members"] == 4 and out["num_nonmembers"] == 6
    assert 0.0 <= out["auc"] <= 1.0 and 1 / 100 <= out["p_value"] <= 1.0
    assert out["roc"]["fpr"][0] == 0.0 and out["roc"]["tpr"][-1] == 1.0
    again = pia_attack(unet, SCHEDULE, x[:4], x[4:], None, t=100, p=4.0, num_permutations=99)
    assert again == out  # deterministic: no noise draws
    guided = pia_attack(
        unet, SCHEDULE, x[:4], x[4:], cpsample_guidance(clf, 0.5, 50.0), 100, 4.0,
        num_permutations=99,
    )  # fmt: skip
    assert guided["member_mean"] != pytest.approx(out["member_mean"])


@pytest.mark.slow
def test_pia_on_the_headline_models_ddim_and_cpsample(headline_models):
    """The headline's denoiser memorises its 8 digits: PIA finds them among 64 never-seen digits
    against plain DDIM; CPSample's corrected eps is attacked the same way (numbers printed; about
    a minute with the session's model training)."""
    from pipeline.core.guidance import cpsample_guidance as guide
    from tests.headline_models import ALPHA, SCALE, T_MAX

    h = headline_models
    guidance = guide(h.classifier, ALPHA, SCALE, t_max=T_MAX)
    m, n = h.train.to_tensor(), h.never.to_tensor()
    ddim = pia_attack(h.unet, h.schedule, m, n, None, num_permutations=999)
    cps = pia_attack(h.unet, h.schedule, m, n, guidance, num_permutations=999)
    print(f"PIA headline: ddim auc {ddim['auc']:.3f} tpr@1% {ddim['tpr_at_fpr']:.3f}; "
          f"cpsample auc {cps['auc']:.3f} tpr@1% {cps['tpr_at_fpr']:.3f}")  # fmt: skip
    assert ddim["auc"] > 0.9 and ddim["p_value"] < 0.01  # measured: 0.986
    # CPSample's guidance fires on the members at t = 0 and moves their eps_0: their errors grow
    # past the non-members' (measured AUC 0.158): a signal too, for an attacker who flips the score
    assert cps["member_mean"] > ddim["member_mean"] and max(cps["auc"], 1 - cps["auc"]) > 0.75


def test_eval_config_validates_pias_knobs():
    from pipeline.core.config import ConfigError, EvalConfig, from_dict

    cfg = from_dict(EvalConfig, {"pia_t": 150, "pia_p": 2})
    assert (cfg.pia_t, cfg.pia_p) == (150, 2.0)
    assert (EvalConfig().pia_t, EvalConfig().pia_p) == (200, 4.0)
    for bad, msg in (({"pia_t": 0}, r"pia_t must be in \(0, 1000\) \(PIA's t\), got 0"),
                     ({"pia_t": 1000}, "pia_t must be in"),
                     ({"pia_p": 0.0}, "pia_p must be > 0, got 0.0")):  # fmt: skip
        with pytest.raises(ConfigError, match=msg):
            from_dict(EvalConfig, bad)
