"""P8's index parts: the stored replica index at 1M images, and a 10M-vector IVF index built in parts.

The 1M index (:func:`run_index`): make_shards for ``--index-n`` synthetic 32x32x3 images, then
``jobs/build_index.py --index ivf`` (PCA to 256-d, IVF-SQ8, about 4 sqrt(N) lists, exact re-ranking),
then one query process (:func:`index_queries`) that loads the stored index as a scoring actor does and
searches two query sets:
- near-threshold: blends ``(1 - w) x`` a training image ``+ w x`` a never-drawn synthetic image, w
  uniform in [0.10, 0.34]; a pool of 3x the wanted number is searched exactly and the blends whose
  exact nearest similarity lies within 0.03 below to 0.01 above the threshold (0.97) are kept;
- random: half training images with +-6 grey levels of noise, half never-drawn images.
Both are searched by the index and by exact brute force streamed over all N stored rows (the same
queries, measured at N, not extrapolated): recall@1, decision agreement and the speed-up per set.

The 10M index in parts (:func:`run_parts`): synthetic PCA-dimension (256-d, unit-norm, clustered)
vectors generated per part, no images. One process trains the IVF-SQ8 index once (same parameters
as the replica index: inner product on L2-normalised vectors, nlist round(4 sqrt(N)), a training
sample of max(39 nlist, 20,000), capped as the index helper caps it); then one process per part adds
its ``--part-size`` vectors to a copy of the trained empty index and writes the part. The index
helper's Ray-free builder (``pipeline.fanout.index_parts``: train_ivf, build_part, write_part) is used
when present, else FAISS directly with the same parameters; ``builder`` in the result says which. Each process's peak RSS (``wait4``) and wall time are
recorded; 100M is projected as parts x the per-part cost.
"""

from __future__ import annotations

import json
import math
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from p8_measure import decision_stats, last_json, pick_near_threshold, run_job  # noqa: E402

IMAGE_SIZE = 32
CPUS = 2
THRESHOLD = 0.97
BLEND = (0.10, 0.34)  # blend weights of the near-threshold pool
PART_DIMS = 256
PART_LIMIT_MB = 2048
CHUNK = 65_536  # vectors generated and added at a time


# ------------------------------------------------------------------------------ the 1M index
def blend(train: np.ndarray, other: np.ndarray, w: np.ndarray) -> np.ndarray:
    """``(1 - w) train + w other`` per image, rounded to uint8: (n, H, W, C) each, w (n,)."""
    w = np.asarray(w, dtype=np.float32).reshape(-1, 1, 1, 1)
    out = (1.0 - w) * train.astype(np.float32) + w * other.astype(np.float32)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def index_queries(store_uri: str, dataset: str, num_near: int, num_random: int) -> None:
    """Load the stored index as a scorer does; search near-threshold and random queries with it and
    by streamed exact search; print a JSON line (see the module docstring)."""
    from pipeline.core.config import ReplicaConfig
    from pipeline.data.sources import synthetic_image
    from pipeline.data.storage import open_store
    from pipeline.fanout.replica_index import exact_search, load_replica_index

    store = open_store(store_uri, create=False)
    t0 = time.perf_counter()
    index = load_replica_index(store, dataset, ReplicaConfig(threshold=THRESHOLD, index="ivf"))
    load_s = time.perf_counter() - t0
    n = int(getattr(index, "sidecar", {}).get("num_images") or len(index.keys))
    rng = np.random.default_rng(0)
    fresh = iter(range(10**9))
    new = lambda k: np.stack([synthetic_image(99, next(fresh), IMAGE_SIZE) for _ in range(k)])  # noqa: E731
    # random: noisy training images and never-drawn images
    half = num_random // 2
    rows = index.rows(np.sort(rng.choice(n, half, replace=False))).astype(np.int16)
    noisy = np.clip(rows + rng.integers(-6, 7, rows.shape), 0, 255).astype(np.uint8)
    random_q = np.concatenate([noisy, new(num_random - half)])
    # near-threshold: a pool of blends, kept where the exact nearest similarity is in the band
    pool_n = 3 * num_near
    train = index.rows(np.sort(rng.choice(n, pool_n, replace=False)))
    pool = blend(train, new(pool_n), rng.uniform(*BLEND, pool_n))
    t0 = time.perf_counter()
    pool_sims, _ = exact_search(index, pool)
    select_s = time.perf_counter() - t0
    near_q = pool[pick_near_threshold(pool_sims, THRESHOLD, num_near)]
    queries = np.concatenate([near_q, random_q])
    index.search(queries[:8])  # warm-up
    t0 = time.perf_counter()
    sims, _ = index.search(queries)
    index_s = time.perf_counter() - t0
    scorer_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # before the exact passes
    t0 = time.perf_counter()
    exact, _ = exact_search(index, queries)
    exact_s = time.perf_counter() - t0
    k = len(near_q)
    print(json.dumps({
        "n": n, "load_s": load_s, "scorer_peak_rss_mb": scorer_mb,
        "near_pool": pool_n, "near_in_band": len(pick_near_threshold(pool_sims, THRESHOLD, pool_n)),
        "near": decision_stats(sims[:k], exact[:k], THRESHOLD) if k else None,
        "random": decision_stats(sims[k:], exact[k:], THRESHOLD),
        "queries": len(queries), "index_s": index_s, "exact_s": exact_s,
        "index_qps": len(queries) / index_s, "exact_qps": len(queries) / exact_s,
        "speedup": exact_s / index_s, "pool_exact_s": select_s,
        "exact": "brute force over all stored rows, full-dimensional centred embedding, streamed "
        "8192 rows at a time, in the same process and threads as the index search",
    }), flush=True)  # fmt: skip


