"""Per-shard replica-check summaries and their fold (Ray-free, numpy only).

A scoring actor scores one sample shard and returns only a :class:`ShardSummary`: its sample
count, replicate count (``s >= threshold``), the sum of nearest-neighbour similarities, a histogram
of ``s`` on fixed bins (:data:`HIST_BINS` over [-1, 1]), the counts strictly above each held-out
percentile (``s > p``, :mod:`pipeline.evaluation.shares`) and its ``k`` closest pairs. Its size
does not depend on the shard's row count. :func:`fold` joins summaries into a :class:`ReplicaSummary`; every count
of the fold equals the count over all rows at once (the histogram's bins are fixed, the pairs are
ordered by similarity, then shard, then key), and the mean differs from it only by float rounding.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

HIST_BINS = 400  # fixed bins of nn_similarity over [HIST_LO, HIST_HI]: width 0.005
HIST_LO, HIST_HI = -1.0, 1.0
PAIR_FIELDS = ("shard", "key", "nn_row", "nn_key", "similarity")


def hist_edges() -> np.ndarray:
    """The :data:`HIST_BINS` + 1 fixed bin edges over [-1, 1]."""
    return np.linspace(HIST_LO, HIST_HI, HIST_BINS + 1)


def hist_counts(sims) -> np.ndarray:
    """(HIST_BINS,) int64 counts of ``sims`` on the fixed bins: bin ``floor((s + 1) / 0.005)``,
    values outside [-1, 1] (float rounding of cosines) clipped into the end bins."""
    s = np.asarray(sims, dtype=np.float64).reshape(-1)
    idx = np.floor((s - HIST_LO) / (HIST_HI - HIST_LO) * HIST_BINS).astype(np.int64)
    return np.bincount(np.clip(idx, 0, HIST_BINS - 1), minlength=HIST_BINS)


def _order(pairs: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Pairs by similarity (highest first), then shard, then key: a total order, so a fold picks
    the same ``k`` pairs as one pass over every row."""
    return sorted(pairs, key=lambda p: (-p["similarity"], p["shard"], p["key"]))


@dataclass
class ShardSummary:
    """What one scored sample shard sends to the driver (bounded: no per-sample rows).

    ``inputs``: what the scores depend on (index build, threshold, percentiles, search settings,
    the samples' fingerprint); a rerun with other inputs rescores the shard. ``shard_sha256``: the
    shard's bytes as the scorer left them (annotated). ``scored_id`` changes each time the shard is
    scored (a resumed check keeps it for the shards it did not rescore)."""

    shard: str
    inputs: dict[str, Any]
    num_samples: int
    num_replicates: int
    sum_similarity: float
    hist: list[int]
    above: dict[str, int]  # {"holdout_p95": #{s > p95}, ...}
    closest: list[dict[str, Any]]  # at most k, fields PAIR_FIELDS, ordered by _order
    shard_sha256: str = ""
    scored_id: str = ""

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str | bytes) -> ShardSummary:
        """Parse a stored summary; a malformed one raises ``ValueError`` (the shard is rescored)."""
        try:
            data = json.loads(text)
            out = cls(**{f.name: data[f.name] for f in dataclasses.fields(cls) if f.name in data})
        except (TypeError, KeyError, AttributeError) as exc:
            raise ValueError(f"not a shard summary: {exc}") from None
        if len(out.hist) != HIST_BINS or sum(out.hist) != out.num_samples:
            raise ValueError(f"shard summary of {out.shard!r}: histogram does not match its count")
        return out


def summarise(
    shard: str | Sequence[str],
    keys: Sequence[str],
    sims,
    nn_rows,
    nn_keys: Sequence[str],
    threshold: float,
    percentiles: Mapping[str, float],
    k: int,
    inputs: dict[str, Any] | None = None,
) -> ShardSummary:
    """The summary of scored rows: ``sims`` (n,) nearest-training similarities, ``nn_rows`` (n,) the
    neighbours' rows in the index, ``nn_keys`` their keys; ``shard`` names the rows' shard (or one
    name per row). Counts: replicates ``s >= threshold``; ``above[p]``: ``#{s > percentiles[p]}``.
    The ``k`` closest pairs are ordered by similarity, then shard, then key."""
    s = np.asarray(sims, dtype=np.float32).reshape(-1).astype(np.float64)
    n = len(s)
    if not (len(keys) == len(nn_keys) == n == np.asarray(nn_rows).reshape(-1).size):
        raise ValueError(f"summarise: {len(keys)} keys, {n} similarities, {len(nn_keys)} nn keys")
    if k < 1:
        raise ValueError(f"k (closest pairs kept) must be >= 1, got {k}")
    names = [shard] * n if isinstance(shard, str) else list(shard)
    rows = np.asarray(nn_rows, dtype=np.int64).reshape(-1)
    by = (np.asarray(keys, dtype=str), np.asarray(names, dtype=str), -s)
    top = np.lexsort(by)[:k] if n else []  # the _order of all rows, first k
    pairs = [
        {"shard": str(names[i]), "key": str(keys[i]), "nn_row": int(rows[i]),
         "nn_key": str(nn_keys[i]), "similarity": float(s[i])}
        for i in top
    ]  # fmt: skip
    return ShardSummary(
        shard=shard if isinstance(shard, str) else "*",
        inputs=dict(inputs or {}),
        num_samples=n,
        num_replicates=int((s >= threshold).sum()),
        sum_similarity=math.fsum(s.tolist()),
        hist=hist_counts(s).tolist(),
        above={name: int((s > float(p)).sum()) for name, p in percentiles.items()},
        closest=_order(pairs)[:k],
    )


