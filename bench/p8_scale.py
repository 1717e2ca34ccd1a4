"""P8: scale, measured per stage at several N, on a local store and once on loopback S3.

    python bench/run.py --only P8                                   # the full benchmark
    python bench/p8_scale.py --sizes 20000 110000 200000 --out bench/results.json
    python bench/p8_scale.py --sizes 500 1250 2000 --index-n 20000 --part-vectors 200000 \
        --s3-size 500 --work /tmp/p8-tiny                            # a quick end-to-end look

Every stage runs as its own job process (``jobs/*.py``, each with a private local Ray of 2 CPUs), so
the measurement is what a user running the job sees. :class:`p8_measure.TreeRss` samples every 0.2 s
the RSS of the job's whole process tree; per stage the result holds the wall time, the **largest
process whatever its name** (``largest_mb``) and the **driver on its own** (``driver_mb``).

Work that grows with N, at each size N (dataset ``synth<N>``, synthetic 32x32x3 images):
- make_shards (N images), one epoch of the training input (the Ray Data read + decode a training
  worker streams, no model: N x 0.9 images) and build_index (``--index ivf`` at every size, with its
  recall measurement, so that one kind of index is compared; the default exact index, used up to
  50,000 training images, is bounded by those 50,000 rows);
- sampling, check_replicas and evaluate over N/10 samples: CPSample in guard mode (0.97) against the
  stored index, with the tiniest denoiser that runs the real stage (a UNet2DModel of 8/16 channels,
  ~25k parameters) and 2 DDIM steps (t = 500, 0: guidance fires at both, t < 600); evaluate runs the
  three attacks on 32 members and 32 non-members (1 draw) and the threshold-free shares (500
  held-out images): what grows with N there is the samples it reads and searches. FID is skipped
  (no Inception weights offline).
- training, denoiser and classifier, at a fixed number of steps (``--steps``): their memory is
  compared, their time is not per image; the data their input epoch streams is the input_epoch stage.
  The classifier gives bits to min(1,000, N/40) held-out images (half the held-out split at small N,
  so that evaluate keeps never-seen non-members).
  Both stream at every size (``cache_max_bytes: 0``): the cached small-data path is bounded by its
  256 MiB limit, not by N.

Goals (issue 27 item 7; :mod:`p8_measure` defines each):
- memory: each stage's largest process and its driver at the largest size <= 1.25x the smallest;
- time: the marginal cost per unit of work (seconds per image, or per sample for the sample stages),
  ``(wall(b) - wall(a)) / (units(b) - units(a))`` between consecutive sizes (start-up cancels), over
  the last interval (110k -> 200k) <= 1.1x that over the first (20k -> 110k);
- S3: one run at ``--s3-size`` on a moto server (its own process) counts the requests of each stage,
  per unit of work, from moto's request log.
The index (1M queries, 10M built in parts) is :mod:`p8_index`.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from p8_measure import (  # noqa: E402
    MotoServer,
    count_requests,
    last_json,
    marginal_costs,
    marginal_ratio,
    memory_ratios,
    run_job,
    startup_s,
)

IMAGE_SIZE = 32
CPUS = 2
SAMPLES_PER_IMAGE = 0.1  # samples = N/10
DDIM_STEPS = 2
SAMPLES_PER_SHARD = 250
DEN_YAML = """unet:
  sample_size: 32
  channels: 3
  block_out_channels: [8, 16]
  layers_per_block: 1
  attention_levels: []
  norm_num_groups: 8
train:
  batch_size: 32
  checkpoint_every: 20
  cache_max_bytes: 0
"""
CLF_YAML = """arch:
  sample_size: 32
  channels: 3
  base_channels: 8
  channel_mults: [1, 2]
  time_embed_dim: 16
  num_groups: 8
train:
  batch_size: 32
  checkpoint_every: 20
  warmup_steps: 5
  cache_max_bytes: 0
"""
LEGACY_KEYS = ("input_vs_step",)  # an older P8 entry's keys that no part rewrites
# stage -> the work it does at N: "images" (N), "train" (the training split), "samples" (N/10), None
WORK = {
    "make_shards": "images", "input_epoch": "train", "train_denoiser": None,
    "train_classifier": None, "build_index": "images", "sample_guarded": "samples",
    "check_replicas": "samples", "evaluate": "samples",
}  # fmt: skip


def num_samples(n: int) -> int:
    """The samples drawn, checked and evaluated at N images: N/10, at least one shard's worth of 1."""
    return max(1, round(n * SAMPLES_PER_IMAGE))