def run_index(base: Path, index_n: int, num_near: int = 1000, num_random: int = 1000):
    """The stored IVF index at ``index_n`` images: (results, checks)."""
    store = str(base / "store")
    ds = f"synth{index_n}"
    shutil.rmtree(Path(store) / "data" / ds, ignore_errors=True)
    shutil.rmtree(Path(store) / "indexes" / ds, ignore_errors=True)
    ray_cpus = ["--ray-cpus", str(CPUS)]
    idx: dict = {"index_n": index_n}
    print(f"P8 index N={index_n}: make_shards", flush=True)
    idx["make_shards"] = run_job(
        ["jobs/make_shards.py", "--store", store, *ray_cpus, "--source", "synthetic",
         "--num-images", str(index_n), "--image-size", str(IMAGE_SIZE), "--dataset", ds,
         "--shard-size", "1000", "--no-progress"], base / "index-make_shards.log",
    )  # fmt: skip
    print(f"P8 index N={index_n}: build_index", flush=True)
    idx["build_index"] = run_job(
        ["jobs/build_index.py", "--store", store, "--dataset", ds, "--index", "ivf", *ray_cpus],
        base / "index-build.log",
    )  # fmt: skip
    print(f"P8 index N={index_n}: queries", flush=True)
    q = run_job([__file__, "--index-queries", store, ds, str(num_near), str(num_random)],
                base / "index-queries.log")  # fmt: skip
    q.update(last_json(q.pop("tail")))
    idx["queries"] = q
    for stage in ("make_shards", "build_index"):
        idx[stage].pop("tail", None)
    return {"index": idx}, index_checks(q, idx["build_index"]["memory"])


def index_checks(q: dict, build_memory: dict) -> dict:
    """The index goals: recall@1 >= 0.99 and agreement >= 0.999 near the threshold, >= 10x exact."""
    near = q["near"] or {"recall_at_1": 0.0, "decision_agreement": 0.0, "queries": 0}
    rnd = q["random"]
    return {
        "index_near_recall_at_1": {"value": near["recall_at_1"], "queries": near["queries"],
                                   "goal": ">= 0.99", "met": near["recall_at_1"] >= 0.99},
        "index_near_decision_agreement": {"value": near["decision_agreement"], "goal": ">= 0.999",
                                          "met": near["decision_agreement"] >= 0.999},
        "index_random_recall_at_1": {"value": rnd["recall_at_1"], "queries": rnd["queries"]},
        "index_random_decision_agreement": {"value": rnd["decision_agreement"]},
        "index_speedup_vs_exact": {"value": q["speedup"], "goal": ">= 10", "met": q["speedup"] >= 10},
        "index_scoring_rss_mb": {"value": q["scorer_peak_rss_mb"], "goal": "<= 4096",
                                 "met": q["scorer_peak_rss_mb"] <= 4096},
        "index_build_largest_mb": {"value": build_memory["largest_mb"],
                                   "role": build_memory["largest_role"]},
        "index_build_driver_mb": {"value": build_memory["driver_mb"], "goal": "<= 2048",
                                  "met": build_memory["driver_mb"] <= 2048},
    }  # fmt: skip


