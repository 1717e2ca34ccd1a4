"""Threshold-free replication shares and the sample-only membership attack (both Ray-free)."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.evaluation.mia import SampleOnlyAttack, group_masks
from pipeline.evaluation.shares import (
    as_percentiles,
    fold_share_counts,
    holdout_percentiles,
    share_counts,
    share_keys,
    shares_from_counts,
    streamed_shares,
    threshold_free_shares,
)

HOLDOUT = np.arange(1, 101) / 100.0  # 0.01, 0.02, ..., 1.00


# ------------------------------------------------------------------------------------------ shares
def test_holdout_percentiles_are_numpys_linear_percentiles():
    pct = holdout_percentiles(HOLDOUT)
    assert list(pct) == ["holdout_p95", "holdout_p99"]
    # position 0.95 * 99 = 94.05 between 0.95 and 0.96; 0.99 * 99 = 98.01 between 0.99 and 1.00
    assert pct["holdout_p95"] == pytest.approx(0.9505)
    assert pct["holdout_p99"] == pytest.approx(0.9901)
    assert holdout_percentiles(HOLDOUT, qs=(50,)) == {"holdout_p50": pytest.approx(0.505)}
    with pytest.raises(ValueError, match="in \\(0, 100\\)"):
        holdout_percentiles(HOLDOUT, qs=(100,))
    with pytest.raises(ValueError, match="no held-out"):
        holdout_percentiles([])
    with pytest.raises(ValueError, match="finite"):
        holdout_percentiles([0.5, np.nan])


def test_shares_count_samples_strictly_above_each_percentile():
    pct = holdout_percentiles(HOLDOUT)
    sims = np.array([0.5, pct["holdout_p95"], 0.96, 0.97, 0.995, 1.0])  # on p95: not above
    out = threshold_free_shares(sims, pct)
    assert out == {
        "holdout_p95": pytest.approx(0.9505),
        "holdout_p99": pytest.approx(0.9901),
        "above_holdout_p95": pytest.approx(4 / 6),
        "above_holdout_p99": pytest.approx(2 / 6),
    }
    assert share_keys({"num_samples": 6, **out}) == list(out)
    # the held-out images themselves: 5% and 1% by construction
    own = threshold_free_shares(HOLDOUT, pct)
    assert own["above_holdout_p95"] == pytest.approx(0.05)
    assert own["above_holdout_p99"] == pytest.approx(0.01)
    # a sampler that piles up just under a 0.97 threshold is caught without any threshold
    piled = np.full(100, 0.969)
    assert float((piled >= 0.97).mean()) == 0.0
    assert threshold_free_shares(piled, pct)["above_holdout_p95"] == 1.0
    with pytest.raises(ValueError, match="no sample"):
        threshold_free_shares([], pct)


def test_shares_streamed_shard_by_shard_equal_the_shares_of_all_samples():
    pct = holdout_percentiles(HOLDOUT)
    sims = np.random.default_rng(0).uniform(0.9, 1.0, 157)
    shards = np.split(sims, [10, 11, 11, 90])  # uneven, one empty
    whole = threshold_free_shares(sims, pct)
    streamed = streamed_shares(iter(shards), pct)
    assert streamed == {"num_samples": 157, **{k: v for k, v in whole.items() if "above" in k}}
    counts = [share_counts(s, pct) for s in shards]
    assert counts[2] == {"num_samples": 0, "above_holdout_p95": 0, "above_holdout_p99": 0}
    total = fold_share_counts(counts)
    assert total["above_holdout_p95"] == int((sims > pct["holdout_p95"]).sum())
    assert {"num_samples": total["num_samples"], **shares_from_counts(total)} == streamed
    with pytest.raises(ValueError, match="no sample similarities"):
        streamed_shares([], pct)
    with pytest.raises(ValueError, match="finite"):
        share_counts([np.inf], pct)
    with pytest.raises(ValueError, match="share counts with keys"):
        fold_share_counts([counts[0], {"num_samples": 1}])


def test_percentiles_given_as_similarities_or_as_a_dict_agree():
    sims = np.array([0.1, 0.99, 0.999])
    pct = holdout_percentiles(HOLDOUT)
    assert as_percentiles(HOLDOUT) == pct
    assert as_percentiles({**pct, "num_holdout": 100}) == pct  # other keys dropped
    assert threshold_free_shares(sims, HOLDOUT) == threshold_free_shares(sims, pct)
    with pytest.raises(ValueError, match="holdout_p"):
        as_percentiles({"num_holdout": 100})


# -------------------------------------------------------------------------- the sample-only attack
def _images(rng, n, hw=6):
    return rng.integers(0, 256, (n, hw, hw, 1), dtype=np.uint8)


def test_attack_auc_is_one_when_the_samples_are_the_members():
    rng = np.random.default_rng(0)
    members, nonmembers = _images(rng, 20), _images(rng, 30)
    mean = np.concatenate([members, nonmembers]).reshape(50, -1).mean(0) / 255.0
    attack = SampleOnlyAttack(members, nonmembers, mean)
    assert attack.aucs(members.copy()) == {"mia_auc": 1.0}
    sm, sn = attack.scores(members)
    np.testing.assert_allclose(sm, 1.0, atol=1e-5)
    assert sn.max() < 0.9
    # samples that are the non-members instead: the attack is perfectly wrong
    assert attack.aucs(nonmembers)["mia_auc"] == 0.0
    assert attack.describe() == {
        "attack": "nearest generated sample (cosine, centred pixels)",
        "num_members": 20,
        "num_nonmembers": 30,
        "groups": {},
    }


def test_attack_is_near_chance_when_the_samples_are_unrelated():
    rng = np.random.default_rng(1)
    members, nonmembers, fresh = _images(rng, 200), _images(rng, 200), _images(rng, 64)
    auc = SampleOnlyAttack(members, nonmembers, None).aucs(fresh)["mia_auc"]
    assert 0.4 < auc < 0.6  # standard error about 0.03 at 200 / 200
    # one copied member lifts the AUC by about 1/200 of the way to 1, no more
    copied = np.concatenate([fresh, members[:1]])
    lifted = SampleOnlyAttack(members, nonmembers, None).aucs(copied)["mia_auc"]
    assert auc < lifted <= auc + 1 / 200 + 1e-9


def test_attack_scores_each_member_group_against_all_non_members():
    rng = np.random.default_rng(2)
    members, nonmembers, fresh = _images(rng, 200), _images(rng, 200), _images(rng, 30)
    keys = [f"k{i:03d}" for i in range(200)]
    groups = {
        "duplicated": {f"k{i:03d}" for i in range(10)} | {"not-a-member"},
        "unique": {f"k{i:03d}" for i in range(10, 200)},
        "none": set(),
    }
    masks = group_masks(keys, groups)
    assert [int(m.sum()) for m in masks.values()] == [10, 190, 0]
    assert masks["duplicated"][:10].all() and not masks["duplicated"][10:].any()
    attack = SampleOnlyAttack(members, nonmembers, None, masks)
    # the model copied the duplicated members only
    out = attack.aucs(np.concatenate([fresh, members[:10]]))
    assert set(out) == {"mia_auc", "mia_auc_duplicated", "mia_auc_unique"}  # empty group left out
    assert out["mia_auc_duplicated"] == 1.0
    assert 0.4 < out["mia_auc_unique"] < 0.6  # standard error about 0.03
    # overall = the members-weighted mix of the groups (they partition the members)
    assert out["mia_auc"] == pytest.approx(
        (10 * out["mia_auc_duplicated"] + 190 * out["mia_auc_unique"]) / 200
    )
    assert attack.describe()["groups"] == {"duplicated": 10, "unique": 190, "none": 0}
    with pytest.raises(ValueError, match="masks 3 members"):
        SampleOnlyAttack(members, nonmembers, None, {"bad": np.ones(3, bool)})
    with pytest.raises(ValueError, match="need members and non-members"):
        SampleOnlyAttack(members[:0], nonmembers, None)
    with pytest.raises(ValueError, match="no generated samples"):
        attack.aucs(fresh[:0])
