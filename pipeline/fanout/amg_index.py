"""AMG's nearest-training-image search over the stored replica index, for the sampling actors.

The maths of Anti-Memorization Guidance are Ray-free in :mod:`pipeline.core.amg`; this module binds
its ``nearest(x0) -> (similarities, neighbours)`` to the stored index that guard mode and the replica
check use (:class:`pipeline.fanout.replica_store.ReplicaIndex`: built once per dataset, loaded by
every actor, never built here). Each step's predicted images are quantised to uint8 and searched
exactly as a sample is (so "similarity >= threshold" means what it means in the replica check), and
the neighbours' rows are read from the index's stored rows (cached in memory, by row).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import numpy as np
import torch

from pipeline.core.amg import amg_guidance
from pipeline.core.config import ConfigError, ReplicaConfig, SamplerConfig, from_dict
from pipeline.core.guidance import GuidanceFn
from pipeline.data.imageset import images_from_tensor, images_to_tensor
from pipeline.data.storage import Store
from pipeline.fanout.replica_store import ReplicaIndex, open_replica_index
from pipeline.fanout.scoring import resolve_ref

CACHE_ROWS = 4096  # neighbour rows kept in memory per actor (uint8: 4096 x 32x32x3 is 12 MiB)


class IndexNearest:
    """``nearest(x0)`` for :func:`pipeline.core.amg.amg_guidance` over a loaded replica index.

    ``x0`` (B, C, H, W) in [-1, 1] -> the index's nearest similarity (B,) float32 and the nearest
    training images (B, C, H, W) in [-1, 1]. A query the index finds no candidate for (IVF) gets
    similarity -inf (never guided) and a placeholder neighbour. Pixel embeddings only: the guidance
    differentiates the embedding in torch, which a TorchScript feature module is not wired for."""

    def __init__(self, index: ReplicaIndex, cache_rows: int = CACHE_ROWS):
        if index.sidecar.get("module") is not None:
            raise ConfigError(
                "sampler 'amg' needs a pixel embedding ('centred' or 'raw') for its gradient; "
                "this index was built with a feature module"
            )
        self.index = index
        self.cache_rows = cache_rows
        self._rows: OrderedDict[int, np.ndarray] = OrderedDict()

    def centre(self) -> torch.Tensor:
        """The embedding's centre in [-1, 1]: the stored mean image (C, H, W) for centred pixels,
        -1 for raw pixels (cosine of pixels in [0, 1]); see :mod:`pipeline.core.amg`."""
        if self.index.mean is None:
            return torch.tensor(-1.0)
        h, w, c = self.index.shape
        mean = torch.from_numpy(np.asarray(self.index.mean, np.float32).reshape(h, w, c))
        return mean.permute(2, 0, 1) * 2.0 - 1.0

    def rows(self, idx: np.ndarray) -> np.ndarray:
        """The uint8 training images (n, H, W, C) at global rows ``idx``, through the row cache."""
        missing = sorted({int(i) for i in idx} - set(self._rows))
        if missing:
            for i, row in zip(missing, self.index.rows(np.asarray(missing)), strict=True):
                self._rows[i] = row
        for i in idx:
            self._rows.move_to_end(int(i))
        out = np.stack([self._rows[int(i)] for i in idx])
        while len(self._rows) > self.cache_rows:
            self._rows.popitem(last=False)
        return out

    def __call__(self, x0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        sims, rows = self.index.search(images_from_tensor(x0), k=1)  # (B,), (B,)
        sims = np.where(rows >= 0, sims, -np.inf).astype(np.float32)
        neighbours = images_to_tensor(self.rows(np.maximum(rows, 0)))
        return torch.from_numpy(sims), neighbours


def index_guidance(index: ReplicaIndex, cfg: SamplerConfig) -> GuidanceFn:
    """AMG's dissimilarity guidance over a loaded index, with ``cfg.amg_threshold``/``amg_scale``."""
    nearest = IndexNearest(index)
    return amg_guidance(nearest, nearest.centre(), cfg.amg_threshold, cfg.amg_scale)


def open_guard_index(store: Store, guard_spec: Any, device: str) -> ReplicaIndex:
    """The stored training index a sampling actor searches (guard mode and AMG): loaded from the
    sidecar the driver checked (:func:`pipeline.fanout.replica_store.index_spec`), never built."""
    spec = resolve_ref(guard_spec)
    if spec is None:
        raise ValueError("guard mode and sampler 'amg' need the stored training index (guard_spec)")
    rcfg = from_dict(ReplicaConfig, spec["replicas"])
    rcfg.use_gpu = rcfg.use_gpu or device == "cuda"
    return open_replica_index(store, spec["sidecar"], rcfg)
