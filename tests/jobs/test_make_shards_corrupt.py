"""The manifest make_shards writes, enforced: every job that reads a dataset checks its shards against
manifest.json before using them. (Named after make_shards: tests/test_layout.py wants a jobs/ script.)

A training shard is cut short, or overwritten by its first half plus garbage (same size: only the
sha256 tells), locally and on loopback S3. Each reading job, run as a real process, must exit 2 naming
the shard's URI, before any checkpoint or model is written. Ray Train (train_denoiser,
train_classifier) verifies with streamed sha256 in Ray tasks; the in-memory readers (evaluate,
check_replicas, sample --guard) hash the bytes they load. One case per job locally, both paths on S3.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch

from pipeline.core.config import UNetConfig
from pipeline.core.diffusion import linear_schedule
from pipeline.core.models import build_unet, save_denoiser
from pipeline.data.datasets import digits_source, split
from pipeline.data.provenance import dir_digest
from pipeline.data.storage import open_store
from pipeline.data.tars import build_tar, encode_png
from pipeline.orchestration.stages import make_shards

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = {  # tiny models for 8x8 grayscale images
    "train_denoiser": "unet: {sample_size: 8, channels: 1, block_out_channels: [8, 16], "
    "layers_per_block: 1, attention_levels: [], norm_num_groups: 8}\n",
    "train_classifier": "arch: {sample_size: 8, channels: 1, base_channels: 8, "
    "channel_mults: [1, 2], time_embed_dim: 8, num_groups: 4}\n",
}
TRAIN = ["--steps", "2", "--batch-size", "8", "--num-workers", "1", "--ray-cpus", "2"]


def corrupt(data: bytes, how: str) -> bytes:
    """``truncate``: the first half; ``garbage``: the first half plus garbage up to the same size."""
    half = data[: len(data) // 2]
    if how == "truncate":
        return half
    return half + (b"\x5a\xa5garbage" * len(data))[: len(data) - len(half)]


def job_args(job: str, store: str, tmp: Path, denoiser: str) -> list[str]:
    """The job's command line, with tiny settings (the check must fail it before any real work)."""
    common = ["--store", store, "--run", "r", "--dataset", "digits"]
    if job in CONFIGS:
        config = tmp / f"{job}.yaml"
        config.write_text(CONFIGS[job])
        extra = ["--holdout-images", "20"] if job == "train_classifier" else []
        return [*common, "--config", str(config), *TRAIN, *extra]
    if job == "evaluate":
        return [*common, "--num-members", "4", "--num-nonmembers", "4", "--threads", "1"]
    if job == "check_replicas":
        return [*common, "--sampler", "cpsample"]
    return [*common, "--sampler", "ddim", "--denoiser", denoiser, "--num-samples", "2",
            "--samples-per-shard", "2", "--steps", "2", "--guard", "0.99"]  # fmt: skip


def _pids_with(marker: str) -> list[int]:
    pids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit() and int(d.name) != os.getpid():
            with contextlib.suppress(OSError):
                if marker in (d / "cmdline").read_bytes().decode(errors="replace"):
                    pids.append(int(d.name))
    return pids


@pytest.fixture
def ray_tmp():
    """A short private RAY_TMPDIR for the job's own Ray; what is left of it is killed by pid."""
    tmp = tempfile.mkdtemp(prefix="rc", dir="/tmp")
    yield tmp
    deadline = time.time() + 30
    while (left := _pids_with(tmp)) and time.time() < deadline:
        for pid in left:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.5)
    shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture(scope="module")
def tiny_denoiser(tmp_path_factory) -> str:
    """A denoiser outside the store, for sample.py --guard."""
    root = tmp_path_factory.mktemp("den")
    torch.manual_seed(0)
    unet = build_unet(UNetConfig(sample_size=8, block_out_channels=(8, 16), norm_num_groups=8))
    save_denoiser(unet, root / "denoiser", {"unet": {}}, linear_schedule())
    return str(root / "denoiser")


