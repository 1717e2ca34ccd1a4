"""FAISS nearest neighbours, embeddings and replication statistics."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from pipeline.fanout.index import (
    GuardIndex,
    build_index,
    centred_pixel_embedding,
    embed_pixels,
    faiss_distributions,
    import_faiss,
    index_recall,
    l2_normalise,
    make_embedding,
    nearest,
    raw_pixel_embedding,
    replica_stats,
)

ROOT = Path(__file__).resolve().parents[2]


def _random_unit(rng, n, d):
    return l2_normalise(rng.standard_normal((n, d)).astype(np.float32))


@pytest.mark.parametrize("k", [1, 5])
def test_flat_index_matches_brute_force(k):
    rng = np.random.default_rng(0)
    train = _random_unit(rng, 300, 24)
    queries = _random_unit(rng, 40, 24)
    sims, idx = nearest(build_index(train, kind="flat"), queries, k=k)
    assert sims.shape == idx.shape == (40, k)
    cos = queries @ train.T
    expected_idx = np.argsort(-cos, axis=1)[:, :k]
    np.testing.assert_array_equal(idx, expected_idx)
    np.testing.assert_allclose(sims, np.take_along_axis(cos, expected_idx, 1), atol=1e-5)
    assert (np.diff(sims, axis=1) <= 1e-7).all()  # descending


def test_ivf_recall_with_high_nprobe():
    rng = np.random.default_rng(1)
    centres = rng.standard_normal((16, 32)).astype(np.float32) * 3
    train = l2_normalise(
        centres[rng.integers(0, 16, 2000)] + rng.standard_normal((2000, 32)).astype(np.float32)
    )
    queries = l2_normalise(
        centres[rng.integers(0, 16, 200)] + rng.standard_normal((200, 32)).astype(np.float32)
    )
    exact_sims, exact = nearest(build_index(train, kind="flat"), queries)
    index = build_index(train, kind="ivf", nlist=32, nprobe=16)
    assert index.nlist == 32  # 2000 // 39 = 51 >= 32
    assert index.nprobe == 16
    sims, idx = nearest(index, queries)
    recall = float((idx[:, 0] == exact[:, 0]).mean())
    assert recall >= 0.99
    np.testing.assert_allclose(
        sims[idx[:, 0] == exact[:, 0]], exact_sims[idx[:, 0] == exact[:, 0]], atol=1e-5
    )


def test_ivf_clamps_nlist_and_nprobe():
    rng = np.random.default_rng(2)
    train = _random_unit(rng, 100, 8)  # 100 // 39 = 2 lists at most
    index = build_index(train, kind="ivf", nlist=1024, nprobe=32)
    assert index.nlist == 2
    assert index.nprobe == 2
    # probing every list is exhaustive: identical to exact search
    queries = _random_unit(rng, 30, 8)
    _, exact = nearest(build_index(train), queries)
    _, idx = nearest(index, queries)
    np.testing.assert_array_equal(idx, exact)


def test_build_index_unknown_kind():
    with pytest.raises(ValueError, match="unknown index kind 'hnsw'"):
        build_index(np.ones((4, 3), np.float32), kind="hnsw")


def _images(rng, n, size=8, channels=1):
    return rng.integers(0, 256, (n, size, size, channels), dtype=np.uint8)


def test_centred_embedding_identical_image_similarity_one():
    rng = np.random.default_rng(3)
    train = _images(rng, 50)
    embed = make_embedding("centred", train)
    emb = embed(train)
    assert emb.shape == (50, 64)
    assert emb.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(embed.mean, train.reshape(50, -1).mean(0) / 255.0, atol=1e-6)
    queries = np.concatenate([train[[4, 17]], _images(rng, 3)])
    sims, idx = nearest(build_index(emb), embed(queries))
    assert idx[:2, 0].tolist() == [4, 17]
    np.testing.assert_allclose(sims[:2, 0], 1.0, atol=1e-5)
    assert (sims[2:, 0] < 0.9).all()
    stats = replica_stats(sims[:, 0], 0.97)
    assert stats.replication_rate == pytest.approx(2 / 5)
    assert stats.threshold == 0.97


def test_centred_embedding_ignores_shared_background_raw_does_not():
    # two images that share a bright background and differ in a small patch
    base = np.full((2, 8, 8, 1), 200, np.uint8)
    base[0, :2, :2] = 0
    base[1, -2:, -2:] = 0
    train = np.concatenate([base, np.full((1, 8, 8, 1), 200, np.uint8)])
    raw = raw_pixel_embedding()(base)
    centred = centred_pixel_embedding(train)(base)
    raw_sim = float(raw[0] @ raw[1])
    centred_sim = float(centred[0] @ centred[1])
    assert raw_sim > 0.9
    assert centred_sim < raw_sim - 0.3


def test_make_embedding_names():
    train = np.zeros((2, 4, 4, 1), np.uint8)
    assert make_embedding("raw", train)(np.full((1, 4, 4, 1), 9, np.uint8)).shape == (1, 16)
    with pytest.raises(ValueError, match="unknown embedding 'clip'"):
        make_embedding("clip", train)


def test_l2_normalise_zero_row_is_finite():
    out = l2_normalise(np.array([[0.0, 0.0], [3.0, 4.0]]))
    np.testing.assert_allclose(out, [[0.0, 0.0], [0.6, 0.8]], atol=1e-7)


def test_replica_stats_threshold_is_inclusive():
    exact = replica_stats(np.array([0.25, 0.5, 0.75, 1.0]), 0.5)
    assert exact.replication_rate == 0.75  # 0.5 itself counts
    assert exact.mean_nn_similarity == pytest.approx(0.625)
    assert exact.num_samples == 4
    assert exact.to_dict() == {
        "num_samples": 4,
        "replication_rate": 0.75,
        "mean_nn_similarity": 0.625,
    }
    assert replica_stats(np.array([[0.1], [0.2]]), 0.15).num_samples == 2


def test_replica_stats_empty_raises():
    with pytest.raises(ValueError, match="no similarities"):
        replica_stats(np.array([]), 0.9)


# ------------------------------------------------------------------ exact vs torch, IVF recall, guard
def test_faiss_exact_equals_torch_brute_force():
    import torch

    rng = np.random.default_rng(7)
    train = _random_unit(rng, 2000, 192)
    queries = _random_unit(rng, 300, 192)
    sims, idx = nearest(build_index(train, kind="flat"), queries, k=3)
    t_sims, t_idx = torch.topk(torch.from_numpy(queries) @ torch.from_numpy(train).T, k=3, dim=1)
    np.testing.assert_array_equal(idx, t_idx.numpy())
    np.testing.assert_allclose(sims, t_sims.numpy(), atol=1e-5)


def _clustered(rng, n, centres):
    noise = rng.standard_normal((n, centres.shape[1])).astype(np.float32)
    return l2_normalise(centres[rng.integers(0, len(centres), n)] + noise)


def test_ivf_recall_on_fixed_set_is_reported_and_high(capsys):
    rng = np.random.default_rng(
        11
    )  # fixed: 5000 training vectors, 500 queries, 32 clusters in 64-d
    centres = rng.standard_normal((32, 64)).astype(np.float32) * 3
    train, queries = _clustered(rng, 5000, centres), _clustered(rng, 500, centres)
    exact_sims, _ = nearest(build_index(train, kind="flat"), queries)
    ivf_sims, _ = nearest(build_index(train, kind="ivf", nlist=64, nprobe=16), queries)
    recall = index_recall(ivf_sims[:, 0], exact_sims[:, 0])
    with capsys.disabled():
        print(f"\nIVF recall@1 (nlist 64, nprobe 16, 5000 x 64-d, 500 queries): {recall:.4f}")
    assert recall >= 0.99
    few = index_recall(
        nearest(build_index(train, "ivf", 64, 1), queries)[0][:, 0], exact_sims[:, 0]
    )
    assert few <= recall  # probing fewer lists cannot find more true neighbours


def test_index_recall_counts_ties_and_checks_shapes():
    assert index_recall(np.array([0.9, 0.5, 0.7]), np.array([0.9, 0.6, 0.7])) == pytest.approx(
        2 / 3
    )
    assert index_recall(np.array([0.8 - 1e-7]), np.array([0.8])) == 1.0  # a tie within float noise
    with pytest.raises(ValueError, match="equal, non-empty"):
        index_recall(np.array([0.1, 0.2]), np.array([0.1]))


class _InMemoryExact:
    """A stand-in for the stored flat replica index: ``search`` as ReplicaIndex's (k=1: 1-D)."""

    kind = "flat"

    def __init__(self, train):
        self.embed = centred_pixel_embedding(train)
        self.index = build_index(self.embed(train), "flat")

    def search(self, images, k=1):
        sims, idx = nearest(self.index, self.embed(images), k)
        return sims[:, 0], idx[:, 0]

    def keys_of(self, idx):
        return [f"t{int(i)}" for i in idx]


