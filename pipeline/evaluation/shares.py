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
the threshold. Ray-free and numpy only.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

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
    out: dict[str, float] = dict(pct)
    for key, p in pct.items():
        out[SHARE_PREFIX + key[len(PERCENTILE_PREFIX) :]] = float((s > p).mean())
    return out


def share_keys(row: Mapping) -> list[str]:
    """The threshold-free keys (percentiles and shares) a row or report section carries, in order."""
    return [k for k in row if k.startswith((PERCENTILE_PREFIX, SHARE_PREFIX))]
