"""PIA, the proximal initialisation membership attack (Kong et al., ICLR 2024), Ray-free.

Kong et al. ("An Efficient Membership Inference Attack for the Diffusion Model by Proximal
Initialization") replace the random noise of the loss attack with the model's own noise estimate
at ``t = 0``, the *proximal initialisation*:

    eps_0   = eps_theta(x_0, 0)
    x_t     = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps_0          (Ho et al. 2020, eq. 4, with eps_0)
    error   = || eps_theta(x_t, t) - eps_0 ||_p                    (members: the smaller)

One deterministic query pair per image, no noise draws. Checked against the authors' code
(``kong13661/PIA``: ``DDPM/attack.py``, and its ``components.PIA`` as public copies of it show;
the paper's text itself was not at hand): ``eps_0`` is the model's output at
step 0, ``x_t`` is built from it with ``abar_t`` of the attacked step, the score is
``sum |eps_theta(x_t, t) - eps_0|^p`` with ``p = 4`` by default, and their DDPM script scores every
``t = 10, 20, ..., 300``; we attack one ``t``, 200 by default (``EvalConfig.pia_t`` / ``pia_p``).
The score here is the normalised norm ``(mean_pixels |.|^p)^(1/p)``, a monotone function of
theirs, so the AUC and TPR are the same.

With CPSample both queries use the classifier-corrected noise estimate (the guidance function), as
the other attacks of :mod:`pipeline.evaluation.mia` do: the attacker sees the protected model.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from pipeline.core.diffusion import Schedule, q_sample
from pipeline.core.guidance import GuidanceFn
from pipeline.core.sampler import DenoiserFn
from pipeline.evaluation.mia import _eps, error_attack_report

PIA_T = 200  # the default t of 1000 (the authors' DDPM script scans t = 10..300)
PIA_P = 4.0  # the authors' default l_p norm


def pia_errors(
    denoiser: DenoiserFn,
    schedule: Schedule,
    x0: torch.Tensor,
    t: int = PIA_T,
    p: float = PIA_P,
    guidance: GuidanceFn | None = None,
    batch_size: int = 256,
) -> np.ndarray:
    """Per-image PIA error ``(mean_pixels |eps_theta(x_t, t) - eps_0|^p)^(1/p)`` (N,) of x_0
    (N, C, H, W) in [-1, 1], with ``eps_0 = eps_theta(x_0, 0)`` and ``x_t`` the forward process
    driven by ``eps_0`` (Kong et al. 2024's proximal initialisation); the guided estimate with
    ``guidance``."""
    if not 0 < t < schedule.num_train_timesteps:
        raise ValueError(f"PIA's t must be in (0, {schedule.num_train_timesteps}), got {t}")
    if not p > 0:
        raise ValueError(f"PIA's p (the l_p norm) must be > 0, got {p}")
    out = []
    for lo in range(0, len(x0), batch_size):
        xb = x0[lo : lo + batch_size].float()
        eps0 = _eps(denoiser, schedule, xb, 0, guidance)  # the proximal initialisation
        t_batch = torch.full((len(xb),), t, dtype=torch.long, device=xb.device)
        x_t = q_sample(schedule, xb, t_batch, eps0)
        diff = _eps(denoiser, schedule, x_t, t, guidance) - eps0  # (B, C, H, W)
        out.append(diff.abs().pow(p).flatten(1).mean(1).pow(1.0 / p).cpu())
    return torch.cat(out).numpy() if out else np.zeros(0, dtype=np.float32)


def pia_attack(
    unet: torch.nn.Module,
    schedule: Schedule,
    members: torch.Tensor,
    nonmembers: torch.Tensor,
    guidance: GuidanceFn | None = None,
    t: int = PIA_T,
    p: float = PIA_P,
    seed: int = 0,
    num_permutations: int = 10_000,
) -> dict[str, Any]:
    """PIA end to end on (N, C, H, W) tensors in [-1, 1]: :func:`mia.error_attack_report` on the errors
    (score = -error: AUC, TPR at 1% FPR, permutation p-value), ``t``, ``p`` and the ROC curve."""
    from pipeline.core.sampler import unet_denoiser

    den = unet_denoiser(unet, schedule)
    em = pia_errors(den, schedule, members, t, p, guidance)
    en = pia_errors(den, schedule, nonmembers, t, p, guidance)
    return {**error_attack_report(em, en, num_permutations, seed), "t": t, "p": p}
