"""A batch of rows (:mod:`pipeline.train.ingest`) as the classifier's and denoiser's input tensors.

Rows are images (``"image"``: uint8 (B, H, W, C) decoded by Ray Data), scaled VAE latents
(``"latent"``: float32 (B, C, h, w), with ``"pooled"`` (B, D) text embeddings where the dataset has
them) or in-memory tensors (``"x"``, ``"y"``); bits come from the keys (:func:`random_bits`).
"""

from __future__ import annotations

import numpy as np
import torch

from pipeline.core.labels import random_bits
from pipeline.data.imageset import DataError, images_to_tensor


def batch_images(rows: dict, device: torch.device) -> torch.Tensor:
    """(B, C, H, W) float in [-1, 1] on ``device`` from a batch of rows: ``"x"`` (already such a
    tensor) or ``"image"`` (uint8 (B, H, W, C), decoded by Ray Data); or ``"latent"`` (float32
    (B, C, h, w) scaled VAE latents), the diffusion model's input as it is."""
    if "x" in rows:
        return rows["x"].to(device)
    if "latent" in rows:
        return torch.as_tensor(np.array(rows["latent"], dtype=np.float32)).to(device)
    return images_to_tensor(np.array(rows["image"], dtype=np.uint8)).to(device)  # own, writable


def batch_pooled(rows: dict, device: torch.device) -> torch.Tensor:
    """(B, D) float32 pooled text embeddings of a batch of latent rows (``"pooled"``)."""
    if "pooled" not in rows:
        raise DataError(
            "the classifier is text-conditioned (cond_dim > 0) but the rows have no pooled text "
            "embedding: its latent dataset needs <key>.pooled.npy members"
        )
    pooled = rows["pooled"]
    if isinstance(pooled, torch.Tensor):
        return pooled.float().to(device)
    return torch.as_tensor(np.array(pooled, dtype=np.float32)).to(device)


def batch_bits(
    rows: dict, label_seed: int, device: torch.device, label_of: dict[str, str] | None = None
) -> torch.Tensor:
    """The batch's random bits: ``"y"`` when given, else :func:`random_bits` of its ``"key"`` (drawn
    from the key's near-duplicate cluster id when ``label_of`` names one: cluster bits)."""
    if "y" in rows:
        return rows["y"].to(device)
    return random_bits([str(k) for k in rows["key"]], label_seed, label_of).to(device)
