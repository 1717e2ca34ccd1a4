"""How well the random-label classifier fits the bits of a group of images (Ray-free).

CPSample only protects an image where its classifier is confident (p < alpha or p > 1 - alpha) and
right about the image's bit. For near-duplicates under independent key bits the classifier is asked
to fit contradictory labels on one picture, so it stays unsure there: :func:`bit_fit` measures that
on the copies themselves, at small t, where guidance decides what the sample becomes.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from pipeline.core.diffusion import Schedule
from pipeline.train.loops import _noisy_logits


def bit_fit(
    clf: torch.nn.Module,
    schedule: Schedule,
    x: torch.Tensor,
    bits: torch.Tensor,
    alpha: float,
    t_lo: int = 0,
    t_hi: int = 100,
    draws: int = 4,
    seed: int = 0,
    batch_size: int = 256,
) -> dict[str, Any]:
    """The classifier on ``draws`` noisings of each image of ``x`` at ``t ~ U[t_lo, t_hi)``:

    - ``accuracy``: share of ``1[c_phi(x_t, t) > 0] == y`` for the images' ``bits``;
    - ``confident``: share with ``p < alpha`` or ``p > 1 - alpha`` (CPSample's firing rule;
      alpha = 0.5 fires everywhere, so the margin below says more);
    - ``mean_margin``: mean ``|p - 1/2|`` (0: unsure, 0.5: certain);
    - ``consistency``: per image, the share of its draws on the side of its majority prediction
      (1: the classifier gives one answer on that picture), averaged."""
    if len(x) == 0:
        return {"accuracy": None, "confident": None, "mean_margin": None, "num_images": 0}
    gen = torch.Generator().manual_seed(seed)
    clf = clf.eval()
    logits, _ = _noisy_logits(clf, schedule, x, t_lo, t_hi, gen, draws, batch_size)
    p = torch.sigmoid(logits)
    y = bits.float().repeat(draws)
    pred = (logits > 0).float()
    per_image = pred.view(draws, len(x)).mean(0)
    consistency = torch.maximum(per_image, 1 - per_image)
    return {
        "accuracy": float((pred == y).float().mean()),
        "confident": float(((p < alpha) | (p > 1 - alpha)).float().mean()),
        "mean_margin": float((p - 0.5).abs().mean()),
        "consistency": float(consistency.mean()),
        "num_images": len(x),
        "t_range": [t_lo, t_hi],
        "draws": draws,
    }


def group_bits(keys: list[str], label_of: dict[str, str] | None, label_seed: int) -> np.ndarray:
    """The bits the classifier was trained on for ``keys``: cluster bits through ``label_of``
    (key -> cluster id) or, without it, key bits."""
    from pipeline.core.labels import random_bits

    return random_bits(keys, label_seed, label_of).numpy()
