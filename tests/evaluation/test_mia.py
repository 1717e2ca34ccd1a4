"""Membership-inference metrics (AUC, TPR at FPR, permutation test) and the attacks on a tiny model."""

from __future__ import annotations

import dataclasses
import types

import numpy as np
import pytest
import torch
from scipy.stats import norm
from sklearn.metrics import roc_auc_score

from pipeline.core.diffusion import linear_schedule
from pipeline.core.guidance import cpsample_guidance
from pipeline.core.models import NoiseClassifier, build_unet
from pipeline.core.sampler import unet_denoiser
from pipeline.evaluation.mia import (
    NearestSamples,
    attack_metrics,
    nn_similarity_scores,
    permutation_test,
    reconstruction_attack,
    reconstruction_errors,
    roc_auc,
    roc_curve,
    secmi_attack,
    secmi_errors,
    tpr_at_fpr,
)


@pytest.mark.parametrize("d", [0.0, 0.5, 1.0, 2.0])
def test_auc_matches_binormal_closed_form(d):
    """Members ~ N(d, 1), non-members ~ N(0, 1): AUC = Phi(d / sqrt 2)."""
    rng = np.random.default_rng(int(d * 10))
    members, nonmembers = rng.normal(d, 1.0, 20_000), rng.normal(0.0, 1.0, 20_000)
    assert roc_auc(members, nonmembers) == pytest.approx(norm.cdf(d / np.sqrt(2)), abs=0.01)


def test_auc_ties_and_extremes():
    assert roc_auc([1.0, 1.0], [1.0, 1.0]) == 0.5
    assert roc_auc([2.0, 3.0], [0.0, 1.0]) == 1.0
    assert roc_auc([0.0, 1.0], [2.0, 3.0]) == 0.0
    # brute force over all pairs agrees on a small sample with ties
    rng = np.random.default_rng(0)
    m, n = rng.integers(0, 5, 30).astype(float), rng.integers(0, 5, 40).astype(float)
    brute = ((m[:, None] > n[None]).sum() + 0.5 * (m[:, None] == n[None]).sum()) / (30 * 40)
    assert roc_auc(m, n) == pytest.approx(brute)
    with pytest.raises(ValueError, match="members and non-members"):
        roc_auc([], [1.0])


def test_roc_curve_area_equals_auc_and_tpr_at_fpr():
    rng = np.random.default_rng(3)
    m, n = rng.normal(1.0, 1.0, 500), rng.normal(0.0, 1.0, 700)
    fpr, tpr = roc_curve(m, n)
    assert fpr[0] == tpr[0] == 0.0 and fpr[-1] == tpr[-1] == 1.0
    assert np.all(np.diff(fpr) >= 0) and np.all(np.diff(tpr) >= 0)
    assert np.trapezoid(tpr, fpr) == pytest.approx(roc_auc(m, n), abs=1e-9)
    # TPR at 1% FPR by direct count: at most 7 of 700 non-members may pass, so every member above
    # the 8th-largest non-member score is caught
    assert tpr_at_fpr(m, n, 0.01) == pytest.approx(float((m > np.sort(n)[-8]).mean()))
    # perfect separation: TPR 1 at FPR 0
    assert tpr_at_fpr([5.0, 6.0], [0.0, 1.0], 0.0) == 1.0


def test_permutation_test_size_under_null():
    """Under H0 (same distribution) the fraction of p < 0.05 is about 0.05."""
    rng = np.random.default_rng(11)
    draws = 1000
    p = np.array(
        [
            permutation_test(rng.normal(size=15), rng.normal(size=25), 499, seed=i)
            for i in range(draws)
        ]
    )
    rate = float((p < 0.05).mean())
    assert 0.03 <= rate <= 0.07, rate  # binomial sd 0.007: about 3 sd either way
    assert p.min() >= 1 / 500 and p.max() <= 1.0


def test_permutation_test_power_and_exact_small_case():
    rng = np.random.default_rng(5)
    assert permutation_test(rng.normal(1.0, 1, 50), rng.normal(0, 1, 50), 2000) < 0.01
    # a = [1, 2], b = [3, 4]: of the 6 splits, 2 have |diff| >= 2 -> p -> 1/3
    assert permutation_test([1.0, 2.0], [3.0, 4.0], 20_000, seed=1) == pytest.approx(
        1 / 3, abs=0.02
    )


