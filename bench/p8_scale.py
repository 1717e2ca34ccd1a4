"""P8: scale. Synthetic 32x32x3 images through every stage at N = 20k and 200k, and a 1M-image index.

    python bench/run.py --only P8                     # the whole benchmark (about an hour on 2 CPUs)
    python bench/p8_scale.py --sizes 2000 --index-n 20000 --work /tmp/p8-small   # a quick look

Every stage runs as its own job process (``jobs/*.py``, each with a private local Ray of 2 CPUs), so
the measurement is what a user running the job sees. A monitor thread samples, every 0.2 s, the RSS of
the job's process tree with psutil: the driver (the job process) and every Ray process under it (Ray
workers, titled ``ray::<task or actor>``, and Ray's own daemons). Per stage it records the wall time and
the peak RSS of the driver and of each kind of process.

Stages at each N (one store, datasets ``synth<N>``): make_shards (``--source synthetic``), one epoch
of the training input (``pipeline.train.ingest.training_dataset`` read and decoded by Ray Data, no model:
the images/s one CPU can feed), the denoiser and the classifier jobs at a fixed number of steps, guarded
sampling (guard mode against ``synth<N>``) and check_replicas of those samples.

The 1M index: make_shards for 1M images, then ``jobs/build_index.py`` (PCA + IVF, built once and stored),
then a query process that loads the stored index as a scoring actor does and searches a query sample
(half perturbed training images, half images never drawn), against exact brute-force search over all
1M full-dimensional embeddings: recall@1, replicate-decision agreement, query throughput, and that
process's peak RSS.

Goals (issue 16): peak RSS of every process at 200k <= 1.25x its 20k value; time per image at 200k <=
1.1x that at 20k for make_shards and the input epoch; the 1M index: recall@1 >= 0.99, agreement >=
0.999, >= 10x exact flat search's query throughput, scoring RSS <= 4 GB, driver RSS <= 2 GB.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

IMAGE_SIZE = 32
FLAT_ROWS = 100_000  # rows of the exact IndexFlatIP baseline (timed, then scaled to N)
CPUS = 2
DEN_YAML = """unet:
  sample_size: 32
  channels: 3
  block_out_channels: [16, 32]
  layers_per_block: 1
  norm_num_groups: 8
train:
  batch_size: 32
  checkpoint_every: 20
"""
CLF_YAML = """arch:
  sample_size: 32
  channels: 3
  base_channels: 16
  channel_mults: [1, 2]
train:
  batch_size: 32
  checkpoint_every: 20
  warmup_steps: 5
"""


# ------------------------------------------------------------------------------------ RSS monitor
def _role(proc) -> str:
    """A process's kind: the driver, a Ray worker by its title (``ray::ReplicaScorer``...), or a daemon."""
    try:
        cmd = " ".join(proc.cmdline())
    except Exception:  # a process that just exited
        return "gone"
    title = cmd.split()[0] if cmd else proc.name()
    if title.startswith(("ray::DashboardAgent", "ray::RuntimeEnvAgent")):
        return "ray_daemon " + title.removeprefix("ray::")
    if title.startswith("ray::"):
        name = re.sub(r"[^A-Za-z0-9_:.]", "", title.split()[0])
        return "ray_worker " + name.removesuffix(":").split(".")[0]
    for daemon in ("raylet", "gcs_server", "dashboard", "log_monitor", "monitor.py", "agent"):
        if daemon in cmd:
            return f"ray_daemon {daemon}"
    return "other " + proc.name()


