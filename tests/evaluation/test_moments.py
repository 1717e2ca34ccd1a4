"""Streaming moments: Chan et al.'s merge against np.cov, and FD from moments against FD from rows."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.evaluation.domain import frechet_distance
from pipeline.evaluation.fid import frechet_distance_features
from pipeline.evaluation.moments import Moments, fold, frechet_distance_moments


def _uneven_chunks(x: np.ndarray, rng) -> list[np.ndarray]:
    cuts = np.sort(rng.choice(np.arange(1, len(x)), size=6, replace=False))
    return np.split(x, cuts)  # seven chunks of different sizes, some of one row


@pytest.mark.parametrize("n,d", [(50, 3), (200, 17), (9, 40)])
def test_merged_chunks_give_np_cov_and_the_mean(n, d):
    rng = np.random.default_rng(n * d)
    x = rng.normal(size=(n, d)) * rng.uniform(0.1, 10, size=d) + 1e3  # a large offset
    chunks = _uneven_chunks(x, rng)
    assert len({len(c) for c in chunks}) > 1
    total = fold(Moments.of(c) for c in chunks)
    assert total.count == n
    np.testing.assert_allclose(total.mean, x.mean(0), rtol=1e-12)
    np.testing.assert_allclose(total.covariance(), np.cov(x, rowvar=False), rtol=1e-9, atol=1e-9)
    # a tree of merges (as the driver folds blocks in arrival order) gives the same
    left = fold(Moments.of(c) for c in chunks[:3])
    right = fold(Moments.of(c) for c in chunks[3:])
    np.testing.assert_allclose(right.merge(left).m2, total.m2, rtol=1e-9, atol=1e-9)


def test_empty_moments_are_the_identity_and_partials_round_trip():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(20, 4))
    m = Moments.of(x)
    e = Moments.empty(4)
    assert m.merge(e) is m and e.merge(m) is m
    assert Moments.of(np.zeros((0, 4))).count == 0
    assert fold([], dim=4).count == 0
    back = Moments.from_partial({"count": np.array([20]), "mean": m.mean, "m2": m.m2})
    assert back.count == 20 and np.array_equal(back.m2, m.m2)


def test_bad_moments_are_refused_with_the_shapes():
    with pytest.raises(ValueError, match=r"\(D,\) mean and a \(D, D\) M2"):
        Moments(3, np.zeros(4), np.zeros((3, 3)))
    with pytest.raises(ValueError, match="cannot merge moments of"):
        Moments.of(np.ones((2, 3))).merge(Moments.of(np.ones((2, 4))))
    with pytest.raises(ValueError, match="more than 1 rows"):
        Moments.of(np.ones((1, 3))).covariance()
    with pytest.raises(ValueError, match="no moments to fold"):
        fold([])
    with pytest.raises(ValueError, match=r"must be \(N, D\)"):
        Moments.of(np.ones(5))


@pytest.mark.parametrize("n1,n2,d", [(30, 20, 10), (7, 12, 64), (300, 250, 16)])
def test_fd_from_moments_equals_fd_from_rows(n1, n2, d):
    """Full-rank and rank-deficient (fewer rows than features) covariances."""
    rng = np.random.default_rng(n1 + d)
    a = rng.normal(size=(n1, d)) + 0.5
    b = rng.normal(size=(n2, d)) * 1.7
    ma = fold(Moments.of(c) for c in _uneven_chunks(a, rng))
    mb = fold(Moments.of(c) for c in _uneven_chunks(b, rng))
    expected = frechet_distance_features(a, b)
    assert frechet_distance_moments(ma, mb) == pytest.approx(expected, rel=1e-6)
    assert frechet_distance_moments(mb, ma) == pytest.approx(expected, rel=1e-6)
    if n1 > d and n2 > d:  # the scipy sqrtm route agrees too
        ref = frechet_distance(
            a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False)
        )
        assert frechet_distance_moments(ma, mb) == pytest.approx(ref, rel=1e-6)
    assert frechet_distance_moments(ma, ma) == pytest.approx(0.0, abs=1e-8 * np.trace(ma.m2))
