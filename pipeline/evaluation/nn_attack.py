"""Attack 3 on a run's stored samples: each member's and non-member's similarity to its nearest
generated sample (:func:`nn_attack`), the samples streamed shard by shard (Ray-free)."""

from __future__ import annotations

from collections.abc import Collection, Mapping

import numpy as np

from pipeline.data.subsets import iter_shards
from pipeline.evaluation.inputs import sampler_folders
from pipeline.evaluation.mia import (
    NearestSamples,
    group_masks,
    permutation_test,
    roc_auc,
    roc_curve,
    tpr_at_fpr,
)

MemberGroups = Mapping[str, Collection[str]]  # group name -> member keys (a superset is fine)
SEARCH_CHUNK = 4096


def nn_attack(
    store,
    run: str,
    members,
    nonmembers,
    train_mean: np.ndarray,
    cfg,
    groups: MemberGroups | None = None,
    chunk: int = SEARCH_CHUNK,
) -> dict:
    """Attack 3: similarity to the nearest generated sample (pixels centred on ``train_mean``, the
    training split's flattened mean image in [0, 1]), per sampler whose shards exist under
    ``samples/<run>/``; score = similarity (higher = member). The samples stream shard by shard
    through an exact search of ``chunk`` samples at a time
    (:class:`pipeline.evaluation.mia.NearestSamples`): memory is (members + non-members) x chunk.

    ``groups`` (name -> member keys, e.g. ``duplicated`` / ``unique``) adds ``"groups": {name:
    {"auc", "num_members", "member_mean"}}`` per sampler: that group's members against all the
    non-members (``auc`` and ``member_mean`` None for a group without members)."""
    masks = group_masks(members.keys, groups)
    queries = np.concatenate([members.images, nonmembers.images])
    out = {}
    for name, folder in sampler_folders(store, run).items():
        nearest = NearestSamples(queries, train_mean, chunk)
        for shard in iter_shards(store, folder):  # one shard at a time, `chunk` samples per search
            nearest.update(shard.images)
        scores = nearest.scores()
        sm, sn = scores[: len(members)], scores[len(members) :]
        fpr, tpr = roc_curve(sm, sn)
        out[name] = {
            "auc": roc_auc(sm, sn), "tpr_at_fpr": tpr_at_fpr(sm, sn, 0.01), "fpr": 0.01,
            "p_value": permutation_test(sm, sn, cfg.num_permutations, cfg.seed),
            "member_mean": float(sm.mean()), "nonmember_mean": float(sn.mean()),
            "num_members": len(sm), "num_nonmembers": len(sn), "num_generated": nearest.count,
            "roc": {"fpr": fpr.tolist(), "tpr": tpr.tolist()},
        }  # fmt: skip
        if masks:
            out[name]["groups"] = {
                g: {"auc": roc_auc(sm[m], sn) if m.any() else None, "num_members": int(m.sum()),
                    "member_mean": float(sm[m].mean()) if m.any() else None}
                for g, m in masks.items()
            }  # fmt: skip
    return out
