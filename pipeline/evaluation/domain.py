"""Sample quality without downloads: a domain classifier's Fréchet distance and confident fraction.

For data where Inception features mean nothing (8x8 digits upsampled), a small CNN is trained on the
held-out real images with their true class labels. Its penultimate features give a Fréchet distance
(Heusel et al. 2017, eq. 6, computed in this feature space: "FD-digitcnn") and its softmax gives the
share of samples it recognises with confidence > 0.9.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm


class DomainClassifier(nn.Module):
    """A small CNN over (B, C, H, W) images in [-1, 1]; ``features`` is its 64-d penultimate layer."""

    def __init__(self, channels: int, num_classes: int, size: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(channels, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(64 * (size // 4) ** 2, 64), nn.ReLU(),
        )  # fmt: skip
        self.head = nn.Linear(64, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


@dataclass
class DomainEvaluator:
    """A trained domain classifier plus the reference feature statistics of real held-out images."""

    model: DomainClassifier
    ref_mu: np.ndarray
    ref_sigma: np.ndarray
    val_accuracy: float

    @torch.no_grad()
    def features(self, x: torch.Tensor) -> np.ndarray:
        return torch.cat([self.model.features(b) for b in x.split(512)]).double().numpy()

    @torch.no_grad()
    def quality(self, x: torch.Tensor) -> dict[str, float]:
        """``fd`` (Fréchet distance to the held-out reference) and ``confident_fraction`` (> 0.9)."""
        feats = self.features(x)
        mu, sigma = feats.mean(0), np.cov(feats, rowvar=False)
        probs = torch.cat([self.model(b).softmax(-1) for b in x.split(512)])
        return {
            "fd": frechet_distance(mu, sigma, self.ref_mu, self.ref_sigma),
            "confident_fraction": float((probs.max(-1).values > 0.9).float().mean()),
        }


def frechet_distance(mu1: np.ndarray, s1: np.ndarray, mu2: np.ndarray, s2: np.ndarray) -> float:
    """``||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^{1/2})`` (Heusel et al. 2017, eq. 6).

    ``Tr (S1 S2)^{1/2}`` is the sum of the square roots of the eigenvalues of ``S1 S2``, which are those
    of the symmetric PSD matrix ``R S2 R`` with ``R = S1^{1/2}``. Two symmetric eigenproblems give it
    exactly, also for the singular covariances that features stuck at 0 (dead ReLUs) or fewer samples
    than dimensions produce, where a general matrix square root is ill-conditioned.
    """
    w, v = np.linalg.eigh(s1)
    root = (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T
    eig = np.linalg.eigvalsh(root @ s2 @ root)
    tr_sqrt = np.sqrt(np.clip(eig, 0.0, None)).sum()
    diff = mu1 - mu2
    return float(max(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * tr_sqrt, 0.0))


def train_domain_evaluator(
    x: torch.Tensor, labels: torch.Tensor, epochs: int = 30, seed: int = 0, progress: bool = False
) -> DomainEvaluator:
    """Train on 85% of the held-out images (labels known), validate on the rest; reference = all."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    n = len(x)
    perm = torch.randperm(n, generator=gen)
    n_val = max(1, n * 15 // 100)
    val, tr = perm[:n_val], perm[n_val:]
    model = DomainClassifier(x.shape[1], int(labels.max()) + 1, x.shape[-1])
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    for _ in tqdm(range(epochs), desc="domain classifier", disable=not progress, leave=False):
        model.train()
        for idx in tr[torch.randperm(len(tr), generator=gen)].split(64):
            # light augmentation: 1-pixel shifts, so features generalise to samples
            shift = tuple(int(v) for v in torch.randint(-1, 2, (2,), generator=gen))
            xb = torch.roll(x[idx], shifts=shift, dims=(2, 3))
            loss = nn.functional.cross_entropy(model(xb), labels[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        acc = float((model(x[val]).argmax(-1) == labels[val]).float().mean())
        feats = model.features(x).double().numpy()
    return DomainEvaluator(model, feats.mean(0), np.cov(feats, rowvar=False), acc)