# ----------------------------------------------------------------------------- 10M in parts
def part_builder():
    """The index helper's Ray-free part builder (``pipeline.fanout.index_parts``: ``train_ivf``,
    ``build_part``, ``write_part``, with its training-sample cap), or None: FAISS directly, with the
    same parameters."""
    try:
        from pipeline.fanout import index_parts
    except ImportError:
        return None
    needed = ("train_ivf", "build_part", "write_part", "MAX_TRAIN_SAMPLES")
    return index_parts if all(hasattr(index_parts, a) for a in needed) else None


def ivf_params(total: int, cap: int | None = None) -> dict:
    """The replica index's IVF parameters for ``total`` vectors (replica_store.build_params), the
    training sample capped at ``cap`` rows when given."""
    nlist = max(1, min(round(4 * math.sqrt(total)), total // 39 or 1))
    train = min(total, max(39 * nlist, 20_000), cap or total)
    return {"nlist": nlist, "train_samples": train, "codec": "sq8",
            "metric": "inner product on L2-normalised vectors", "seed": 0}  # fmt: skip


def synthetic_vectors(seed: int, start: int, count: int, dims: int = PART_DIMS) -> np.ndarray:
    """``count`` unit-norm float32 vectors of rows ``start...``, a function of (seed, row) blocks of
    :data:`CHUNK` (``start`` a multiple of it): 1,024 Gaussian clusters with a decaying per-dimension
    scale, as PCA outputs have."""
    if start % CHUNK:
        raise ValueError(f"start must be a multiple of {CHUNK}, got {start}")
    scale = (1.0 / np.sqrt(1.0 + np.arange(dims) / 16.0)).astype(np.float32)
    centres = np.random.default_rng(12345).standard_normal((1024, dims), dtype=np.float32) * scale
    out = []
    for lo in range(start, start + count, CHUNK):
        rng = np.random.default_rng((seed, lo))
        n = min(CHUNK, start + count - lo)  # a whole chunk is drawn: a row never depends on n
        c = rng.integers(0, 1024, CHUNK)[:n]
        x = centres[c] + 0.5 * rng.standard_normal((CHUNK, dims), np.float32)[:n] * scale
        out.append(x / np.linalg.norm(x, axis=1, keepdims=True))
    return np.concatenate(out)


def _chunks(start: int, count: int, dims: int):
    for lo in range(start, start + count, CHUNK):
        yield synthetic_vectors(1, lo, min(CHUNK, start + count - lo), dims)


def train_part_index(work: str, total: int, dims: int) -> None:
    """One process: the trained empty IVF-SQ8 index for ``total`` vectors, written to
    ``work/trained.faiss``; prints a JSON line."""
    import faiss

    helper = part_builder()
    params = ivf_params(total, helper.MAX_TRAIN_SAMPLES if helper else None)
    t0 = time.perf_counter()
    sample = synthetic_vectors(7, 0, params["train_samples"], dims)  # another seed than the parts
    if helper:
        index = helper.train_ivf(sample, dims, params)
    else:
        quantizer = faiss.IndexFlatIP(dims)
        index = faiss.IndexIVFScalarQuantizer(quantizer, dims, params["nlist"],
                                              faiss.ScalarQuantizer.QT_8bit, faiss.METRIC_INNER_PRODUCT)  # fmt: skip
        index.cp.seed = params["seed"]
        index.train(sample)
    faiss.write_index(index, str(Path(work) / "trained.faiss"))
    print(json.dumps({**params, "seconds": time.perf_counter() - t0, "peak_rss_mb": _peak_mb(),
                      "builder": "index_parts" if helper else "faiss"}), flush=True)  # fmt: skip


def build_part(work: str, part: int, start: int, count: int, dims: int) -> None:
    """One process: a part's vectors (generated chunk by chunk) added with global ids to a copy of
    the trained empty index, written to ``work/part-<part>.faiss``; prints a JSON line."""
    import faiss

    helper = part_builder()
    t0 = time.perf_counter()
    trained = faiss.read_index(str(Path(work) / "trained.faiss"))
    out = Path(work) / f"part-{part:05d}.faiss"
    if helper:  # pipeline.fanout.index_parts: the part file holds codes and ids, not the quantiser
        index = helper.build_part(trained, _chunks(start, count, dims), start)
        helper.write_part(index, out)
    else:
        index = trained
        for lo in range(start, start + count, CHUNK):
            n = min(CHUNK, start + count - lo)
            x = synthetic_vectors(1, lo, n, dims)
            index.add_with_ids(x, np.arange(lo, lo + n, dtype=np.int64))
        faiss.write_index(index, str(out))
    print(json.dumps({"part": part, "vectors": int(index.ntotal), "bytes": out.stat().st_size,
                      "seconds": time.perf_counter() - t0, "peak_rss_mb": _peak_mb(),
                      "builder": "index_parts" if helper else "faiss"}), flush=True)  # fmt: skip


def run_process(args: list[str]) -> dict:
    """Run ``python <args>``: its JSON line (which carries its own peak RSS) and the wall seconds."""
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=HERE.parent)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} exited {proc.returncode}:\n{proc.stderr[-3000:]}")
    return {**last_json(proc.stdout.splitlines()), "wall_s": time.perf_counter() - t0}


