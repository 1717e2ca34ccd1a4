"""A batch of rows (:mod:`pipeline.train.ingest`) as the classifier's and denoiser's input tensors.

Rows are images (``"image"``: uint8 (B, H, W, C) decoded by Ray Data), scaled VAE latents
(``"latent"``: float32 (B, C, h, w), with ``"pooled"`` (B, D) text embeddings where the dataset has
them) or in-memory tensors (``"x"``, ``"y"``); bits come from the keys (:func:`random_bits`).
Every tensor reaches the device through :func:`pipeline.train.device.to_device` (pinned memory,
``non_blocking``), and images travel as uint8 and are scaled to [-1, 1] on the device.
"""

from __future__ import annotations

import numpy as np
import torch

from pipeline.core.labels import random_bits
from pipeline.data.imageset import DataError
from pipeline.train.device import to_device

_NUMPY = {torch.uint8: np.uint8, torch.float32: np.float32}


def _tensor(column, dtype: torch.dtype) -> torch.Tensor:
    """A column as a tensor of ``dtype``; a numpy column becomes a writable copy that owns its memory
    (the rows stay as Ray Data delivered them)."""
    if isinstance(column, torch.Tensor):
        return column.to(dtype)
    return torch.from_numpy(np.array(column, dtype=_NUMPY[dtype]))


def batch_images(rows: dict, device: torch.device) -> torch.Tensor:
    """(B, C, H, W) float in [-1, 1] on ``device`` from a batch of rows: ``"x"`` (already such a
    tensor) or ``"image"`` (uint8 (B, H, W, C), decoded by Ray Data; copied as uint8, then
    ``x / 127.5 - 1`` on the device, as :func:`pipeline.data.imageset.images_to_tensor`); or
    ``"latent"`` (float32 (B, C, h, w) scaled VAE latents), the diffusion model's input as it is."""
    if "x" in rows:
        return to_device(rows["x"], device)
    if "latent" in rows:
        return to_device(_tensor(rows["latent"], torch.float32), device)
    images = to_device(_tensor(rows["image"], torch.uint8), device)  # own, writable
    return images.permute(0, 3, 1, 2).float() / 127.5 - 1.0


def batch_pooled(rows: dict, device: torch.device) -> torch.Tensor:
    """(B, D) float32 pooled text embeddings of a batch of latent rows (``"pooled"``)."""
    if "pooled" not in rows:
        raise DataError(
            "the classifier is text-conditioned (cond_dim > 0) but the rows have no pooled text "
            "embedding: its latent dataset needs <key>.pooled.npy members"
        )
    pooled = rows["pooled"]
    if isinstance(pooled, torch.Tensor):
        return to_device(pooled.float(), device)
    return to_device(_tensor(pooled, torch.float32), device)


def batch_bits(
    rows: dict, label_seed: int, device: torch.device, label_of: dict[str, str] | None = None
) -> torch.Tensor:
    """The batch's random bits: ``"y"`` when given, else :func:`random_bits` of its ``"key"`` (drawn
    from the key's near-duplicate cluster id when ``label_of`` names one: cluster bits)."""
    if "y" in rows:
        return to_device(rows["y"], device)
    return to_device(random_bits([str(k) for k in rows["key"]], label_seed, label_of), device)
