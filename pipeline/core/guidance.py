"""CPSample guidance: the confidence gate and the classifier-guided noise estimate.

Kazdan et al. 2024 (arXiv 2409.07025), Algorithm 2: when the random-label classifier is confident
(``p < alpha`` or ``p > 1 - alpha``) the sample is steered toward the *opposite* label with classifier
guidance in the ``condition_score`` form of Dhariwal & Nichol 2021 (eq. 14):

    eps_hat = eps - s * sqrt(1 - abar_t) * grad_{x_t} log p(target | x_t)

``eps`` is always the noise estimate, whatever the network predicts: the sampler's denoiser adapter
converts a v-prediction or x_0 output first (:class:`pipeline.core.sampler.UNetDenoiser`), so the
formula above and ``pred_xstart`` (``input_mode="x0"``) hold for every prediction type.

The maths here are pure functions of tensors; :func:`cpsample_guidance` wraps a classifier into the
guidance callable that :func:`pipeline.core.sampler.sample` accepts.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from pipeline.core.diffusion import pred_xstart_from_eps


@dataclass
class GuidanceOutput:
    """What a guidance function returns for one sampler step (B = batch size)."""

    eps: torch.Tensor  # (B, C, H, W) guided noise estimate
    fired: torch.Tensor  # (B,) bool, guidance acted on this sample at this step
    p: torch.Tensor  # (B,) classifier probability of label 1 before guidance


# (x_t, t, eps, abar_t) -> GuidanceOutput; t and abar_t are (B,) tensors, eps the noise estimate.
GuidanceFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], GuidanceOutput]


def validate_knobs(alpha: float, scale: float) -> None:
    """Reject knobs outside the algorithm's domain with a message that says what is allowed."""
    if not 0.0 < alpha <= 0.5:
        raise ValueError(f"alpha must be in (0, 0.5] (the confidence threshold), got {alpha}")
    if scale < 0:
        raise ValueError(f"scale must be >= 0 (the guidance strength s), got {scale}")


def cpsample_gate(p: torch.Tensor, alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The CPSample gate: returns ``(fired, target)`` for probabilities ``p`` of shape (B,).

    ``p > 1 - alpha`` -> target 0; ``p < alpha`` -> target 1; otherwise not fired (target is then
    meaningless and set to ``p`` so that ``target - p`` is 0). At ``alpha = 0.5`` every sample with
    ``p != 0.5`` fires and is pushed toward its less likely label.
    """
    high = p > 1.0 - alpha
    low = p < alpha
    fired = high | low
    target = torch.where(high, torch.zeros_like(p), torch.where(low, torch.ones_like(p), p))
    return fired, target


def log_prob_grad(target: torch.Tensor, p: torch.Tensor, grad_logit: torch.Tensor) -> torch.Tensor:
    """``grad_x log p(target | x)`` for a Bernoulli with ``p = sigmoid(logit(x))``.

    d/dl log sigmoid(l) = 1 - p and d/dl log(1 - sigmoid(l)) = -p, so both are ``(target - p) * dl/dx``.
    Shapes: target, p (B,); grad_logit (B, C, H, W).
    """
    return (target - p).reshape(-1, *([1] * (grad_logit.dim() - 1))) * grad_logit


def cpsample_eps(
    eps: torch.Tensor,
    p: torch.Tensor,
    grad_logit: torch.Tensor,
    abar_t: torch.Tensor,
    alpha: float,
    scale: float,
    active: torch.Tensor | None = None,
) -> GuidanceOutput:
    """Apply the gate and ``eps_hat = eps - s sqrt(1 - abar_t) grad log p(target | x_t)``.

    Samples outside the confidence band, or with ``active`` (B,) False (e.g. outside the guided t
    range), keep ``eps`` unchanged, bit for bit.
    """
    fired, target = cpsample_gate(p, alpha)
    if active is not None:
        fired = fired & active
    g = log_prob_grad(target, p, grad_logit)
    coef = scale * (1.0 - abar_t).sqrt().reshape(-1, *([1] * (eps.dim() - 1)))
    eps_hat = torch.where(fired.reshape(coef.shape), eps - coef * g, eps)
    return GuidanceOutput(eps=eps_hat, fired=fired, p=p)


def classifier_logits(
    classifier: nn.Module,
    x: torch.Tensor,
    t: torch.Tensor,
    eps: torch.Tensor,
    abar_t: torch.Tensor,
    input_mode: str = "x_t",
) -> torch.Tensor:
    """Classifier logits (B,) for the sampler state ``x`` (which may require grad).

    With ``input_mode="x0"`` the classifier sees ``pred_xstart`` at t = 0 with eps held fixed, so the
    chain rule contributes ``1 / sqrt(abar_t)`` to the input gradient.
    """
    if input_mode == "x0":
        return classifier(pred_xstart_from_eps(x, eps.detach(), abar_t), torch.zeros_like(t))
    return classifier(x, t)


def cpsample_guidance(
    classifier: nn.Module, alpha: float, scale: float, input_mode: str = "x_t", t_max: int = 1000
) -> GuidanceFn:
    """Wrap a random-label classifier into a CPSample guidance function for the sampler.

    Guidance acts only at ``t < t_max``: a classifier trained on ``t < t_max`` says nothing reliable
    above it. One classifier forward per step; the backward runs only when at least one sample fired.
    Samples are independent (the classifier has no batch statistics), so the gradient of the summed logits is the
    per-sample gradient ``d logit_i / d x_i``.
    """
    validate_knobs(alpha, scale)
    if input_mode not in ("x_t", "x0"):
        raise ValueError(f"input_mode must be 'x_t' or 'x0', got {input_mode!r}")

    def guide(x_t: torch.Tensor, t: torch.Tensor, eps: torch.Tensor, abar_t: torch.Tensor):
        active = t < t_max
        if not bool(active.any()):  # no classifier call at all above the guided t range
            nan = torch.full((x_t.shape[0],), float("nan"), device=x_t.device)
            return GuidanceOutput(eps=eps, fired=torch.zeros_like(active), p=nan)
        with torch.enable_grad():
            x = x_t.detach().requires_grad_(True)
            logits = classifier_logits(classifier, x, t, eps, abar_t, input_mode)
            p = torch.sigmoid(logits.detach().float())
            fired = cpsample_gate(p, alpha)[0] & active
            if scale == 0 or not bool(fired.any()):
                return GuidanceOutput(eps=eps, fired=fired, p=p)
            (grad,) = torch.autograd.grad(logits.sum(), x)
        return cpsample_eps(eps, p, grad, abar_t, alpha, scale, active)

    return guide