class TreeRss:
    """Peak RSS per process of a process tree, sampled every ``interval`` seconds in a thread."""

    def __init__(self, pid: int, interval: float = 0.2):
        import psutil

        self.root = psutil.Process(pid)
        self.interval = interval
        self.peaks: dict[int, tuple[str, int]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        import psutil

        while not self._stop.is_set():
            try:
                procs = [self.root, *self.root.children(recursive=True)]
            except psutil.NoSuchProcess:
                break
            for p in procs:
                try:
                    rss = p.memory_info().rss
                except psutil.Error:
                    continue
                role = "driver" if p.pid == self.root.pid else _role(p)
                old_role, old_rss = self.peaks.get(p.pid, (role, 0))
                # a worker's title changes (ray::IDLE -> ray::ReplicaScorer): keep the busy one
                keep = old_role if "IDLE" in role or role == "gone" else role
                self.peaks[p.pid] = (keep, max(rss, old_rss))
            self._stop.wait(self.interval)

    def stop(self) -> dict[str, float]:
        """Peak RSS in MB by role (the largest process of each role), plus ``driver``."""
        self._stop.set()
        self._thread.join()
        by_role: dict[str, float] = {}
        for role, rss in self.peaks.values():
            by_role[role] = max(by_role.get(role, 0.0), rss / 2**20)
        return dict(sorted(by_role.items()))


def run_job(args: list[str], log: Path, env: dict | None = None) -> dict:
    """Run ``python <args>`` from the repo root; wall time, peak RSS by role, and the last lines."""
    t0 = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, *args], cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
            env={**os.environ, "RAY_DEDUP_LOGS": "0", **(env or {})},
        )  # fmt: skip
        monitor = TreeRss(proc.pid)
        rc = proc.wait()
    peaks = monitor.stop()
    tail = log.read_text().splitlines()[-15:]
    if rc != 0:
        raise RuntimeError(f"{' '.join(args)} exited {rc}:\n" + "\n".join(tail))
    return {"wall_s": time.perf_counter() - t0, "peak_rss_mb": peaks, "tail": tail}


# --------------------------------------------------------------------------- in-process helpers
def input_epoch(store_uri: str, dataset: str) -> None:
    """One epoch of the training input (Ray Data read + decode, no model); prints a JSON line."""
    import ray

    from pipeline.data.layout import data_folder
    from pipeline.data.storage import open_store
    from pipeline.fanout.ray_init import init_ray
    from pipeline.train.ingest import training_dataset

    init_ray(num_cpus=CPUS)
    ray.data.DataContext.get_current().enable_progress_bars = False
    ds = training_dataset(open_store(store_uri, create=False), data_folder(dataset, "train"))
    n, t0 = 0, time.perf_counter()
    for batch in ds.iter_batches(batch_size=256, batch_format="numpy"):
        n += len(batch["key"])
    print(json.dumps({"images": n, "seconds": time.perf_counter() - t0}), flush=True)


