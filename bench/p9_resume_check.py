"""P9: the driver's resume check of a finished sampling run, at 100k and 1M samples.

    python bench/run.py --only P9
    python bench/p9_resume_check.py --sizes 10000 100000 --work /tmp/p9     # a quick look

A rerun of ``jobs/sample.py`` reads the records of every shard already in its output folder in the
driver (:func:`pipeline.fanout.resume.completed_shards`, 8 shards at a time, no image decoded) and sends
only the incomplete shards to the actor pool. This measures that pass where it is heaviest, a finished
run: every shard is read. For each size N it writes N samples as real sample shards (1,000 per shard, a
16x16 PNG and the record each sample of a ``ddim`` run carries) into a local store, then runs the check
in a fresh process and records its wall time and that process's peak RSS.

Goals: every shard found complete; the checking process's peak RSS at the largest N <= 1.25x that at the
smallest (the driver holds 8 shards, not N samples); its time per sample at the largest N <= 1.25x that at
the smallest.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

PER_SHARD = 1000
CHECK = """
import json, resource, sys, time
from pipeline.core.config import SamplerConfig
from pipeline.data.storage import open_store
from pipeline.fanout.resume import completed_shards
from pipeline.fanout.sampling import shard_plan
store, n, fingerprint = open_store(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
cfg = SamplerConfig(sampler="ddim", num_samples=n, samples_per_shard=int(sys.argv[4]))
t0 = time.perf_counter()
done = completed_shards(store, "samples/p9/ddim", shard_plan(n, cfg.samples_per_shard), cfg, fingerprint)
wall = time.perf_counter() - t0
print(json.dumps({"wall_s": wall, "complete_shards": len(done),
                  "samples": sum(int(r["shipped"]) for r in done.values()),
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def write_run(store_root: Path, n: int) -> str:
    """N samples of a finished ``ddim`` run under ``samples/p9/ddim``; returns its fingerprint."""
    import numpy as np

    from pipeline.core.config import SamplerConfig
    from pipeline.data.shards import shard_name
    from pipeline.data.storage import open_store
    from pipeline.data.tars import build_tar, encode_png
    from pipeline.fanout.resume import run_fingerprint, sample_key, sampling_provenance
    from pipeline.fanout.sampling import shard_plan

    cfg = SamplerConfig(sampler="ddim", num_samples=n, samples_per_shard=PER_SHARD)
    provenance = sampling_provenance(cfg, "sha256:" + "d" * 64, None)
    fingerprint = run_fingerprint(provenance)
    store = open_store(str(store_root))
    rng = np.random.default_rng(0)
    pngs = [encode_png(rng.integers(0, 256, (16, 16, 1), dtype=np.uint8)) for _ in range(64)]
    for entry in shard_plan(n, PER_SHARD):
        shard, count = entry["shard"], entry["count"]
        records = []
        for i in range(count):
            meta = {
                "seed": shard * PER_SHARD + i, "shard": shard, "index": i, "attempt": 0,
                "sampler": "ddim", "steps": cfg.steps, "guidance_steps_fired": 0, "final_p": None,
                "provenance": provenance, "run_fingerprint": fingerprint, "shard_members": count,
                "shard_planned": count, "shard_rejected": 0, "shard_seconds": 1.0,
            }  # fmt: skip
            records.append((sample_key("ddim", shard, i), pngs[i % len(pngs)], meta))
        store.write_bytes(build_tar(records), "samples", "p9", "ddim", shard_name(shard))
    return fingerprint


def measure(work: Path, n: int) -> dict:
    root = work / f"store-{n}"
    shutil.rmtree(root, ignore_errors=True)
    t0 = time.perf_counter()
    fingerprint = write_run(root, n)
    written = time.perf_counter() - t0
    size = sum(p.stat().st_size for p in (root / "samples").rglob("*.tar"))
    out = subprocess.run(
        [sys.executable, "-c", CHECK, str(root), str(n), fingerprint, str(PER_SHARD)],
        capture_output=True, text=True, check=True, cwd=HERE.parent,
    )  # fmt: skip
    res = json.loads(out.stdout.strip().splitlines()[-1])
    shutil.rmtree(root, ignore_errors=True)
    return {**res, "shards": -(-n // PER_SHARD), "bytes": size, "write_s": written,
            "us_per_sample": res["wall_s"] / n * 1e6}  # fmt: skip


def run(sizes: tuple[int, ...] = (100_000, 1_000_000), work: str | None = None) -> dict:
    base = Path(work or tempfile.mkdtemp(prefix="p9-"))
    base.mkdir(parents=True, exist_ok=True)
    per_n = {}
    for n in sorted(sizes):
        print(f"--> P9 at {n} samples", flush=True)
        per_n[n] = measure(base, n)
        print(json.dumps(per_n[n]), flush=True)
    small, large = per_n[min(per_n)], per_n[max(per_n)]
    checks = {
        "all_complete": all(r["samples"] == n for n, r in per_n.items()),
        "rss_ratio": large["peak_rss_mb"] / small["peak_rss_mb"],
        "time_per_sample_ratio": large["us_per_sample"] / small["us_per_sample"],
    }
    checks["rss_bounded"] = checks["rss_ratio"] <= 1.25
    checks["time_linear"] = checks["time_per_sample_ratio"] <= 1.25
    return {
        "sizes": {str(n): r for n, r in per_n.items()},
        "samples_per_shard": PER_SHARD,
        "threads": 8,
        "store": "local folder",
        "checks": checks,
    }


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    p.add_argument("--work", help="scratch folder (default: a new temporary one)")
    args = p.parse_args()
    print(json.dumps(run(tuple(args.sizes), args.work), indent=2))


if __name__ == "__main__":
    main()
