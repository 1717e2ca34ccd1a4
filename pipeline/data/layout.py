"""Where things live under a store root (the storage contract, DESIGN.md section 4)."""

from __future__ import annotations


def data_folder(dataset: str, split: str | None = None) -> str:
    """``data/<dataset>`` (manifest.json) or ``data/<dataset>/<split>`` (its shards)."""
    return f"data/{dataset}" if split is None else f"data/{dataset}/{split}"


def samples_folder(run: str, sampler: str) -> str:
    """``samples/<run>/<sampler>``: the sample shards of one sampler (``ddim`` or ``cpsample``)."""
    return f"samples/{run}/{sampler}"