def index_queries(store_uri: str, dataset: str, num_queries: int, threshold: float) -> None:
    """Load the stored index as a scoring actor does; search queries; compare with exact search."""
    import numpy as np

    from pipeline.core.config import ReplicaConfig
    from pipeline.data.sources import synthetic_image
    from pipeline.data.storage import open_store
    from pipeline.data.subsets import pick_images
    from pipeline.fanout.replica_index import exact_search, load_replica_index

    store = open_store(store_uri, create=False)
    cfg = ReplicaConfig(threshold=threshold)
    t0 = time.perf_counter()
    index = load_replica_index(store, dataset, cfg)
    load_s = time.perf_counter() - t0
    rng = np.random.default_rng(0)
    half = num_queries // 2
    train, _ = pick_images(store, f"data/{dataset}/train", half, seed=5)
    noisy = np.clip(train.images.astype(np.int16) + rng.integers(-6, 7, train.images.shape), 0, 255)
    fresh = np.stack([synthetic_image(99, i, IMAGE_SIZE) for i in range(num_queries - len(train))])
    queries = np.concatenate([noisy.astype(np.uint8), fresh])
    index.search(queries[:8])  # warm-up
    t0 = time.perf_counter()
    sims, _ = index.search(queries)
    approx_s = time.perf_counter() - t0
    # what a scoring actor holds: the loaded index after searching (peak so far, before the baselines)
    scorer_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    t0 = time.perf_counter()
    exact_sims, _ = exact_search(index, queries)
    exact_s = time.perf_counter() - t0
    # the exact flat baseline: FAISS IndexFlatIP over in-memory full-dimensional embeddings. Its search
    # time is linear in N, so it is timed on the first FLAT_ROWS rows (1.2 GB at 3072-d; all 1M would
    # take 12 GB) and scaled to N.
    import faiss

    blocks, held = [], 0
    for _, block in index.iter_rows(8192):
        blocks.append(index.embed(block))
        held += len(block)
        if held >= FLAT_ROWS:
            break
    flat = faiss.IndexFlatIP(blocks[0].shape[1])
    flat.add(np.ascontiguousarray(np.concatenate(blocks), dtype=np.float32))
    del blocks
    q = np.ascontiguousarray(index.embed(queries), dtype=np.float32)
    t0 = time.perf_counter()
    flat.search(q, 1)
    flat_s = (time.perf_counter() - t0) * len(index.keys) / flat.ntotal
    del flat
    hit = sims >= exact_sims - 1e-5
    agree = (sims >= threshold) == (exact_sims >= threshold)
    print(json.dumps({
        "queries": len(queries), "load_s": load_s, "scorer_peak_rss_mb": scorer_mb,
        "recall_at_1": float(hit.mean()), "decision_agreement": float(agree.mean()),
        "replicates_exact": int((exact_sims >= threshold).sum()),
        "index_qps": len(queries) / approx_s, "streamed_exact_qps": len(queries) / exact_s,
        "flat_ip_qps": len(queries) / flat_s, "flat_ip_timed_rows": held,
        "speedup": flat_s / approx_s, "speedup_vs_streamed_exact": exact_s / approx_s,
    }), flush=True)  # fmt: skip


# ------------------------------------------------------------------------------------ the stages
def stages_at(n: int, store: str, work: Path, steps: int) -> dict:
    ds, run = f"synth{n}", f"bench{n}"
    den, clf = work / "den.yaml", work / "clf.yaml"
    den.write_text(DEN_YAML)
    clf.write_text(CLF_YAML)
    common = ["--store", store, "--ray-cpus", str(CPUS)]
    out = {}
    shutil.rmtree(Path(store) / "data" / ds, ignore_errors=True)  # time a fresh write
    print(f"P8 N={n}: make_shards", flush=True)
    out["make_shards"] = run_job(
        ["jobs/make_shards.py", *common, "--source", "synthetic", "--num-images", str(n),
         "--image-size", str(IMAGE_SIZE), "--dataset", ds, "--shard-size", "1000",
         "--no-progress"], work / f"make_shards-{n}.log",
    )  # fmt: skip
    out["make_shards"]["images_per_s"] = n / out["make_shards"]["wall_s"]
    print(f"P8 N={n}: input epoch", flush=True)
    res = run_job([__file__, "--input-epoch", store, ds], work / f"input-{n}.log")
    epoch = json.loads(next(x for x in reversed(res["tail"]) if x.startswith("{")))
    res.update(epoch, images_per_s=epoch["images"] / epoch["seconds"])
    res["images_per_s_per_cpu"] = res["images_per_s"] / CPUS
    out["input_epoch"] = res
    train = ["--steps", str(steps), "--overwrite", "--threads", "1"]
    print(f"P8 N={n}: denoiser", flush=True)
    out["train_denoiser"] = run_job(
        ["jobs/train_denoiser.py", *common, "--dataset", ds, "--run", run, "--config", str(den),
         *train], work / f"denoiser-{n}.log",
    )  # fmt: skip
    print(f"P8 N={n}: classifier", flush=True)
    out["train_classifier"] = run_job(
        ["jobs/train_classifier.py", *common, "--dataset", ds, "--run", run, "--config", str(clf),
         *train], work / f"classifier-{n}.log",
    )  # fmt: skip
    print(f"P8 N={n}: guarded sampling", flush=True)
    out["sample_guarded"] = run_job(
        ["jobs/sample.py", "--store", store, "--run", run, "--sampler", "cpsample",
         "--num-samples", "32", "--samples-per-shard", "16", "--batch-size", "16", "--steps", "5",
         "--guard", "0.97", "--dataset", ds, "--overwrite", "--concurrency", "1",
         "--allow-unfit"],  # a few-step classifier: P8 measures cost, not protection
        work / f"sample-{n}.log",
    )  # fmt: skip
    print(f"P8 N={n}: check_replicas", flush=True)
    out["check_replicas"] = run_job(
        ["jobs/check_replicas.py", "--store", store, "--run", run, "--dataset", ds,
         "--sampler", "cpsample"], work / f"check-{n}.log",
    )  # fmt: skip
    return out