def test_attack_metrics_direction():
    """Errors: members smaller -> AUC > 0.5 with score = -error."""
    rng = np.random.default_rng(2)
    out = attack_metrics(rng.normal(0.5, 0.2, 200), rng.normal(1.0, 0.2, 200), num_permutations=500)
    assert out["auc"] > 0.9 and out["tpr_at_fpr"] > 0.2 and out["p_value"] < 0.01
    assert out["num_members"] == 200 and out["fpr"] == 0.01


def test_nn_similarity_scores():
    gen = np.zeros((3, 2, 2, 1), np.uint8)
    gen[0, 0, 0] = 255
    gen[1, 1, 1] = 255
    queries = gen[[0, 1]].copy()
    queries[1, 0, 0] = 40
    s = nn_similarity_scores(queries, gen)
    assert s[0] == pytest.approx(1.0)
    assert s[1] < 1.0


def _dense_nn(queries: np.ndarray, generated: np.ndarray, mean) -> np.ndarray:
    """The dense (queries x samples) computation the streamed search replaced."""

    def embed(images):
        flat = images.reshape(len(images), -1).astype(np.float64) / 255.0 - mean
        return flat / np.linalg.norm(flat, axis=1, keepdims=True)

    return (embed(queries) @ embed(generated).T).max(axis=1)


def test_nearest_samples_folds_chunks_to_the_dense_result():
    """Small chunks force many FAISS searches whose running top-1 must equal the dense maximum,
    whatever the chunking and however the samples arrive."""
    rng = np.random.default_rng(5)
    queries = rng.integers(0, 256, (13, 6, 6, 3), dtype=np.uint8)
    generated = rng.integers(0, 256, (101, 6, 6, 3), dtype=np.uint8)
    generated[40] = queries[2]  # an exact copy somewhere in the middle chunk
    mean = rng.uniform(0.3, 0.7, 6 * 6 * 3)
    dense = _dense_nn(queries, generated, mean)
    for chunk in (1, 7, 64, 1000):
        got = nn_similarity_scores(queries, generated, mean, chunk=chunk)
        np.testing.assert_allclose(got, dense, atol=2e-6)
    streamed = NearestSamples(queries, mean, chunk=9)
    for part in np.array_split(generated, [3, 50, 51]):  # shards of uneven sizes
        streamed.update(part)
    assert streamed.count == 101 and streamed.scores()[2] == pytest.approx(1.0, abs=1e-6)
    np.testing.assert_allclose(streamed.scores(), dense, atol=2e-6)
    with pytest.raises(ValueError, match="no generated samples"):
        NearestSamples(queries, mean).scores()
    with pytest.raises(ValueError, match=r"\(108 values\) do not match the queries' 36"):
        NearestSamples(queries[..., :1], None).update(generated)
    with pytest.raises(ValueError, match="chunk must be >= 1"):
        NearestSamples(queries, mean, chunk=0)


@pytest.fixture(scope="module")
def tiny_models():
    from pipeline.core.config import ClassifierArchConfig, UNetConfig

    torch.manual_seed(0)
    unet = build_unet(UNetConfig(sample_size=8, block_out_channels=(8, 16))).eval()
    clf = NoiseClassifier(
        ClassifierArchConfig(8, 1, 8, (1, 2), time_embed_dim=8, num_groups=4)
    ).eval()
    return unet, clf, linear_schedule()


