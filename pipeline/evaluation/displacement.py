"""How much CPSample moves a sample, near the training set and away from it.

DDIM and CPSample draw from the same seeds, so sample ``i`` of each starts from the same noise. The
displacement of a pair is the mean absolute pixel change, ``d_i = mean |x_cps_i - x_ddim_i| / 255``.
Pairs are split by where the unguided sample landed: *near* when the DDIM sample's nearest-training-image
similarity is at or above the replica threshold (a copy CPSample should move), *far* when it is below the
held-out reference (the ``far_below`` similarity, e.g. the median nearest-neighbour similarity of
never-seen real images: a sample as novel as real new data). The scale of "a different picture" is the
displacement between unrelated DDIM samples (a fixed derangement of the same set).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from pipeline.data.imageset import DataError, ImageSet


def pair_by_seed(ddim: ImageSet, guided: ImageSet) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """The two samplers' images in matching order: keys ``<sampler>-<shard>-<index>`` share the
    ``<shard>-<index>`` suffix (and so the seed) across samplers."""

    def by_suffix(s: ImageSet) -> dict[str, int]:
        return {k.split("-", 1)[1]: i for i, k in enumerate(s.keys)}

    a, b = by_suffix(ddim), by_suffix(guided)
    common = sorted(set(a) & set(b))
    if not common:
        raise DataError("the two sample sets share no seeds (keys <sampler>-<shard>-<index>)")
    return ddim.images[[a[k] for k in common]], guided.images[[b[k] for k in common]], common


def pixel_change(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Per-pair mean absolute pixel change in [0, 1]: ``mean |x - y| / 255`` over pixels and channels."""
    diff = np.abs(x.astype(np.float32) - y.astype(np.float32)) / 255.0
    return diff.reshape(len(diff), -1).mean(axis=1)


def _summary(d: np.ndarray) -> dict[str, Any]:
    if d.size == 0:
        return {"count": 0}
    q = np.quantile(d, [0.5, 0.9])
    return {
        "count": int(d.size),
        "mean": float(d.mean()),
        "median": float(q[0]),
        "p90": float(q[1]),
    }


def displacement(
    ddim: np.ndarray,
    guided: np.ndarray,
    ddim_nn_sims: np.ndarray,
    threshold: float,
    far_below: float,
) -> dict[str, Any]:
    """Displacement of same-seed pairs, overall and split into near (copies) and far (novel) pairs.

    ``relative`` divides each mean by the unrelated-pair displacement: 0 = untouched, ~1 = as different
    as another sample entirely."""
    if len(ddim) != len(guided) or len(ddim) != len(ddim_nn_sims) or len(ddim) < 2:
        raise DataError(
            f"need >= 2 aligned pairs, got {len(ddim)} DDIM, {len(guided)} guided, "
            f"{len(ddim_nn_sims)} similarities"
        )
    d = pixel_change(ddim, guided)
    unrelated = pixel_change(ddim, np.roll(ddim, 1, axis=0))
    scale = float(unrelated.mean())
    sims = np.asarray(ddim_nn_sims, dtype=np.float64)
    out: dict[str, Any] = {
        "threshold": float(threshold),
        "far_below": float(far_below),
        "unrelated_pairs": _summary(unrelated),
        "all": _summary(d),
        "near": _summary(d[sims >= threshold]),
        "far": _summary(d[sims < far_below]),
    }
    for part in ("all", "near", "far"):
        if out[part]["count"]:
            out[part]["relative"] = out[part]["mean"] / scale if scale > 0 else float("nan")
    return out