def _ratio(big: float, small: float) -> float:
    return big / small if small else float("nan")


def run_stages(base: Path, sizes: tuple[int, int], steps: int) -> tuple[dict, dict]:
    """Every stage at both sizes: (results, checks)."""
    store = str(base / "store")
    per_n = {n: stages_at(n, store, base, steps) for n in sizes}
    small, big = sizes
    checks = {}
    for stage in per_n[small]:
        a, b = per_n[small][stage]["peak_rss_mb"], per_n[big][stage]["peak_rss_mb"]
        ratios = {role: _ratio(b[role], a[role]) for role in a if role in b and a[role] > 50}
        worst = max(ratios, key=ratios.get)
        checks[f"{stage}_rss_ratio"] = {"worst_role": worst, "ratio": ratios[worst],
                                        "goal": "<= 1.25", "met": ratios[worst] <= 1.25}  # fmt: skip
    for stage, key in (("make_shards", "images_per_s"), ("input_epoch", "images_per_s")):
        r = _ratio(per_n[small][stage][key], per_n[big][stage][key])  # time/image big / small
        checks[f"{stage}_time_per_image_ratio"] = {"ratio": r, "goal": "<= 1.1", "met": r <= 1.1}
    feed = per_n[big]["input_epoch"]["images_per_s_per_cpu"]
    demand = _step_demand(per_n[big]["train_denoiser"]["tail"])
    out = {
        "sizes": list(sizes), "steps": steps,
        "stages": {str(n): v for n, v in per_n.items()},
        "input_vs_step": {
            "input_images_per_s_per_cpu": feed,
            "bench_denoiser_cpu_step_images_per_s": demand,
            "cpus_per_cpu_worker_needed": None if demand is None else demand / feed,
            "note": "a GPU worker's step demand was not measured here (no GPU); CPUs per GPU "
            "worker = its step images/s / input_images_per_s_per_cpu",
        },
    }  # fmt: skip
    return out, checks


def run_index(base: Path, index_n: int, num_queries: int) -> tuple[dict, dict]:
    """The stored index at ``index_n`` images: (results, checks)."""
    store = str(base / "store")
    ds = f"synth{index_n}"
    shutil.rmtree(Path(store) / "data" / ds, ignore_errors=True)
    shutil.rmtree(Path(store) / "indexes" / ds, ignore_errors=True)
    print(f"P8 index N={index_n}: make_shards", flush=True)
    idx: dict = {"index_n": index_n}
    idx["make_shards"] = run_job(
        ["jobs/make_shards.py", "--store", store, "--ray-cpus", str(CPUS), "--source", "synthetic",
         "--num-images", str(index_n), "--image-size", str(IMAGE_SIZE), "--dataset", ds,
         "--shard-size", "1000", "--no-progress"], base / "make_shards-index.log",
    )  # fmt: skip
    idx["make_shards"]["images_per_s"] = index_n / idx["make_shards"]["wall_s"]
    print(f"P8 index N={index_n}: build_index", flush=True)
    idx["build_index"] = run_job(
        ["jobs/build_index.py", "--store", store, "--dataset", ds, "--ray-cpus", str(CPUS)],
        base / "build-index.log",
    )  # fmt: skip
    print(f"P8 index N={index_n}: queries", flush=True)
    q = run_job([__file__, "--index-queries", store, ds, str(num_queries)], base / "queries.log")
    q.update(json.loads(next(x for x in reversed(q["tail"]) if x.startswith("{"))))
    idx["queries"] = q
    driver_peak = idx["build_index"]["peak_rss_mb"].get("driver", 0.0)
    workers = [v for k, v in idx["build_index"]["peak_rss_mb"].items() if k != "driver"]
    scorer = q["scorer_peak_rss_mb"]  # the query process loaded and searched the index as a scorer
    checks = {
        "index_recall_at_1": {"value": q["recall_at_1"], "goal": ">= 0.99",
                              "met": q["recall_at_1"] >= 0.99},
        "index_decision_agreement": {"value": q["decision_agreement"], "goal": ">= 0.999",
                                     "met": q["decision_agreement"] >= 0.999},
        "index_speedup_vs_exact": {"value": q["speedup"], "goal": ">= 10",
                                   "met": q["speedup"] >= 10},
        "index_scoring_rss_mb": {"value": scorer, "goal": "<= 4096", "met": scorer <= 4096},
        "index_build_driver_rss_mb": {"value": driver_peak, "goal": "<= 2048",
                                      "met": driver_peak <= 2048},
        "index_build_worker_rss_mb": {"value": max(workers, default=0.0)},
    }  # fmt: skip
    return {"index": idx}, checks