def _peak_mb() -> float:
    """This process's peak RSS in MB (Linux reports ru_maxrss in KB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def project_parts(parts: list[dict], train: dict, vectors: int, target: int = 100_000_000) -> dict:
    """100M (``target``) from a build of ``vectors`` in parts: parts x the median per-part time, the
    largest part task, storage in proportion, and the one-off training, whose k-means work (39 nlist
    training rows x nlist lists, nlist ~ 4 sqrt(N)) grows as N, while each part's add (assigning its
    vectors to nlist lists) grows as sqrt(N) at a fixed part size."""
    if not parts:
        raise ValueError("no parts were built")
    per_part = sorted(p["wall_s"] for p in parts)[len(parts) // 2]
    size = max(p["vectors"] for p in parts)
    n_parts = math.ceil(target / size)
    growth = math.sqrt(target / vectors)
    stored = sum(p["bytes"] for p in parts) / sum(p["vectors"] for p in parts)
    return {
        "target_vectors": target, "parts": n_parts, "part_vectors": size,
        "per_part_s_measured": per_part, "per_part_s_projected": per_part * growth,
        "part_task_peak_mb_measured": max(p["peak_rss_mb"] for p in parts),
        "vcpu_hours_projected": n_parts * per_part * growth * CPUS / 3600,
        "train_s_projected": train["wall_s"] * target / vectors,
        "index_bytes_projected": stored * target,
        "basis": "projected: parts x measured per-part cost (x sqrt(100M / N) for the longer "
        "list assignment), training x 100M / N; per-part memory is bounded by the part size",
    }  # fmt: skip


def run_parts(base: Path, vectors: int, part_size: int = 1_000_000, dims: int = PART_DIMS):
    """A ``vectors``-vector IVF-SQ8 index built in parts of ``part_size``: (results, checks)."""
    work = base / "parts"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    part_size = max(CHUNK, part_size // CHUNK * CHUNK)  # whole generator chunks
    print(f"P8 parts: training the IVF index for {vectors} vectors", flush=True)
    train = run_process([__file__, "--train-part-index", str(work), str(vectors), str(dims)])
    parts = []
    for i, start in enumerate(range(0, vectors, part_size)):
        count = min(part_size, vectors - start)
        print(f"P8 parts: part {i} ({count} vectors)", flush=True)
        parts.append(run_process(
            [__file__, "--build-part", str(work), str(i), str(start), str(count), str(dims)]
        ))  # fmt: skip
        (work / f"part-{i:05d}.faiss").unlink()  # the size is recorded; the disk is not needed
    largest = max([p["peak_rss_mb"] for p in parts] + [train["peak_rss_mb"]])
    out = {"vectors": vectors, "dims": dims, "part_size": part_size, "train": train,
           "parts": parts, "builder": parts[0]["builder"],
           "projection_100m": project_parts(parts, train, vectors)}  # fmt: skip
    checks = {"parts_task_peak_mb": {"value": largest, "goal": f"<= {PART_LIMIT_MB}",
                                     "met": largest <= PART_LIMIT_MB}}  # fmt: skip
    return {"parts_index": out}, checks


def main() -> None:
    cmd, *args = sys.argv[1:]
    if cmd == "--index-queries":
        index_queries(args[0], args[1], int(args[2]), int(args[3]))
    elif cmd == "--train-part-index":
        train_part_index(args[0], int(args[1]), int(args[2]))
    elif cmd == "--build-part":
        build_part(args[0], *(int(a) for a in args[1:]))
    else:
        raise SystemExit(f"usage: {__file__} --index-queries|--train-part-index|--build-part ...")


if __name__ == "__main__":
    main()
