"""The in-memory image set every stage passes around, and the errors bad image data raises.

An :class:`ImageSet` is uint8 images at the model's resolution with stable WebDataset keys and
optional class labels; :meth:`ImageSet.to_tensor` / :func:`images_from_tensor` convert to and from the
[-1, 1] tensors the diffusion models use.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image


class DataError(ValueError):
    """Input data is missing, unreadable, or inconsistent."""


@dataclass
class ImageSet:
    """``images``: (N, H, W, C) uint8; ``keys``: N unique WebDataset keys; ``labels``: class ids or None."""

    keys: list[str]
    images: np.ndarray
    labels: list[int] | None = None
    meta: list[dict[str, Any]] = field(default_factory=list)

    def __post_init__(self) -> None:
        if len(self.keys) != len(self.images):
            raise DataError(f"{len(self.keys)} keys for {len(self.images)} images")
        if len(set(self.keys)) != len(self.keys):
            raise DataError("duplicate keys in image set")

    def __len__(self) -> int:
        return len(self.keys)

    def subset(self, idx: list[int] | np.ndarray) -> ImageSet:
        idx = [int(i) for i in idx]
        return ImageSet(
            keys=[self.keys[i] for i in idx],
            images=self.images[idx],
            labels=None if self.labels is None else [self.labels[i] for i in idx],
            meta=[self.meta[i] for i in idx] if self.meta else [],
        )

    def to_tensor(self):
        """(N, C, H, W) float32 in [-1, 1], the scaling the diffusion models use."""
        return images_to_tensor(self.images)


def images_to_tensor(images: np.ndarray):
    """(N, H, W, C) uint8 -> (N, C, H, W) float32 in [-1, 1], the scaling the diffusion models use."""
    import torch

    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def images_from_tensor(x) -> np.ndarray:
    """Inverse of :meth:`ImageSet.to_tensor`: (N, C, H, W) in [-1, 1] -> (N, H, W, C) uint8."""
    import torch

    arr = ((x.clamp(-1, 1) + 1.0) * 127.5).round().to(dtype=torch.uint8)
    return arr.permute(0, 2, 3, 1).cpu().numpy()


def fit_square(img: Image.Image, image_size: int) -> Image.Image:
    """Centre-crop to a square, then resize (bicubic) to ``image_size``."""
    w, h = img.size
    side = min(w, h)  # centre crop to a square, then resize
    img = img.crop(
        ((w - side) // 2, (h - side) // 2, (w - side) // 2 + side, (h - side) // 2 + side)
    )
    return (
        img.resize((image_size, image_size), Image.Resampling.BICUBIC)
        if side != image_size
        else img
    )


GRAY_MODES = ("L", "LA", "1", "I", "I;16", "F")


def stack_images(loaded: list[Image.Image]) -> np.ndarray:
    """Same-size PIL images -> (N, H, W, C) uint8: 1 channel when all are grayscale, otherwise RGB
    (grayscale replicated). No images give an empty (0, 1, 1, 1) array."""
    if not loaded:
        return np.zeros((0, 1, 1, 1), np.uint8)
    mode = "L" if all(im.mode in GRAY_MODES for im in loaded) else "RGB"
    arrays = [np.asarray(im.convert(mode), dtype=np.uint8) for im in loaded]
    return np.stack([a[..., None] if a.ndim == 2 else a for a in arrays])


def safe_key(name: str) -> str:
    """A WebDataset key: every character but letters, digits, ``_`` and ``-`` (dots start extensions,
    slashes are folders) becomes ``_``."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", name)


def image_mode(images: np.ndarray) -> str:
    """PIL mode of (N, H, W, C) uint8 images: ``L`` (C = 1) or ``RGB`` (C = 3)."""
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise DataError(
            f"images must be (N, H, W, 1 or 3) uint8, got {images.shape} {images.dtype}"
        )
    return "L" if images.shape[-1] == 1 else "RGB"
