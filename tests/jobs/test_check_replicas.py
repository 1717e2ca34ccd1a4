"""jobs/check_replicas.py end to end as a subprocess: per-shard parts and the summary it prints,
and --use-gpu refused up front on a Ray without GPUs (the resume paths:
tests/fanout/test_scoring_stream.py and tests/orchestration/test_replica_report.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from pipeline.data.imageset import ImageSet
from pipeline.data.shards import write_image_shards
from pipeline.data.storage import open_store
from pipeline.fanout.resume import run_fingerprint

ROOT = Path(__file__).resolve().parents[2]
PROV = {"sampler": "sha256:" + "a" * 64, "denoiser": "sha256:" + "d" * 64}


def _job(store_dir: Path, *extra: str) -> subprocess.CompletedProcess:
    args = ["--store", str(store_dir), "--run", "q", "--dataset", "r", "--sampler", "ddim"]
    env = {**os.environ, "RAY_ADDRESS": "", "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, str(ROOT / "jobs" / "check_replicas.py"), *args, *extra],
        capture_output=True, text=True, timeout=300, env=env, cwd=ROOT,
    )  # fmt: skip


def test_check_replicas_writes_parts_and_refuses_a_gpu_it_cannot_get(tmp_path):
    rng = np.random.default_rng(9)
    store = open_store(str(tmp_path / "s"))
    train = rng.integers(0, 256, (30, 8, 8, 1), dtype=np.uint8)
    write_image_shards(store, "data/r/train", ImageSet([f"t-{i}" for i in range(30)], train), 15)
    samples = np.concatenate([train[:3], rng.integers(0, 256, (9, 8, 8, 1), dtype=np.uint8)])
    meta = [{"provenance": PROV, "run_fingerprint": run_fingerprint(PROV)}] * 12
    keys = [f"ddim-{i:06d}" for i in range(12)]
    write_image_shards(store, "samples/q/ddim", ImageSet(keys, samples, meta=meta), 4)

    done = _job(tmp_path / "s", "--threshold", "0.99", "--pairs-k", "2")
    assert done.returncode == 0, done.stderr[-2000:]
    printed = json.loads(done.stdout.strip().splitlines()[-1])
    assert printed["per_sample"] == "replicas-ddim/" and printed["num_shards"] == 3
    assert printed["num_samples"] == 12 and printed["replication_rate"] == 3 / 12
    parts = store.listdir("reports", "q", "replicas-ddim")
    assert parts == [f"shard-{i:06d}.{x}" for i in range(3) for x in ("jsonl", "summary.json")]
    report = store.read_bytes("reports", "q", "report.json")
    gpu = _job(tmp_path / "s", "--use-gpu")
    assert gpu.returncode == 2
    assert "error: use_gpu: the scorers ask for a GPU each" in gpu.stderr.strip().splitlines()[-1]
    assert store.read_bytes("reports", "q", "report.json") == report  # nothing written
    assert store.listdir("reports", "q", "replicas-ddim") == parts