def test_guard_index_threshold_is_inclusive():
    rng = np.random.default_rng(4)
    train = _images(rng, 30)
    guard = GuardIndex(_InMemoryExact(train), threshold=0.9)
    assert guard.exact
    queries = np.concatenate([train[[3]], _images(rng, 4)])
    sims, idx = guard.check(queries)
    assert sims.shape == idx.shape == (5,)
    assert idx[0] == 3 and sims[0] == pytest.approx(1.0, abs=1e-5)
    assert guard.keys_of(idx[:1]) == ["t3"]
    assert guard.rejects(sims).tolist() == [True] + [bool(s >= 0.9) for s in sims[1:]]
    exact = GuardIndex(_InMemoryExact(train), threshold=float(sims[1]))
    assert bool(exact.rejects(sims[1]))  # at the threshold counts as a copy


def test_embed_pixels_matches_training_embedding():
    rng = np.random.default_rng(5)
    images = rng.integers(0, 256, (5, 4, 4, 3), dtype=np.uint8)
    mean = images.reshape(5, -1).mean(0) / 255.0
    emb = embed_pixels(images, mean.astype(np.float32))
    assert emb.shape == (5, 48)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    expected = images.reshape(5, -1) / 255.0 - mean
    np.testing.assert_allclose(
        emb, expected / np.linalg.norm(expected, axis=1, keepdims=True), atol=1e-5
    )


# ------------------------------------------------------------------------ one FAISS build at a time
def test_faiss_comes_from_exactly_one_extra():
    """Base dependencies name no FAISS; the cpu and gpu extras each name one build; make installs cpu."""
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert not [d for d in project["dependencies"] if d.startswith("faiss")]
    extras = project["optional-dependencies"]
    assert [d.split(">")[0] for d in extras["cpu"] if "faiss" in d] == ["faiss-cpu"]
    assert [d.split(">")[0] for d in extras["gpu"] if "faiss" in d] == ["faiss-gpu-cu12"]
    assert "'.[cpu,test]'" in (ROOT / "Makefile").read_text()
    assert faiss_distributions() == ["faiss-cpu"]  # this environment: the cpu extra only
    assert import_faiss().IndexFlatIP(4).d == 4


def test_two_faiss_builds_are_refused_by_name(monkeypatch):
    from importlib import metadata

    real = metadata.version
    monkeypatch.setattr(
        metadata, "version", lambda name: "1.9.0" if name == "faiss-gpu-cu12" else real(name)
    )
    with pytest.raises(ImportError, match=r"faiss-cpu, faiss-gpu-cu12.*pip uninstall -y faiss-cpu"):
        build_index(np.eye(4, dtype=np.float32))
