"""Anti-Memorization Guidance (AMG), its dissimilarity guidance, as a baseline sampler.

Chen, Liu and Xu, CVPR 2024, "Towards Memorization-Free Diffusion Models" (no official code). AMG has
three guidances: despecification (it weakens a too-specific text prompt), caption deduplication (it
steers away from the caption of a duplicated training image), and dissimilarity, plus a per-step
memorisation check that switches them on. The first two need a text condition; only **dissimilarity
guidance** and the per-step check apply to the unconditional models sampled here, and they are
what this module implements. At each DDIM step:

1. predict ``x0_hat = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t)`` (Song et al. 2021, eq. 12);
2. find its nearest training image ``n`` and their similarity ``sigma_t = sim(x0_hat, n)`` (the
   replica check's embedding and cosine; ``nearest`` does the search);
3. where ``sigma_t`` is at or above the threshold, push ``x_t`` down the gradient of that
   similarity, with ``n`` held fixed, in the ``condition_score`` form of classifier guidance
   (Dhariwal & Nichol 2021, eq. 14, with ``log p`` replaced by ``-sigma``):

       eps_hat = eps + s * sqrt(1 - abar_t) * grad_{x_t} sim(x0_hat(x_t), n)

   so the next predicted image is ``x0_hat - s (1 - abar_t) / abar_t * grad_{x0} sim``: further from
   ``n`` for a small enough ``s``. Below the threshold ``eps`` is returned unchanged, bit for bit.

``sim`` is the cosine of **centred pixels**: ``cos(flat(x - c), flat(n - c))`` with ``c`` the training
mean image in [-1, 1] (the replica check's default embedding, which subtracts the mean of images in
[0, 1]: the cosine is the same, because ``(x + 1) / 2 - m = (x - (2m - 1)) / 2``). For the raw-pixel
embedding ``c = -1`` (the cosine of pixels in [0, 1]).

What this differs in from the paper, and why: eps is held fixed in the gradient (no backward pass
through the denoiser; the guidance function sees only ``(x_t, t, eps, abar_t)``, as CPSample's
``input_mode="x0"`` does), so ``grad_{x_t} = grad_{x0} / sqrt(abar_t)``; ``x0_hat`` is clipped to
[-1, 1] before the similarity, as the DDIM step and the replica check clip it; the threshold is one
constant (the paper schedules it over t); the similarity is pixel cosine, not SSCD features.
AMG needs the training images at sampling time (every step searches them); CPSample does not.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from pipeline.core.diffusion import pred_xstart_from_eps
from pipeline.core.guidance import GuidanceFn, GuidanceOutput

# (B, C, H, W) predicted images in [-1, 1] -> (similarities (B,), nearest training images (B, C, H, W)
# in [-1, 1]); the similarities are the replica check's (the search's own, not recomputed here)
NearestFn = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def validate_amg_knobs(threshold: float, scale: float) -> None:
    """Reject knobs outside the method's domain with a message that says what is allowed."""
    if not -1.0 <= threshold <= 1.0:
        raise ValueError(f"amg_threshold must be a cosine similarity in [-1, 1], got {threshold}")
    if scale < 0:
        raise ValueError(
            f"amg_scale must be >= 0 (the dissimilarity guidance scale s), got {scale}"
        )


def centred_cosine(x: torch.Tensor, n: torch.Tensor, centre: torch.Tensor) -> torch.Tensor:
    """``cos(flat(x - c), flat(n - c))`` per sample, differentiable in ``x``: the centred-pixel
    embedding's similarity (L2-normalised, inner product). x, n (B, C, H, W); c (C, H, W) or a
    scalar tensor; returns (B,)."""
    a = (x - centre).flatten(1)
    b = (n - centre).flatten(1)
    a = a / a.norm(dim=1, keepdim=True).clamp_min(1e-12)
    b = b / b.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return (a * b).sum(dim=1)


def similarity_grad(
    x_t: torch.Tensor,
    eps: torch.Tensor,
    abar_t: torch.Tensor,
    neighbours: torch.Tensor,
    centre: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``sim(clip(x0_hat(x_t)), n)`` (B,) and its gradient in ``x_t`` (B, C, H, W), with eps and the
    neighbours ``n`` held fixed: the chain rule through ``x0_hat`` contributes ``1 / sqrt(abar_t)``."""
    with torch.enable_grad():
        x = x_t.detach().float().requires_grad_(True)
        x0 = pred_xstart_from_eps(x, eps.detach().float(), abar_t).clamp(-1.0, 1.0)
        sim = centred_cosine(x0, neighbours.to(x0), centre.to(x0))
        (grad,) = torch.autograd.grad(sim.sum(), x)  # samples are independent: per-sample grads
    return sim.detach(), grad


def amg_eps(
    eps: torch.Tensor,
    grad_sim: torch.Tensor,
    abar_t: torch.Tensor,
    fired: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """``eps_hat = eps + s sqrt(1 - abar_t) grad_{x_t} sim`` where ``fired`` (B,), else ``eps``
    itself (bit for bit): the dissimilarity guidance, Chen et al. 2024, in the form of eq. 14 of
    Dhariwal & Nichol 2021 with ``log p`` replaced by ``-sim``."""
    coef = scale * (1.0 - abar_t).sqrt().reshape(-1, *([1] * (eps.dim() - 1)))
    return torch.where(fired.reshape(coef.shape), eps + coef * grad_sim.to(eps), eps)


def amg_guidance(
    nearest: NearestFn, centre: torch.Tensor | float, threshold: float, scale: float
) -> GuidanceFn:
    """Wrap a nearest-training-image search into AMG's dissimilarity guidance for the sampler.

    ``nearest`` (:data:`NearestFn`) sees each step's clipped ``x0_hat``; the samples whose nearest
    similarity is at or above ``threshold`` (the replica rule, inclusive) are guided, the others keep
    ``eps`` unchanged. ``centre``: the embedding's centre in [-1, 1] (the training mean image (C, H,
    W) for centred pixels, -1 for raw pixels). ``GuidanceOutput.p`` is NaN: there is no classifier.
    """
    validate_amg_knobs(threshold, scale)
    centre_t = torch.as_tensor(centre, dtype=torch.float32)

    def guide(x_t: torch.Tensor, t: torch.Tensor, eps: torch.Tensor, abar_t: torch.Tensor):
        nan = torch.full((x_t.shape[0],), float("nan"), device=x_t.device)
        x0 = pred_xstart_from_eps(x_t, eps, abar_t).clamp(-1.0, 1.0)
        sims, neighbours = nearest(x0)  # (B,), (B, C, H, W)
        fired = torch.as_tensor(sims, device=x_t.device) >= threshold
        if scale == 0 or not bool(fired.any()):
            return GuidanceOutput(eps=eps, fired=fired, p=nan)
        _, grad = similarity_grad(x_t, eps, abar_t, neighbours.to(x_t.device), centre_t)
        return GuidanceOutput(eps=amg_eps(eps, grad, abar_t, fired, scale), fired=fired, p=nan)

    return guide
