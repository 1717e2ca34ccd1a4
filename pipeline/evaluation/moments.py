"""Streaming mean and covariance (Chan et al. parallel update) and the Fréchet distance of two
moment sets (Ray-free, numpy only).

FD needs only the mean and covariance of each feature set (Heusel et al. 2017, eq. 6), so features
never have to sit in one place: each block of rows is reduced to its count ``n``, mean ``mu`` and
centred sum of outer products ``M2 = sum_i (x_i - mu)(x_i - mu)^T``, and blocks are merged pairwise
(Chan, Golub & LeVeque 1979):

    n = n_a + n_b,   delta = mu_b - mu_a,   mu = mu_a + delta n_b / n,
    M2 = M2_a + M2_b + delta delta^T n_a n_b / n.

Everything is float64; merging in any order and any block sizes gives ``np.cov`` to rounding.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class Moments:
    """Count, mean (D,) and centred sum of outer products ``M2`` (D, D) of a set of rows, float64."""

    count: int
    mean: np.ndarray
    m2: np.ndarray

    def __post_init__(self) -> None:
        d = self.mean.shape
        if self.count < 0 or len(d) != 1 or self.m2.shape != (d[0], d[0]):
            raise ValueError(
                f"moments need count >= 0, a (D,) mean and a (D, D) M2; got count {self.count}, "
                f"mean {self.mean.shape}, M2 {self.m2.shape}"
            )

    @classmethod
    def of(cls, rows: np.ndarray) -> Moments:
        """The moments of feature rows (N, D), in float64."""
        x = np.asarray(rows, dtype=np.float64)
        if x.ndim != 2:
            raise ValueError(f"feature rows must be (N, D), got shape {x.shape}")
        if len(x) == 0:
            return cls.empty(x.shape[1])
        mu = x.mean(0)
        c = x - mu
        return cls(len(x), mu, c.T @ c)

    @classmethod
    def empty(cls, dim: int) -> Moments:
        """The moments of no rows: the identity of :meth:`merge`."""
        return cls(0, np.zeros(dim), np.zeros((dim, dim)))

    @classmethod
    def from_partial(cls, partial: Mapping[str, Any]) -> Moments:
        """From a partial ``{"count", "mean", "m2"}`` (a feature actor's per-block result)."""
        return cls(
            int(np.asarray(partial["count"]).reshape(())),
            np.asarray(partial["mean"], dtype=np.float64),
            np.asarray(partial["m2"], dtype=np.float64),
        )

    def merge(self, other: Moments) -> Moments:
        """The moments of both sets of rows (Chan et al. 1979's pairwise update)."""
        if self.mean.shape != other.mean.shape:
            raise ValueError(f"cannot merge moments of {self.mean.shape} and {other.mean.shape}")
        if other.count == 0:
            return self
        if self.count == 0:
            return other
        n = self.count + other.count
        delta = other.mean - self.mean
        mean = self.mean + delta * (other.count / n)
        m2 = self.m2 + other.m2 + np.outer(delta, delta) * (self.count * other.count / n)
        return Moments(n, mean, m2)

    def covariance(self, ddof: int = 1) -> np.ndarray:
        """``M2 / (n - ddof)``: the sample covariance (D, D) (``np.cov``'s with ``ddof=1``)."""
        if self.count <= ddof:
            raise ValueError(f"need more than {ddof} rows for a covariance, got {self.count}")
        return self.m2 / (self.count - ddof)


def fold(parts: Iterable[Moments], dim: int | None = None) -> Moments:
    """All ``parts`` merged left to right (``dim``: the feature size when there may be none)."""
    total = None if dim is None else Moments.empty(dim)
    for part in parts:
        total = part if total is None else total.merge(part)
    if total is None:
        raise ValueError("no moments to fold (and no dimension given)")
    return total


def _psd_sqrt(s: np.ndarray) -> np.ndarray:
    """Symmetric square root of a PSD matrix; eigenvalues below rounding (``D eps max``) are 0."""
    w, v = np.linalg.eigh((s + s.T) / 2.0)
    w = np.where(w > len(w) * np.finfo(np.float64).eps * max(w.max(), 0.0), w, 0.0)
    return (v * np.sqrt(w)) @ v.T


def frechet_distance_moments(a: Moments, b: Moments) -> float:
    """``||mu_a - mu_b||^2 + Tr(S_a) + Tr(S_b) - 2 Tr((S_a S_b)^{1/2})`` (Heusel et al. 2017, eq. 6)
    from two moment sets (covariances with ``ddof=1``, as ``np.cov``).

    ``Tr((S_a S_b)^{1/2})`` is the sum of the square roots of the eigenvalues of the symmetric PSD
    ``S_a^{1/2} S_b S_a^{1/2}`` (similar to ``S_a S_b``); eigenvalues below rounding are 0, so a
    rank-deficient covariance (fewer rows than features) adds no square roots of round-off."""
    sa, sb = a.covariance(), b.covariance()
    root = _psd_sqrt(sa)
    inner = root @ sb @ root
    eig = np.linalg.eigvalsh((inner + inner.T) / 2.0)
    eig = np.where(eig > len(eig) * np.finfo(np.float64).eps * max(eig.max(), 0.0), eig, 0.0)
    diff = a.mean - b.mean
    value = diff @ diff + np.trace(sa) + np.trace(sb) - 2.0 * np.sqrt(eig).sum()
    return float(max(value, 0.0))
