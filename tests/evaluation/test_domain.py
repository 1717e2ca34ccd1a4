"""Fréchet distance and the domain-classifier quality metrics."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import scipy.linalg
import torch

from pipeline.data.datasets import digits_source
from pipeline.evaluation.domain import (
    DomainClassifier,
    DomainEvaluator,
    frechet_distance,
    train_domain_evaluator,
)


def _spd(rng, d):
    a = rng.standard_normal((d, d))
    return a @ a.T / d + 0.1 * np.eye(d)


def test_frechet_identical_is_zero():
    rng = np.random.default_rng(0)
    mu, s = rng.standard_normal(8), _spd(rng, 8)
    assert frechet_distance(mu, s, mu, s) == pytest.approx(0.0, abs=1e-6)


def test_frechet_shifted_means_is_squared_norm():
    rng = np.random.default_rng(1)
    mu, s = rng.standard_normal(8), _spd(rng, 8)
    d = rng.standard_normal(8)
    assert frechet_distance(mu, s, mu + d, s) == pytest.approx(float(d @ d), rel=1e-6, abs=1e-6)


@pytest.mark.filterwarnings("error")
def test_frechet_singular_covariances_are_exact_and_silent():
    # rank-1 covariances (a feature stuck at 0, as dead ReLUs give): 4 + 1 - 2 sqrt(4 * 1) = 1
    s1, s2 = np.diag([4.0, 0.0]), np.diag([1.0, 0.0])
    assert frechet_distance(np.zeros(2), s1, np.zeros(2), s2) == pytest.approx(1.0, abs=1e-12)
    # fewer samples than dimensions, rotated: equals the eigen-decomposition of S1 S2 itself
    rng = np.random.default_rng(3)
    a, b = rng.normal(size=(4, 6)), rng.normal(size=(5, 6))
    c1, c2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    tr_sqrt = np.sqrt(np.clip(np.linalg.eigvals(c1 @ c2).real, 0, None)).sum()
    expected = np.trace(c1) + np.trace(c2) - 2 * tr_sqrt
    # (sqrt of the ~1e-17 rounding of the zero eigenvalues adds ~1e-8: compare at 1e-6)
    assert frechet_distance(np.zeros(6), c1, np.zeros(6), c2) == pytest.approx(expected, rel=1e-6)


def test_frechet_diagonal_covariances_closed_form():
    a = np.array([1.0, 4.0, 9.0])
    b = np.array([4.0, 1.0, 9.0])
    mu1, mu2 = np.zeros(3), np.array([1.0, 0.0, 2.0])
    expected = 5.0 + float(((np.sqrt(a) - np.sqrt(b)) ** 2).sum())  # 5 + 1 + 1
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-6)
    # symmetric
    assert frechet_distance(mu2, np.diag(b), mu1, np.diag(a)) == pytest.approx(expected, rel=1e-6)


def test_frechet_singular_covariance_is_finite():
    s = np.diag([1.0, 0.0, 0.0])
    value = frechet_distance(np.zeros(3), s, np.ones(3), s)
    assert np.isfinite(value)
    assert value == pytest.approx(3.0, abs=1e-3)


def test_domain_classifier_shapes():
    torch.manual_seed(0)
    model = DomainClassifier(channels=3, num_classes=5, size=8)
    x = torch.zeros(2, 3, 8, 8)
    assert model.features(x).shape == (2, 64)
    assert model(x).shape == (2, 5)


@pytest.fixture(scope="module")
def core_domain_evaluator():
    ds = digits_source(8).subset(range(400))
    x, labels = ds.to_tensor(), torch.tensor(ds.labels)
    return train_domain_evaluator(x, labels, epochs=12, seed=0), x


def test_domain_evaluator_quality(core_domain_evaluator):
    ev, x = core_domain_evaluator
    assert isinstance(ev, DomainEvaluator)
    assert ev.ref_mu.shape == (64,)
    assert ev.ref_sigma.shape == (64, 64)
    assert 0.6 <= ev.val_accuracy <= 1.0  # ten classes: chance is 0.1
    real = ev.quality(x[:200])
    assert set(real) == {"fd", "confident_fraction"}
    # the FD against an independent matrix square root (scipy's sqrtm), the confident fraction
    # from the classifier's own softmax, and the reference set at distance 0 from itself
    feats = ev.features(x[:200])
    mu, sigma = feats.mean(0), np.cov(feats, rowvar=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # singular covariances: dead ReLUs
        covmean = scipy.linalg.sqrtm(sigma @ ev.ref_sigma).real
    fd = (mu - ev.ref_mu) @ (mu - ev.ref_mu) + np.trace(sigma + ev.ref_sigma - 2 * covmean)
    assert real["fd"] == pytest.approx(fd, rel=1e-3)
    with torch.no_grad():
        top = ev.model(x[:200]).softmax(-1).max(-1).values
    assert real["confident_fraction"] == float((top > 0.9).float().mean())
    assert ev.quality(x)["fd"] == pytest.approx(0.0, abs=1e-9)
    noise = ev.quality(torch.rand(200, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1)
    assert noise["fd"] > 2 * real["fd"]
    assert (
        real["confident_fraction"] > noise["confident_fraction"] or real["confident_fraction"] > 0.5
    )
    # the full reference set against itself
    assert ev.quality(x)["fd"] == pytest.approx(0.0, abs=1e-3)
    feats = ev.features(x[:3])
    assert feats.shape == (3, 64) and feats.dtype == np.float64


def test_train_domain_evaluator_is_seeded(core_domain_evaluator):
    ev, _ = core_domain_evaluator
    ds = digits_source(8).subset(range(400))
    again = train_domain_evaluator(ds.to_tensor(), torch.tensor(ds.labels), epochs=12, seed=0)
    assert again.val_accuracy == ev.val_accuracy
    np.testing.assert_allclose(again.ref_mu, ev.ref_mu, rtol=1e-6, atol=1e-9)
