"""Sample quality for a user's own image folder, offline: no Inception weights, no labels needed.

A folder of images has no digit classifier to judge samples by. Two measures replace it:

- ``fd_encoder``: the Fréchet distance (Heusel et al. 2017, eq. 6) between samples and the held-out
  real images in the 64-d code of a small convolutional autoencoder trained on the held-out images
  alone (reconstruction loss ``||x - D(E(x))||^2``, a bounded number of seeded steps). No labels:
  it works on any folder. A sample with grain or broken strokes lies off the images the encoder was
  fitted to and moves its code, so the distance grows (``tests/evaluation/test_folder_quality.py``
  checks that noise and erased strokes raise it while another half of the real images does not).
- When the images sit in label subfolders (``class_0/``, ``class_1/`` ...; the folder source keys
  each image by its relative path, ``class_0__img_0001``), the subfolder is the label and the
  domain classifier of :mod:`pipeline.evaluation.domain` trains on the held-out images with those
  labels: ``fd`` (its feature-space Fréchet distance) and ``confident_fraction`` (share of samples
  it labels with confidence > 0.9), the measures the digits use.

:func:`quality_evaluator` picks what a held-out split supports; its evaluator has the
``quality(images)`` method the demo and the sweep call (:func:`pipeline.evaluation.sweep.quality_of`).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from pipeline.evaluation.domain import DomainEvaluator, frechet_distance, train_domain_evaluator

FOLDER_KEY_SEP = "__"  # pipeline.data.datasets.folder_source: "class_0/a.png" -> key "class_0__a"
CODE_DIM = 64
DOMAIN_NAME = "FD-domaincnn (Fréchet distance in a held-out-trained digit CNN's features)"
ENCODER_NAME = "FD-encoder (Fréchet distance in a held-out-trained autoencoder's 64-d code)"


def subfolder_labels(keys: Sequence[str], min_per_class: int = 2) -> list[int] | None:
    """Class ids from the first-level subfolder each folder image came from, or None.

    Keys of :func:`pipeline.data.datasets.folder_source` are relative paths with ``/`` replaced by
    ``__``: the part before the first ``__`` is the subfolder. Labels need every image in a
    subfolder, at least 2 subfolders and ``min_per_class`` images in each (fewer: the folder is not
    labelled, None). Ids follow the sorted subfolder names (``class_0`` -> 0, ``class_1`` -> 1 ...).
    """
    if min_per_class < 1:
        raise ValueError(f"min_per_class must be >= 1, got {min_per_class}")
    if not keys or any(FOLDER_KEY_SEP not in k for k in keys):
        return None
    names = [k.split(FOLDER_KEY_SEP, 1)[0] for k in keys]
    counts = Counter(names)
    if len(counts) < 2 or min(counts.values()) < min_per_class:
        return None
    ids = {name: i for i, name in enumerate(sorted(counts))}
    return [ids[n] for n in names]


class FolderAutoencoder(nn.Module):
    """A small conv autoencoder over square (B, C, size, size) images in [-1, 1], size >= 4 (padded
    with background -1 to a multiple of 4 inside); ``encode`` gives the (B, 64) code whose
    statistics the Fréchet distance compares."""

    def __init__(self, channels: int, size: int, code_dim: int = CODE_DIM):
        super().__init__()
        if size < 4:
            raise ValueError(f"image size must be >= 4, got {size}")
        side = -(-size // 4)
        self.size, self.pad = size, 4 * side - size
        self.encoder = nn.Sequential(
            nn.Conv2d(channels, 32, 3, stride=2, padding=1), nn.ReLU(),  # (B, 32, H/2, W/2)
            nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.ReLU(),  # (B, 64, H/4, W/4)
            nn.Flatten(), nn.Linear(64 * side * side, code_dim),
        )  # fmt: skip
        self.decoder = nn.Sequential(
            nn.Linear(code_dim, 64 * side * side), nn.ReLU(), nn.Unflatten(1, (64, side, side)),
            nn.ConvTranspose2d(64, 32, 4, stride=2, padding=1), nn.ReLU(),
            nn.ConvTranspose2d(32, channels, 4, stride=2, padding=1), nn.Tanh(),
        )  # fmt: skip

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(nn.functional.pad(x, (0, self.pad, 0, self.pad), value=-1.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encode(x))[..., : self.size, : self.size]


def train_autoencoder(
    x: torch.Tensor, steps: int = 1500, seed: int = 0, batch_size: int = 64, progress: bool = False
) -> tuple[FolderAutoencoder, float]:
    """Fit :class:`FolderAutoencoder` to 85% of ``x`` (N, C, H, W) in [-1, 1] by the mean squared
    reconstruction error ``||x - D(E(x))||^2`` for ``steps`` Adam steps (seeded: same ``x`` and
    ``seed``, same weights); returns the model (eval mode) and its mean squared error on the other
    15%, the check that it learnt the images rather than nothing."""
    if steps < 1 or batch_size < 1:
        raise ValueError(f"steps and batch_size must be >= 1, got {steps} and {batch_size}")
    if x.ndim != 4 or len(x) < 4:
        raise ValueError(f"need (N >= 4, C, H, W) images, got shape {tuple(x.shape)}")
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    perm = torch.randperm(len(x), generator=gen)
    n_val = max(1, len(x) * 15 // 100)
    val, tr = x[perm[:n_val]], x[perm[n_val:]]
    model = FolderAutoencoder(x.shape[1], x.shape[-1])
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    for _ in tqdm(range(steps), desc="folder encoder", disable=not progress, leave=False):
        xb = tr[torch.randint(len(tr), (min(batch_size, len(tr)),), generator=gen)]
        loss = nn.functional.mse_loss(model(xb), xb)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        val_mse = float(nn.functional.mse_loss(model(val), val))
    return model, val_mse


@torch.no_grad()
def encoder_codes(encoder: FolderAutoencoder, x: torch.Tensor) -> np.ndarray:
    """(N, C, H, W) in [-1, 1] -> (N, 64) float64 autoencoder codes, 512 images at a time."""
    return torch.cat([encoder.encode(b) for b in x.split(512)]).double().numpy()


@dataclass
class FolderEvaluator:
    """Quality of samples against a folder's held-out images: ``fd_encoder`` always, and the domain
    classifier's ``fd`` and ``confident_fraction`` when the folder has label subfolders."""

    encoder: FolderAutoencoder
    ref_mu: np.ndarray
    ref_sigma: np.ndarray
    val_mse: float
    domain: DomainEvaluator | None = None

    @property
    def val_accuracy(self) -> float | None:
        return None if self.domain is None else self.domain.val_accuracy

    def quality(self, x: torch.Tensor) -> dict[str, float]:
        """``fd_encoder`` (eq. 6 between the codes of ``x`` and of the held-out images), plus the
        domain classifier's ``fd`` and ``confident_fraction`` when labels existed."""
        codes = encoder_codes(self.encoder, x)
        out = {
            "fd_encoder": frechet_distance(
                codes.mean(0), np.cov(codes, rowvar=False), self.ref_mu, self.ref_sigma
            )
        }
        if self.domain is not None:
            out.update(self.domain.quality(x))
        return out

    def describe(self) -> dict[str, Any]:
        out: dict[str, Any] = {"encoder_val_mse": self.val_mse, "labels": self.domain is not None}
        if self.domain is not None:
            out["domain_val_accuracy"] = self.domain.val_accuracy
        return out


