"""CPSample gate and the classifier-guided noise estimate against autograd and finite differences."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from pipeline.core.diffusion import linear_schedule, pred_xstart_from_eps
from pipeline.core.guidance import (
    cpsample_eps,
    cpsample_gate,
    cpsample_guidance,
    log_prob_grad,
    validate_knobs,
)
from pipeline.core.models import NoiseClassifier


def _log_prob(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """log p(target | x) of a Bernoulli with logit ``logits`` (target in {0, 1})."""
    return target * nn.functional.logsigmoid(logits) + (1 - target) * nn.functional.logsigmoid(
        -logits
    )


class _BackwardCounter(torch.autograd.Function):
    """Identity whose backward counts its calls (instrumentation, not a replacement)."""

    calls = 0

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        _BackwardCounter.calls += 1
        return grad


class _CountingClassifier(nn.Module):
    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, x, t):
        return self.inner(_BackwardCounter.apply(x), t)


class _SmoothClassifier(nn.Module):
    """A small nonlinear float64 classifier (for finite differences; NoiseClassifier is float32)."""

    def __init__(self, shape):
        super().__init__()
        g = torch.Generator().manual_seed(5)
        n = int(torch.tensor(shape).prod())
        self.w1 = nn.Parameter(torch.randn(n, 6, generator=g, dtype=torch.float64) / n**0.5)
        self.w2 = nn.Parameter(torch.randn(6, generator=g, dtype=torch.float64) * 2)

    def forward(self, x, t):
        h = torch.tanh(x.flatten(1) @ self.w1 + t[:, None].to(x.dtype) / 1000)
        return h @ self.w2


def _inputs(seed: int, shape=(4, 1, 8, 8)):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g), torch.randn(shape, generator=g)


@pytest.fixture
def core_clf(core_tiny_clf_cfg):
    torch.manual_seed(0)
    return NoiseClassifier(core_tiny_clf_cfg).eval()


# ------------------------------------------------------------------------------------------- knobs
@pytest.mark.parametrize(
    ("alpha", "scale", "fragment"),
    [
        (0.0, 1.0, "alpha"),
        (-0.1, 1.0, "alpha"),
        (0.6, 1.0, "alpha"),
        (0.5000001, 1.0, "alpha"),
        (0.1, -1.0, "scale"),
    ],
)
def test_validate_knobs_rejects(alpha, scale, fragment):
    with pytest.raises(ValueError, match=fragment):
        validate_knobs(alpha, scale)
    with pytest.raises(ValueError, match=fragment):
        cpsample_guidance(nn.Identity(), alpha, scale)


@pytest.mark.parametrize(("alpha", "scale"), [(0.5, 0.0), (1e-9, 3.0), (0.25, 100.0)])
def test_validate_knobs_accepts(alpha, scale):
    validate_knobs(alpha, scale)


def test_cpsample_guidance_rejects_input_mode():
    with pytest.raises(ValueError, match="input_mode"):
        cpsample_guidance(nn.Identity(), 0.1, 1.0, input_mode="x_0")


# -------------------------------------------------------------------------------------------- gate
def test_gate_semantics():
    p = torch.tensor([0.0, 0.1, 0.25, 0.3, 0.5, 0.75, 0.8, 1.0])
    fired, target = cpsample_gate(p, alpha=0.25)
    assert fired.tolist() == [True, True, False, False, False, False, True, True]
    assert target[:2].tolist() == [1.0, 1.0]  # p < alpha -> target 1
    assert target[-2:].tolist() == [0.0, 0.0]  # p > 1 - alpha -> target 0
    assert torch.equal(target[2:6], p[2:6])  # not fired -> target - p == 0


def test_gate_alpha_half_fires_everywhere_except_exact_half():
    p = torch.tensor([0.0, 0.2, 0.4999, 0.5, 0.5001, 0.9, 1.0])
    fired, target = cpsample_gate(p, alpha=0.5)
    assert fired.tolist() == [True, True, True, False, True, True, True]
    # pushed toward the less likely label
    assert target.tolist()[:3] == [1.0, 1.0, 1.0]
    assert target.tolist()[4:] == [0.0, 0.0, 0.0]


def test_cpsample_eps_keeps_in_band_samples_bit_for_bit():
    g = torch.Generator().manual_seed(0)
    eps = torch.randn(5, 1, 4, 4, generator=g)
    grad = torch.randn(5, 1, 4, 4, generator=g)
    abar = torch.full((5,), 0.3)
    p = torch.tensor([0.05, 0.1, 0.5, 0.9, 0.97])
    out = cpsample_eps(eps, p, grad, abar, alpha=0.08, scale=2.0)
    assert out.fired.tolist() == [True, False, False, False, True]
    assert torch.equal(out.eps[1:4], eps[1:4])
    assert torch.equal(out.p, p)
    coef = 2.0 * (1 - 0.3) ** 0.5
    # below alpha: target 1 -> eps - s sqrt(1-abar) (1 - p) grad
    assert torch.allclose(out.eps[0], eps[0] - coef * (1 - 0.05) * grad[0], atol=1e-6)
    # above 1 - alpha: target 0 -> eps + s sqrt(1-abar) p grad
    assert torch.allclose(out.eps[4], eps[4] + coef * 0.97 * grad[4], atol=1e-6)


@pytest.mark.parametrize("target_value", [0.0, 1.0])
def test_log_prob_grad_matches_autograd(core_clf, target_value):
    x, _ = _inputs(1)
    x = x.requires_grad_(True)
    t = torch.tensor([0, 10, 200, 999])
    logits = core_clf(x, t)
    target = torch.full((4,), target_value)
    (expected,) = torch.autograd.grad(_log_prob(logits, target).sum(), x)

    x2 = x.detach().requires_grad_(True)
    logits2 = core_clf(x2, t)
    (grad_logit,) = torch.autograd.grad(logits2.sum(), x2)
    ours = log_prob_grad(target, torch.sigmoid(logits2.detach()), grad_logit)
    assert ours.shape == x.shape
    assert expected.abs().max() > 0
    assert torch.allclose(ours, expected, rtol=1e-4, atol=1e-6)


# ------------------------------------------------------------------------------- guidance function
@pytest.mark.parametrize("scale", [0.7, 5.0])
def test_guided_eps_matches_autograd_x_t(core_clf, scale):
    x_t, eps = _inputs(2)
    t = torch.tensor([999, 500, 50, 0])
    abar = linear_schedule().abar(t)
    out = cpsample_guidance(core_clf, alpha=0.5, scale=scale)(x_t, t, eps, abar)
    p = torch.sigmoid(core_clf(x_t, t)).detach()
    assert torch.allclose(out.p, p, atol=1e-6)
    assert bool(out.fired.all())  # alpha = 0.5 and p != 0.5 exactly

    x = x_t.clone().requires_grad_(True)
    target = (p < 0.5).float()  # the less likely label
    (g,) = torch.autograd.grad(_log_prob(core_clf(x, t), target).sum(), x)
    expected = eps - scale * (1 - abar).sqrt()[:, None, None, None] * g
    assert not torch.equal(out.eps, eps)
    assert torch.allclose(out.eps, expected, rtol=1e-4, atol=1e-6)


def test_guided_eps_matches_autograd_x0(core_clf):
    x_t, eps = _inputs(3)
    t = torch.tensor([900, 400, 100, 20])
    abar = linear_schedule().abar(t)
    out = cpsample_guidance(core_clf, alpha=0.5, scale=3.0, input_mode="x0")(x_t, t, eps, abar)

    x = x_t.clone().requires_grad_(True)
    logits = core_clf(pred_xstart_from_eps(x, eps, abar), torch.zeros_like(t))
    p = torch.sigmoid(logits.detach())
    assert torch.allclose(out.p, p, atol=1e-6)
    target = (p < 0.5).float()
    (g,) = torch.autograd.grad(_log_prob(logits, target).sum(), x)
    expected = eps - 3.0 * (1 - abar).sqrt()[:, None, None, None] * g
    assert torch.allclose(out.eps, expected, rtol=1e-4, atol=1e-6)

    # chain rule: d/dx_t = (d/dx0) / sqrt(abar_t)
    x0 = pred_xstart_from_eps(x_t, eps, abar).requires_grad_(True)
    (g0,) = torch.autograd.grad(_log_prob(core_clf(x0, torch.zeros_like(t)), target).sum(), x0)
    assert torch.allclose(g, g0 / abar.sqrt()[:, None, None, None], rtol=1e-4, atol=1e-6)


def test_guided_eps_finite_difference_float64():
    shape = (3, 1, 4, 4)
    clf = _SmoothClassifier(shape[1:])
    g = torch.Generator().manual_seed(4)
    x_t = torch.randn(shape, generator=g, dtype=torch.float64)
    eps = torch.randn(shape, generator=g, dtype=torch.float64)
    t = torch.tensor([700, 300, 30])
    abar = linear_schedule().abar(t).double()
    scale = 2.0
    out = cpsample_guidance(clf, alpha=0.5, scale=scale)(x_t, t, eps, abar)
    assert bool(out.fired.all())
    with torch.no_grad():
        target = (torch.sigmoid(clf(x_t, t)) < 0.5).double()
        h = 1e-6
        for i, idx in [(0, (0, 1, 2)), (1, (0, 3, 0)), (2, (0, 0, 3))]:
            xp, xm = x_t.clone(), x_t.clone()
            xp[(i, *idx)] += h
            xm[(i, *idx)] -= h
            fd = (_log_prob(clf(xp, t), target)[i] - _log_prob(clf(xm, t), target)[i]) / (2 * h)
            expected = eps[(i, *idx)] - scale * (1 - abar[i]).sqrt() * fd
            assert abs(fd) > 1e-4
            assert out.eps[(i, *idx)].item() == pytest.approx(expected.item(), rel=1e-6, abs=1e-8)


def test_guidance_skips_backward_when_nothing_fires(core_clf):
    clf = _CountingClassifier(core_clf)
    x_t, eps = _inputs(6)
    t = torch.tensor([999, 600, 300, 10])
    abar = linear_schedule().abar(t)
    p = torch.sigmoid(core_clf(x_t, t)).detach()
    # an untrained classifier is far from confident: a tiny alpha never fires
    assert float((p - 0.5).abs().max()) < 0.49

    _BackwardCounter.calls = 0
    out = cpsample_guidance(clf, alpha=1e-6, scale=5.0)(x_t, t, eps, abar)
    assert _BackwardCounter.calls == 0
    assert not bool(out.fired.any())
    assert out.eps is eps
    assert torch.allclose(out.p, p, atol=1e-6)

    # scale 0 also skips the backward, though samples fire
    out = cpsample_guidance(clf, alpha=0.5, scale=0.0)(x_t, t, eps, abar)
    assert _BackwardCounter.calls == 0
    assert bool(out.fired.all())
    assert out.eps is eps

    # and when something fires, exactly one backward runs
    out = cpsample_guidance(clf, alpha=0.5, scale=5.0)(x_t, t, eps, abar)
    assert _BackwardCounter.calls == 1
    assert not torch.equal(out.eps, eps)


def test_guidance_partial_fire_keeps_other_samples_bit_for_bit(core_clf):
    x_t, eps = _inputs(7)
    t = torch.tensor([999, 600, 300, 10])
    abar = linear_schedule().abar(t)
    p = torch.sigmoid(core_clf(x_t, t)).detach()
    # choose alpha so that exactly the most extreme sample fires
    dist = (p - 0.5).abs()
    order = dist.argsort(descending=True)
    alpha = float(0.5 - (dist[order[0]] + dist[order[1]]) / 2)
    out = cpsample_guidance(core_clf, alpha=alpha, scale=5.0)(x_t, t, eps, abar)
    assert out.fired.tolist() == [i == int(order[0]) for i in range(4)]
    for i in range(4):
        if i == int(order[0]):
            assert not torch.equal(out.eps[i], eps[i])
        else:
            assert torch.equal(out.eps[i], eps[i])


def test_guidance_does_not_leave_grads_on_classifier(core_clf):
    x_t, eps = _inputs(8)
    t = torch.tensor([500, 500, 500, 500])
    abar = linear_schedule().abar(t)
    with torch.no_grad():  # the sampler calls guidance from no_grad code
        out = cpsample_guidance(core_clf, alpha=0.5, scale=1.0)(x_t, t, eps, abar)
    assert not torch.equal(out.eps, eps)
    assert all(p.grad is None for p in core_clf.parameters())


def test_guidance_t_gate_switches_off_steps_at_or_above_t_max(core_clf):
    x_t, eps = _inputs(9)
    t = torch.tensor([999, 600, 599, 10])
    abar = linear_schedule().abar(t)
    ungated = cpsample_guidance(core_clf, alpha=0.5, scale=5.0)(x_t, t, eps, abar)
    gated = cpsample_guidance(core_clf, alpha=0.5, scale=5.0, t_max=600)(x_t, t, eps, abar)
    assert ungated.fired.tolist() == [True, True, True, True]
    assert gated.fired.tolist() == [False, False, True, True]
    assert torch.equal(gated.eps[:2], eps[:2])  # above the gate: untouched, bit for bit
    assert torch.allclose(gated.eps[2:], ungated.eps[2:])  # below it: the same guidance as ungated


def test_guidance_t_gate_skips_classifier_when_every_sample_is_above(core_clf):
    x_t, eps = _inputs(10)
    t = torch.full((4,), 900)
    counting = _CountingClassifier(core_clf)
    _BackwardCounter.calls = 0
    out = cpsample_guidance(counting, alpha=0.5, scale=5.0, t_max=600)(
        x_t, t, eps, linear_schedule().abar(t)
    )
    assert _BackwardCounter.calls == 0
    assert not out.fired.any() and torch.isnan(out.p).all()
    assert torch.equal(out.eps, eps)
