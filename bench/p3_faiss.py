"""P3: FAISS exact search ÷ torch brute force, then IVF ÷ exact at a large synthetic training set.

Part 1 (the ratio): nearest training vector of each query, inner product on L2-normalised
vectors, 3x32x32 = 3072-d (CIFAR-size images), FAISS ``IndexFlatIP`` against ``torch`` matmul + top-1
in query chunks. Both use the same number of threads; they are run interleaved and the ratio of
the medians is the speed-up of FAISS. Part 2 (details): an ``IndexIVFFlat`` against exact search on
clustered synthetic vectors (random Gaussian data has no neighbourhood structure for IVF to exploit;
real embeddings do), with recall@1 measured against the exact answers, at ``nprobe`` 32 and along a
curve of ``nprobe`` values that includes the replica check's default (``ReplicaConfig.nprobe``, 256).
These are a bench setting, not the replica index's: ``nlist`` is fixed at 1024 (the stored index's
default at 1M is about 4 x sqrt(N) = 4,000 lists, with PCA, sq8 codes and exact re-ranking of 32
candidates; ``bench/p8_scale.py`` measures that index). The clusters overlap (noise 0.7 per dimension
around 4 x nlist centres): with well-separated clusters (noise 0.35) recall is 1.0 even at ``nprobe``
1, which says nothing; at 1.0 the data is close to structureless.
"""

from __future__ import annotations

import statistics
import time

import numpy as np
import torch

from pipeline.fanout.index import build_index, index_recall, l2_normalise, nearest


def _torch_top1(train: torch.Tensor, queries: torch.Tensor, chunk: int = 1024):
    sims, idx = [], []
    for lo in range(0, len(queries), chunk):
        s, i = torch.max(queries[lo : lo + chunk] @ train.T, dim=1)
        sims.append(s)
        idx.append(i)
    return torch.cat(sims).numpy(), torch.cat(idx).numpy()


def _timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def exact_vs_torch(n_train: int, n_query: int, dim: int, repeats: int) -> dict:
    rng = np.random.default_rng(0)
    train = l2_normalise(rng.standard_normal((n_train, dim), dtype=np.float32))
    queries = l2_normalise(rng.standard_normal((n_query, dim), dtype=np.float32))
    t_build, index = _timed(lambda: build_index(train, "flat"))
    tt, tq = torch.from_numpy(train), torch.from_numpy(queries)
    times: dict[str, list[float]] = {"faiss": [], "torch": []}
    for _ in range(repeats):
        t, (f_sims, f_idx) = _timed(lambda: nearest(index, queries))
        times["faiss"].append(t)
        t, (t_sims, t_idx) = _timed(lambda: _torch_top1(tt, tq))
        times["torch"].append(t)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {
        "ratio": med["torch"] / med["faiss"],
        "faiss_s": med["faiss"], "torch_s": med["torch"], "faiss_add_s": t_build,
        "agreement": float((f_idx[:, 0] == t_idx).mean()),
        "max_abs_sim_diff": float(np.abs(f_sims[:, 0] - t_sims).max()),
        "n_train": n_train, "n_query": n_query, "dim": dim, "repeats": repeats,
    }  # fmt: skip


def ivf_vs_exact(
    n_train: int,
    n_query: int,
    dim: int,
    nlist: int,
    nprobe: int,
    repeats: int,
    noise: float = 0.7,
    curve: tuple[int, ...] = (1, 4, 8, 16, 64),
) -> dict:
    rng = np.random.default_rng(1)
    centres = rng.standard_normal((4 * nlist, dim), dtype=np.float32)
    train = np.empty((n_train, dim), np.float32)
    for lo in range(0, n_train, 100_000):  # chunks keep the temporary small
        n = min(100_000, n_train - lo)
        jitter = rng.standard_normal((n, dim), dtype=np.float32) * noise
        train[lo : lo + n] = centres[rng.integers(0, len(centres), n)] + jitter
    train = l2_normalise(train)
    queries = l2_normalise(
        centres[rng.integers(0, len(centres), n_query)]
        + rng.standard_normal((n_query, dim), dtype=np.float32) * noise
    )
    t_flat, flat = _timed(lambda: build_index(train, "flat"))
    t_ivf, ivf = _timed(lambda: build_index(train, "ivf", nlist, nprobe))
    times: dict[str, list[float]] = {"exact": [], "ivf": []}
    for _ in range(repeats):
        t, (e_sims, _) = _timed(lambda: nearest(flat, queries))
        times["exact"].append(t)
        t, (i_sims, _) = _timed(lambda: nearest(ivf, queries))
        times["ivf"].append(t)
    med = {k: statistics.median(v) for k, v in times.items()}
    points = []
    for probe in sorted({*curve, nprobe}):
        ivf.nprobe = probe
        runs = [_timed(lambda: nearest(ivf, queries)) for _ in range(repeats)]
        t, sims = statistics.median(r[0] for r in runs), runs[-1][1][0]
        points.append(
            {"nprobe": probe, "speedup": med["exact"] / t,
             "recall": index_recall(sims[:, 0], e_sims[:, 0])}
        )  # fmt: skip
    ivf.nprobe = nprobe
    return {
        "ivf_speedup": med["exact"] / med["ivf"],
        "ivf_recall": index_recall(i_sims[:, 0], e_sims[:, 0]),
        "ivf_exact_s": med["exact"], "ivf_s": med["ivf"], "ivf_build_s": t_ivf,
        "ivf_flat_add_s": t_flat, "ivf_n_train": n_train, "ivf_n_query": n_query,
        "ivf_dim": dim, "ivf_nlist": ivf.nlist, "ivf_nprobe": ivf.nprobe, "ivf_noise": noise,
        "ivf_curve": points,
    }  # fmt: skip


def run(
    n_train: int = 50_000,
    n_query: int = 10_000,
    dim: int = 3 * 32 * 32,
    ivf_n: int = 1_000_000,
    ivf_dim: int = 128,
    ivf_queries: int = 1000,
    nlist: int = 1024,
    nprobe: int = 32,
    repeats: int = 3,
    threads: int = 1,
) -> dict:
    """``nprobe``: the IVF headline's setting; the curve also holds the replica check's default."""
    import faiss

    from pipeline.core.config import ReplicaConfig

    faiss.omp_set_num_threads(threads)
    torch.set_num_threads(threads)
    out = exact_vs_torch(n_train, n_query, dim, repeats)
    curve = (1, 4, 8, 16, 64, ReplicaConfig().nprobe)
    out.update(ivf_vs_exact(ivf_n, ivf_queries, ivf_dim, nlist, nprobe, repeats, curve=curve))
    out.update(goal=">= 1.0", threads=threads, faiss_version=faiss.__version__)
    return out
