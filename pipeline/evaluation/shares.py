"""Threshold-free replication: how many samples sit closer to the training set than real images do.

One replica threshold (cosine >= 0.97) can be gamed: a sampler that pushes its copies just under it
scores a low replication rate while still copying. The reference here is not a fixed number but the
held-out real images themselves: their nearest-training-image similarities (same embedding, same
index) give the 95th and 99th percentiles, and a sample counts when its own nearest-neighbour
similarity is strictly above them.

By construction 5% of held-out real images lie above the held-out p95 and 1% above the p99 (up to
ties and interpolation on a finite held-out set), so a sampler that generates like the data
distribution, never closer to the training images than unseen real images are, scores about 5% and
1%; shares well above those mean samples closer to training images than real data ever is, whatever
the threshold. The shares fold from per-shard counts (:func:`share_counts`), so a sampler's folder is
never held at once. Ray-free and numpy only.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

DEFAULT_QS = (95, 99)
PERCENTILE_PREFIX = "holdout_p"
SHARE_PREFIX = "above_holdout_p"


def _flat(values, what: str) -> np.ndarray:
    s = np.asarray(values, dtype=np.float64).reshape(-1)
    if s.size == 0:
        raise ValueError(f"no {what} similarities given")
    if not np.all(np.isfinite(s)):
        raise ValueError(f"{what} similarities must be finite")
    return s


def holdout_percentiles(holdout_sims, qs: Sequence[float] = DEFAULT_QS) -> dict[str, float]:
    """``{"holdout_p95": .., "holdout_p99": ..}``: percentiles (numpy's linear interpolation) of the
    held-out real images' nearest-training-image similarities; 5% / 1% of them lie above, by
    construction. Each ``q`` must be in (0, 100)."""
    s = _flat(holdout_sims, "held-out")
    out = {}
    for q in qs:
        if not 0.0 < float(q) < 100.0:
            raise ValueError(f"percentiles must be in (0, 100), got {q}")
        out[f"{PERCENTILE_PREFIX}{float(q):g}"] = float(np.percentile(s, float(q)))
    return out


def as_percentiles(holdout) -> dict[str, float]:
    """The held-out percentiles from either the held-out similarities themselves (any array-like)
    or an already computed :func:`holdout_percentiles` dict (other keys are dropped)."""
    if isinstance(holdout, Mapping):
        pct = {k: float(v) for k, v in holdout.items() if k.startswith(PERCENTILE_PREFIX)}
        if not pct:
            raise ValueError(f"no '{PERCENTILE_PREFIX}<q>' keys in {sorted(holdout)}")
        return pct
    return holdout_percentiles(holdout)


def threshold_free_shares(nn_sims, percentiles: Mapping[str, float]) -> dict[str, float]:
    """``{"holdout_p95", "holdout_p99", "above_holdout_p95", "above_holdout_p99"}``: the held-out
    percentiles and the share of samples whose nearest-training-image similarity is strictly above
    each (``#{s > p} / N``). Held-out real images score about 0.05 and 0.01 by construction.

    ``percentiles``: :func:`holdout_percentiles`' dict (any ``holdout_p<q>`` keys)."""
    s = _flat(nn_sims, "sample")
    pct = as_percentiles(percentiles)
    return {**pct, **shares_from_counts(share_counts(s, pct))}


def share_counts(nn_sims, percentiles: Mapping[str, float]) -> dict[str, int]:
    """One shard's part of the shares: ``{"num_samples": N, "above_holdout_p95": #{s > p95}, ...}``
    (integers; fold shards with :func:`fold_share_counts`, then :func:`shares_from_counts`). An empty
    shard counts zeros."""
    s = np.asarray(nn_sims, dtype=np.float64).reshape(-1)
    if not np.all(np.isfinite(s)):
        raise ValueError("sample similarities must be finite")
    out = {"num_samples": int(s.size)}
    for key, p in as_percentiles(percentiles).items():
        out[SHARE_PREFIX + key[len(PERCENTILE_PREFIX) :]] = int((s > p).sum())
    return out


def fold_share_counts(parts: Iterable[Mapping[str, int]]) -> dict[str, int]:
    """Per-shard :func:`share_counts` summed key by key (every part must have the same keys)."""
    total: dict[str, int] = {}
    for part in parts:
        if total and set(part) != set(total):
            raise ValueError(f"share counts with keys {sorted(part)} and {sorted(total)}")
        for key, value in part.items():
            total[key] = total.get(key, 0) + int(value)
    return total


def shares_from_counts(counts: Mapping[str, int]) -> dict[str, float]:
    """``{"above_holdout_p<q>": count / num_samples}`` from (folded) :func:`share_counts`."""
    n = int(counts.get("num_samples", 0))
    if n == 0:
        raise ValueError("no sample similarities given")
    return {k: int(v) / n for k, v in counts.items() if k.startswith(SHARE_PREFIX)}


def streamed_shares(sims_per_shard: Iterable, percentiles: Mapping[str, float]) -> dict[str, Any]:
    """``{"num_samples", "above_holdout_p<q>": ...}`` of a sampler whose nearest-training similarities
    arrive one shard at a time (an iterable of arrays): per-shard counts folded, equal to
    :func:`threshold_free_shares` on all of them at once."""
    counts = fold_share_counts(share_counts(sims, percentiles) for sims in sims_per_shard)
    return {"num_samples": counts.get("num_samples", 0), **shares_from_counts(counts)}


def share_keys(row: Mapping) -> list[str]:
    """The threshold-free keys (percentiles and shares) a row or report section carries, in order."""
    return [k for k in row if k.startswith((PERCENTILE_PREFIX, SHARE_PREFIX))]
