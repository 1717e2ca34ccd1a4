"""The replica guard for protected pipelines: redraw any sample at or above the copy threshold.

A pipeline given ``guard=ReplicaGuard.from_store(store, dataset)`` checks every image it made
against the stored replica index of the training images (``jobs/build_index.py``; the same index,
embedding and inclusive rule as ``check_replicas`` and the jobs' guard mode). A sample at or above
the threshold is drawn again from fresh noise (attempt k of sample i seeded
``derive_seed(seed_i, "guard", k)``), up to ``max_redraws`` times; one still at or above it after
that is blacked out and flagged, as diffusers' safety checker treats what it rejects. With the exact
(flat) index nothing at or above the threshold is returned; with IVF the decision agreement with
exact search is measured at build time and recorded in the index sidecar.

FAISS (and boto3 for an S3 store) load when a guard is built, not when this module is imported.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from pipeline.data.imageset import images_from_tensor
from pipeline.integrations.protection import redraw_generators


@dataclass
class GuardResult:
    """Per sample: the nearest training similarity of the last image drawn (for a flagged sample,
    the copy that was blacked out), redraws spent, and whether it is still a copy (then blacked
    out); ``keys`` names each last image's nearest training image."""

    images: torch.Tensor
    similarity: np.ndarray
    redraws: np.ndarray
    flagged: np.ndarray
    keys: list[str]


class ReplicaGuard:
    """Nearest-training-image check over a loaded replica index (anything with
    ``search(uint8 (N, H, W, C), k=1) -> (sims, rows)`` and ``keys_of(rows)``)."""

    def __init__(self, index: Any, threshold: float = 0.97, max_redraws: int = 4):
        if not -1.0 <= threshold <= 1.0:
            raise ValueError(f"guard threshold must be in [-1, 1] (a cosine), got {threshold}")
        if max_redraws < 0:
            raise ValueError(f"max_redraws must be >= 0, got {max_redraws}")
        self.index, self.threshold, self.max_redraws = index, float(threshold), int(max_redraws)

    @classmethod
    def from_store(
        cls,
        store: str,
        dataset: str,
        threshold: float | None = None,
        max_redraws: int = 4,
        embedding: str = "centred",
        s3_endpoint: str | None = None,
    ) -> ReplicaGuard:
        """The stored, current index of ``data/<dataset>/train`` under ``store`` (a folder or
        ``s3://bucket/prefix``); a missing or stale one raises ``StaleArtifactError`` naming the
        ``build_index`` command. ``threshold`` defaults to the replica rule's (0.97)."""
        from pipeline.core.config import ReplicaConfig
        from pipeline.fanout.replica_store import load_replica_index

        cfg = ReplicaConfig(embedding=embedding)
        index = load_replica_index(store, dataset, cfg, s3_endpoint=s3_endpoint)
        return cls(index, cfg.threshold if threshold is None else threshold, max_redraws)

    def similarity(self, images: torch.Tensor) -> tuple[np.ndarray, list[str]]:
        """(B, C, H, W) images in [-1, 1] -> nearest training similarity (B,) and its key."""
        shape = tuple(getattr(self.index, "sidecar", {}).get("image_shape") or ())
        arr = images_from_tensor(images.float())
        if shape and tuple(arr.shape[1:]) != shape:
            raise ValueError(
                f"the guard's index holds {shape} (H, W, C) training images but the pipeline makes "
                f"{tuple(arr.shape[1:])}: build the index of the dataset this model was trained on"
            )
        sims, rows = self.index.search(arr, k=1)
        return np.asarray(sims, dtype=np.float32), list(self.index.keys_of(np.asarray(rows)))

    def apply(
        self,
        images: torch.Tensor,
        seeds: list[int],
        redraw: Callable[[np.ndarray, list[torch.Generator]], torch.Tensor],
    ) -> GuardResult:
        """Check ``images`` (B, C, H, W) in [-1, 1]; redraw the copies with ``redraw(positions,
        generators)`` (the pipeline's own sampling of those positions from the given noise)."""
        images = images.clone()
        sims, keys = self.similarity(images)
        redraws = np.zeros(len(images), dtype=np.int64)
        for attempt in range(1, self.max_redraws + 1):
            bad = np.flatnonzero(sims >= self.threshold)
            if not len(bad):
                break
            fresh = redraw(bad, redraw_generators([seeds[i] for i in bad], attempt))
            images[torch.as_tensor(bad)] = fresh.to(images.dtype).to(images.device)
            new_sims, new_keys = self.similarity(fresh)
            sims[bad] = new_sims
            for j, i in enumerate(bad):
                keys[i] = new_keys[j]
            redraws[bad] += 1
        flagged = sims >= self.threshold
        if flagged.any():
            images[torch.as_tensor(np.flatnonzero(flagged))] = -1.0  # black
        return GuardResult(images, sims, redraws, flagged, keys)