def run(
    work: str | None = None,
    sizes: tuple[int, int] = (20_000, 200_000),
    index_n: int = 1_000_000,
    steps: int = 20,
    num_queries: int = 1000,
    parts: tuple[str, ...] = ("stages", "index"),
    previous: dict | None = None,
) -> dict:
    """P8's results.json entry: ``parts`` measured now, merged over ``previous`` (an earlier entry)."""
    base = Path(work or tempfile.mkdtemp(prefix="p8-"))
    base.mkdir(parents=True, exist_ok=True)
    result = dict(previous or {})
    checks = dict(result.get("checks", {}))
    result.update(image_size=IMAGE_SIZE, cpus=CPUS)
    for part in parts:
        out, new = (
            run_stages(base, sizes, steps)
            if part == "stages"
            else run_index(base, index_n, num_queries)
        )
        result.update(out)
        result[f"{part}_measured_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        checks = {k: v for k, v in checks.items() if k.startswith("index_") == (part == "stages")}
        checks.update(new)
    result["checks"] = dict(sorted(checks.items()))
    result["all_met"] = all(c.get("met", True) for c in checks.values())
    return result


def _step_demand(tail: list[str]) -> float | None:
    """images/s of the bench denoiser's training steps, from the job's last metrics line."""
    for line in reversed(tail):
        m = re.search(r"'images_per_s': ([0-9.e+-]+)", line)
        if m:
            return float(m.group(1))
    return None


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--input-epoch", nargs=2, metavar=("STORE", "DATASET"))
    p.add_argument("--index-queries", nargs=3, metavar=("STORE", "DATASET", "QUERIES"))
    p.add_argument("--work")
    p.add_argument("--sizes", type=int, nargs=2, default=(20_000, 200_000))
    p.add_argument("--index-n", type=int, default=1_000_000)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--part", action="append", choices=["stages", "index"])
    p.add_argument("--out", help="merge the result into this results.json's P8 entry")
    args = p.parse_args()
    if args.input_epoch:
        input_epoch(*args.input_epoch)
    elif args.index_queries:
        store, ds, nq = args.index_queries
        index_queries(store, ds, int(nq), 0.97)
    else:
        results = json.loads(Path(args.out).read_text()) if args.out else {}
        res = run(args.work, tuple(args.sizes), args.index_n, args.steps,
                  parts=tuple(args.part or ("stages", "index")), previous=results.get("P8"))  # fmt: skip
        print(json.dumps(res, indent=2))
        if args.out:
            res["measured_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
            res["machine"] = f"{os.uname().machine}, {os.cpu_count()} CPUs"
            results["P8"] = res
            Path(args.out).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
