"""An IVF index in parts, without Ray, on real FAISS: trained once, built part by part, searched
part by part; the same neighbours as one merged index and as exact search."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.fanout.index import import_faiss, l2_normalise
from pipeline.fanout.index_parts import (
    PartSearch,
    build_part,
    code_bytes,
    merge_topk,
    read_part,
    reduce,
    train_ivf,
    train_pca,
    write_part,
)

N, DIM, PARTS = 2400, 64, 6
PARAMS = {"nlist": 24, "codec": "sq8", "seed": 0, "pca_dims": 16}


@pytest.fixture(scope="module")
def index_in_parts(tmp_path_factory):
    """2400 clustered 64-d unit vectors; PCA to 16 and IVF trained on 1200; six parts of 400."""
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(40, DIM))
    x = l2_normalise(centres[rng.integers(0, 40, N)] + 0.6 * rng.normal(size=(N, DIM)))
    pca = train_pca(x[::2], PARAMS["pca_dims"])
    trained = train_ivf(reduce(pca, x[::2]), DIM, PARAMS, pca)
    folder = tmp_path_factory.mktemp("parts")
    paths = []
    for p in range(PARTS):
        lo = p * (N // PARTS)
        hi = lo + N // PARTS
        chunks = (x[c : min(c + 150, hi)] for c in range(lo, hi, 150))  # uneven chunks
        part = build_part(trained, chunks, start=lo)
        assert write_part(part, folder / f"ivf-{p}.faiss") == N // PARTS
        paths.append(folder / f"ivf-{p}.faiss")
    return x, trained, paths


def test_the_parts_search_like_one_merged_index(index_in_parts):
    x, trained, paths = index_in_parts
    faiss = import_faiss()
    merged = build_part(trained, [x], start=0)  # the one-index reference
    faiss.extract_index_ivf(merged).nprobe = 6
    rng = np.random.default_rng(1)
    q = l2_normalise(x[rng.integers(0, N, 50)] + 0.2 * rng.normal(size=(50, DIM)))
    want_s, want_i = merged.search(q, 10)
    parts = [read_part(p, trained) for p in paths]
    got_s, got_i = PartSearch(trained, nprobe=6).search(q, 10, iter(parts))
    np.testing.assert_array_equal(got_i, want_i)
    np.testing.assert_allclose(got_s, want_s, atol=1e-6)
    # each part holds only its rows, under their global ids
    assert [int(p.ntotal) for p in parts] == [N // PARTS] * PARTS


def test_planted_near_duplicates_are_found_as_by_exact_search(index_in_parts):
    x, trained, paths = index_in_parts
    rng = np.random.default_rng(2)
    planted = rng.choice(N, 40, replace=False)
    q = l2_normalise(x[planted] + 0.02 * rng.normal(size=(40, DIM)))  # cosine ~0.99
    exact = np.argmax(q @ x.T, axis=1)
    assert (exact == planted).all()
    _, got = PartSearch(trained, nprobe=4).search(q, 1, (read_part(p, trained) for p in paths))
    np.testing.assert_array_equal(got[:, 0], planted)


def test_a_part_file_holds_no_quantiser_and_codes_are_sized(index_in_parts, tmp_path):
    x, trained, _ = index_in_parts
    lone = build_part(trained, [x[:400]], start=0)
    write_part(lone, tmp_path / "p.faiss")
    faiss = import_faiss()
    assert faiss.extract_index_ivf(lone).quantizer.ntotal == PARAMS["nlist"]  # restored after write
    assert faiss.read_index(str(tmp_path / "p.faiss")).quantizer.ntotal == 0
    # 400 sq8 codes of 16 dims and ids, plus list headers: about code_bytes each
    assert code_bytes(PARAMS, DIM) == 16 + 8
    assert 400 * 24 <= (tmp_path / "p.faiss").stat().st_size <= 400 * 24 + 4096
    # the trained index keeps the (16, 64) projection, not PCA's 64 x 64 eigenvector matrix
    assert len(faiss.serialize_index(trained)) < DIM * DIM * 4
    with pytest.raises(ValueError, match="no PCA"):
        train_ivf(x[:100], DIM + 1, PARAMS)


def test_merge_topk_orders_by_similarity_then_row():
    sims = np.array([[0.5, 0.9, 0.9, 0.1]], dtype=np.float32)
    ids = np.array([[7, 4, 2, -1]])
    s, i = merge_topk(sims, ids, 4)
    assert i.tolist() == [[2, 4, 7, -1]] and s[0, 3] == -np.inf