@dataclass
class ReplicaSummary:
    """The fold of every shard's summary: the replica check's statistics without per-sample rows."""

    threshold: float
    percentiles: dict[str, float]
    num_shards: int = 0
    num_samples: int = 0
    num_replicates: int = 0
    sum_similarity: float = 0.0
    hist: list[int] = field(default_factory=lambda: [0] * HIST_BINS)
    above: dict[str, int] = field(default_factory=dict)
    closest: list[dict[str, Any]] = field(default_factory=list)

    @property
    def replication_rate(self) -> float:
        """``#{s >= threshold} / N``."""
        return self.num_replicates / self.num_samples if self.num_samples else 0.0

    @property
    def mean_nn_similarity(self) -> float:
        return self.sum_similarity / self.num_samples if self.num_samples else 0.0

    def stats(self) -> dict[str, Any]:
        """``{"num_samples", "replication_rate", "mean_nn_similarity"}``, as
        :meth:`pipeline.fanout.index.ReplicaStats.to_dict`."""
        return {
            "num_samples": self.num_samples,
            "replication_rate": self.replication_rate,
            "mean_nn_similarity": self.mean_nn_similarity,
        }

    def shares(self) -> dict[str, float]:
        """The threshold-free shares from the folded counts: each held-out percentile and the share
        of samples strictly above it (``above_holdout_p<q> = #{s > p} / N``, as
        :func:`pipeline.evaluation.shares.threshold_free_shares`); ``{}`` without percentiles."""
        out: dict[str, float] = {}
        for name, p in self.percentiles.items():
            out[name] = float(p)
            out["above_" + name] = self.above[name] / self.num_samples if self.num_samples else 0.0
        return out


def fold(
    summaries: Iterable[ShardSummary],
    threshold: float,
    percentiles: Mapping[str, float],
    k: int,
) -> ReplicaSummary:
    """Join shard summaries (one pass, bounded memory: the ``k`` closest pairs are kept, never the
    rows). Every summary must come from the same inputs (its ``inputs`` equal the first one's) and
    carry counts for exactly ``percentiles``; a shard summarised twice raises ``ValueError``."""
    total = ReplicaSummary(float(threshold), {n: float(p) for n, p in percentiles.items()})
    total.above = {name: 0 for name in percentiles}
    sums, seen, first = [], set(), None
    hist = np.zeros(HIST_BINS, dtype=np.int64)
    for s in summaries:
        if s.shard in seen:
            raise ValueError(f"shard {s.shard!r} summarised twice")
        seen.add(s.shard)
        first = s.inputs if first is None else first
        if s.inputs != first:
            changed = sorted(k_ for k_ in {*first, *s.inputs} if first.get(k_) != s.inputs.get(k_))
            raise ValueError(
                f"shard {s.shard!r} was scored with other inputs ({', '.join(changed)})"
            )
        if set(s.above) != set(total.above):
            want = sorted(total.above)
            raise ValueError(f"shard {s.shard!r} counts above {sorted(s.above)}, not {want}")
        total.num_shards += 1
        total.num_samples += s.num_samples
        total.num_replicates += s.num_replicates
        sums.append(s.sum_similarity)
        hist += np.asarray(s.hist, dtype=np.int64)
        for name in total.above:
            total.above[name] += s.above[name]
        total.closest = _order(total.closest + list(s.closest))[:k]
    total.sum_similarity = math.fsum(sums)
    total.hist = hist.tolist()
    return total


def spread_picks(counts: Sequence[int], q: int) -> list[tuple[int, list[int]]]:
    """At most ``q`` (shard, rows) picks spread over shards of ``counts`` rows: up to ``q`` shards
    evenly spaced in order, from each about ``q / shards`` evenly spaced rows (more from the others
    when a shard is short), ``min(q, sum(counts))`` rows in all. Deterministic, so a
    bounded recall sample reads at most ``q`` shards and can be recomputed."""
    nonempty = [i for i, c in enumerate(counts) if c > 0]
    q = min(int(q), int(sum(counts[i] for i in nonempty)))
    if q <= 0:
        return []
    spread = np.linspace(0, len(nonempty) - 1, min(q, len(nonempty))).astype(int)
    chosen = sorted({nonempty[j] for j in spread})
    if sum(counts[i] for i in chosen) < q:  # too few rows in the spread shards: take them all
        chosen = nonempty
    take, left = {}, q
    for j, i in enumerate(sorted(chosen, key=lambda i: counts[i])):  # short shards first
        take[i] = min(counts[i], -(-left // (len(chosen) - j)))
        left -= take[i]
    return [
        (i, np.unique(np.linspace(0, counts[i] - 1, take[i]).astype(int)).tolist())
        for i in chosen
        if take[i]
    ]