def train_folder_evaluator(
    x: torch.Tensor,
    labels: Sequence[int] | None = None,
    epochs: int = 30,
    seed: int = 0,
    encoder_steps: int = 1500,
    progress: bool = False,
) -> FolderEvaluator:
    """The autoencoder on the held-out images ``x`` (:func:`train_autoencoder`, ``encoder_steps``)
    and, with ``labels`` (2 classes or more), the domain classifier (``epochs``); the reference
    statistics are those of all of ``x``."""
    encoder, val_mse = train_autoencoder(x, encoder_steps, seed, progress=progress)
    domain = None
    if labels is not None and len(set(labels)) > 1:
        domain = train_domain_evaluator(x, torch.tensor(list(labels)), epochs, seed, progress)
    codes = encoder_codes(encoder, x)
    return FolderEvaluator(encoder, codes.mean(0), np.cov(codes, rowvar=False), val_mse, domain)


def quality_evaluator(
    holdout, epochs: int = 30, seed: int = 0, encoder_steps: int = 1500, progress: bool = False
) -> tuple[DomainEvaluator | FolderEvaluator | None, dict[str, Any]]:
    """The quality evaluator a held-out split supports, and the report's quality header.

    ``holdout``: an :class:`pipeline.data.imageset.ImageSet`. Labels of its own (the digits): the
    domain classifier alone, as before. Else a folder: :class:`FolderEvaluator`, with labels from
    the subfolders where there are (:func:`subfolder_labels`). Fewer than 4 images: None. The header
    holds ``_name`` (the metric the sweep chooses by first) and the evaluators' checks."""
    if holdout.labels is not None and len(set(holdout.labels)) > 1:
        ev = train_domain_evaluator(holdout.to_tensor(), torch.tensor(holdout.labels), epochs, seed, progress)  # fmt: skip
        return ev, {"_name": DOMAIN_NAME, "_domain_val_accuracy": ev.val_accuracy}
    if len(holdout) < 4:
        return None, {"_name": "none"}
    labels = subfolder_labels(holdout.keys)
    ev = train_folder_evaluator(holdout.to_tensor(), labels, epochs, seed, encoder_steps, progress)
    header: dict[str, Any] = {"_name": ENCODER_NAME, "_encoder_val_mse": ev.val_mse}
    if ev.domain is not None:
        header["_name"] = f"{DOMAIN_NAME.replace('digit CNN', 'label CNN')}; also {ENCODER_NAME}"
        header["_domain_val_accuracy"] = ev.domain.val_accuracy
        header["_labels"] = "the first-level subfolders"
    return ev, header