def make_dataset(store_uri: str, denoiser: str | None = None) -> None:
    """8x8 digits with a manifest, 40 training and 60 held-out images in shards of 10; one sample
    shard (``samples/r/cpsample``) for check_replicas to score. ``denoiser``: put it in the store as
    run r's model, which drew the sample (evaluate attacks the run's own models)."""
    store = open_store(store_uri)
    train, holdout = split(digits_source(8).subset(range(100)), 40, 0)
    make_shards(store, "digits", train, holdout, shard_size=10)
    # a sample records the models that drew it (evaluate and check_replicas check that first)
    digest = "sha256:" + "0" * 64
    if denoiser is not None:
        store.put_dir(denoiser, "models", "r", "denoiser")
        digest = dir_digest(denoiser)
    record = {"provenance": {"denoiser": digest}, "run_fingerprint": "0" * 16}
    sample = build_tar([("s0", encode_png(train.images[0]), record)])
    store.write_bytes(sample, "samples", "r", "cpsample", "shard-000000.tar")


def run_job(job: str, args: list[str], ray_tmp: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "RAY_TMPDIR": ray_tmp, "PYTHONPATH": str(ROOT)}
    env.pop("RAY_ADDRESS", None)
    cmd = [sys.executable, str(ROOT / "jobs" / f"{job}.py"), *args]
    return subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)


def assert_refused(done: subprocess.CompletedProcess, uri: str) -> None:
    assert done.returncode == 2, done.stderr[-3000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and f"checksum mismatch for {uri}:" in errors[0], done.stderr[-3000:]


LOCAL_CASES = [  # (job, split, corruption): every reading job, both corruptions (train_denoiser's
    ("train_denoiser", "train", "truncate"),  # garbage-appended shard: the S3 case below)
    ("train_classifier", "holdout", "garbage"),  # the classifier trains on held-out images too
    ("evaluate", "train", "truncate"),
    ("check_replicas", "train", "garbage"),
    ("sample", "train", "truncate"),  # --guard reads the training images
]


@pytest.mark.parametrize(("job", "split_name", "how"), LOCAL_CASES)
def test_local_corrupt_shard_fails_the_job(tmp_path, ray_tmp, tiny_denoiser, job, split_name, how):
    store = tmp_path / "store"
    make_dataset(str(store), tiny_denoiser if job == "evaluate" else None)
    shard = store / "data" / "digits" / split_name / "shard-000001.tar"
    shard.write_bytes(corrupt(shard.read_bytes(), how))
    before = sorted(p.relative_to(store) for p in store.rglob("*"))
    done = run_job(job, job_args(job, str(store), tmp_path, tiny_denoiser), ray_tmp)
    assert_refused(done, str(shard))
    assert sorted(p.relative_to(store) for p in store.rglob("*")) == before  # nothing written


@pytest.mark.parametrize(("job", "how"), [("train_denoiser", "garbage"), ("evaluate", "truncate")])
def test_s3_corrupt_shard_fails_the_job(
    s3_bucket, s3_env, tmp_path, ray_tmp, tiny_denoiser, job, how
):
    """The Ray tasks stream the object through the store's S3 filesystem; evaluate reads it whole."""
    import boto3

    make_dataset(f"s3://{s3_bucket}/p", tiny_denoiser if job == "evaluate" else None)
    s3 = boto3.client("s3", endpoint_url=s3_env["AWS_ENDPOINT_URL"])
    key = "p/data/digits/train/shard-000002.tar"
    data = s3.get_object(Bucket=s3_bucket, Key=key)["Body"].read()
    s3.put_object(Bucket=s3_bucket, Key=key, Body=corrupt(data, how))

    def keys() -> list[str]:
        return sorted(o["Key"] for o in s3.list_objects_v2(Bucket=s3_bucket).get("Contents", []))

    before = keys()
    done = run_job(job, job_args(job, f"s3://{s3_bucket}/p", tmp_path, tiny_denoiser), ray_tmp)
    assert_refused(done, f"s3://{s3_bucket}/{key}")
    assert keys() == before  # nothing written
