"""jobs/sample.py as a real process: killed mid-run, then resumed, locally and on loopback S3.

The job starts its own private Ray (``RAY_TMPDIR`` points at a short folder of this test). After the
kill, every process whose command line names that folder is ended by its pid, and the test checks
that none is left.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch

from pipeline.core.config import SamplerConfig, UNetConfig
from pipeline.core.diffusion import linear_schedule
from pipeline.core.models import build_unet, save_denoiser
from pipeline.data.tars import read_tar
from pipeline.fanout.sampling import sample_key

ROOT = Path(__file__).resolve().parents[2]
N, PER_SHARD = 12, 2  # 6 shards


@pytest.fixture(scope="module")
def job_denoiser(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("den")
    torch.manual_seed(0)
    unet = build_unet(UNetConfig(sample_size=8, block_out_channels=(8, 16), norm_num_groups=8))
    save_denoiser(unet, root / "denoiser", {"unet": {}}, linear_schedule())
    return str(root / "denoiser")


@pytest.fixture(scope="module")
def unfit_classifier(tmp_path_factory) -> str:
    """An 8x8 classifier whose model card shows 60% of its own bits: below min_fit (90%)."""
    from pipeline.core.config import ClassifierArchConfig
    from pipeline.core.models import NoiseClassifier, save_classifier

    card = {"accuracy": 0.6, "mean_margin": 0.01, "t_range": [0, 100], "rows": 8, "seed": 0}
    arch = ClassifierArchConfig(8, 1, 8, (1, 2), time_embed_dim=8, num_groups=4)
    path = tmp_path_factory.mktemp("clf") / "clf"
    save_classifier(NoiseClassifier(arch), path, {"fit": card})
    return str(path)


def _ray_procs(marker: str) -> list[int]:
    pids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if marker in (d / "cmdline").read_bytes().decode(errors="replace"):
                    pids.append(int(d.name))
            except OSError:
                continue
    return pids


def _reap(marker: str) -> int:
    """SIGKILL, by pid, every process whose command line names ``marker`` (this test's own Ray temp
    folder); returns how many there were and checks that none survives."""
    pids = _ray_procs(marker)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    deadline = time.time() + 30
    while _ray_procs(marker) and time.time() < deadline:
        time.sleep(0.5)
    assert _ray_procs(marker) == [], "Ray processes of the killed job were left running"
    return len(pids)


@pytest.fixture
def ray_tmp():
    """A short private RAY_TMPDIR; afterwards no process that names it may survive."""
    tmp = tempfile.mkdtemp(prefix="r5", dir="/tmp")
    yield tmp
    _reap(tmp)


def _job(store: str, den: str, ray_tmp: str) -> tuple[list[str], dict[str, str]]:
    cmd = [
        sys.executable, str(ROOT / "jobs" / "sample.py"), "--store", store, "--run", "r",
        "--sampler", "ddim", "--denoiser", den, "--num-samples", str(N),
        "--samples-per-shard", str(PER_SHARD), "--batch-size", "2", "--steps", "60",
        "--concurrency", "1",
    ]  # fmt: skip
    env = {**os.environ, "RAY_TMPDIR": ray_tmp, "PYTHONPATH": str(ROOT)}
    env.pop("RAY_ADDRESS", None)
    return cmd, env


def _kill_after_first_shard(cmd, env, list_shards, sig: int) -> int:
    """Start the job, kill its process group with ``sig`` once a shard exists; shards seen then."""
    proc = subprocess.Popen(
        cmd, env=env, cwd=ROOT, start_new_session=True,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    deadline = time.time() + 400
    try:
        while not list_shards():
            assert proc.poll() is None, "the job ended before writing a shard"
            assert time.time() < deadline, "no shard after 400 s"
            time.sleep(0.05)
        os.killpg(proc.pid, sig)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return len(list_shards())


def _resume(cmd, env) -> dict:
    """Rerun the job after removing what the kill left of its Ray (raylet, GCS, workers)."""
    _reap(env["RAY_TMPDIR"])
    for _ in range(2):
        done = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
        # Ray gives its raylet a fixed 30 s to start; a heavily loaded shared machine can miss it
        if done.returncode == 0 or "timed out during startup" not in done.stderr:
            break
        _reap(env["RAY_TMPDIR"])
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def _check_complete(tars: dict[str, bytes], sampler: str) -> None:
    """Exactly N samples, every expected key once, every shard a complete tar."""
    assert sorted(tars) == [f"shard-{s:06d}.tar" for s in range(N // PER_SHARD)]
    keys = [k for name, data in sorted(tars.items()) for k in read_tar(data, name).keys]
    assert len(keys) == N == len(set(keys))
    expected = [sample_key(sampler, s, i) for s in range(N // PER_SHARD) for i in range(PER_SHARD)]
    assert keys == expected


@pytest.mark.slow
def test_sigkilled_job_on_loopback_s3_resumes_to_exactly_n_samples(
    s3_bucket, s3_env, job_denoiser, unfit_classifier, ray_tmp
):
    """SIGKILL (no clean-up at all) after the first shard lands in S3, rerun: exactly N samples, no
    duplicated, stray or partial object. (One test covers both the local-rename and the S3-PUT paths'
    contract, because atomicity is the storage layer's and is tested there for both.) The job is
    CPSample with a classifier below min_fit and ``--allow-unfit``: both runs sample with it (the
    refusal without the flag: test_allow_unfit_flag_refuses_a_classifier_below_min_fit)."""
    import boto3

    s3 = boto3.client("s3", endpoint_url=s3_env["AWS_ENDPOINT_URL"])
    prefix = "batch/samples/r/cpsample/"
    cmd, env = _job(f"s3://{s3_bucket}/batch", job_denoiser, ray_tmp)
    cmd = [*cmd, "--sampler", "cpsample", "--classifier", unfit_classifier, "--allow-unfit"]

    def objects() -> list[str]:
        listed = s3.list_objects_v2(Bucket=s3_bucket, Prefix=prefix).get("Contents", [])
        return sorted(o["Key"] for o in listed)

    seen = _kill_after_first_shard(cmd, env, objects, signal.SIGKILL)
    assert 1 <= seen <= N // PER_SHARD
    out = _resume(cmd, env)
    assert out["num_samples"] == N and out["skipped_shards"] >= seen
    names = objects()
    assert len(names) == len(set(names)) == N // PER_SHARD  # no stray or duplicated objects
    tars = {
        k.rsplit("/", 1)[-1]: s3.get_object(Bucket=s3_bucket, Key=k)["Body"].read() for k in names
    }
    _check_complete(tars, "cpsample")
    report = json.loads(
        s3.get_object(Bucket=s3_bucket, Key="batch/reports/r/report.json")["Body"].read()
    )
    assert report["sampling"]["cpsample"]["num_samples"] == N
    # the plain settings beside the digests, and the report's inputs: these models, these samples
    settings = report["sampling"]["cpsample"]["sampler_settings"]
    assert settings["steps"] == 60 and settings["alpha"] == SamplerConfig().alpha  # the default
    inputs = report["inputs"]
    assert sorted(inputs) == ["classifier", "denoiser", "package_version", "samples"]
    assert inputs["denoiser"] == out["provenance"]["denoiser"]
    assert inputs["classifier"] == out["provenance"]["classifier"]
    assert list(inputs["samples"]) == ["cpsample"]
    md = s3.get_object(Bucket=s3_bucket, Key="batch/reports/r/report.md")["Body"].read().decode()
    assert "## Sampling: cpsample" in md and f"- num_samples: {N}" in md


@pytest.mark.parametrize(
    "script, args, message",
    [
        ("sample.py", ["--guard", "1.5"], "guard must be a cosine similarity in [-1, 1]"),
        ("sample.py", ["--guard-budget", "-1"], "guard_budget must be >= 0"),
        ("check_replicas.py", ["--recall-queries", "0"], "recall_queries must be > 0"),
        ("check_replicas.py", [], "no sample shards under"),
        ("sample.py", ["--prompts", "p.txt"], "--prompts and --prompts-from are for latent models"),
        ("sample.py", ["--model", "sd"], "exactly one of --prompts FILE or --prompts-from"),
        ("sample.py", ["--model", "sd", "--prompts-from", "nope"], "has no captions"),
        ("sample.py", ["--model", "sd", "--denoiser", "d"], "either --model"),
        ("sample.py", ["--model", "sd", "--prompts", "/dev/null"], "at least one prompt"),
    ],
)
def test_jobs_reject_bad_guard_and_replica_input(tmp_path, script, args, message):
    store = tmp_path / "store"
    done = subprocess.run(
        [sys.executable, str(ROOT / "jobs" / script), "--store", str(store), *args],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr[-2000:]
    assert message in done.stderr and "Traceback" not in done.stderr
    assert not (store / "samples").exists() and not (store / "reports").exists()


def test_sample_with_a_missing_prompts_file_exits_2_in_one_line_and_writes_nothing(tmp_path):
    """The prompts file is read before the store is opened: before, the --store folder was created
    first and the missing file ended in a traceback (exit 1)."""
    store = tmp_path / "store"
    cmd = [sys.executable, str(ROOT / "jobs" / "sample.py"), "--store", str(store),
           "--model", "sd", "--prompts", str(tmp_path / "missing.txt")]  # fmt: skip
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr[-2000:]
    assert done.stderr.splitlines() == [
        f"error: --prompts {tmp_path / 'missing.txt'}: no such file (one prompt per line)"
    ]
    assert not store.exists()


def test_allow_unfit_flag_refuses_a_classifier_below_min_fit(
    tmp_path, job_denoiser, unfit_classifier, ray_tmp
):
    """--allow-unfit maps to SamplerConfig.allow_unfit: a classifier whose model card shows 60% of
    its own bits is refused without it (exit 2, one line, before Ray starts). With it the job samples:
    the SIGKILL test above runs both of its jobs with the flag and this classifier."""
    cmd, env = _job(str(tmp_path / "store"), job_denoiser, ray_tmp)
    cmd = [*cmd, "--sampler", "cpsample", "--classifier", unfit_classifier, "--steps", "2",
           "--num-samples", "2"]  # fmt: skip
    done = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    errors = [x for x in done.stderr.splitlines() if x.startswith("error:")]
    assert done.returncode == 2 and len(errors) == 1, done.stderr[-3000:]
    assert "below min_fit 90%" in errors[0] and "--allow-unfit" in errors[0]
    assert not (tmp_path / "store" / "samples").exists()
