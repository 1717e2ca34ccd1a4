"""Per-shard replica summaries and their fold (pipeline.fanout.replica_summary): Ray-free."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from pipeline.evaluation.shares import holdout_percentiles, threshold_free_shares
from pipeline.fanout.index import replica_stats
from pipeline.fanout.replica_summary import (
    HIST_BINS,
    ShardSummary,
    fold,
    hist_counts,
    hist_edges,
    spread_picks,
    summarise,
)

THRESHOLD = 0.9


def _rows(n: int, seed: int = 0):
    """n scored rows: similarities in [-0.2, 1] (float32, with ties and exact copies at 1.0)."""
    rng = np.random.default_rng(seed)
    sims = rng.uniform(-0.2, 1.0, n).astype(np.float32)
    sims[rng.choice(n, n // 20, replace=False)] = 1.0  # ties at the top
    sims[rng.choice(n, n // 20, replace=False)] = np.float32(0.5)
    keys = [f"s-{i:05d}" for i in range(n)]
    nn_rows = rng.integers(0, 1000, n)
    return keys, sims, nn_rows, [f"t-{r:04d}" for r in nn_rows]


def test_histogram_bins_are_fixed_and_clip_the_ends():
    edges = hist_edges()
    assert len(edges) == HIST_BINS + 1 and edges[0] == -1.0 and edges[-1] == 1.0
    counts = hist_counts([-1.5, -1.0, 0.0, 0.0012, 0.9, 1.0, 1.0000001])
    assert counts.sum() == 7 and counts.dtype == np.int64
    assert counts[0] == 2  # -1.5 clipped, -1.0
    assert counts[HIST_BINS // 2] == 2  # 0.0 and 0.0012 share the bin [0, 0.005)
    assert counts[HIST_BINS - 1] == 2  # 1.0 and the rounding above it
    assert counts[int((0.9 + 1) / 2 * HIST_BINS)] == 1
    # agrees with numpy's histogram on values inside the range
    x = np.random.default_rng(1).uniform(-1, 1, 1000)
    np.testing.assert_array_equal(hist_counts(x), np.histogram(x, edges)[0])


def test_fold_of_shard_summaries_equals_the_summary_of_all_rows():
    keys, sims, nn_rows, nn_keys = _rows(1000)
    pct = holdout_percentiles(np.random.default_rng(2).uniform(0.2, 0.95, 300))
    bounds = [0, 7, 300, 301, 640, 1000]  # uneven shards, one of a single row
    shards = [f"shard-{i:06d}.tar" for i in range(len(bounds) - 1)]
    names = np.repeat(shards, np.diff(bounds)).tolist()
    parts = [
        summarise(shards[i], keys[a:b], sims[a:b], nn_rows[a:b], nn_keys[a:b], THRESHOLD, pct, 16)
        for i, (a, b) in enumerate(itertools.pairwise(bounds))
    ]
    whole = summarise(names, keys, sims, nn_rows, nn_keys, THRESHOLD, pct, 16)
    total = fold(parts, THRESHOLD, pct, 16)
    assert total.num_shards == 5 and total.num_samples == whole.num_samples == 1000
    assert total.num_replicates == whole.num_replicates == int((sims >= THRESHOLD).sum())
    assert total.hist == whole.hist and sum(total.hist) == 1000
    assert total.above == whole.above
    assert total.closest == whole.closest and len(total.closest) == 16
    assert total.sum_similarity == pytest.approx(whole.sum_similarity, rel=1e-12)
    # the same numbers as the in-memory functions over every similarity
    s64 = sims.astype(np.float64)
    assert total.stats()["replication_rate"] == replica_stats(s64, THRESHOLD).replication_rate
    assert total.stats()["mean_nn_similarity"] == pytest.approx(float(s64.mean()), rel=1e-12)
    assert total.shares() == threshold_free_shares(s64, pct)
    # the k closest: by similarity, then shard, then key; the exact copies (1.0) come first
    top = total.closest
    assert [p["similarity"] for p in top] == [1.0] * 16
    assert [(p["shard"], p["key"]) for p in top] == sorted((p["shard"], p["key"]) for p in top)
    i = keys.index(top[0]["key"])
    assert top[0]["nn_row"] == int(nn_rows[i]) and top[0]["nn_key"] == nn_keys[i]
    assert top[0]["shard"] == names[i]
    # order-free: folded in reverse, the result is the same
    back = fold(parts[::-1], THRESHOLD, pct, 16)
    assert (back.closest, back.hist, back.above) == (total.closest, total.hist, total.above)


def test_summaries_round_trip_through_json_and_refuse_bad_text():
    keys, sims, nn_rows, nn_keys = _rows(50)
    s = summarise("shard-000003.tar", keys, sims, nn_rows, nn_keys, THRESHOLD, {}, 4, {"a": 1})
    s.shard_sha256, s.scored_id = "ab" * 32, "x1"
    back = ShardSummary.from_json(s.to_json())
    assert back == s and len(s.to_json()) < 4000  # bounded: 400 bins and 4 pairs
    with pytest.raises(ValueError, match="not a shard summary"):
        ShardSummary.from_json('{"shard": "x"}')
    bad = s.to_json().replace('"num_samples": 50', '"num_samples": 51')
    with pytest.raises(ValueError, match="histogram does not match its count"):
        ShardSummary.from_json(bad)


def test_fold_refuses_mixed_inputs_repeats_and_other_percentiles():
    keys, sims, nn_rows, nn_keys = _rows(20)
    pct = {"holdout_p99": 0.8}

    def part(name, inputs, p=pct):
        return summarise(name, keys, sims, nn_rows, nn_keys, THRESHOLD, p, 3, inputs)

    a, b = part("a.tar", {"index_build": "1"}), part("b.tar", {"index_build": "2"})
    with pytest.raises(ValueError, match=r"'b.tar' was scored with other inputs \(index_build\)"):
        fold([a, b], THRESHOLD, pct, 3)
    with pytest.raises(ValueError, match=r"'a\.tar' summarised twice"):
        fold([a, a], THRESHOLD, pct, 3)
    with pytest.raises(ValueError, match=r"counts above \[\], not \['holdout_p99'\]"):
        fold([part("c.tar", {"index_build": "1"}, {})], THRESHOLD, pct, 3)
    with pytest.raises(ValueError, match=r"k .* must be >= 1"):
        summarise("a.tar", keys, sims, nn_rows, nn_keys, THRESHOLD, pct, 0)
    with pytest.raises(ValueError, match="3 keys, 20 similarities"):
        summarise("a.tar", keys[:3], sims, nn_rows, nn_keys, THRESHOLD, pct, 2)
    empty = fold([], THRESHOLD, pct, 3)
    assert empty.num_samples == 0 and empty.replication_rate == 0.0 and empty.closest == []


@pytest.mark.parametrize(
    "counts, q",
    [([20, 20], 25), ([20, 20], 40), ([1, 50, 0, 3], 30), ([5] * 100, 7), ([3, 0, 2], 99)],
)
def test_spread_picks_are_bounded_distinct_and_fill_the_quota(counts, q):
    picks = spread_picks(counts, q)
    assert sum(len(rows) for _, rows in picks) == min(q, sum(counts))
    assert len(picks) <= q and [i for i, _ in picks] == sorted({i for i, _ in picks})
    for i, rows in picks:
        assert rows == sorted(set(rows)) and rows[0] >= 0 and rows[-1] < counts[i]
    assert spread_picks(counts, q) == picks  # deterministic


def test_spread_picks_spread_over_shards():
    picks = spread_picks([5] * 100, 7)
    assert [i for i, _ in picks] == [0, 16, 33, 49, 66, 82, 99]
    assert all(len(rows) == 1 for _, rows in picks)
    assert spread_picks([0, 0], 5) == []