def test_reconstruction_attack_runs_and_is_deterministic(tiny_models):
    unet, clf, schedule = tiny_models
    x = torch.rand(10, 1, 8, 8) * 2 - 1
    den = unet_denoiser(unet)
    a = reconstruction_errors(den, schedule, x, (50, 200), draws=2, seed=3, batch_size=4)
    b = reconstruction_errors(den, schedule, x, (50, 200), draws=2, seed=3, batch_size=7)
    assert set(a) == {"t50", "t200", "mean"}
    np.testing.assert_allclose(a["mean"], b["mean"], rtol=1e-5)  # batching does not change noise
    assert a["mean"].shape == (10,) and np.all(a["mean"] > 0)
    np.testing.assert_allclose(a["mean"], (a["t50"] + a["t200"]) / 2)  # averaged over t
    guided = cpsample_guidance(clf, 0.5, 50.0)
    c = reconstruction_errors(den, schedule, x, (50, 200), 2, 3, guidance=guided)
    assert not np.allclose(c["mean"], a["mean"])  # the classifier-corrected eps differs
    out = reconstruction_attack(unet, schedule, x[:5], x[5:], guided, (50,), 1, num_permutations=99)
    # the AUC of the members' errors (seed 0) against the non-members' (seed 1), by scikit-learn
    em = reconstruction_errors(unet_denoiser(unet, schedule), schedule, x[:5], (50,), 1, 0, guided)
    en = reconstruction_errors(unet_denoiser(unet, schedule), schedule, x[5:], (50,), 1, 1, guided)
    scores = -np.concatenate([em["mean"], en["mean"]])
    auc = roc_auc_score(np.r_[np.ones(5), np.zeros(5)], scores)
    assert out["auc"] == pytest.approx(auc) and out["auc_per_t"] == {"t50": pytest.approx(auc)}
    assert len(out["roc"]["fpr"]) == len(out["roc"]["tpr"])


def test_secmi_identity_model_and_attack(tiny_models):
    """With an exact eps (x_0 = 0, eps(x_t) = x_t / sqrt(1 - abar_t)) the DDIM round trip is exact."""
    _, _, schedule = tiny_models
    abar = schedule.alphas_cumprod.float()

    def exact(x, t):
        return x / (1 - abar[t]).sqrt().reshape(-1, 1, 1, 1)

    x0 = torch.zeros(4, 1, 8, 8) + 1e-3
    err = secmi_errors(exact, schedule, x0, t_sec=40, k=10)
    assert np.all(err < 1e-8)
    unet = tiny_models[0]
    out = secmi_attack(unet, schedule, torch.rand(4, 1, 8, 8), torch.rand(4, 1, 8, 8), None, 20, 10, num_permutations=99)  # fmt: skip
    assert {"auc", "tpr_at_fpr", "p_value", "roc"} <= set(out)
    with pytest.raises(ValueError, match="divisible"):
        secmi_errors(exact, schedule, x0, t_sec=45, k=10)


class _Oracle(torch.nn.Module):
    """A "UNet" that knows the clean images x_0 (B, C, H, W): at ``(x_t, t)`` it outputs the exact
    eps, v (``sqrt(abar) eps - sqrt(1 - abar) x_0``, Salimans & Ho 2022) or x_0 that produced x_t."""

    def __init__(self, x0: torch.Tensor, schedule, kind: str):
        super().__init__()
        self.x0, self.schedule, self.kind = x0, schedule, kind

    def forward(self, x, t):
        a = self.schedule.abar(t).reshape(-1, 1, 1, 1)
        eps = (x - a.sqrt() * self.x0) / (1 - a).sqrt()
        v = a.sqrt() * eps - (1 - a).sqrt() * self.x0
        out = {"epsilon": eps, "v_prediction": v, "sample": self.x0}[self.kind]
        return types.SimpleNamespace(sample=out)


@pytest.mark.parametrize("kind", ["epsilon", "v_prediction", "sample"])
def test_attacks_read_every_prediction_type_as_eps(kind):
    """An exact model has zero loss-attack and SecMI error whatever it predicts; read as eps, a v or
    x_0 model would not."""
    schedule = dataclasses.replace(linear_schedule(), prediction_type=kind)
    x0 = torch.rand(4, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    oracle = _Oracle(x0, schedule, kind)
    den = unet_denoiser(oracle, schedule)
    rec = reconstruction_errors(den, schedule, x0, (50, 200), draws=1, seed=1)
    assert np.all(rec["mean"] < 1e-8)
    assert np.all(secmi_errors(den, schedule, x0, t_sec=40, k=10) < 1e-8)
    if kind != "epsilon":
        misread = dataclasses.replace(schedule, prediction_type="epsilon")
        wrong = reconstruction_errors(unet_denoiser(oracle, misread), misread, x0, (50,), 1, 1)
        assert np.all(wrong["mean"] > 1e-3)
        # an adapter built without the schedule reads eps, and the attacks refuse it for this model
        with pytest.raises(ValueError, match="unet_denoiser\\(unet, schedule\\)"):
            reconstruction_errors(unet_denoiser(oracle), schedule, x0, (50,), 1, 1)