def classifier_holdout(n: int) -> int:
    """Held-out images the classifier gives bits to: its default 1,000, but at most half the held-out
    split (about N/20), so that evaluate keeps never-seen non-members at small N."""
    return max(1, min(1000, n // 40))


# --------------------------------------------------------------------------- in-process helper
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


# ------------------------------------------------------------------------------------ the stages
def stage_commands(n: int, store: str, work: Path, steps: int) -> dict[str, list[str]]:
    """The job command line of every stage at N (run in this order)."""
    ds, run = f"synth{n}", f"bench{n}"
    den, clf = work / "den.yaml", work / "clf.yaml"
    den.write_text(DEN_YAML)
    clf.write_text(CLF_YAML)
    ray_cpus = ["--ray-cpus", str(CPUS)]
    train = ["--store", store, "--dataset", ds, "--run", run, "--steps", str(steps),
             "--overwrite", "--threads", "1", *ray_cpus]  # fmt: skip
    samples = num_samples(n)
    return {
        "make_shards": ["jobs/make_shards.py", "--store", store, *ray_cpus, "--source", "synthetic",
                        "--num-images", str(n), "--image-size", str(IMAGE_SIZE), "--dataset", ds,
                        "--shard-size", "1000", "--no-progress"],
        "input_epoch": [__file__, "--input-epoch", store, ds],
        "train_denoiser": ["jobs/train_denoiser.py", *train, "--config", str(den)],
        "train_classifier": ["jobs/train_classifier.py", *train, "--config", str(clf),
                             "--holdout-images", str(classifier_holdout(n))],
        "build_index": ["jobs/build_index.py", "--store", store, "--dataset", ds, "--index", "ivf",
                        *ray_cpus],
        "sample_guarded": ["jobs/sample.py", "--store", store, "--run", run, "--sampler", "cpsample",
                           "--num-samples", str(samples), "--samples-per-shard",
                           str(min(SAMPLES_PER_SHARD, samples)), "--batch-size", "50",
                           "--steps", str(DDIM_STEPS), "--guard", "0.97", "--dataset", ds,
                           "--overwrite", "--concurrency", "1",
                           "--allow-unfit"],  # a few-step classifier: P8 measures cost, not protection
        "check_replicas": ["jobs/check_replicas.py", "--store", store, "--run", run, "--dataset", ds,
                           "--sampler", "cpsample"],
        "evaluate": ["jobs/evaluate.py", "--store", store, "--run", run, "--dataset", ds,
                     "--num-members", "32", "--num-nonmembers", "32", "--draws", "1",
                     "--max-holdout", "500", "--threads", "1"],
    }  # fmt: skip


def work_units(stage: str, n: int, result: dict) -> float | None:
    """The units of work a stage did at N (:data:`WORK`), None for fixed-work stages."""
    kind = WORK[stage]
    if kind == "images":
        return float(n)
    if kind == "train":
        return float(result["images"])
    if kind == "samples":
        return float(num_samples(n))
    return None


def stages_at(n: int, store: str, work: Path, steps: int, moto: MotoServer | None = None) -> dict:
    """Every stage at N: wall time, memory, work units (and, on S3, the requests it made)."""
    if "://" not in store:
        for sub in ("data", "indexes"):  # time a fresh write and a fresh build
            shutil.rmtree(Path(store) / sub / f"synth{n}", ignore_errors=True)
    out = {}
    for stage, cmd in stage_commands(n, store, work, steps).items():
        print(f"P8 N={n} {'S3 ' if moto else ''}{stage}", flush=True)
        seen = len(moto.lines()) if moto else 0
        tag = f"{stage}-{n}{'-s3' if moto else ''}"
        res = run_job(cmd, work / f"{tag}.log", env=moto.env if moto else None)
        if stage == "input_epoch":
            res.update(last_json(res["tail"]))
        res["units"] = work_units(stage, n, res)
        if moto:
            res["requests"] = count_requests(moto.lines()[seen:])
            if res["units"]:
                res["requests_per_unit"] = res["requests"]["total"] / res["units"]
        res.pop("tail")
        out[stage] = res
    return out


def stage_checks(per_n: dict[int, dict]) -> dict:
    """Per stage: memory at the largest size over the smallest, and the marginal time goal."""
    sizes = sorted(per_n)
    checks = {}
    for stage in per_n[sizes[0]]:
        checks[f"{stage}_memory"] = memory_ratios(
            per_n[sizes[0]][stage]["memory"], per_n[sizes[-1]][stage]["memory"]
        )
        if WORK[stage] is None:
            continue
        walls = {n: per_n[n][stage]["wall_s"] for n in sizes}
        units = {n: per_n[n][stage]["units"] for n in sizes}
        intervals = marginal_costs(walls, units)
        checks[f"{stage}_marginal_time"] = {
            **marginal_ratio(intervals), "unit": "sample" if WORK[stage] == "samples" else "image",
            "intervals": intervals, "startup_s": startup_s(walls, units),
        }  # fmt: skip
    return checks


def run_stages(base: Path, sizes: tuple[int, ...], steps: int) -> tuple[dict, dict]:
    """Every stage at every size on a local store: (results, checks)."""
    store = str(base / "store")
    per_n = {n: stages_at(n, store, base, steps) for n in sorted(sizes)}
    out = {"sizes": sorted(sizes), "steps": steps, "ddim_steps": DDIM_STEPS,
           "samples_per_image": SAMPLES_PER_IMAGE,
           "stages": {str(n): v for n, v in per_n.items()}}  # fmt: skip
    return out, stage_checks(per_n)


def run_s3(base: Path, n: int, steps: int, local: dict | None = None) -> dict:
    """Every stage at N on a moto S3 server: requests per unit of work, wall time and memory; with
    ``local`` (the same size's local results) the S3 / local wall-time ratio of each stage."""
    moto = MotoServer(base / "moto.log")
    try:
        moto.create_bucket("p8-bench")
        per_stage = stages_at(n, f"s3://p8-bench/p8-{n}", base, steps, moto)
    finally:
        moto.stop()
    if local:
        for stage, res in per_stage.items():
            if stage in local:
                res["wall_vs_local"] = res["wall_s"] / local[stage]["wall_s"]
    total = sum(r["requests"]["total"] for r in per_stage.values())
    return {"size": n, "stages": per_stage, "requests_total": total,
            "requests_per_image": total / n,
            "server": "moto_server (own process) on 127.0.0.1; counts from its request log"}  # fmt: skip


# ------------------------------------------------------------------------------------- the entry
def run(
    work: str | None = None,
    sizes: tuple[int, ...] = (20_000, 110_000, 200_000),
    index_n: int = 1_000_000,
    steps: int = 20,
    s3_size: int | None = 20_000,
    part_vectors: int = 10_000_000,
    part_size: int = 1_000_000,
    parts: tuple[str, ...] = ("stages", "s3", "index", "parts"),
    previous: dict | None = None,
) -> dict:
    """P8's results.json entry: ``parts`` measured now, merged over ``previous`` (an earlier entry,
    whose parts not measured now are kept with their own ``<part>_measured_at``)."""
    import p8_index

    base = Path(work or tempfile.mkdtemp(prefix="p8-"))
    base.mkdir(parents=True, exist_ok=True)
    result = {k: v for k, v in (previous or {}).items() if k not in LEGACY_KEYS}
    checks = dict(result.get("checks", {}))
    result.update(image_size=IMAGE_SIZE, cpus=CPUS)
    for part in parts:
        new: dict = {}
        if part == "stages":
            out, new = run_stages(base, sizes, steps)
        elif part == "s3":
            local = result.get("stages", {}).get(str(s3_size))
            out = {"s3": run_s3(base, s3_size or min(sizes), steps, local)}
        elif part == "index":
            out, new = p8_index.run_index(base, index_n)
        else:
            out, new = p8_index.run_parts(base, part_vectors, part_size)
        prefix = {"stages": "", "s3": "s3_", "index": "index_", "parts": "parts_"}[part]
        if prefix == "":  # the stage checks have no prefix: drop them all before new ones
            checks = {k: v for k, v in checks.items() if k.startswith(("index_", "parts_"))}
        elif new:
            checks = {k: v for k, v in checks.items() if not k.startswith(prefix)}
        checks.update(new)
        result.update(out)
        result[f"{part}_measured_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    result["checks"] = dict(sorted(checks.items()))
    result["all_met"] = all(c.get("met") is not False for c in checks.values())
    result["no_verdict"] = sorted(k for k, c in checks.items() if "met" in c and c["met"] is None)
    return result


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--input-epoch", nargs=2, metavar=("STORE", "DATASET"))
    p.add_argument("--work", help="scratch folder (default: a new temporary one)")
    p.add_argument("--sizes", type=int, nargs="+", default=[20_000, 110_000, 200_000])
    p.add_argument("--s3-size", type=int, default=20_000, help="N of the loopback S3 run")
    p.add_argument("--index-n", type=int, default=1_000_000)
    p.add_argument(
        "--part-vectors", type=int, default=10_000_000, help="vectors of the parts bench"
    )
    p.add_argument("--part-size", type=int, default=1_000_000, help="vectors per part task")
    p.add_argument("--steps", type=int, default=20, help="training steps (fixed at every N)")
    p.add_argument("--part", action="append", choices=["stages", "s3", "index", "parts"])
    p.add_argument("--out", help="merge the result into this results.json's P8 entry")
    args = p.parse_args()
    if args.input_epoch:
        input_epoch(*args.input_epoch)
        return
    if len(args.sizes) < 2:
        p.error("--sizes needs at least two sizes (three to check the marginal-time goal)")
    results = json.loads(Path(args.out).read_text()) if args.out else {}
    res = run(args.work, tuple(args.sizes), args.index_n, args.steps, args.s3_size,
              args.part_vectors, args.part_size, tuple(args.part or ("stages", "s3", "index", "parts")),
              previous=results.get("P8"))  # fmt: skip
    print(json.dumps(res, indent=2))
    if args.out:
        res["measured_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        res["machine"] = f"{os.uname().machine}, {os.cpu_count()} CPUs"
        results["P8"] = res
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
